"""The work folder of one features output: computed clips saved in batches until the HDF5 is assembled.

``.OUT.DIGEST.work/`` sits beside the output (DIGEST: of the front end, so a changed front end starts
afresh). Whoever computes clips (a process, a worker, a torchrun rank, a ``--shard i/N`` job) writes them
in batch files, each written under a temporary name and renamed: a batch is either complete or absent,
and a killed run resumes from the batches it left. Writers never share a file, so any number of them may
fill one folder (on a file system all of them see); they are told apart by a tag ("0of1", "3of8").

A batch file ``TAG-TOKEN.batch`` holds::

    b"CRBATCH1"  uint64 little-endian header length  header (JSON, UTF-8)  float32 rows
    header: {"n_mels": M, "clips": [{"name", "size", "mtime_ns", "duration", "n_frames", "reason"}, ...]}

the rows of the clips that were computed (reason null), in header order, (sum T_i, M) C order; a clip
that could not be read has a reason and no rows. size / mtime_ns are the source's when it was read: a
clip whose source changed since is computed again. One file per batch (not per clip) keeps file
creations, the costly operation on cluster file systems, a small fraction of the work.

A batch that does not fit on the disk (its size is checked before writing; a failed write is caught too,
in a worker process as in this one) raises NoSpace, which pickles back from a worker like any error;
``no_space`` then says what the rest of the job needs. The batches already saved stay valid.

Besides batches: ``part-TAG.done`` (JSON: what part TAG computed, written when it finished its share) and
``TAG.lock`` (an advisory lock a writer holds: a second writer of the same part is refused).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clotho_retrieve.frontend import FrontEnd
from clotho_retrieve.utils import ClothoRetrieveError, atomic_path

MAGIC = b"CRBATCH1"
WORK_FILES = "the work files"
_HEAD = struct.Struct("<8sQ")  # magic, header length


@dataclass
class ClipResult:
    """One clip as computed: features (None when skipped), seconds, source size and mtime, why skipped."""

    name: str
    mel: np.ndarray | None
    duration: float
    signature: np.ndarray  # (2,) int64 [size, mtime_ns]
    reason: str | None


@dataclass(frozen=True)
class Entry:
    """Where a computed clip lies: rows [row, row + n_frames) of the data of ``file``."""

    name: str
    file: Path
    data_start: int  # byte offset of the file's float32 rows
    row: int
    n_frames: int
    duration: float
    signature: tuple[int, int]
    reason: str | None


def work_dir(out: Path, front_end: FrontEnd) -> Path:
    """The work folder beside ``out`` for this front end."""
    digest = hashlib.sha1(json.dumps(front_end.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return out.parent / f".{out.name}.{digest}.work"


class WorkFolder:
    """Batches of computed clips for one output; ``scan()`` indexes what is there, ``find`` looks up."""

    def __init__(self, path: Path, n_mels: int):
        self.path, self.n_mels = Path(path), n_mels
        self.entries: dict[str, list[Entry]] = {}  # name -> every computed version of that clip
        self._seen: set[str] = set()  # batch files already indexed

    # ------------------------------------------------------------------ writing
    def write_batch(self, tag: str, results: list[ClipResult]) -> Path:
        """Save ``results`` as one batch file (temporary name, then rename). A batch that does not fit on the
        disk (checked first, or a failed write) raises NoSpace naming it, with ``per_clip`` bytes set."""
        from clotho_retrieve.safety import NoSpace, check_space, writes

        clips = [{"name": r.name, "size": int(r.signature[0]), "mtime_ns": int(r.signature[1]),
                  "duration": float(r.duration), "n_frames": 0 if r.mel is None else len(r.mel),
                  "reason": r.reason} for r in results]
        header = json.dumps({"n_mels": self.n_mels, "clips": clips}).encode("utf-8")
        header += b" " * (-(len(header) + _HEAD.size) % 64)  # rows start 64-byte aligned
        chunks = [_HEAD.pack(MAGIC, len(header)) + header]
        chunks += [np.ascontiguousarray(r.mel, dtype="<f4").data for r in results if r.mel is not None]
        size = sum(memoryview(c).nbytes for c in chunks)
        path = self.path / f"{tag}-{secrets.token_hex(8)}.batch"
        try:
            with writes(path, WORK_FILES, size):  # a failed write (a full disk above all): one line
                check_space(path, size, WORK_FILES)
                with atomic_path(path, suffix=".part") as tmp:
                    _write_file(tmp, chunks)
        except NoSpace as exc:
            exc.per_clip = size / max(1, len(results))  # travels with the error (pickled from a worker)
            raise
        return path

    def make(self) -> None:
        """Create the folder (a failed mkdir, a full disk above all: one line naming it)."""
        from clotho_retrieve.safety import writes

        with writes(self.path, "the work folder"):
            self.path.mkdir(parents=True, exist_ok=True)

    def no_space(self, out: Path, left: int, clips: int, failed: Exception) -> Exception:
        """The one line when a batch did not fit (``failed``, a NoSpace) with ``left`` clips of the job not
        saved yet: what the rest needs, from the batches so far (or the failed one): those ``left`` clips,
        then the output ``out``, about as large as all the job's ``clips`` (the batches stay until then).
        The folder must have been scanned since the failure."""
        from clotho_retrieve.safety import no_space

        sizes = []
        for file in {e.file for versions in self.entries.values() for e in versions}:
            with contextlib.suppress(OSError):
                sizes.append(file.stat().st_size)
        count = self.clip_count()
        per_clip = sum(sizes) / count if sizes and count else getattr(failed, "per_clip", 0)
        needed = int(per_clip * (left + clips))
        return no_space(out, needed or None, f"the features of {left} more clips and the file itself")

    def clean(self, tag: str) -> None:
        """Remove temporary files a killed writer of part ``tag`` left (its batches are kept)."""
        for stale in self.path.glob(f".{tag}-*.part"):
            stale.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, tag: str) -> Iterator[None]:
        """Hold part ``tag``'s lock; refuse when another live process holds it."""
        import fcntl

        from clotho_retrieve.safety import writes

        self.make()
        with writes(self.path, "the work folder"):
            fh = open(self.path / f"{tag}.lock", "a")  # noqa: SIM115 - closed by the with below
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ClothoRetrieveError(
                    f"{self.path}: another `features` run is computing part {tag} of this output; "
                    "wait for it to finish (or stop it) and re-run"
                ) from None
            except OSError:  # a file system without locks (some cluster mounts): go on unguarded
                pass
            yield

    # ------------------------------------------------------------------ reading
    def scan(self) -> int:
        """Index the batch files not seen before; returns how many clips they add. A batch that cannot
        be read (it cannot be half-written, but a disk can fail) is removed: its clips are redone."""
        added = 0
        for path in sorted(self.path.glob("*.batch")):
            if path.name in self._seen:
                continue
            try:
                entries = self._read_header(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                if isinstance(exc, FileNotFoundError):
                    continue
                path.unlink(missing_ok=True)
                continue
            self._seen.add(path.name)
            for e in entries:
                self.entries.setdefault(e.name, []).append(e)
            added += len(entries)
        return added

    def _read_header(self, path: Path) -> list[Entry]:
        with open(path, "rb") as fh:
            magic, n = _HEAD.unpack(fh.read(_HEAD.size))
            if magic != MAGIC:
                raise ValueError("not a batch file")
            header = json.loads(fh.read(n).decode("utf-8"))
        start = _HEAD.size + n
        if header["n_mels"] != self.n_mels:
            raise ValueError("n_mels")
        entries, row = [], 0
        for c in header["clips"]:
            entries.append(Entry(c["name"], path, start, row, int(c["n_frames"]), float(c["duration"]),
                                 (int(c["size"]), int(c["mtime_ns"])), c["reason"]))
            row += int(c["n_frames"])
        if path.stat().st_size != start + 4 * row * self.n_mels:
            raise ValueError("size")
        return entries

    def find(self, name: str, signature: np.ndarray) -> Entry | None:
        """The computed clip ``name`` of a source with this [size, mtime_ns], or None."""
        want = (int(signature[0]), int(signature[1]))
        return next((e for e in self.entries.get(name, ()) if e.signature == want), None)

    def read(self, entry: Entry) -> np.ndarray:
        """(n_frames, n_mels) float32 features of a computed clip."""
        count = entry.n_frames * self.n_mels
        offset = entry.data_start + 4 * entry.row * self.n_mels
        mel = np.fromfile(entry.file, dtype="<f4", count=count, offset=offset)
        return mel.reshape(entry.n_frames, self.n_mels).astype(np.float32, copy=False)

    def clip_count(self, tag: str | None = None) -> int:
        """Computed clips (every version) indexed so far; with ``tag``, those of part ``tag``'s batches."""
        return sum(1 for v in self.entries.values() for e in v
                   if tag is None or e.file.name.startswith(f"{tag}-"))

    # ------------------------------------------------------------------ parts
    def mark_part_done(self, tag: str, record: dict) -> None:
        from clotho_retrieve.safety import writes
        from clotho_retrieve.utils import atomic_write_text

        path = self.path / f"part-{tag}.done"
        with writes(path, "the record of a finished part"):
            atomic_write_text(path, json.dumps(record) + "\n")

    def parts_done(self) -> dict[str, dict]:
        """tag -> record of every part that said it finished."""
        done = {}
        for path in self.path.glob("part-*.done"):
            with contextlib.suppress(OSError, ValueError):
                done[path.name[len("part-") : -len(".done")]] = json.loads(path.read_text(encoding="utf-8"))
        return done


def _write_file(path: Path, chunks: list) -> None:
    """Write ``chunks`` (bytes, buffers) one after the other into a new file ``path``."""
    with open(path, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
