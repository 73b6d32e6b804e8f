"""A sharded `embed`: each process writes one part of the index; the parts are then merged into one.

Layout (each part is an INDEX folder of its own, in the format of store.py)::

    INDEX/parts/shard-00001-of-00004/index.h5    the rows of shard 1 of 4 (resumable like any index)
    INDEX/parts/shard-00001-of-00004/done.json   written (atomically) once the part is complete
    INDEX/index.h5                               the merge: every part's rows in shard order

Shards: the clips in `embed`'s order (feature files in order, a name in several files taken from the
first) are cut into ``--chunk-size`` chunks, and shard i of N takes chunks [i C / N, (i + 1) C / N) of
the C chunks: contiguous runs of whole chunks. So the parts, concatenated in shard order, hold the rows
of a one-process `embed` in the same order, and every chunk is encoded in the same length-sorted
batches (bit-identical embeddings where the kernels are deterministic).

Who merges: under ``torchrun`` (WORLD_SIZE > 1, no --shard) every rank embeds its part, then waits at
a gloo barrier, and rank 0 merges. Parts made by separate jobs (``embed --shard i/N``, e.g. a SLURM
array) are merged by ``clotho-retrieve merge-index INDEX``. A merge checks that the N parts are all
complete, contiguous, of one run, and that the merged names hash to the clip-order digest every part
recorded; INDEX/index.h5 is written under a temporary name and renamed. The parts are kept (they are
what a re-run resumes from); delete INDEX/parts to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from clotho_retrieve.index.integrity import CLIP_COLUMNS
from clotho_retrieve.index.search import chunk_ranges, drop_ann_index
from clotho_retrieve.index.store import INDEX_FILE
from clotho_retrieve.index.writer import IndexWriter
from clotho_retrieve.utils import ClothoRetrieveError, atomic_path, atomic_write_text

PARTS_DIR = "parts"
DONE_FILE = "done.json"
MERGED_ATTR = "merged_from"  # index.h5 attribute of a merge: JSON of its parts' done records


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``of`` (0-based)."""

    index: int
    of: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/N' (0 <= i < N), as `embed --shard` takes it."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise ClothoRetrieveError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 3/8")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.of:05d}"

    def clip_range(self, total: int, chunk_size: int) -> tuple[int, int]:
        """[start, stop) of this shard's clips among ``total``: whole chunks of ``chunk_size``."""
        chunks = -(-total // chunk_size)
        a, b = self.index * chunks // self.of, (self.index + 1) * chunks // self.of
        return min(total, a * chunk_size), min(total, b * chunk_size)


@dataclass
class ShardJob:
    """This process's place in a sharded `embed`."""

    shard: Shard
    rank: int = 0
    world_size: int = 1
    merges: bool = False  # assembles INDEX/index.h5 once every part is done (rank 0 under torchrun)


def shard_job(shard: str | Shard | None) -> ShardJob | None:
    """The job of this process from ``--shard`` and torchrun's RANK / WORLD_SIZE; None: a one-process
    embed of the whole index. Under torchrun with --shard i/N, rank r takes shard i W + r of N W."""
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return None if shard is None else ShardJob(shard)
    if shard is None:
        return ShardJob(Shard(rank, world), rank, world, merges=rank == 0)
    return ShardJob(Shard(shard.index * world + rank, shard.of * world), rank, world)


def part_dir(out: Path, shard: Shard) -> Path:
    return Path(out) / PARTS_DIR / shard.name


def clips_digest(names: Iterable[str]) -> str:
    """blake2b-128 of the clip names in order: the clip order every part of one index must share."""
    digest = hashlib.blake2b(digest_size=16)
    for name in names:
        digest.update(name.encode("utf-8") + b"\0")
    return digest.hexdigest()


def check_fresh_target(out: Path) -> None:
    """A sharded embed builds INDEX/index.h5 from parts: refuse to replace one that was not merged."""
    path = Path(out) / INDEX_FILE
    if not path.exists():
        return
    try:
        with h5py.File(path, "r") as h5:
            merged = MERGED_ATTR in h5.attrs
    except OSError:
        merged = False
    if not merged:
        raise ClothoRetrieveError(
            f"{path}: written (or changed since its merge) by a one-process embed; a sharded embed "
            "assembles a new index from parts and would replace it: use a new --out"
        )


def reset_if_reordered(part: Path, names: list[str]) -> bool:
    """Start a part over when its committed rows are not a prefix of its shard's clips (the clip list
    or --chunk-size changed since it was written): appending would break the clip order. True if reset."""
    path = part / INDEX_FILE
    if not path.exists():
        return False
    with h5py.File(path, "r") as h5:
        old = [v.decode("utf-8") for v in h5["names"][: int(h5.attrs["count"])]]
    wanted = set(names)
    kept = [n for n in old if n in wanted]
    if kept == names[: len(kept)]:
        return False
    path.unlink()
    return True


def mark_done(part: Path, record: dict) -> None:
    atomic_write_text(part / DONE_FILE, json.dumps(record, indent=2) + "\n")


def clear_done(part: Path) -> None:
    (part / DONE_FILE).unlink(missing_ok=True)


def take_shard(reader, job: ShardJob, chunk_size: int, part: Path) -> tuple[int, int, int, str]:
    """Restrict an embed.FeatureReader to this job's shard of its clips; returns (start, stop, total,
    clip-order digest). Clears the part's done mark, and starts the part over if its rows are not a
    prefix of the shard (reset_if_reordered)."""
    from clotho_retrieve.utils import err_console

    names = list(reader.where)
    start, stop = job.shard.clip_range(len(names), chunk_size)
    reader.keep(names[start:stop])
    clear_done(part)
    if reset_if_reordered(part, names[start:stop]):
        err_console.print(f"[yellow]warning:[/] {part}: its shard changed (clips or chunk size); redone")
    return start, stop, len(names), clips_digest(names)


def finish_shards(job: ShardJob, out: Path) -> dict | None:
    """After this process's part is done: wait for the other ranks (torchrun), then the merging rank
    merges (its summary); None for the others and for a `--shard` job (merged by `merge-index`)."""
    barrier(job)
    if not job.merges:
        return None
    from clotho_retrieve.safety import output_lock

    with output_lock(out):
        return merge_parts(out, job.shard.of)


def barrier(job: ShardJob) -> None:
    """Wait for every rank of a torchrun job (gloo; a day's timeout: shards may take long)."""
    import datetime

    import torch.distributed as dist

    if job.world_size <= 1:
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------
def complete_parts(out: Path, of: int | None = None) -> list[dict]:
    """The done records of the parts of INDEX ``out`` (of ``of`` shards), checked complete and contiguous."""
    records = []
    for path in sorted((Path(out) / PARTS_DIR).glob(f"shard-*-of-*/{DONE_FILE}")):
        try:
            records.append({**json.loads(path.read_text(encoding="utf-8")), "dir": str(path.parent)})
        except (OSError, json.JSONDecodeError) as exc:
            raise ClothoRetrieveError(f"{path}: unreadable ({exc}); re-run that shard's embed") from None
    counts = sorted({r["of"] for r in records})
    if of is None and len(counts) > 1:
        raise ClothoRetrieveError(f"{out}/{PARTS_DIR}: parts of {counts} shards; choose one with --shards N")
    of = of or (counts[0] if counts else None)
    records = sorted((r for r in records if r["of"] == of), key=lambda r: r["shard"])
    missing = sorted(set(range(of or 0)) - {r["shard"] for r in records})
    if of is None or missing:
        what = f"shards {missing} of {of}" if of else "no complete part"
        raise ClothoRetrieveError(f"{out}/{PARTS_DIR}: {what} not done; run (or re-run) their embed first")
    stop = 0
    for r in records:
        same = (r["total"], r["clips_digest"], r["fingerprint"]) == (
            records[0]["total"],
            records[0]["clips_digest"],
            records[0]["fingerprint"],
        )
        if not same or r["start"] != stop:
            raise ClothoRetrieveError(
                f"{r['dir']}: not the next part of {records[0]['dir']}'s index (other features, run or "
                "--chunk-size); re-run every shard with the same arguments"
            )
        stop = r["stop"]
    if stop != records[0]["total"]:
        raise ClothoRetrieveError(f"{out}/{PARTS_DIR}: the parts cover {stop} of {records[0]['total']} clips")
    return records


def _copy_rows(src: h5py.File, dst: h5py.File, count: int, chunk_rows: int, digest) -> None:
    for a, b in chunk_ranges(count, chunk_rows):
        for name in CLIP_COLUMNS:
            IndexWriter._append(dst[name], src[name][a:b])
        for v in src["names"][a:b]:
            digest.update(v + b"\0")


def _copy_captions(src: h5py.File, dst: h5py.File, offset: int, done: int, chunk_rows: int) -> None:
    """Caption rows of clips [0, done) of one part, their clip rows shifted by ``offset``."""
    m = int(np.searchsorted(src["caption_clip"][:], done))
    for a, b in chunk_ranges(m, chunk_rows):
        IndexWriter._append(dst["caption_embeddings"], src["caption_embeddings"][a:b])
        IndexWriter._append(dst["caption_text"], src["caption_text"][a:b])
        IndexWriter._append(dst["caption_clip"], src["caption_clip"][a:b] + offset)


def _append_part(src: h5py.File, dst: h5py.File, r: dict, offset: int, chunk_rows: int, digest) -> int:
    """Append one part's clip rows to the merge (the first part also gives the layout and attributes)."""
    attrs = dict(src.attrs)
    if "audio" not in dst:
        IndexWriter._create(dst, int(attrs["embed_dim"]))
        dst.attrs.update(attrs)
    elif (attrs["fingerprint"], attrs["front_end"]) != (dst.attrs["fingerprint"], dst.attrs["front_end"]):
        raise ClothoRetrieveError(f"{r['dir']}: another run or front end than the first part")
    count = int(attrs["count"])
    if count != r["stop"] - r["start"]:
        raise ClothoRetrieveError(f"{r['dir']}: {count} rows, its {DONE_FILE} says {r['stop'] - r['start']}")
    _copy_rows(src, dst, count, chunk_rows, digest)
    return count


def merge_parts(out: str | os.PathLike, of: int | None = None, chunk_rows: int = 65_536) -> dict:
    """Write INDEX/index.h5 from the complete parts of INDEX ``out``; returns a summary dict.

    Caption embeddings are merged as far as they are complete in clip order (captions_done), so a
    later `embed --captions` completes them."""
    out = Path(out)
    records = complete_parts(out, of)
    check_fresh_target(out)
    digest = hashlib.blake2b(digest_size=16)
    offset, captions_done, captions_open, captions_wanted = 0, 0, True, False
    drop_ann_index(out)  # its rows are about to change
    with atomic_path(out / INDEX_FILE) as tmp, h5py.File(tmp, "w") as dst:
        for r in records:
            with h5py.File(Path(r["dir"]) / INDEX_FILE, "r") as src:
                count = _append_part(src, dst, r, offset, chunk_rows, digest)
                captions_wanted |= bool(src.attrs.get("captions_wanted", False))
                if captions_open:  # caption rows stay a prefix in clip order
                    done = int(src.attrs["captions_done"])
                    _copy_captions(src, dst, offset, done, chunk_rows)
                    captions_done, captions_open = offset + done, done == count
            offset += count
        if digest.hexdigest() != records[0]["clips_digest"]:
            raise ClothoRetrieveError(f"{out}/{PARTS_DIR}: merged names differ from the parts' clip order")
        parts = [{k: v for k, v in r.items() if k != "dir"} for r in records]
        dst.attrs.update(count=offset, captions_done=captions_done, captions_wanted=captions_wanted)
        dst.attrs.update(complete=True, target_count=offset)  # the parts were complete (done.json)
        dst.attrs[MERGED_ATTR] = json.dumps(parts)
    return {"index": str(out), "clips": offset, "parts": len(records), "captions_done": captions_done}


def done_record(shard: Shard, start: int, stop: int, total: int, digest: str, writer: IndexWriter) -> dict:
    """What a complete part records in done.json."""
    return {
        "shard": shard.index,
        "of": shard.of,
        "start": start,
        "stop": stop,
        "total": total,
        "clips_digest": digest,
        "fingerprint": str(writer.h5.attrs["fingerprint"]),
        "count": writer.count,
        "captions_done": writer.captions_done,
    }
