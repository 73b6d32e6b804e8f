"""The embedding index store: audio (and caption) embeddings of a trained run, written and read.

On-disk layout of an INDEX folder::

    INDEX/index.h5      the embeddings and what describes them (resizable, written chunk by chunk)
        audio               (N, D) float32   L2-normalised audio embeddings, one row per clip
        names               (N,)   str       file names (relative paths for --audio-dir features)
        sources             (N,)   str       the feature file each clip came from (e.g. "evaluation.h5")
        durations           (N,)   float64   seconds
        captions            (N,)   str       JSON list of the clip's captions ("[]" when unknown)
        clip_fingerprints   (N,)   S32       blake2b-128 (hex) of the clip's float32 log-Mel frames;
                                             "" = unknown (rows of a format version 1 index)
        caption_embeddings  (M, D) float32   optional (embed --captions): one row per caption
        caption_clip        (M,)   int64     the audio row each caption belongs to
        caption_text        (M,)   str       the caption itself
        attrs: format_version, run (absolute path), which (best | last), fingerprint (SHA-256 of the
               run's model.safetensors), weights_size / weights_mtime_ns (to skip re-hashing an
               unchanged file), embed_dim, front_end (JSON), model_config (JSON),
               count (rows committed), captions_done (clips whose captions are embedded),
               captions_wanted (caption embeddings were asked for once: `embed` keeps them complete),
               complete (false while an `embed` is unfinished), target_count (the clips it will hold),
               resume_command (the `embed` that finishes it)
    INDEX/embed.json    the EmbedConfig of the last `embed`
    INDEX/faiss.index   optional approximate index over `audio` (FAISS, inner product; index/ann.py)
    INDEX/faiss.json    its AnnConfig, the row count and fingerprint it was built from, and "report":
                        the recall@10, memory and latency measured when it was built (ann.BuildReport)
    INDEX/parts/        the parts of a sharded `embed` (index/parts.py)

Rows are appended a chunk at a time and ``count`` is raised only after a chunk is flushed, so an
interrupted `embed` resumes where it stopped (rows past ``count`` are discarded on reopen). The space a
chunk needs is reserved before it is written (clotho_retrieve.safety.reserve_space): on a full disk the
writer stops with one line before HDF5 writes anything, and the committed rows stay readable. Rows whose
clip changed are overwritten in place, their fingerprint written last (an interruption leaves them
"changed", and the next `embed` redoes them); dropping rows rewrites index.h5 atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from clotho_retrieve.encoder import RunFingerprint
from clotho_retrieve.index import integrity
from clotho_retrieve.index.ann import AnnConfig, set_search_params
from clotho_retrieve.index.search import (
    FAISS_FILE,
    FAISS_META,
    VectorPrefix,
    exact_search,
    faiss_search,
)
from clotho_retrieve.utils import ClothoRetrieveError, err_console

FORMAT_VERSION = 2  # 2: clip_fingerprints
INDEX_FILE = "index.h5"

# No chunk cache for writing: each chunk goes to disk when written, so a failed write raises there (a
# cached chunk would be written when its dataset object is freed, where HDF5 can only print the error).
UNCACHED = {"rdcc_nbytes": 0}
_STR = h5py.string_dtype(encoding="utf-8")
_FP = np.dtype("S32")  # a clip fingerprint: 32 hex digits


# ----------------------------------------------------------------------------------------------
# Reading an index
# ----------------------------------------------------------------------------------------------
def read_faiss(path: Path, mmap: bool = True):
    """A FAISS index file with its IVF inverted lists memory-mapped (a query reads the pages of the lists
    it probes, not a 4 GB file for a million clips; other parts and types are read as usual). Read
    whole if FAISS refuses to map it, or with ``mmap=False`` (a long-lived server: no page faults on
    cold lists). The index is read-only: search, never add."""
    import faiss

    if not mmap:
        return faiss.read_index(str(path))
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:  # a type FAISS cannot map (or an unreadable file: the plain read says which)
        return faiss.read_index(str(path))


class EmbeddingIndex:
    """Read side of an INDEX folder: metadata, the vectors, and `search`.

    Vectors of small indexes (<= ``in_memory_max`` bytes) are read into memory once; larger ones are
    streamed from HDF5 by exact search, or served by faiss.index when one was built.
    """

    def __init__(
        self, path: str | os.PathLike, in_memory_max: int = 2 << 30, mmap: bool = True, load_ann: bool = True
    ):
        """``load_ann=False``: never read faiss.index (exact search; rebuilding a damaged FAISS file)."""
        self.path = Path(path)
        self.mmap = mmap  # FAISS inverted lists memory-mapped (one-shot queries) or read whole (servers)
        h5_path = self.path / INDEX_FILE
        if not h5_path.is_file():
            hint = " (pass the folder `embed --out` wrote)" if self.path.is_file() else ""
            raise ClothoRetrieveError(
                f"{self.path}: no {INDEX_FILE} here{hint}; build one with `clotho-retrieve embed`"
            )
        try:
            self._h5 = h5py.File(h5_path, "r")
            attrs = dict(self._h5.attrs)
            self.count = int(attrs["count"])
            self.embed_dim = int(attrs["embed_dim"])
            self.front_end: dict = json.loads(attrs["front_end"])
            self.model_config: dict = json.loads(attrs["model_config"])
            self.fingerprint = RunFingerprint(
                str(attrs["run_model_dir"]),
                str(attrs["fingerprint"]),
                int(attrs["weights_size"]),
                int(attrs["weights_mtime_ns"]),
            )
            self.run = str(attrs["run"])
            self.which = str(attrs["which"])
            self.captions_done = int(attrs["captions_done"])
            audio = self._h5["audio"]
            if audio.shape[0] < self.count or audio.shape[1] != self.embed_dim:
                raise ValueError(f"audio is {audio.shape}, expected ({self.count}, {self.embed_dim})")
            integrity.check_readable(self._h5, self.count)
        except (OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
            if getattr(self, "_h5", None) is not None:
                self._h5.close()
            raise integrity.open_failed(exc, self.path) from None
        self.incomplete = integrity.incomplete_warning(self.path, attrs, self.count)
        small = self.count * self.embed_dim * 4 <= in_memory_max
        self.vectors: np.ndarray | VectorPrefix = (
            audio[: self.count] if small else VectorPrefix(audio, self.count)
        )
        self.ann, self.ann_config = self._load_faiss() if load_ann else (None, None)

    def _load_faiss(self):
        meta_path = self.path / FAISS_META
        if not meta_path.is_file():
            return None, None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("count") != self.count or meta.get("fingerprint") != self.fingerprint.sha256:
            err_console.print(
                f"[yellow]warning:[/] {self.path / FAISS_FILE} is stale (built for {meta.get('count')} "
                f"clips, index has {self.count}); using exact search. Rebuild: clotho-retrieve index "
                f"{self.path}"
            )
            return None, None
        try:
            index = read_faiss(self.path / FAISS_FILE, self.mmap)
        except RuntimeError as exc:
            raise ClothoRetrieveError(
                f"{self.path / FAISS_FILE}: unreadable ({str(exc).splitlines()[0]}); rebuild it with "
                f"`clotho-retrieve index {self.path}`, or search without it: query --exact"
            ) from None
        cfg = AnnConfig(**meta["config"])
        set_search_params(index, cfg)
        return index, cfg

    @property
    def index_type(self) -> str:
        return self.ann_config.index_type if self.ann_config else "exact"

    def __len__(self) -> int:
        return self.count

    def _column(self, name: str, ids: Sequence[int]) -> list:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return []
        uniq, inverse = np.unique(ids, return_inverse=True)  # h5py fancy indexing wants increasing ids
        values = self._h5[name][uniq]
        return [values[j] for j in inverse]

    def names(self, ids: Sequence[int]) -> list[str]:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in self._column("names", ids)]

    def durations(self, ids: Sequence[int]) -> list[float]:
        return [float(v) for v in self._column("durations", ids)]

    def captions(self, ids: Sequence[int]) -> list[list[str]]:
        return [json.loads(v) for v in self._column("captions", ids)]

    def all_names(self) -> list[str]:
        return [v.decode("utf-8") for v in self._h5["names"][: self.count]]

    @property
    def captions_wanted(self) -> bool:
        """Caption embeddings were asked for once (format 1 indexes: when some were embedded)."""
        return bool(self._h5.attrs.get("captions_wanted", self.captions_done > 0))

    @property
    def has_caption_embeddings(self) -> bool:
        return "caption_embeddings" in self._h5 and self.captions_done == self.count

    def caption_vectors(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(M, D) caption embeddings, (M,) their audio rows, and the caption texts."""
        if not self.has_caption_embeddings:
            raise ClothoRetrieveError(
                f"{self.path}: no caption embeddings for all clips; re-run `clotho-retrieve embed "
                "--captions` with the same --out"
            )
        texts = [v.decode("utf-8") for v in self._h5["caption_text"][:]]
        return self._h5["caption_embeddings"][:], self._h5["caption_clip"][:], texts

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k clips for each query vector (Q, D) -> scores, ids (Q, k); FAISS when built, unless exact.

        Approximate search may return id -1 in slots it could not fill."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.embed_dim:
            raise ClothoRetrieveError(
                f"{self.path}: query vectors have dimension {queries.shape[1]}, the index {self.embed_dim}"
            )
        if self.count == 0:
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        if self.ann is not None and not exact:
            return faiss_search(self.ann, queries, k)
        return exact_search(self.vectors, queries, k)

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> EmbeddingIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
