"""Micro-batching: concurrent requests for one model are served by worker threads, a batch at a time.

A text query costs the text tower one forward pass whose time grows slowly with the batch (8 short
queries cost the int8 MiniLM tower about 5x one), so under load a worker takes every request waiting, up
to ``max_batch``, and answers them together; with one request waiting it runs at once (no added delay:
the batch is what queued while the workers were busy). Each result goes to its caller as soon as the
batch function gives it (it may yield them one by one). Workers keep model calls off the event loop;
several of them (one per core) let one batch be encoded while another is searched, as onnxruntime and
FAISS release the GIL.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future

_MISSING = object()


class Batcher:
    """Calls ``fn(items) -> results`` (same length, same order) on batches of submitted items, in
    ``workers`` threads; each first calls ``init()`` (settings that belong to a thread, e.g. OpenMP's)."""

    def __init__(
        self,
        fn: Callable[[list], Iterable],
        max_batch: int = 32,
        name: str = "batcher",
        workers: int = 1,
        init: Callable[[], None] | None = None,
    ):
        self.fn, self.init = fn, init
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._count = threading.Lock()
        self.batches = 0  # batches run, and items in them (their ratio: the mean batch size)
        self.items = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, item) -> Future:
        if self._closed:
            raise RuntimeError("batcher is closed")
        fut: Future = Future()
        self._queue.put((item, fut))
        return fut

    def _work(self) -> None:
        if self.init is not None:
            self.init()
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.put(None)  # for the other workers
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            batch = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            with self._count:
                self.batches += 1
                self.items += len(batch)
            self._run(batch)

    def _run(self, batch: list) -> None:
        """Hand each caller its result as soon as ``fn`` gives it (``fn`` may return a list, or yield the
        results one by one); an exception goes to every caller still waiting, and the worker serves on."""
        done = 0
        try:
            results = iter(self.fn([item for item, _ in batch]))
            for _, fut in batch:
                result = next(results, _MISSING)
                if result is _MISSING:
                    raise RuntimeError(f"batcher: fewer results than the {len(batch)} items of a batch")
                fut.set_result(result)
                done += 1
        except Exception as exc:
            for _, fut in batch[done:]:
                fut.set_exception(exc)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)  # each worker that sees it puts it back for the next one
            for thread in self._threads:
                thread.join(timeout=10)
