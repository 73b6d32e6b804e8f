"""Running batches of clips for the `features` stage: in this process or a pool of worker processes.

``plan_batches`` cuts a list of clips into batches (each saved as one file by the batch function, see
feature_parts.py); ``run_batches`` computes them one after the other in this process (on one thread, as a
worker would) or in a pool, with a progress bar; ``Runner`` holds how this process runs: its part of the
work (sharding.Shard), its workers and their pool, --strict.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clotho_retrieve.sharding import Shard
from clotho_retrieve.utils import ClothoRetrieveError

MAX_BATCH_CLIPS = 256  # clips per batch file
MAX_BATCH_BYTES = 64 << 20  # source bytes per batch (bounds a worker's memory and the work a kill loses)

Record = Callable[[str, "str | None"], None]  # called with (name, skip reason) as each clip finishes
# batch_fn(batch, *args, record=None) -> [(name, skip reason)]: computes and saves one batch
BatchFn = Callable[..., list[tuple[str, "str | None"]]]


def init_worker(main_pid: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)  # one clip per process; processes give the parallelism
    if main_pid is not None:  # a pool worker: never outlive the run (kill -9 included)
        from clotho_retrieve.safety import die_with_parent, end_with

        die_with_parent()
        end_with(main_pid)


class LazyPool:
    """A process pool started on first use and shared by the jobs of one run (workers start slowly)."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def get(self):
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        if self.pool is None:
            # forkserver: a clean server process imports torch once, workers fork from it (fast start;
            # forking this process instead could hang the child if torch already started OpenMP threads).
            ctx = get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "clotho_retrieve.features"])
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=init_worker,
                                            initargs=(os.getpid(),))
        return self.pool

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
            self.pool = None


@dataclass
class Runner:
    """How this process computes: its part of every job, its workers (and their pool), --strict."""

    shard: Shard
    workers: int
    strict: bool = False
    pool: LazyPool | None = None

    def __post_init__(self) -> None:
        if self.pool is None:
            self.pool = LazyPool(self.workers)


def plan_batches(todo: list[tuple[str, Path, int]], workers: int) -> list[list[tuple[str, Path]]]:
    """(name, path, source bytes) -> consecutive batches of (name, path): at most MAX_BATCH_CLIPS clips and
    MAX_BATCH_BYTES bytes, and at least 4 batches per worker when there are enough clips (balance)."""
    per = max(1, min(MAX_BATCH_CLIPS, math.ceil(len(todo) / (4 * workers))))
    batches: list[list[tuple[str, Path]]] = []
    size = 0
    for name, path, nbytes in todo:
        if not batches or len(batches[-1]) >= per or size + nbytes > MAX_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append((name, path))
        size += nbytes
    return batches


def _speed_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ClipsPerSecond(ProgressColumn):
        def render(self, task) -> Text:  # clips computed in this run per second of its wall time
            done = task.completed - task.fields.get("resumed", 0)
            rate = done / task.elapsed if task.elapsed and done else None
            return Text(f"{rate:.1f} clips/s" if rate else "- clips/s", style="cyan")

    return ClipsPerSecond()


def _run_here(batches, batch_fn: BatchFn, args: tuple, record: Record) -> None:
    """The batches in this process, one thread (as a worker would), one after the other."""
    import torch

    threads = torch.get_num_threads()
    init_worker()
    try:
        for batch in batches:
            batch_fn(batch, *args, record=record)
    finally:
        torch.set_num_threads(threads)


def _run_in_pool(batches, batch_fn: BatchFn, args: tuple, record: Record, runner: Runner, out: Path) -> None:
    """The batches in the pool's worker processes, a bounded number in flight at a time."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    pending = set()
    try:
        for batch in batches:
            pending.add(runner.pool.get().submit(batch_fn, batch, *args))
            if len(pending) >= 2 * runner.workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    for name, reason in fut.result():
                        record(name, reason)
        for fut in wait(pending).done:
            for name, reason in fut.result():
                record(name, reason)
    except BrokenProcessPool:
        raise ClothoRetrieveError(
            f"{out}: a worker process died (out of memory?); re-run to resume, perhaps with fewer --workers"
        ) from None
    except BaseException:
        runner.pool.close(cancel=True)
        raise


def run_batches(out: Path, todo: list[tuple[str, Path, int]], total: int, batch_fn: BatchFn, args: tuple,
                runner: Runner) -> None:
    """Compute ``todo`` (name, path, source bytes) with ``batch_fn(batch, *args)``, with a progress bar
    over ``total`` clips (those already done count as resumed). A skipped clip ends the run with --strict."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from clotho_retrieve.utils import err_console

    part = "" if runner.shard.is_single else f" (part {runner.shard.label})"
    progress = Progress(
        TextColumn(f"features {out.name}{part}"), BarColumn(), MofNCompleteColumn(), _speed_column(),
        TimeRemainingColumn(), console=err_console, transient=False,
        refresh_per_second=2,  # each refresh renders the bar: at rich's default 10/s, a few % of a core
    )
    with progress:
        resumed = total - len(todo)  # reused from the old file or from batches of a killed run
        task = progress.add_task("", total=total, completed=resumed, resumed=resumed)

        def record(name: str, reason: str | None) -> None:
            if reason is not None and runner.strict:
                raise ClothoRetrieveError(f"{name}: {reason} (--strict)")
            progress.advance(task)

        batches = plan_batches(todo, runner.workers)
        if runner.workers == 1 or len(batches) == 1:
            _run_here(batches, batch_fn, args, record)
        elif batches:
            _run_in_pool(batches, batch_fn, args, record, runner, out)
