"""The HDF5 features cache: one file per Clotho split (or one for a folder of audio).

HDF5 layout::

    /mel          (sum_i T_i, n_mels) float32   every clip's frames, concatenated (contiguous, uncompressed)
    /offsets      (N + 1,) int64                clip i is mel[offsets[i]:offsets[i + 1]]  -> O(1) reads
    /n_frames     (N,) int64                    T_i
    /durations    (N,) float64                  seconds of the source audio
    /names        (N,) str                      file names (relative paths for --audio-dir)
    /captions     (N, K) str                    K captions per clip ("" pads; K = 0 when there are none)
    /source_size, /source_mtime_ns  (N,) int64  the source file's size and st_mtime_ns when it was computed
    /skipped/names, /skipped/reasons  (M,) str  files left out and why
    /skipped/source_size, /skipped/source_mtime_ns  (M,) int64   same, -1 for problems found before decoding
    attrs: every FrontEnd field (mel_norm None is stored as "none"), format, format_version, source, split
           (a CLAP model's features: every ClapFrontEnd field, preset "clap"; /mel holds its (C * T, F)
           input rows per clip, see clap.py)

Format version 2 added the source_* datasets (what lets a re-run reuse unchanged clips); version 1 files
are still read, with every size and mtime unknown (-1), so nothing of theirs is reused.

``write_feature_file`` writes a whole file atomically; ``FeatureFile`` reads one (metadata in memory,
clips on demand).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from clotho_retrieve.frontend import FrontEnd, front_end_from_dict
from clotho_retrieve.utils import ClothoRetrieveError

FORMAT = "clotho-retrieve-features"
FORMAT_VERSION = 2  # 2: /source_size, /source_mtime_ns (incremental updates)
UNKNOWN = -1  # size / mtime of a source never stat'ed (format version 1, problems found before decoding)


def features_path(features_dir: str | os.PathLike, split: str) -> Path:
    """The HDF5 file of one Clotho split inside a features folder."""
    return Path(features_dir) / f"{split}.h5"


def source_signature(path: Path) -> np.ndarray:
    """[size, st_mtime_ns] of a source file (the /source_* columns): what tells a re-run it changed."""
    st = path.stat()
    return np.array([st.st_size, st.st_mtime_ns], np.int64)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _strings(ds) -> list:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()].ravel().tolist()]


def _sources(h5, group: str, n: int) -> np.ndarray:
    """(n, 2) int64 [size, mtime_ns] from ``group``source_size / source_mtime_ns, UNKNOWN when absent."""
    if f"{group}source_size" not in h5:
        return np.full((n, 2), UNKNOWN, np.int64)
    size, mtime_ns = h5[f"{group}source_size"][()], h5[f"{group}source_mtime_ns"][()]
    return np.stack([size, mtime_ns], axis=1).astype(np.int64)


class FeatureFile:
    """Read side of one features HDF5 file: metadata in memory, clips read on demand in O(1).

    Picklable (for DataLoader workers): the HDF5 handle is opened lazily in each process.
    """

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise ClothoRetrieveError(f"{self.path}: features file not found; run `clotho-retrieve features`")
        try:
            with h5py.File(self.path, "r") as h5:
                self._check_format(h5)
                self._read_metadata(h5)
        except (OSError, KeyError) as exc:
            raise ClothoRetrieveError(
                f"{self.path}: unreadable features file ({exc}); delete it and re-run `features`"
            ) from None
        self._h5 = None
        self._pid = None

    def _check_format(self, h5) -> None:
        if h5.attrs.get("format") != FORMAT:
            raise ClothoRetrieveError(
                f"{self.path}: not a clotho-retrieve features file; re-create it with "
                "`clotho-retrieve features`"
            )
        if int(h5.attrs.get("format_version", 0)) > FORMAT_VERSION:
            raise ClothoRetrieveError(
                f"{self.path}: written by a newer clotho-retrieve (format version "
                f"{h5.attrs['format_version']}); upgrade, or re-run `clotho-retrieve features`"
            )

    def _read_metadata(self, h5) -> None:
        self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
        self.front_end = front_end_from_dict(self.attrs)  # a FrontEnd, or a ClapFrontEnd
        self.names: list[str] = _strings(h5["names"])
        caps = h5["captions"]
        k = caps.shape[1]
        flat = _strings(caps) if k else []
        self.captions: list[list[str]] = [
            [c for c in flat[i * k : (i + 1) * k] if c] for i in range(len(self.names))
        ]
        self.durations: np.ndarray = h5["durations"][()].astype(np.float64)
        self.n_frames: np.ndarray = h5["n_frames"][()].astype(np.int64)
        self.offsets: np.ndarray = h5["offsets"][()].astype(np.int64)
        self.skipped: list[tuple[str, str]] = list(
            zip(_strings(h5["skipped/names"]), _strings(h5["skipped/reasons"]), strict=True)
        )
        # (size, mtime_ns) of each source when computed; UNKNOWN in files of format version 1
        self.sources: np.ndarray = _sources(h5, "", len(self.names))  # (N, 2) int64
        self.skipped_sources: np.ndarray = _sources(h5, "skipped/", len(self.skipped))  # (M, 2)

    def __len__(self) -> int:
        return len(self.names)

    def _mel(self):
        import h5py

        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5["mel"]

    def __getitem__(self, i: int) -> np.ndarray:
        """(n_frames[i], n_mels) float32 log-Mel of clip i."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"clip {i} out of range for {n} clips in {self.path}")
        i %= n
        return np.asarray(self._mel()[self.offsets[i] : self.offsets[i + 1]], dtype=np.float32)

    def index(self, name: str) -> int:
        """Position of a clip by file name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ClothoRetrieveError(f"{self.path}: no clip named {name!r}") from None

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None
        return state

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def write_feature_file(
    path: str | os.PathLike,
    names: list[str],
    mels: Iterable[np.ndarray],
    durations: list[float],
    front_end: FrontEnd,  # or a clap.ClapFrontEnd: its (C * T, F) input rows are stored the same way
    captions: list[list[str]] | None = None,
    skipped: list[tuple[str, str]] | None = None,
    n_frames: list[int] | None = None,
    sources: np.ndarray | None = None,
    skipped_sources: np.ndarray | None = None,
    **attrs,
) -> Path:
    """Write a complete features file atomically (temporary name, then rename); see the module docstring.

    ``mels`` is consumed once, in order; clip i must have front_end.n_mels columns. With ``n_frames``
    given, ``mels`` may be a lazy iterator (bounded memory). ``sources`` / ``skipped_sources``: (N, 2) and
    (M, 2) [size, mtime_ns] of the source files (UNKNOWN = -1 when not given: never reused by a re-run).
    """
    import h5py

    from clotho_retrieve.safety import h5_new_file
    from clotho_retrieve.utils import atomic_path

    path = Path(path)
    if n_frames is None:
        mels = list(mels)
        n_frames = [len(m) for m in mels]
    n_frames = np.asarray(n_frames, np.int64).reshape(len(names))
    offsets = np.concatenate([[0], np.cumsum(n_frames)]).astype(np.int64)
    captions = captions if captions is not None else [[] for _ in names]
    k = max((len(c) for c in captions), default=0)
    cap = np.array([list(c) + [""] * (k - len(c)) for c in captions], dtype=object).reshape(len(names), k)
    skipped = skipped or []
    sources = _source_array(sources, len(names))
    skipped_sources = _source_array(skipped_sources, len(skipped))
    text = h5py.string_dtype("utf-8")
    texts = [*names, *cap.ravel().tolist(), *(x for s in skipped for x in s)]
    strings = sum(len(s.encode()) + 32 for s in texts)  # variable-length strings: HDF5's global heap
    needed = int(offsets[-1]) * front_end.n_mels * 4 + 40 * (len(names) + len(skipped)) + 2 * strings
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with h5_new_file(tmp, needed, "the features file", path) as h5:
            _write_mels(h5, mels, offsets, front_end.n_mels)
            h5.create_dataset("offsets", data=offsets)
            h5.create_dataset("n_frames", data=n_frames)
            h5.create_dataset("durations", data=np.asarray(durations, np.float64))
            h5.create_dataset("names", data=np.array(names, dtype=object), dtype=text)
            h5.create_dataset("captions", data=cap, dtype=text, shape=(len(names), k))
            for col, key in enumerate(("skipped/names", "skipped/reasons")):
                h5.create_dataset(key, data=np.array([s[col] for s in skipped], dtype=object), dtype=text)
            for group, src in (("", sources), ("skipped/", skipped_sources)):
                h5.create_dataset(f"{group}source_size", data=src[:, 0])
                h5.create_dataset(f"{group}source_mtime_ns", data=src[:, 1])
            for key, value in front_end.to_dict().items():
                h5.attrs[key] = "none" if value is None else value
            h5.attrs["format"] = FORMAT
            h5.attrs["format_version"] = FORMAT_VERSION
            for key, value in attrs.items():
                h5.attrs[key] = value
    return path


WRITE_BYTES = 4 << 20  # clips smaller than this are gathered into slabs of about this size


def _write_mels(h5, mels: Iterable[np.ndarray], offsets: np.ndarray, n_mels: int) -> None:
    """/mel: clip i's (T_i, n_mels) frames at rows offsets[i]:offsets[i + 1]. Long clips are written as
    they come; runs of short ones are gathered into slabs of about WRITE_BYTES (few HDF5 calls for many
    small clips, bounded memory)."""
    mel_ds = h5.create_dataset("mel", shape=(int(offsets[-1]), n_mels), dtype=np.float32)
    slab: list[np.ndarray] = []
    start = 0  # first row of the slab

    def flush(end: int) -> None:
        if end > start:
            mel_ds[start:end] = np.concatenate(slab) if len(slab) > 1 else slab[0]
        slab.clear()

    for m, a, b in zip(mels, offsets[:-1], offsets[1:], strict=True):
        if m.shape != (b - a, n_mels):
            raise ValueError(f"clip features {m.shape}, expected ({b - a}, {n_mels})")
        if m.nbytes >= WRITE_BYTES // 16:  # long enough to write alone
            flush(a)
            if b > a:
                mel_ds[a:b] = m
            start = b
            continue
        slab.append(m)
        if (b - start) * n_mels * 4 >= WRITE_BYTES:
            flush(b)
            start = b
    flush(int(offsets[-1]))


def _source_array(sources, n: int) -> np.ndarray:
    if sources is None:
        return np.full((n, 2), UNKNOWN, np.int64)
    return np.asarray(sources, np.int64).reshape(n, 2)
