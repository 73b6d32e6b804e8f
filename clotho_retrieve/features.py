"""The `features` stage: sources of audio in, one HDF5 features file per job out, resumable and parallel.

A ``Job`` is one output file: the clips to compute in order (names, paths, captions) and the problems
found before decoding. Jobs come from a source (datasets/clotho.py: one per split of a Clotho root;
datasets/folder.py: one for a folder of audio). ``run_job`` computes one:

1. An existing output with the same front end is reused: clips whose source has the recorded size and
   mtime are copied from it, files that were skipped and have not changed stay skipped; when nothing at
   all changed, nothing is written.
2. Every other clip is decoded and transformed (frontend.decode_log_mel) by a pool of worker processes
   into a shard beside the output (``.OUT.DIGEST.work/<hash>.npz``, or ``.skip`` with the reason), saved
   atomically: a killed run resumes from its shards.
3. The file is assembled in the job's order (feature_file.write_feature_file: temporary name, then
   rename) and the shards are removed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clotho_retrieve.feature_file import UNKNOWN, FeatureFile, source_signature, write_feature_file
from clotho_retrieve.frontend import PRESETS, FrontEnd, decode_log_mel
from clotho_retrieve.utils import ClothoRetrieveError


@dataclass
class FeaturesConfig:
    """Settings of one `features` run (saved as features_config.json beside the output)."""

    preset: str = "paper"
    overrides: dict = dataclasses.field(default_factory=dict)  # FrontEnd fields that replace the preset's
    workers: int = 0  # 0: all cores
    strict: bool = False
    allow_missing_captions: bool = False  # a captions CSV without some of caption_1..5: warn, not refuse

    def front_end(self) -> FrontEnd:
        if self.preset not in PRESETS:
            raise ClothoRetrieveError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[self.preset], **self.overrides)


@dataclass
class Job:
    """One output HDF5 file: the clips to compute, in order, and the problems found before decoding."""

    out: Path
    names: list[str]
    paths: list[Path]
    captions: list[list[str]]
    skipped: list[tuple[str, str]]
    attrs: dict


# ----------------------------------------------------------------------------------------------
# Shards: one clip's result, saved atomically beside the output
# ----------------------------------------------------------------------------------------------
def _work_dir(out: Path, front_end: FrontEnd) -> Path:
    """Shard folder beside the output, specific to the front end (a changed front end starts afresh)."""
    import hashlib
    import json

    digest = hashlib.sha1(json.dumps(front_end.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return out.parent / f".{out.name}.{digest}.work"


def _shard_name(name: str) -> str:
    import hashlib

    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:20]


def _init_worker(main_pid: int | None = None) -> None:
    import torch

    torch.set_num_threads(1)  # one clip per process; processes give the parallelism
    if main_pid is not None:  # a pool worker: never outlive the run (kill -9 included)
        from clotho_retrieve.safety import die_with_parent, end_with

        die_with_parent()
        end_with(main_pid)


def _compute_shard(name: str, path: Path, work: Path, front_end: FrontEnd) -> tuple[str, str | None]:
    """Compute one clip and save its shard atomically: <hash>.npz (features) or <hash>.skip (reason).

    Both record the source's signature taken before decoding, so a file changed meanwhile is redone.
    """
    import json

    from clotho_retrieve.safety import writes
    from clotho_retrieve.utils import atomic_path

    key = _shard_name(name)
    signature = np.full(2, UNKNOWN, np.int64)
    try:
        signature = source_signature(path)
        mel, duration = decode_log_mel(path, front_end)
    except ClothoRetrieveError as exc:
        reason = str(exc)
    except Exception as exc:  # never let one file end the run; report it in the skip table
        reason = f"failed ({type(exc).__name__}: {exc})"
    else:
        with writes(work, "the work files", mel.nbytes):  # a full disk: one line, as NoSpace
            with atomic_path(work / f"{key}.npz", suffix=".part") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, mel=mel, duration=np.float64(duration), signature=signature)
        (work / f"{key}.skip").unlink(missing_ok=True)  # an older version of the file was unreadable
        return name, None
    with writes(work, "the work files", 4096), atomic_path(work / f"{key}.skip", suffix=".part") as tmp:
        record = {"name": name, "reason": reason, "signature": signature.tolist()}
        tmp.write_text(json.dumps(record), encoding="utf-8")
    (work / f"{key}.npz").unlink(missing_ok=True)
    return name, reason


def _no_space_for_work(job: Job, work: Path, left: int) -> ClothoRetrieveError:
    """The disk filled up while computing: estimate what the rest of the job needs from the shards so far
    (those of the clips left, then the output, about as large as all its clips' shards)."""
    from clotho_retrieve.safety import no_space

    sizes = [p.stat().st_size for p in work.glob("*.npz")]
    per_clip = sum(sizes) / len(sizes) if sizes else 0
    needed = int(per_clip * (left + len(job.names)))
    return no_space(job.out, needed or None, f"the features of {left} more clips and the file itself")


def _finished(name: str, path: Path, work: Path) -> tuple[bool, str | None]:
    """(done, skip reason) from an existing shard; a shard of an older version of the file is redone."""
    import json

    key = _shard_name(name)
    try:
        now = source_signature(path)
    except OSError:
        return False, None  # gone since the listing: computing it records why
    for shard in (work / f"{key}.skip", work / f"{key}.npz"):
        if not shard.is_file():
            continue
        try:
            if shard.suffix == ".skip":
                record = json.loads(shard.read_text(encoding="utf-8"))
                return (True, record["reason"]) if record.get("signature") == now.tolist() else (False, None)
            with np.load(shard, allow_pickle=False) as z:
                return bool(np.array_equal(z["signature"], now)), None
        except (OSError, ValueError, KeyError):
            shard.unlink()
    return False, None


def _shard(work: Path, name: str) -> tuple[np.ndarray | None, float, np.ndarray, str | None]:
    """(mel or None, duration, signature, skip reason) of a finished clip's shard."""
    import json

    key = _shard_name(name)
    if (work / f"{key}.skip").is_file():
        record = json.loads((work / f"{key}.skip").read_text(encoding="utf-8"))
        return None, 0.0, np.asarray(record["signature"], np.int64), record["reason"]
    with np.load(work / f"{key}.npz", allow_pickle=False) as z:
        return z["mel"], float(z["duration"]), z["signature"], None


# ----------------------------------------------------------------------------------------------
# Reusing an existing output
# ----------------------------------------------------------------------------------------------
@dataclass
class _Reuse:
    """What an existing output still holds for a job (nothing when there is no output yet)."""

    existing: FeatureFile | None = None
    clips: dict[str, int] = field(default_factory=dict)  # name -> index in existing (features to copy)
    skips: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # name -> (reason, signature)
    removed: int = 0  # clips of the existing output that the job no longer lists

    def __len__(self) -> int:
        return len(self.clips) + len(self.skips)


def _reusable(job: Job, existing: FeatureFile) -> tuple[dict[str, int], dict[str, tuple[str, np.ndarray]]]:
    """What an existing output still holds for ``job``: entries whose source has the recorded size and mtime.

    Returns name -> index in ``existing`` (features to copy) and name -> (reason, signature) (a file that
    was skipped and has not changed since). UNKNOWN signatures (format version 1) never match.
    """
    clips = {name: i for i, name in enumerate(existing.names)}
    skips = {name: (reason, sig) for (name, reason), sig in zip(existing.skipped, existing.skipped_sources,
                                                                 strict=True) if sig[0] != UNKNOWN}
    reuse_clip, reuse_skip = {}, {}
    for name, path in zip(job.names, job.paths, strict=True):
        if name not in clips and name not in skips:
            continue
        try:
            now = source_signature(path)
        except OSError:
            continue
        if name in clips and np.array_equal(existing.sources[clips[name]], now):
            reuse_clip[name] = clips[name]
        elif name in skips and np.array_equal(skips[name][1], now):
            reuse_skip[name] = skips[name]
    return reuse_clip, reuse_skip


def _open_existing(job: Job, front_end: FrontEnd) -> _Reuse:
    """The reusable part of ``job.out``; refuses an output of another front end or format."""
    if not job.out.is_file():
        return _Reuse()
    try:
        existing = FeatureFile(job.out)
    except ClothoRetrieveError:
        existing = None
    if existing is None or existing.front_end != front_end:
        raise ClothoRetrieveError(
            f"{job.out}: exists with a different front end or format; delete it or choose another --out"
        )
    clips, skips = _reusable(job, existing)
    return _Reuse(existing, clips, skips, removed=len(set(existing.names) - set(job.names)))


def _up_to_date(job: Job, reuse: _Reuse) -> bool:
    """True when every source is unchanged and the output already holds what the job would write."""
    existing = reuse.existing
    if existing is None or len(reuse) != len(job.names):
        return False
    names = [n for n in job.names if n in reuse.clips]
    captions = [c for n, c in zip(job.names, job.captions, strict=True) if n in reuse.clips]
    skipped = job.skipped + [(n, reuse.skips[n][0]) for n in job.names if n in reuse.skips]
    return (existing.names, existing.captions, existing.skipped) == (names, captions, skipped) and all(
        str(existing.attrs.get(k)) == str(v) for k, v in job.attrs.items()
    )


# ----------------------------------------------------------------------------------------------
# Computing: one process, or a pool of workers
# ----------------------------------------------------------------------------------------------
def _speed_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ClipsPerSecond(ProgressColumn):
        def render(self, task) -> Text:  # clips computed in this run per second of its wall time
            done = task.completed - task.fields.get("resumed", 0)
            rate = done / task.elapsed if task.elapsed and done else None
            return Text(f"{rate:.1f} clips/s" if rate else "- clips/s", style="cyan")

    return ClipsPerSecond()


class _LazyPool:
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
            ctx.set_forkserver_preload(["torch", "torchaudio", "clotho_retrieve.features"])
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(os.getpid(),))
        return self.pool

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


Todo = list[tuple[str, Path]]  # (name, path) of the clips to compute
Record = Callable[[str, "str | None"], None]  # called with (name, skip reason) as each clip finishes


def _compute_here(todo: Todo, work: Path, front_end: FrontEnd, record: Record) -> None:
    """Compute the clips in this process, one thread (as a worker would), one after the other."""
    import torch

    threads = torch.get_num_threads()
    _init_worker()
    try:
        for name, path in todo:
            record(*_compute_shard(name, path, work, front_end))
    finally:
        torch.set_num_threads(threads)


def _compute_in_pool(todo: Todo, work: Path, front_end: FrontEnd, record: Record, pool: _LazyPool,
                     workers: int, out: Path) -> None:
    """Compute the clips in the pool's worker processes, a bounded number in flight at a time."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    pending = set()
    try:
        for name, path in todo:
            pending.add(pool.get().submit(_compute_shard, name, path, work, front_end))
            if len(pending) >= 4 * workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    record(*fut.result())
        for fut in wait(pending).done:
            record(*fut.result())
    except BrokenProcessPool:
        raise ClothoRetrieveError(
            f"{out}: a worker process died (out of memory?); re-run to resume, perhaps with fewer --workers"
        ) from None
    except BaseException:
        pool.close(cancel=True)
        raise


def _compute(job: Job, todo: Todo, work: Path, front_end: FrontEnd, workers: int, strict: bool,
             pool: _LazyPool | None) -> None:
    """Compute every clip of ``todo`` into its shard, with a progress bar over the whole job."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from clotho_retrieve.safety import NoSpace
    from clotho_retrieve.utils import err_console

    progress = Progress(
        TextColumn(f"features {job.out.name}"), BarColumn(), MofNCompleteColumn(), _speed_column(),
        TimeRemainingColumn(), console=err_console, transient=False,
    )
    with progress:
        resumed = len(job.names) - len(todo)  # reused from the old file or from shards of a killed run
        task = progress.add_task("", total=len(job.names), completed=resumed, resumed=resumed)

        done = []

        def record(name: str, reason: str | None) -> None:
            if reason is not None and strict:
                raise ClothoRetrieveError(f"{name}: {reason} (--strict)")
            done.append(name)
            progress.advance(task)

        try:
            if workers == 1 or len(todo) == 1:
                _compute_here(todo, work, front_end, record)
            elif todo:
                own_pool = pool is None
                pool = pool or _LazyPool(workers)
                _compute_in_pool(todo, work, front_end, record, pool, workers, job.out)
                if own_pool:
                    pool.close()
        except NoSpace:  # a work file did not fit: say what the rest of the job needs
            raise _no_space_for_work(job, work, len(todo) - len(done)) from None


# ----------------------------------------------------------------------------------------------
# Assembling the output
# ----------------------------------------------------------------------------------------------
def _assemble(job: Job, front_end: FrontEnd, work: Path, reuse: _Reuse) -> tuple[int, list[tuple[str, str]]]:
    """Write the output in the job's order (what a run from scratch writes); returns (clips, skipped).

    Reused clips are copied from the old file, the others read from their shards, one clip in memory at
    a time. Written under a temporary name, then renamed.
    """
    existing = reuse.existing
    kept = []  # (name, captions, n_frames, duration, signature, index in the old file or None)
    skipped, skipped_sources = list(job.skipped), [np.full(2, UNKNOWN, np.int64)] * len(job.skipped)
    for name, caps in zip(job.names, job.captions, strict=True):
        if name in reuse.clips:
            i = reuse.clips[name]
            kept.append((name, caps, int(existing.n_frames[i]), float(existing.durations[i]),
                         existing.sources[i], i))
            continue
        if name in reuse.skips:
            reason, signature = reuse.skips[name]
        else:
            mel, duration, signature, reason = _shard(work, name)
        if reason is not None:
            skipped.append((name, reason))
            skipped_sources.append(signature)
        else:
            kept.append((name, caps, len(mel), duration, signature, None))

    def mels() -> Iterator[np.ndarray]:  # one clip in memory at a time
        for name, *_, i in kept:
            yield existing[i] if i is not None else _shard(work, name)[0]

    if not kept:  # never an output that looks written but holds nothing
        if existing is not None:
            existing.close()
        example = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ClothoRetrieveError(
            f"{job.out}: no clip could be read, {len(skipped)} skipped{example}; nothing written"
        )
    try:
        write_feature_file(job.out, [k[0] for k in kept], mels(), [k[3] for k in kept], front_end,
                           captions=[k[1] for k in kept], skipped=skipped, n_frames=[k[2] for k in kept],
                           sources=np.array([k[4] for k in kept], np.int64).reshape(-1, 2),
                           skipped_sources=np.array(skipped_sources, np.int64).reshape(-1, 2), **job.attrs)
    finally:
        if existing is not None:
            existing.close()
    return len(kept), skipped


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def run_job(job: Job, front_end: FrontEnd, workers: int = 0, strict: bool = False,
            pool: _LazyPool | None = None) -> dict:
    """Compute, finish or bring up to date one HDF5 file.

    Over an existing output with the same front end, clips whose source has the recorded name, size and
    mtime are copied from it, new or changed files are computed, removed ones dropped; when nothing
    changed, nothing is written. Returns {"out", "clips", "skipped", "computed", "reused", "removed",
    "status"}.
    """
    import shutil

    work = _work_dir(job.out, front_end)
    reuse = _open_existing(job, front_end)
    if _up_to_date(job, reuse):
        shutil.rmtree(work, ignore_errors=True)  # killed after the rename
        existing = reuse.existing
        return {"out": job.out, "clips": len(existing), "skipped": existing.skipped, "computed": 0,
                "reused": len(job.names), "removed": 0, "status": "up to date"}
    if strict and (job.skipped or reuse.skips):
        name, reason = job.skipped[0] if job.skipped else next((n, r) for n, (r, _) in reuse.skips.items())
        raise ClothoRetrieveError(f"{name}: {reason} (--strict)")
    work.mkdir(parents=True, exist_ok=True)
    for stale in list(work.glob("*.part")) + list(job.out.parent.glob(f".{job.out.name}.*.h5.tmp")):
        stale.unlink(missing_ok=True)  # left by a run killed mid-write

    todo = [(name, path) for name, path in zip(job.names, job.paths, strict=True)
            if name not in reuse.clips and name not in reuse.skips and not _finished(name, path, work)[0]]
    workers = max(1, workers or os.cpu_count() or 1)
    _compute(job, todo, work, front_end, workers, strict, pool)
    clips, skipped = _assemble(job, front_end, work, reuse)
    shutil.rmtree(work, ignore_errors=True)
    status = "written" if reuse.existing is None else (
        f"updated: {len(reuse)} reused, {len(todo)} computed, {reuse.removed} removed"
    )
    return {"out": job.out, "clips": clips, "skipped": skipped, "computed": len(todo), "reused": len(reuse),
            "removed": reuse.removed, "status": status}


def _jobs(root, out, audio_dir, splits, allow_missing_captions=False) -> tuple[list[Job], Path]:
    """The jobs of a Clotho root or of a folder of audio, and where the run's settings are saved."""
    from clotho_retrieve.datasets.clotho import clotho_jobs
    from clotho_retrieve.datasets.folder import audio_dir_job

    if root is not None:
        if Path(out).suffix == ".h5" or Path(out).is_file():
            raise ClothoRetrieveError(f"{out}: with --root, --out is a folder (one .h5 per split)")
        return clotho_jobs(root, out, splits, allow_missing_captions), Path(out) / "features_config.json"
    if Path(out).is_dir():
        raise ClothoRetrieveError(f"{out}: with --audio-dir, --out is a file (sounds.h5), not a folder")
    return [audio_dir_job(audio_dir, out)], Path(out).with_suffix(".json")


def compute_features(
    cfg: FeaturesConfig,
    root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    audio_dir: str | os.PathLike | None = None,
    splits: list[str] | None = None,
) -> list[dict]:
    """The `features` stage: a Clotho root (one HDF5 per split into folder ``out``) or ``audio_dir``
    (one HDF5 file ``out``). Resumable: re-running finishes an interrupted run, and brings a finished file
    up to date with its sources (see run_job).
    """
    import json
    from contextlib import ExitStack

    from clotho_retrieve.safety import output_lock, writes
    from clotho_retrieve.utils import atomic_write_text

    if (root is None) == (audio_dir is None):
        raise ClothoRetrieveError("features: pass either --root (Clotho layout) or --audio-dir")
    if out is None:
        raise ClothoRetrieveError("features: --out is required")
    front_end = cfg.front_end()
    jobs, config_path = _jobs(root, out, audio_dir, splits, cfg.allow_missing_captions)
    workers = cfg.workers or os.cpu_count() or 1
    pool = _LazyPool(workers)
    with ExitStack() as locks:
        for job in jobs:  # one writer per output: a second run stops here, before any work
            locks.enter_context(output_lock(job.out))
        try:
            results = [run_job(job, front_end, workers, cfg.strict, pool) for job in jobs]
        finally:
            pool.close()
        record = {"features": dataclasses.asdict(cfg), "front_end": front_end.to_dict()}
        with writes(config_path, "the features settings"):
            atomic_write_text(config_path, json.dumps(record, indent=2) + "\n")
    return results


def print_report(results: list[dict]) -> None:
    """A table of the files written (or already complete) and one of every clip skipped, with why."""
    from rich.table import Table

    from clotho_retrieve.utils import console

    table = Table(title="features")
    for col in ("file", "clips", "skipped", "computed now", "status"):
        table.add_column(col, justify="left" if col in ("file", "status") else "right")
    for r in results:
        table.add_row(str(r["out"]), str(r["clips"]), str(len(r["skipped"])), str(r["computed"]), r["status"])
    console.print(table)
    if all(r["status"] == "up to date" for r in results):
        console.print("Nothing to do: every output is complete and no source file changed.")
    skipped = [(r["out"].name, name, reason) for r in results for name, reason in r["skipped"]]
    if skipped:
        table = Table(title=f"skipped clips ({len(skipped)}, also stored in each file's /skipped)")
        for col in ("output", "file", "reason"):
            table.add_column(col, overflow="fold")
        for row in skipped:
            table.add_row(*row)
        console.print(table)
