"""The output file of a features job: what an old one still holds, and writing the new one.

``open_existing`` opens the job's output when there is one (refusing another front end or format) and
finds what it still holds: clips whose source has the recorded size and mtime (copied, not recomputed)
and files that were skipped and have not changed (they stay skipped). ``up_to_date`` tells when it
already holds exactly what the job would write. ``assemble`` writes the output in the job's order from
the old file and the work folder's batches (feature_parts.py), what a run from scratch would write.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from clotho_retrieve.feature_file import UNKNOWN, FeatureFile, source_signature, write_feature_file
from clotho_retrieve.feature_parts import Entry, WorkFolder
from clotho_retrieve.frontend import FrontEnd
from clotho_retrieve.utils import ClothoRetrieveError

if TYPE_CHECKING:
    from clotho_retrieve.features import Job


@dataclass
class Reuse:
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


def open_existing(job: Job, front_end: FrontEnd) -> Reuse:
    """The reusable part of ``job.out``; refuses an output of another front end or format."""
    if not job.out.is_file():
        return Reuse()
    try:
        existing = FeatureFile(job.out)
    except ClothoRetrieveError:
        existing = None
    if existing is None or existing.front_end != front_end:
        raise ClothoRetrieveError(
            f"{job.out}: exists with a different front end or format; delete it or choose another --out"
        )
    clips, skips = _reusable(job, existing)
    return Reuse(existing, clips, skips, removed=len(set(existing.names) - set(job.names)))


def up_to_date(job: Job, reuse: Reuse) -> bool:
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


def assemble(job: Job, reuse: Reuse, folder: WorkFolder, entries: dict[str, Entry],
             front_end: FrontEnd) -> tuple[int, list[tuple[str, str]]]:
    """Write the output in the job's order (what a run from scratch writes); returns (clips, skipped).

    Reused clips are copied from the old file, the others read from their batches, one clip in memory at
    a time. Written under a temporary name, then renamed.
    """
    existing = reuse.existing
    for stale in job.out.parent.glob(f".{job.out.name}.*.h5.tmp"):
        stale.unlink(missing_ok=True)  # left by a run killed mid-write
    kept = []  # (name, captions, n_frames, duration, signature, index in the old file or Entry)
    skipped, skipped_sources = list(job.skipped), [np.full(2, UNKNOWN, np.int64)] * len(job.skipped)
    for name, caps in zip(job.names, job.captions, strict=True):
        if name in reuse.clips:
            i = reuse.clips[name]
            kept.append((name, caps, int(existing.n_frames[i]), float(existing.durations[i]),
                         existing.sources[i], i))
        elif name in reuse.skips:
            skipped.append((name, reuse.skips[name][0]))
            skipped_sources.append(reuse.skips[name][1])
        elif (e := entries[name]).reason is not None:
            skipped.append((name, e.reason))
            skipped_sources.append(np.asarray(e.signature, np.int64))
        else:
            kept.append((name, caps, e.n_frames, e.duration, np.asarray(e.signature, np.int64), e))

    def mels() -> Iterator[np.ndarray]:  # one clip in memory at a time
        for *_, where in kept:
            yield existing[where] if isinstance(where, int) else folder.read(where)

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
