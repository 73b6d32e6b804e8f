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

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from clotho_retrieve.encoder import RunFingerprint
from clotho_retrieve.index import integrity
from clotho_retrieve.index.ann import AnnConfig, set_search_params
from clotho_retrieve.index.integrity import CAPTION_COLUMNS, CLIP_COLUMNS
from clotho_retrieve.index.search import (
    FAISS_FILE,
    FAISS_META,
    VectorPrefix,
    chunk_ranges,
    exact_search,
    faiss_search,
)
from clotho_retrieve.safety import (
    check_space,
    close_h5,
    h5_new_file,
    is_write_error,
    release_space,
    reserve_space,
    write_failed,
)
from clotho_retrieve.utils import ClothoRetrieveError, atomic_path, err_console

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


# ----------------------------------------------------------------------------------------------
# Writing an index (`clotho-retrieve embed`)
# ----------------------------------------------------------------------------------------------
FINISH = "re-run the same `embed` to finish: the clips written so far are kept"


class IndexWriter:
    """Append side of INDEX/index.h5: creates it, checks it belongs to the run, commits rows chunk-wise.

    Every write reserves its space first and a failed one closes the file with care (:meth:`_writing`);
    a damaged index.h5 of an earlier `embed` is moved aside and rebuilt."""

    def __init__(
        self,
        out: Path,
        fingerprint: RunFingerprint,
        run: str,
        which: str,
        embed_dim: int,
        front_end: dict,
        model_config: dict,
    ):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / INDEX_FILE
        where = {  # where the run is now: it may have moved or been copied (the weights are the same)
            "run": run,
            "which": which,
            "run_model_dir": fingerprint.model_dir,
            "weights_size": fingerprint.size,
            "weights_mtime_ns": fingerprint.mtime_ns,
        }
        self.h5 = None
        if self.path.exists():
            self.h5 = self._open_existing(self.path, fingerprint, embed_dim, front_end)
        if self.h5 is not None:
            with self._writing("the index settings", 0):
                self.h5.attrs.update(where)
                if "merged_from" in self.h5.attrs:  # no longer just the merge of INDEX/parts (parts.py)
                    del self.h5.attrs["merged_from"]
            return
        check_space(self.path, 64 << 10, "a new index", FINISH)
        with atomic_path(self.path) as tmp:  # the empty skeleton appears whole or not at all
            with h5py.File(tmp, "w") as h5:
                self._create(h5, embed_dim)
                h5.attrs.update(
                    {
                        "format_version": FORMAT_VERSION,
                        **where,
                        "fingerprint": fingerprint.sha256,
                        "embed_dim": embed_dim,
                        "front_end": json.dumps(front_end),
                        "model_config": json.dumps(model_config),
                        "count": 0,
                        "captions_done": 0,
                        "complete": False,  # until the first `embed` finishes (IndexWriter.finish)
                    }
                )
        self.h5 = h5py.File(self.path, "a", **UNCACHED)

    def _open_existing(
        self, path: Path, fingerprint: RunFingerprint, embed_dim: int, front_end: dict
    ) -> h5py.File | None:
        """Open an index to extend: refuse another run's, upgrade format 1, drop uncommitted rows.

        A damaged index.h5 that `embed` wrote (embed.json beside it) is moved aside: returns None."""
        h5 = None
        try:
            h5 = h5py.File(path, "a", **UNCACHED)
            a = h5.attrs
            old_sha, dim, count = str(a["fingerprint"]), int(a["embed_dim"]), int(a["count"])
            old_run, old_front_end = str(a["run"]), json.loads(a["front_end"])
            captions_done = int(a["captions_done"])
            integrity.check_readable(h5, count)
        except (OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
            close_h5(h5)
            integrity.set_aside(exc, path)  # raises unless it is a damaged index of `embed`, moved aside
            return None
        if old_sha != fingerprint.sha256:
            h5.close()
            raise ClothoRetrieveError(
                f"{path}: built by another run ({old_run}, weights {old_sha[:12]}); this run's weights "
                f"are {fingerprint.sha256[:12]}. Use a new --out"
            )
        if old_front_end != front_end or dim != embed_dim:
            h5.close()
            raise ClothoRetrieveError(f"{path}: built with another front end or dimension; use a new --out")
        self.h5 = h5
        with self._writing("the index", integrity.growth(h5, 0)):
            if "clip_fingerprints" not in h5:  # format version 1: every row's features are unknown
                h5.create_dataset(
                    "clip_fingerprints", (count,), _FP, maxshape=(None,), chunks=(4096,), fillvalue=b""
                )
                h5.attrs["format_version"] = FORMAT_VERSION
            self._truncate(count, captions_done)
        return h5

    @contextlib.contextmanager
    def _writing(self, what: str, needed: int):
        """Reserve ``needed`` bytes at the end of index.h5, then write: on a full disk nothing is written
        and one line says what is needed; a write that fails anyway closes the file with care (HDF5
        must not write after a failed write) and becomes one line too."""
        reserve_space(self.path, needed, what, FINISH)
        try:
            yield
        except Exception as exc:
            if not is_write_error(exc):
                raise
            close_h5(self.h5)
            self.h5 = None
            raise write_failed(exc, self.path, what, needed, FINISH) from None

    def begin(self, target: int, command: str) -> None:
        """Mark the index unfinished until :meth:`finish`: a query warns and prints ``command``."""
        with self._writing("the index state", 0):
            self.h5.attrs.update({"complete": False, "target_count": target, "resume_command": command})
            self.h5.flush()

    def finish(self) -> None:
        with self._writing("the index state", 0):
            self.h5.attrs.update({"complete": True, "target_count": self.count})
            self.h5.flush()

    @staticmethod
    def _create(h5: h5py.File, d: int) -> None:
        h5.create_dataset("audio", (0, d), np.float32, maxshape=(None, d), chunks=(256, d))
        for name in ("names", "sources", "captions"):
            h5.create_dataset(name, (0,), _STR, maxshape=(None,), chunks=(4096,))
        h5.create_dataset("durations", (0,), np.float64, maxshape=(None,), chunks=(4096,))
        h5.create_dataset("clip_fingerprints", (0,), _FP, maxshape=(None,), chunks=(4096,))
        h5.create_dataset("caption_embeddings", (0, d), np.float32, maxshape=(None, d), chunks=(256, d))
        h5.create_dataset("caption_clip", (0,), np.int64, maxshape=(None,), chunks=(4096,))
        h5.create_dataset("caption_text", (0,), _STR, maxshape=(None,), chunks=(4096,))

    def _truncate(self, count: int, captions_done: int) -> None:
        """Drop rows an interrupted run wrote past the committed counters."""
        for name in CLIP_COLUMNS:
            self.h5[name].resize(count, axis=0)
        clip = self.h5["caption_clip"][:]
        m = int(np.searchsorted(clip, captions_done))  # caption rows are in clip order
        for name in CAPTION_COLUMNS:
            self.h5[name].resize(m, axis=0)

    @property
    def count(self) -> int:
        return int(self.h5.attrs["count"])

    @property
    def captions_done(self) -> int:
        return int(self.h5.attrs["captions_done"])

    @property
    def captions_wanted(self) -> bool:
        """Caption embeddings were asked for once: every later `embed` keeps them complete."""
        return bool(self.h5.attrs.get("captions_wanted", self.captions_done > 0))

    @captions_wanted.setter
    def captions_wanted(self, wanted: bool) -> None:
        self.h5.attrs["captions_wanted"] = wanted

    def names(self) -> list[str]:
        return [v.decode("utf-8") for v in self.h5["names"][: self.count]]

    def captions(self, start: int, stop: int) -> list[list[str]]:
        return [json.loads(v) for v in self.h5["captions"][start:stop]]

    def clip_fingerprints(self) -> list[bytes]:
        return list(self.h5["clip_fingerprints"][: self.count])

    @staticmethod
    def _append(ds: h5py.Dataset, values) -> None:
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n:] = values

    def add_clips(
        self,
        emb: np.ndarray,
        names: list[str],
        sources: list[str],
        durations: list[float],
        captions: list[list[str]],
        fingerprints: list[bytes] | None = None,
    ) -> None:
        """Append one chunk of clips (emb (n, D)), then commit it by raising `count`.

        Without ``fingerprints`` the rows' features count as unknown: a later `embed` re-embeds them."""
        assert self.h5["audio"].shape[0] == self.count, "uncommitted rows"
        needed = integrity.growth(self.h5, len(names), 0, integrity.text_bytes(names, sources, captions))
        with self._writing(f"{len(names)} more clips", needed):
            self._append(self.h5["audio"], emb.astype(np.float32))
            self._append(self.h5["names"], names)
            self._append(self.h5["sources"], sources)
            self._append(self.h5["durations"], np.asarray(durations, np.float64))
            self._append(self.h5["captions"], [json.dumps(c, ensure_ascii=False) for c in captions])
            self._append(self.h5["clip_fingerprints"], np.asarray(fingerprints or [b""] * len(names), _FP))
            self.h5.flush()
            self.h5.attrs["count"] = self.count + len(names)
            self.h5.flush()

    def update_clips(
        self,
        rows: np.ndarray,
        emb: np.ndarray,
        sources: list[str],
        durations: list[float],
        captions: list[list[str]],
        fingerprints: list[bytes],
    ) -> None:
        """Overwrite committed rows (increasing, emb (n, D)) in place; their fingerprints go last, so an
        interrupted update leaves them unequal to the features and the next `embed` redoes them."""
        assert np.all(np.diff(rows) > 0) and rows[-1] < self.count
        needed = integrity.growth(self.h5, 0, 0, integrity.text_bytes(sources, captions))  # new strings
        with self._writing(f"{len(rows)} changed clips", needed):
            self.h5["audio"][rows] = emb.astype(np.float32)
            self.h5["sources"][rows] = sources
            self.h5["durations"][rows] = np.asarray(durations, np.float64)
            self.h5["captions"][rows] = [json.dumps(c, ensure_ascii=False) for c in captions]
            self.h5.flush()
            self.h5["clip_fingerprints"][rows] = np.asarray(fingerprints, _FP)
            self.h5.flush()

    def forget_captions_from(self, row: int) -> None:
        """Drop the caption embeddings of clips >= row (they are re-embedded from there, in clip order)."""
        if row >= self.captions_done:
            return
        m = int(np.searchsorted(self.h5["caption_clip"][:], row))
        with self._writing("the index state", 0):
            self.h5.attrs["captions_done"] = row  # first: a crash leaves rows past it, which _truncate drops
            self.h5.flush()
            for name in CAPTION_COLUMNS:
                self.h5[name].resize(m, axis=0)
            self.h5.flush()

    def keep_rows(self, keep: np.ndarray, chunk_rows: int = 65_536) -> None:
        """Keep only the clips where ``keep`` (count,) is True (and their captions): index.h5 is rewritten
        chunk by chunk under a temporary name and renamed, so a reader sees the old or the new file."""
        count, captions_done = self.count, self.captions_done
        new_row = np.cumsum(keep) - 1  # (count,) new row of each kept clip
        attrs = dict(self.h5.attrs)
        attrs.update(count=int(keep.sum()), captions_done=int(keep[:captions_done].sum()))
        d = self.h5["audio"].shape[1]
        size = self.path.stat().st_size  # at most what the rewritten file takes
        with atomic_path(self.path) as tmp:
            with h5_new_file(tmp, size, "the index without the pruned clips", self.path, FINISH) as h5:
                self._create(h5, d)
                for a, b in chunk_ranges(count, chunk_rows):
                    k = keep[a:b]
                    for name in CLIP_COLUMNS:
                        self._append(h5[name], self.h5[name][a:b][k])
                n_caps = self.h5["caption_clip"].shape[0]
                for a, b in chunk_ranges(n_caps, chunk_rows):
                    clip = self.h5["caption_clip"][a:b]
                    k = keep[clip]
                    self._append(h5["caption_embeddings"], self.h5["caption_embeddings"][a:b][k])
                    self._append(h5["caption_text"], self.h5["caption_text"][a:b][k])
                    self._append(h5["caption_clip"], new_row[clip[k]])
                h5.attrs.update(attrs)
            self.h5.close()
        self.h5 = h5py.File(self.path, "a", **UNCACHED)

    def add_captions(self, emb: np.ndarray, clip: np.ndarray, texts: list[str], captions_done: int) -> None:
        """Append caption embeddings of clips [captions_done_before, captions_done), then commit them."""
        needed = integrity.growth(self.h5, 0, len(texts), integrity.text_bytes(texts))
        with self._writing(f"{len(texts)} more caption embeddings", needed):
            self._append(self.h5["caption_embeddings"], emb.astype(np.float32))
            self._append(self.h5["caption_clip"], clip.astype(np.int64))
            self._append(self.h5["caption_text"], texts)
            self.h5.flush()
            self.h5.attrs["captions_done"] = captions_done
            self.h5.flush()

    def close(self, failing: bool = False) -> None:
        """Close index.h5 (with care) and give back unused reserved space; ``failing``: an error is on its
        way already, so a failed close is not reported over it."""
        failed = close_h5(self.h5)
        self.h5 = None
        release_space(self.path)
        if failed is not None and not failing:
            raise write_failed(failed, self.path, "the index", None, FINISH)

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close(failing=exc[0] is not None)
