"""The embedding index: audio (and caption) embeddings of a trained run, searchable by cosine similarity.

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
               captions_wanted (caption embeddings were asked for once: `embed` keeps them complete)
    INDEX/embed.json    the EmbedConfig of the last `embed`
    INDEX/faiss.index   optional approximate index over `audio` (FAISS, inner product)
    INDEX/faiss.json    its AnnConfig plus the row count and fingerprint it was built from

Rows are appended a chunk at a time and ``count`` is raised only after a chunk is flushed, so an
interrupted `embed` resumes where it stopped (rows past ``count`` are discarded on reopen). A later
`embed` keeps the index in step with the features given: new names are appended, rows whose clip
fingerprint changed are re-embedded in place (their fingerprint is written last, so an interruption
leaves them "changed" and the next run redoes them), and with ``prune`` rows whose names are not in
the features are dropped by rewriting index.h5 atomically.

Search is exact by default: a chunked matrix product with top-k selection by ``np.argpartition`` and
ties broken by row number, so its order equals a brute-force NumPy ranking. For large collections
`faiss.index` (IVF-Flat or HNSW-Flat) trades a little recall for speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from clotho_retrieve.utils import ClothoRetrieveError, atomic_path, atomic_write_text, err_console

FORMAT_VERSION = 2  # 2: clip_fingerprints
INDEX_FILE = "index.h5"
FAISS_FILE = "faiss.index"
FAISS_META = "faiss.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_TYPES = ("auto", "exact", "ivf", "hnsw")
AUTO_EXACT_MAX = 50_000  # `auto`: exact search up to this many clips, IVF above (see docs/readme/query.md)

_STR = h5py.string_dtype(encoding="utf-8")
_FP = np.dtype("S32")  # a clip fingerprint: 32 hex digits


# ----------------------------------------------------------------------------------------------
# Run fingerprint
# ----------------------------------------------------------------------------------------------
def resolve_model_dir(checkpoint: str | os.PathLike, which: str = "best") -> Path:
    """A model folder (holding model.safetensors), given it or a run folder (then RUN/which/)."""
    path = Path(checkpoint).expanduser()
    for candidate in (path, path / which):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate.resolve()
    raise ClothoRetrieveError(
        f"{path}: no {WEIGHTS_FILE} here or in {path / which}; pass a run folder written by "
        "`clotho-retrieve train` or a model folder"
    )


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class RunFingerprint:
    """Which weights produced the embeddings: the SHA-256 of model.safetensors (plus its stat, a cache)."""

    model_dir: str
    sha256: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, model_dir: Path, known: RunFingerprint | None = None) -> RunFingerprint:
        """Hash the weights, unless ``known`` describes the same unchanged file (same path, size, mtime)."""
        st = (model_dir / WEIGHTS_FILE).stat()
        stat = (str(model_dir), st.st_size, st.st_mtime_ns)
        if known is not None and (known.model_dir, known.size, known.mtime_ns) == stat:
            return known
        return cls(str(model_dir), file_sha256(model_dir / WEIGHTS_FILE), st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------------------------
# Exact search
# ----------------------------------------------------------------------------------------------
def _topk_rows(scores: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of ``scores`` (Q, n): highest first, ties by lower column; ids shifted by offset.

    np.argpartition picks *some* k best; among entries equal to the k-th best value it may drop a
    lower column for a higher one, so those boundary ties are re-chosen by column before sorting.
    """
    n = scores.shape[1]
    k = min(k, n)
    out_s = np.empty((scores.shape[0], k), dtype=scores.dtype)
    out_i = np.empty((scores.shape[0], k), dtype=np.int64)
    for q, row in enumerate(scores):
        if k < n:
            part = np.argpartition(-row, k - 1)[:k]
            kth = row[part].min()
            above = np.flatnonzero(row > kth)
            ties = np.flatnonzero(row == kth)[: k - len(above)]
            cand = np.concatenate([above, ties])
        else:
            cand = np.arange(n)
        order = np.lexsort((cand, -row[cand]))  # score descending, then column ascending
        out_i[q] = cand[order] + offset
        out_s[q] = row[cand[order]]
    return out_s, out_i


def exact_search(
    vectors: np.ndarray | h5py.Dataset | _Prefix, queries: np.ndarray, k: int, chunk_rows: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` (Q, D) against ``vectors`` (N, D) -> scores, ids (Q, k).

    ``vectors`` may be an in-memory array or an HDF5 dataset: it is read ``chunk_rows`` rows at a time,
    so memory stays at O(chunk_rows * (D + Q)) whatever N is. The order equals
    ``np.argsort(-(queries @ vectors.T), kind="stable")[:, :k]``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = vectors.shape[0]
    k = min(k, n)
    best_s = np.empty((queries.shape[0], 0), dtype=np.float32)
    best_i = np.empty((queries.shape[0], 0), dtype=np.int64)
    for start in range(0, n, chunk_rows):
        block = np.asarray(vectors[start : start + chunk_rows], dtype=np.float32)  # (n_b, D)
        s, i = _topk_rows(queries @ block.T, k, offset=start)  # (Q, n_b) -> (Q, k_b)
        best_s, best_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
        if start > 0:  # merge: same rule (score desc, row asc) over the kept candidates
            order = np.lexsort((best_i, -best_s), axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, order, 1)
            best_i = np.take_along_axis(best_i, order, 1)
    return best_s, best_i


# ----------------------------------------------------------------------------------------------
# Approximate search (FAISS)
# ----------------------------------------------------------------------------------------------
@dataclass
class AnnConfig:
    """Settings of the approximate index. 0 means "choose from the collection size" (see resolved())."""

    index_type: str = "ivf"  # ivf (IVF-Flat) | hnsw (HNSW-Flat); inner product on unit vectors = cosine
    nlist: int = 0  # IVF cells; 0: about 2 sqrt(N)
    nprobe: int = 0  # IVF cells visited per query; 0: 16 (capped by nlist)
    train_size: int = 0  # IVF k-means training vectors; 0: 40 * nlist
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_construction: int = 80
    ef_search: int = 128

    def resolved(self, n: int) -> AnnConfig:
        nlist = self.nlist or max(1, int(round(2 * np.sqrt(n))))
        nlist = min(nlist, n)
        return AnnConfig(
            index_type=self.index_type,
            nlist=nlist,
            nprobe=min(self.nprobe or 16, nlist),
            train_size=min(n, self.train_size or 40 * nlist),
            hnsw_m=self.hnsw_m,
            ef_construction=self.ef_construction,
            ef_search=self.ef_search,
        )


def choose_index_type(index_type: str, n: int) -> str:
    """`auto` -> exact up to AUTO_EXACT_MAX clips, else ivf; anything else is checked and passed through."""
    if index_type not in INDEX_TYPES:
        raise ClothoRetrieveError(f"--index-type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if index_type == "auto":
        return "exact" if n <= AUTO_EXACT_MAX else "ivf"
    return index_type


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def build_faiss(vectors: np.ndarray | h5py.Dataset, cfg: AnnConfig, seed: int = 0, chunk_rows: int = 65_536):
    """Build a FAISS inner-product index (IVF-Flat or HNSW-Flat) over ``vectors`` (N, D), read in chunks."""
    import faiss

    n, d = vectors.shape
    cfg = cfg.resolved(n)
    if cfg.index_type == "ivf":
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, cfg.nlist, faiss.METRIC_INNER_PRODUCT)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=cfg.train_size, replace=False))
        train = np.concatenate(
            [
                np.asarray(vectors[a:b], np.float32)[rows[(rows >= a) & (rows < b)] - a]
                for a, b in _chunks(n, chunk_rows)
            ]
        )  # (train_size, D), read chunk by chunk so an HDF5 dataset is never loaded whole
        index.cp.niter = 10
        index.cp.seed = seed
        index.train(train)
        index.nprobe = cfg.nprobe
    elif cfg.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        raise ClothoRetrieveError(f"index type {cfg.index_type!r} has no FAISS index (ivf or hnsw)")
    for a, b in _chunks(n, chunk_rows):
        index.add(np.ascontiguousarray(vectors[a:b], dtype=np.float32))
    return index, cfg


def faiss_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS top-k -> (scores, ids), each (Q, k). Id -1 marks a slot FAISS could not fill (an IVF probe
    that saw fewer than k vectors); `query.rank` drops those."""
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    return scores, ids.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Reading an index
# ----------------------------------------------------------------------------------------------
class EmbeddingIndex:
    """Read side of an INDEX folder: metadata, the vectors, and `search`.

    Vectors of small indexes (<= ``in_memory_max`` bytes) are read into memory once; larger ones are
    streamed from HDF5 by exact search, or served by faiss.index when one was built.
    """

    def __init__(self, path: str | os.PathLike, in_memory_max: int = 2 << 30):
        self.path = Path(path)
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
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as exc:
            if getattr(self, "_h5", None) is not None:
                self._h5.close()
            raise ClothoRetrieveError(
                f"{h5_path}: not a readable index ({type(exc).__name__}: {exc}); rebuild it with "
                "`clotho-retrieve embed`"
            ) from None
        small = self.count * self.embed_dim * 4 <= in_memory_max
        self.vectors: np.ndarray | _Prefix = audio[: self.count] if small else _Prefix(audio, self.count)
        self.ann, self.ann_config = self._load_faiss()

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
        import faiss

        try:
            index = faiss.read_index(str(self.path / FAISS_FILE))
        except RuntimeError as exc:
            raise ClothoRetrieveError(
                f"{self.path / FAISS_FILE}: unreadable ({str(exc).splitlines()[0]}); rebuild it with "
                f"`clotho-retrieve index {self.path}`"
            ) from None
        cfg = AnnConfig(**meta["config"])
        if cfg.index_type == "ivf":
            index.nprobe = cfg.nprobe
        else:
            index.hnsw.efSearch = cfg.ef_search
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


class _Prefix:
    """The first ``n`` rows of an HDF5 dataset, sliceable like an array (rows past `count` are not data)."""

    def __init__(self, ds: h5py.Dataset, n: int):
        self.ds, self.shape = ds, (n, ds.shape[1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.ds[sl.start : min(sl.stop, self.shape[0])]


def search(index: EmbeddingIndex, query_vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Top-k clips of ``index`` for unit query vectors (Q, D) -> (scores, ids), each (Q, k)."""
    return index.search(query_vectors, k)


# ----------------------------------------------------------------------------------------------
# Building the approximate index of an existing INDEX folder (`clotho-retrieve index`)
# ----------------------------------------------------------------------------------------------
def build_ann_index(
    index_dir: str | os.PathLike, index_type: str = "auto", cfg: AnnConfig | None = None
) -> str:
    """Write (or remove) INDEX/faiss.index for the index's current rows; returns the type chosen.

    `exact` removes any FAISS file, so search falls back to the exact ranking. The FAISS file is
    written under a temporary name and renamed, so a reader sees the old one or the new one.
    """
    index_dir = Path(index_dir)
    with EmbeddingIndex(index_dir, in_memory_max=0) as idx:
        chosen = choose_index_type(index_type, idx.count)
        if chosen == "exact":
            for name in (FAISS_META, FAISS_FILE):
                (index_dir / name).unlink(missing_ok=True)
            return chosen
        if idx.count == 0:
            raise ClothoRetrieveError(f"{index_dir}: the index is empty; nothing to build")
        import faiss

        cfg = AnnConfig(**{**asdict(cfg or AnnConfig()), "index_type": chosen})
        t0 = time.perf_counter()
        with err_console.status(f"building {chosen} index over {idx.count:,} clips"):
            ann, resolved = build_faiss(idx.vectors, cfg)
        (index_dir / FAISS_META).unlink(missing_ok=True)  # never a new .json beside an old .index
        with atomic_path(index_dir / FAISS_FILE) as tmp:
            faiss.write_index(ann, str(tmp))
        meta = {"config": asdict(resolved), "count": idx.count, "fingerprint": idx.fingerprint.sha256}
        atomic_write_text(index_dir / FAISS_META, json.dumps(meta, indent=2) + "\n")
        err_console.print(f"{chosen} index of {idx.count:,} clips built in {time.perf_counter() - t0:.1f} s")
    return chosen


# ----------------------------------------------------------------------------------------------
# Writing an index (`clotho-retrieve embed`)
# ----------------------------------------------------------------------------------------------
@dataclass
class EmbedConfig:
    """Settings of `embed`, saved as INDEX/embed.json."""

    batch_size: int = 16  # clips per forward pass
    chunk_size: int = 256  # clips per HDF5 write (the resume granularity)
    captions: bool = False  # also embed every caption (for audio-to-text queries)
    index_type: str = "auto"  # exact | ivf | hnsw | auto (exact up to AUTO_EXACT_MAX clips)
    which: str = "best"  # best | last, when the checkpoint is a run folder
    device: str = "cpu"


def feature_files(features: str | os.PathLike) -> list[Path]:
    """A features .h5 file, or every .h5 in a folder (a Clotho features folder: all its splits)."""
    path = Path(features)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.h5") if not p.name.startswith("."))
        if not files:
            raise ClothoRetrieveError(f"{path}: no .h5 feature files here; run `clotho-retrieve features`")
        return files
    if path.is_file():
        return [path]
    raise ClothoRetrieveError(f"{path}: no such features file or folder; run `clotho-retrieve features`")


CLIP_COLUMNS = ("audio", "names", "sources", "captions", "durations", "clip_fingerprints")  # one row a clip
CAPTION_COLUMNS = ("caption_embeddings", "caption_clip", "caption_text")  # one row a caption


def clip_fingerprint(mel: np.ndarray) -> bytes:
    """blake2b-128 (32 hex digits) of a clip's float32 log-Mel frames (T, M) and their shape.

    Equal fingerprints mean `embed` would write the same audio row, so it can keep it. The front end
    needs no part in it (one index holds one front end, checked on open). Captions are not part of
    it: the same clip may come with captions in one features file and without in another.
    """
    mel = np.ascontiguousarray(mel, dtype=np.float32)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(mel.shape, np.int64).tobytes())
    digest.update(mel.tobytes())
    return digest.hexdigest().encode("ascii")


class _IndexWriter:
    """Append side of INDEX/index.h5: creates it, checks it belongs to the run, commits rows chunk-wise."""

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
        path = out / INDEX_FILE
        self.path = path
        if path.exists():
            try:
                self.h5 = h5py.File(path, "a")
                a = self.h5.attrs
                old_sha, dim, count = str(a["fingerprint"]), int(a["embed_dim"]), int(a["count"])
                old_run, old_front_end = str(a["run"]), json.loads(a["front_end"])
            except (OSError, KeyError, json.JSONDecodeError) as exc:
                raise ClothoRetrieveError(
                    f"{path}: not a readable index ({type(exc).__name__}); delete {out} or choose "
                    "another --out"
                ) from None
            if old_sha != fingerprint.sha256:
                self.h5.close()
                raise ClothoRetrieveError(
                    f"{path}: built by another run ({old_run}, weights {old_sha[:12]}); this run's weights "
                    f"are {fingerprint.sha256[:12]}. Use a new --out"
                )
            if old_front_end != front_end or dim != embed_dim:
                self.h5.close()
                raise ClothoRetrieveError(
                    f"{path}: built with another front end or dimension; use a new --out"
                )
            if "clip_fingerprints" not in self.h5:  # format version 1: every row's features are unknown
                self.h5.create_dataset(
                    "clip_fingerprints", (count,), _FP, maxshape=(None,), chunks=(4096,), fillvalue=b""
                )
                self.h5.attrs["format_version"] = FORMAT_VERSION
            self._truncate(count, int(a["captions_done"]))
        else:
            with atomic_path(path) as tmp:  # the empty skeleton appears whole or not at all
                with h5py.File(tmp, "w") as h5:
                    self._create(h5, embed_dim)
                    h5.attrs.update(
                        {
                            "format_version": FORMAT_VERSION,
                            "run": run,
                            "which": which,
                            "run_model_dir": fingerprint.model_dir,
                            "fingerprint": fingerprint.sha256,
                            "weights_size": fingerprint.size,
                            "weights_mtime_ns": fingerprint.mtime_ns,
                            "embed_dim": embed_dim,
                            "front_end": json.dumps(front_end),
                            "model_config": json.dumps(model_config),
                            "count": 0,
                            "captions_done": 0,
                        }
                    )
            self.h5 = h5py.File(path, "a")
        # The run may have moved or been copied: record where it is now (the weights are the same).
        self.h5.attrs.update(
            {
                "run": run,
                "which": which,
                "run_model_dir": fingerprint.model_dir,
                "weights_size": fingerprint.size,
                "weights_mtime_ns": fingerprint.mtime_ns,
            }
        )

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
        for name in ("caption_embeddings", "caption_clip", "caption_text"):
            self.h5[name].resize(m, axis=0)

    @property
    def count(self) -> int:
        return int(self.h5.attrs["count"])

    @property
    def captions_done(self) -> int:
        return int(self.h5.attrs["captions_done"])

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
        with atomic_path(self.path) as tmp:
            with h5py.File(tmp, "w") as h5:
                self._create(h5, d)
                for a, b in _chunks(count, chunk_rows):
                    k = keep[a:b]
                    for name in CLIP_COLUMNS:
                        self._append(h5[name], self.h5[name][a:b][k])
                n_caps = self.h5["caption_clip"].shape[0]
                for a, b in _chunks(n_caps, chunk_rows):
                    clip = self.h5["caption_clip"][a:b]
                    k = keep[clip]
                    self._append(h5["caption_embeddings"], self.h5["caption_embeddings"][a:b][k])
                    self._append(h5["caption_text"], self.h5["caption_text"][a:b][k])
                    self._append(h5["caption_clip"], new_row[clip[k]])
                h5.attrs.update(attrs)
            self.h5.close()
        self.h5 = h5py.File(self.path, "a")

    def add_captions(self, emb: np.ndarray, clip: np.ndarray, texts: list[str], captions_done: int) -> None:
        """Append caption embeddings of clips [captions_done_before, captions_done), then commit them."""
        self._append(self.h5["caption_embeddings"], emb.astype(np.float32))
        self._append(self.h5["caption_clip"], clip.astype(np.int64))
        self._append(self.h5["caption_text"], texts)
        self.h5.flush()
        self.h5.attrs["captions_done"] = captions_done
        self.h5.flush()

    def close(self) -> None:
        self.h5.close()


def _pad_batch(mels: list[np.ndarray]):
    """List of (T_i, M) log-Mels -> zero-padded (B, T_max, M) tensor and lengths (B,)."""
    import torch

    lengths = torch.tensor([m.shape[0] for m in mels])
    batch = torch.zeros(len(mels), int(lengths.max()), mels[0].shape[1])
    for b, m in enumerate(mels):
        batch[b, : m.shape[0]] = torch.from_numpy(m)
    return batch, lengths


def encode_clips(model, mels: list[np.ndarray], batch_size: int, device: str = "cpu") -> np.ndarray:
    """Audio embeddings (n, D) of log-Mels; batches are formed of similar lengths to limit padding."""
    import torch

    order = np.argsort([m.shape[0] for m in mels], kind="stable")
    out = np.empty((len(mels), model.cfg.embed_dim), np.float32)
    with torch.inference_mode():
        for start in range(0, len(mels), batch_size):
            rows = order[start : start + batch_size]
            logmel, lengths = _pad_batch([mels[r] for r in rows])  # (B, T, M), (B,)
            out[rows] = model.encode_audio(logmel.to(device), lengths.to(device)).float().cpu().numpy()
    return out


def embed(
    checkpoint: str | os.PathLike,
    features: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EmbedConfig | None = None,
    prune: bool = False,
) -> dict:
    """Embed every clip of ``features`` (file or folder) with the run's audio tower into the INDEX ``out``.

    The index is brought in step with the features: clips whose names are new are appended, clips whose
    log-Mel frames changed (`clip_fingerprint`) are re-embedded in place (captions too), and with
    ``prune`` rows whose names are not in ``features`` are removed; unchanged clips are kept as they are,
    so re-running resumes an interrupted run. A name in several feature files is taken from the first.
    Returns a summary dict (added, updated, removed, unchanged).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from clotho_retrieve.feature_file import FeatureFile
    from clotho_retrieve.frontend import FrontEnd
    from clotho_retrieve.models import RetrievalModel

    cfg = cfg or EmbedConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClothoRetrieveError(f"{out}: exists and is not a folder; --out names an index folder")
    files = feature_files(features)
    model_dir = resolve_model_dir(checkpoint, cfg.which)
    previous, had_captions = None, False
    if (out / INDEX_FILE).is_file():  # reuse the recorded hash when the weights file is unchanged
        try:
            with EmbeddingIndex(out, in_memory_max=0) as old:
                previous = old.fingerprint
                had_captions = bool(old._h5.attrs.get("captions_wanted", old.captions_done > 0))
        except ClothoRetrieveError:
            previous = None
    fingerprint = RunFingerprint.of(model_dir, previous)
    with_captions = cfg.captions or had_captions  # an index with caption embeddings keeps them complete
    parts = ("audio", "text") if with_captions else ("audio",)
    with err_console.status(f"loading {model_dir}"):
        model = RetrievalModel.from_pretrained(model_dir, parts=parts, device=cfg.device).eval()
    model_cfg = asdict(model.cfg)

    sources = [FeatureFile(f) for f in files]
    front_end = sources[0].front_end
    for f, ff in zip(files, sources, strict=True):
        if ff.front_end != front_end:
            raise ClothoRetrieveError(
                f"{f}: computed with another front end than {files[0]}; embed it separately"
            )
    trained_on = model_cfg.get("front_end")
    if trained_on and FrontEnd.from_dict(trained_on) != front_end:
        raise ClothoRetrieveError(
            f"{files[0]}: features differ from the front end {model_dir} was trained on "
            f"({', '.join(front_end.differences(FrontEnd.from_dict(trained_on)))}); recompute them"
        )

    writer = _IndexWriter(
        out,
        fingerprint,
        str(Path(checkpoint).resolve()),
        cfg.which,
        int(model.cfg.embed_dim),
        front_end.to_dict(),
        model_cfg,
    )
    writer.h5.attrs["captions_wanted"] = with_captions
    atomic_write_text(out / "embed.json", json.dumps(asdict(cfg), indent=2) + "\n")
    try:
        # Clip fingerprints, streamed one clip at a time: (file number, clip number) -> fingerprint
        wanted: dict[str, tuple[int, int]] = {}  # name -> where it is in the features (first file wins)
        for s, ff in enumerate(sources):
            for i, name in enumerate(ff.names):
                wanted.setdefault(name, (s, i))
        fps: dict[tuple[int, int], bytes] = {}
        with err_console.status(f"fingerprinting {len(wanted):,} clips"):
            for s, i in wanted.values():
                fps[s, i] = clip_fingerprint(sources[s][i])

        names = writer.names()
        keep = np.array([n in wanted for n in names], dtype=bool)
        removed = int((~keep).sum()) if prune else 0
        if removed:
            _drop_faiss(out)
            writer.keep_rows(keep)
            names = writer.names()
        row_of = {n: r for r, n in enumerate(names)}
        old_fps = writer.clip_fingerprints()
        update: list[tuple[int, int, int]] = []  # (row, file number, clip number): features changed
        todo: list[tuple[int, int]] = []  # (file number, clip number) of clips not in the index yet
        for name, (s, i) in wanted.items():
            row = row_of.get(name)
            if row is None:
                todo.append((s, i))
            elif old_fps[row] != fps[s, i]:
                update.append((row, s, i))
        update.sort()
        unchanged = len(wanted) - len(todo) - len(update)
        if update or todo:
            _drop_faiss(out)  # never a FAISS file that disagrees with the rows, even if interrupted
        if update:
            writer.forget_captions_from(update[0][0])

        def clip_columns(chunk: list[tuple[int, int]]) -> dict:
            return {
                "sources": [files[s].name for s, i in chunk],
                "durations": [float(sources[s].durations[i]) for s, i in chunk],
                "captions": [list(sources[s].captions[i]) for s, i in chunk],
                "fingerprints": [fps[s, i] for s, i in chunk],
            }

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
        )
        with progress:
            if update:
                task = progress.add_task("re-embedding changed audio", total=len(update))
                for start in range(0, len(update), cfg.chunk_size):
                    chunk = update[start : start + cfg.chunk_size]
                    mels = [sources[s][i] for _, s, i in chunk]  # (T_i, M) float32 each
                    emb = encode_clips(model, mels, cfg.batch_size, cfg.device)  # (n, D) unit norm
                    rows = np.array([r for r, _, _ in chunk])
                    writer.update_clips(rows, emb, **clip_columns([(s, i) for _, s, i in chunk]))
                    progress.advance(task, len(chunk))
            task = progress.add_task("embedding audio", total=len(todo))
            for start in range(0, len(todo), cfg.chunk_size):
                chunk = todo[start : start + cfg.chunk_size]
                mels = [sources[s][i] for s, i in chunk]  # (T_i, M) float32 each
                emb = encode_clips(model, mels, cfg.batch_size, cfg.device)  # (n, D) unit norm
                writer.add_clips(emb, names=[sources[s].names[i] for s, i in chunk], **clip_columns(chunk))
                progress.advance(task, len(chunk))
            if with_captions:  # caption rows of new and changed clips
                _embed_captions(model, writer, progress, cfg)
        count, captions_done = writer.count, writer.captions_done
    finally:
        writer.close()
        for ff in sources:
            ff.close()

    index_type = choose_index_type(cfg.index_type, count)
    if index_type == "exact":
        build_ann_index(out, "exact")
    else:
        meta_path = out / FAISS_META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("count") != count or meta.get("config", {}).get("index_type") != index_type:
            build_ann_index(out, index_type)  # rows changed: _drop_faiss removed the old one
    return {
        "index": str(out),
        "clips": count,
        "added": len(todo),
        "updated": len(update),
        "removed": removed,
        "unchanged": unchanged,
        "captions_embedded_for": captions_done if with_captions else 0,
        "index_type": index_type,
        "fingerprint": fingerprint.sha256,
    }


def _drop_faiss(out: Path) -> None:
    """Remove the FAISS files before rows change; `embed` rebuilds them once the rows are written."""
    for name in (FAISS_META, FAISS_FILE):
        (out / name).unlink(missing_ok=True)


def _embed_captions(model, writer: _IndexWriter, progress, cfg: EmbedConfig) -> None:
    """Embed the captions of clips [captions_done, count) with the text tower, chunk by chunk."""
    import torch

    task = progress.add_task("embedding captions", total=writer.count - writer.captions_done)
    while (done := writer.captions_done) < writer.count:
        stop = min(writer.count, done + cfg.chunk_size)
        caps = writer.captions(done, stop)
        texts = [c for cs in caps for c in cs]
        clip = np.repeat(np.arange(done, stop), [len(cs) for cs in caps])  # (M_chunk,) audio row of each
        emb = np.empty((len(texts), model.cfg.embed_dim), np.float32)
        with torch.inference_mode():
            for a in range(0, len(texts), cfg.batch_size):
                emb[a : a + cfg.batch_size] = model.encode_text(texts[a : a + cfg.batch_size]).float().cpu()
        writer.add_captions(emb, clip, texts, stop)
        progress.advance(task, stop - done)
