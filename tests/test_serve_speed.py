"""`serve`'s speed pieces on their own: text workers that run batches side by side, the query cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from clotho_retrieve.serve.batcher import Batcher
from clotho_retrieve.serve.cache import QueryCache


def test_batcher_workers_run_batches_at_the_same_time():
    """Two workers: a second batch starts while the first is still running (a barrier both must reach),
    every caller still gets its own answer, and close() stops both."""
    barrier = threading.Barrier(2, timeout=5)

    def fn(items):
        if items[0] in (0, 1):
            barrier.wait()  # raises BrokenBarrierError unless the other batch runs meanwhile
        return [x + 100 for x in items]

    batcher = Batcher(fn, max_batch=1, workers=2)
    futures = [batcher.submit(i) for i in range(8)]
    assert [f.result(10) for f in futures] == list(range(100, 108))
    assert batcher.items == 8 and batcher.batches == 8
    batcher.close()
    assert not any(t.is_alive() for t in batcher._threads)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(0)


def test_query_cache_encodes_each_text_once_and_forgets_the_oldest():
    calls = []

    def encode(texts):  # (B, 2): a vector that names its text
        calls.append(list(texts))
        return np.array([[len(t), ord(t[0])] for t in texts], np.float32)

    cache = QueryCache(encode, size=2)
    np.testing.assert_array_equal(cache(["ab", "c"]), encode(["ab", "c"]))
    calls.clear()
    np.testing.assert_array_equal(cache(["c", "dddd", "ab"]), [[1, 99], [4, 100], [2, 97]])
    assert calls == [["dddd"]]  # "c" and "ab" were kept (and used: "c" is now the oldest)
    assert cache.stats() == {"size": 2, "held": 2, "hits": 2, "misses": 3}
    calls.clear()
    cache(["ab"]), cache(["c"])  # "dddd" pushed "c" out
    assert calls == [["c"]] and cache.stats()["hits"] == 3
    off = QueryCache(encode, size=0)
    off(["x"]), off(["x"])
    assert off.stats() == {"size": 0, "held": 0, "hits": 0, "misses": 2}


def test_batcher_hands_out_each_result_as_soon_as_it_is_yielded():
    """fn may yield results one by one: the first caller is answered while the rest are still being made,
    and an error part-way reaches only the callers not yet answered."""
    second, taken = threading.Event(), threading.Event()

    def fn(items):
        taken.set()
        yield items[0] * 10
        second.wait(5)  # released only once the first caller has its answer
        for x in items[1:]:
            if x == "boom":
                raise ValueError("boom")
            yield x * 10

    batcher = Batcher(fn, max_batch=8)
    gate = batcher.submit(0)  # the worker runs this one alone while the others queue up
    first, rest = batcher.submit(1), [batcher.submit(i) for i in (2, 3)]
    assert gate.result(5) == 0
    second.set()
    assert first.result(5) == 10 and [f.result(5) for f in rest] == [20, 30]
    second.clear()
    taken.clear()
    blocker = batcher.submit(7)  # occupies the worker until `second` is set
    assert taken.wait(5)
    futures = [batcher.submit(x) for x in (4, "boom", 6)]
    assert blocker.result(5) == 70
    second.set()
    assert futures[0].result(5) == 40
    for f in futures[1:]:
        with pytest.raises(ValueError, match="boom"):
            f.result(5)
    short = Batcher(lambda items: iter([]))
    with pytest.raises(RuntimeError, match="fewer results"):
        short.submit(1).result(5)
    batcher.close()
    short.close()
