"""The `features` stage: sources of audio in, one HDF5 features file per job out; resumable, parallel,
and split over processes and machines.

A ``Job`` is one output file: the clips to compute in order (names, paths, captions) and the problems
found before decoding. Jobs come from a source (datasets/clotho.py: one per split of a Clotho root;
datasets/folder.py: one for a folder of audio). For each job:

1. An existing output with the same front end is reused: clips whose source has the recorded size and
   mtime are copied from it, files that were skipped and have not changed stay skipped; when nothing at
   all changed, nothing is written.
2. Every other clip is decoded and transformed (``front_end.file_features``: frontend.decode_log_mel, or
   a CLAP model's ClapFeatureExtractor input, clap.ClapFrontEnd) in batches, by this process or a pool
   of worker processes; each batch is saved atomically in the work folder beside the output
   (feature_parts.py), so a killed run resumes from the batches it left.
3. Once every clip is computed, the file is assembled in the job's order (feature_file.write_feature_file:
   temporary name, then rename) and the work folder is removed.

Many processes or machines (sharding.py): each takes every N-th clip of each job (its part) into the
same work folder (a file system they all see), then the file is assembled once::

    torchrun --nnodes 4 --nproc_per_node 2 ... -m clotho_retrieve features --root R --out F
        # every rank computes its part; after a barrier (gloo) rank 0 assembles the files
    clotho-retrieve features --root R --out F --shard 3/8     # one of 8 separate jobs (a SLURM array)
    clotho-retrieve merge --out F                             # once all 8 finished: assemble

A re-run with any number of processes resumes from every batch already saved, whoever wrote it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clotho_retrieve.feature_file import UNKNOWN, FeatureFile, source_signature, write_feature_file  # noqa: F401
from clotho_retrieve.feature_output import Reuse, assemble, open_existing, up_to_date
from clotho_retrieve.feature_parts import ClipResult, Entry, WorkFolder, work_dir
from clotho_retrieve.feature_pool import LazyPool, Record, Runner, run_batches
from clotho_retrieve.frontend import PRESETS, FrontEnd
from clotho_retrieve.sharding import ProcessGroup, Shard, default_workers, resolve_shard
from clotho_retrieve.utils import ClothoRetrieveError

# FeatureFile and write_feature_file (feature_file.py) are imported from here too: the stage's output.

@dataclass
class FeaturesConfig:
    """Settings of one `features` run (saved as features_config.json beside the output)."""

    preset: str = "paper"
    overrides: dict = dataclasses.field(default_factory=dict)  # FrontEnd fields that replace the preset's
    workers: int = 0  # 0: all cores (shared by the ranks of a machine under torchrun)
    strict: bool = False
    model: str | None = None  # a CLAP model (hub id or folder): its ClapFeatureExtractor input instead
    shard: str = ""  # "i/N": compute part i of N and leave assembly to `merge`; "" : torchrun's or none
    allow_missing_captions: bool = False  # a captions CSV without some of caption_1..5: warn, not refuse

    def front_end(self):
        """The FrontEnd of the preset and overrides, or the ClapFrontEnd of ``model``."""
        if self.model is not None:
            from clotho_retrieve.clap import clap_front_end, is_clap_model

            if self.overrides or self.preset != "paper":
                raise ClothoRetrieveError("features: --model sets the front end; drop --preset and overrides")
            if not is_clap_model(self.model):
                raise ClothoRetrieveError(
                    f"features --model {self.model}: not a CLAP model (a hub id such as "
                    "laion/clap-htsat-unfused, or a folder whose config.json has model_type clap)"
                )
            return clap_front_end(self.model)
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


def _stat(path: Path) -> np.ndarray | None:
    """The source's [size, mtime_ns], None when it cannot be stat'ed (gone since the listing)."""
    try:
        return source_signature(path)
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Computing: batches of clips, in this process or a pool of workers
# ----------------------------------------------------------------------------------------------
def _compute_clip(name: str, path: Path, front_end: FrontEnd) -> ClipResult:
    """Decode and transform one clip; a file that cannot be used gets a reason instead of features.

    The source's signature is taken before decoding, so a file changed meanwhile is redone next time.
    """
    signature = np.full(2, UNKNOWN, np.int64)
    try:
        signature = source_signature(path)
        mel, duration = front_end.file_features(path)  # log-Mel frames, or a CLAP model's input rows
    except ClothoRetrieveError as exc:
        reason = str(exc)
    except Exception as exc:  # never let one file end the run; report it in the skip table
        reason = f"failed ({type(exc).__name__}: {exc})"
    else:
        return ClipResult(name, mel, duration, signature, None)
    return ClipResult(name, None, 0.0, signature, reason)


def _compute_batch(batch: list[tuple[str, Path]], work: Path, front_end: FrontEnd, tag: str,
                   record: Record | None = None) -> list[tuple[str, str | None]]:
    """Compute ``batch`` and save it as one batch file; interrupted, it saves the clips finished so far."""
    results: list[ClipResult] = []
    try:
        for name, path in batch:
            results.append(_compute_clip(name, path, front_end))
            if record is not None:
                record(name, results[-1].reason)
    finally:
        if results:
            WorkFolder(work, front_end.n_mels).write_batch(tag, results)
    return [(r.name, r.reason) for r in results]


# ----------------------------------------------------------------------------------------------
# One job: its state, this process's part, assembling the output
# ----------------------------------------------------------------------------------------------
@dataclass
class _State:
    """One job under way: its work folder, what the old output still holds."""

    job: Job
    folder: WorkFolder
    reuse: Reuse
    up_to_date: bool = False


def _start(job: Job, front_end: FrontEnd, run: Runner) -> _State:
    """Open the job: reusable part of an old output; up to date when nothing changed."""
    folder = WorkFolder(work_dir(job.out, front_end), front_end.n_mels)
    reuse = open_existing(job, front_end)
    if up_to_date(job, reuse):
        if run.shard.is_single or (run.shard.launcher == "torchrun" and run.shard.index == 0):
            shutil.rmtree(folder.path, ignore_errors=True)  # killed after the rename
        return _State(job, folder, reuse, up_to_date=True)
    if run.strict and (job.skipped or reuse.skips):
        name, reason = job.skipped[0] if job.skipped else next((n, r) for n, (r, _) in reuse.skips.items())
        raise ClothoRetrieveError(f"{name}: {reason} (--strict)")
    return _State(job, folder, reuse)


def _compute_part(st: _State, front_end: FrontEnd, run: Runner) -> int:
    """Compute this process's part of the job (the clips no batch holds yet); returns how many."""
    job, folder, reuse = st.job, st.folder, st.reuse
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.clean(run.shard.tag)
    folder.scan()
    share = [i for i in run.shard.take(len(job.names))
             if job.names[i] not in reuse.clips and job.names[i] not in reuse.skips]
    todo = []
    for i in share:
        signature = _stat(job.paths[i])
        if signature is None or folder.find(job.names[i], signature) is None:
            todo.append((job.names[i], job.paths[i], 0 if signature is None else int(signature[0])))
    run_batches(job.out, todo, len(share), _compute_batch, (folder.path, front_end, run.shard.tag), run)
    if not run.shard.is_single:
        folder.mark_part_done(run.shard.tag, {"clips": len(share), "computed": len(todo)})
    return len(todo)


def _resolve(st: _State, any_version: bool = False) -> tuple[dict[str, Entry], list[tuple[str, Path, int]]]:
    """The computed entry of every clip the old output does not hold, and the clips without one.

    An entry counts when its source's size and mtime are the file's now; ``any_version`` accepts the
    newest entry of a file that changed again while it was being computed.
    """
    st.folder.scan()
    entries, missing = {}, []
    for name, path in zip(st.job.names, st.job.paths, strict=True):
        if name in st.reuse.clips or name in st.reuse.skips:
            continue
        signature = _stat(path)
        entry = st.folder.find(name, signature) if signature is not None else None
        if entry is None and any_version and st.folder.entries.get(name):
            entry = max(st.folder.entries[name], key=lambda e: e.file.stat().st_mtime_ns)
        if entry is None:
            missing.append((name, path, 0 if signature is None else int(signature[0])))
        else:
            entries[name] = entry
    return entries, missing


def _finish(st: _State, front_end: FrontEnd, computed: int, strict: bool, run: Runner | None = None) -> dict:
    """Assemble the output once every clip is computed. With ``run`` (this process computes), clips still
    missing (a file changed during the run) are computed here; without (merge), they are an error."""
    job, reuse = st.job, st.reuse
    entries, missing = _resolve(st)
    if missing and run is not None:
        args = (st.folder.path, front_end, run.shard.tag)
        run_batches(job.out, missing, len(missing), _compute_batch, args, run)
        computed += len(missing)
        entries, missing = _resolve(st, any_version=True)
    if missing:
        done = sorted(tag.replace("of", "/") for tag in st.folder.parts_done())
        raise ClothoRetrieveError(
            f"{job.out}: {len(missing)} clips have no features yet (e.g. {missing[0][0]}); parts finished: "
            f"{', '.join(done) or 'none'}. Run the missing `features --shard i/N` parts (a re-run also "
            "computes files added or changed since), then merge again"
        )
    if strict and (bad := next(((n, e.reason) for n, e in entries.items() if e.reason), None)):
        raise ClothoRetrieveError(f"{bad[0]}: {bad[1]} (--strict)")
    clips, skipped = assemble(job, reuse, st.folder, entries, front_end)
    shutil.rmtree(st.folder.path, ignore_errors=True)
    status = "written" if reuse.existing is None else (
        f"updated: {len(reuse)} reused, {computed} computed, {reuse.removed} removed"
    )
    return {"out": job.out, "clips": clips, "skipped": skipped, "computed": computed, "reused": len(reuse),
            "removed": reuse.removed, "status": status}


def _unchanged(st: _State) -> dict:
    existing = st.reuse.existing
    return {"out": st.job.out, "clips": len(existing), "skipped": existing.skipped, "computed": 0,
            "reused": len(st.job.names), "removed": 0, "status": "up to date"}


def run_job(job: Job, front_end: FrontEnd, workers: int = 0, strict: bool = False,
            pool: LazyPool | None = None) -> dict:
    """Compute, finish or bring up to date one HDF5 file, in this process (and its workers).

    Over an existing output with the same front end, clips whose source has the recorded name, size and
    mtime are copied from it, new or changed files are computed, removed ones dropped; when nothing
    changed, nothing is written. Returns {"out", "clips", "skipped", "computed", "reused", "removed",
    "status"}.
    """
    own_pool = pool is None
    run = Runner(Shard(), max(1, workers or os.cpu_count() or 1), strict, pool)
    try:
        st = _start(job, front_end, run)
        if st.up_to_date:
            return _unchanged(st)
        with st.folder.lock(run.shard.tag):
            return _finish(st, front_end, _compute_part(st, front_end, run), strict, run)
    finally:
        if own_pool:
            run.pool.close()


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def _jobs(root, out, audio_dir, splits, allow_missing_captions=False) -> tuple[list[Job], Path]:
    """The jobs of a Clotho root or of a folder of audio, and where the run's settings are saved."""
    from clotho_retrieve.datasets.clotho import clotho_jobs
    from clotho_retrieve.datasets.folder import audio_dir_job

    if (root is None) == (audio_dir is None):
        raise ClothoRetrieveError("features: pass either --root (Clotho layout) or --audio-dir")
    if out is None:
        raise ClothoRetrieveError("features: --out is required")
    if root is not None:
        if Path(out).suffix == ".h5" or Path(out).is_file():
            raise ClothoRetrieveError(f"{out}: with --root, --out is a folder (one .h5 per split)")
        return clotho_jobs(root, out, splits, allow_missing_captions), Path(out) / "features_config.json"
    if Path(out).is_dir():
        raise ClothoRetrieveError(f"{out}: with --audio-dir, --out is a file (sounds.h5), not a folder")
    return [audio_dir_job(audio_dir, out)], Path(out).with_suffix(".json")


def _save_settings(path: Path, cfg: FeaturesConfig, front_end: FrontEnd, root, audio_dir, splits) -> None:
    """The run's settings beside what they produced; ``merge`` reads the source from them."""
    import json

    from clotho_retrieve.utils import atomic_write_text

    source = {"root": str(Path(root).resolve()) if root is not None else None,
              "audio_dir": str(Path(audio_dir).resolve()) if audio_dir is not None else None,
              "splits": list(splits) if splits else None}
    record = {"features": dataclasses.asdict(cfg), "front_end": front_end.to_dict(), "source": source}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


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

    Under torchrun each rank computes its part of every job, then (after a barrier) rank 0 assembles the
    files; with ``cfg.shard`` "i/N" this process computes part i and leaves the files to `merge`.
    """
    front_end = cfg.front_end()
    shard = resolve_shard(cfg.shard)
    jobs, settings = _jobs(root, out, audio_dir, splits, cfg.allow_missing_captions)
    workers = cfg.workers or default_workers(shard)
    run = Runner(shard, workers, cfg.strict)
    assembler = shard.is_single or (shard.launcher == "torchrun" and shard.index == 0)
    try:
        with ProcessGroup(shard) as group, contextlib.ExitStack() as locks:
            if shard.is_single:  # one writer per output: a second run stops here, before any work
                from clotho_retrieve.safety import output_lock

                for job in jobs:
                    locks.enter_context(output_lock(job.out))
            states = [_start(job, front_end, run) for job in jobs]
            computed = {}
            for st in states:
                if not st.up_to_date:
                    locks.enter_context(st.folder.lock(shard.tag))
                    computed[st.job.out] = _compute_part(st, front_end, run)
            group.barrier()  # under torchrun: every rank has computed its part
            results = [_unchanged(st) if st.up_to_date else
                       _finish(st, front_end, _parts_computed(st, shard, computed), cfg.strict, run)
                       if assembler else _part_result(st, shard, computed) for st in states]
    finally:
        run.pool.close()
    if assembler or shard.launcher == "option":
        _save_settings(settings, cfg, front_end, root, audio_dir, splits)
    return results


def _parts_computed(st: _State, shard: Shard, computed: dict) -> int:
    """Clips computed by this run: this process's, plus (torchrun) what every other rank reported."""
    if shard.is_single:
        return computed[st.job.out]
    parts = st.folder.parts_done()
    return sum(parts.get(f"{r}of{shard.count}", {}).get("computed", 0) for r in range(shard.count))


def _part_result(st: _State, shard: Shard, computed: dict) -> dict:
    then = ("rank 0 assembles the file" if shard.launcher == "torchrun" else
            "run `clotho-retrieve merge` once every part finished")
    return {"out": st.job.out, "clips": len(shard.take(len(st.job.names))), "skipped": [],
            "computed": computed[st.job.out], "reused": 0, "removed": 0,
            "status": f"part {shard.label} computed; {then}", "part": shard.label}


def merge_features(out: str | os.PathLike) -> list[dict]:
    """Assemble the files of a run split with ``features --shard i/N`` once every part finished.

    Reads the source and front end from the settings the parts saved beside ``out``; computes nothing:
    clips no part computed are an error naming them and the parts that finished.
    """
    import json

    out = Path(out)
    settings = out / "features_config.json" if out.is_dir() else out.with_suffix(".json")
    try:
        record = json.loads(settings.read_text(encoding="utf-8"))
        cfg, source = FeaturesConfig(**record["features"]), record["source"]
    except FileNotFoundError:
        raise ClothoRetrieveError(
            f"{settings}: not found; merge assembles what `features --shard i/N` runs computed (they save "
            "their settings there), so run those first"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClothoRetrieveError(f"{settings}: unreadable features settings ({exc})") from None
    front_end = cfg.front_end()
    jobs, _ = _jobs(source["root"], out, source["audio_dir"], source["splits"])
    run = Runner(Shard(), 1, cfg.strict)
    results = []
    for job in jobs:
        st = _start(job, front_end, run)
        if st.up_to_date:
            results.append(_unchanged(st))
            continue
        with st.folder.lock("merge"):
            parts = st.folder.parts_done().values()
            results.append(_finish(st, front_end, sum(p.get("computed", 0) for p in parts), cfg.strict))
    return results


def print_report(results: list[dict]) -> None:
    """A table of the files written (or already complete) and one of every clip skipped, with why."""
    from rich.table import Table

    from clotho_retrieve.utils import console

    for r in results:  # a part of a sharded run: one line (every rank prints its own)
        if "part" in r:
            console.print(f"{r['out']}: {r['computed']} of {r['clips']} clips computed now; {r['status']}")
    results = [r for r in results if "part" not in r]
    if not results:
        return
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
