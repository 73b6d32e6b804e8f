"""Search over an index's vectors: exact top-k (chunked, tie-stable) and approximate (FAISS IVF / HNSW).

Search is exact by default: a chunked matrix product with top-k selection by ``np.argpartition`` and
ties broken by row number, so its order equals a brute-force NumPy ranking. For large collections
`faiss.index` (IVF-Flat or HNSW-Flat) trades a little recall for speed. On unit vectors the inner
product is the cosine similarity.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from clotho_retrieve.utils import ClothoRetrieveError, atomic_path, atomic_write_text, err_console

FAISS_FILE = "faiss.index"  # INDEX/faiss.index: the approximate index over INDEX/index.h5's audio rows
FAISS_META = "faiss.json"  # its AnnConfig plus the row count and run fingerprint it was built from
INDEX_TYPES = ("auto", "exact", "ivf", "hnsw")
AUTO_EXACT_MAX = 50_000  # `auto`: exact search up to this many clips, IVF above (see docs/)


def chunk_ranges(n: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of ``size`` rows covering ``n`` rows."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


class VectorPrefix:
    """The first ``n`` rows of an HDF5 dataset, sliceable like an array (rows past `count` are not data)."""

    def __init__(self, ds: h5py.Dataset, n: int):
        self.ds, self.shape = ds, (n, ds.shape[1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.ds[sl.start : min(sl.stop, self.shape[0])]


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
    vectors: np.ndarray | h5py.Dataset | VectorPrefix, queries: np.ndarray, k: int, chunk_rows: int = 65_536
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
                for a, b in chunk_ranges(n, chunk_rows)
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
    for a, b in chunk_ranges(n, chunk_rows):
        index.add(np.ascontiguousarray(vectors[a:b], dtype=np.float32))
    return index, cfg


def faiss_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS top-k -> (scores, ids), each (Q, k). Id -1 marks a slot FAISS could not fill (an IVF probe
    that saw fewer than k vectors); `query.rank` drops those."""
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    return scores, ids.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Building the approximate index of an existing INDEX folder (`clotho-retrieve index`)
# ----------------------------------------------------------------------------------------------
def drop_ann_index(index_dir: str | os.PathLike) -> None:
    """Remove INDEX/faiss.index and faiss.json (search falls back to exact; no stale FAISS file)."""
    for name in (FAISS_META, FAISS_FILE):
        (Path(index_dir) / name).unlink(missing_ok=True)


def build_ann_index(
    index_dir: str | os.PathLike, index_type: str = "auto", cfg: AnnConfig | None = None
) -> str:
    """Write (or remove) INDEX/faiss.index for the index's current rows; returns the type chosen.

    `exact` removes any FAISS file, so search falls back to the exact ranking. The FAISS file is
    written under a temporary name and renamed, so a reader sees the old one or the new one. The old
    FAISS file is never read: a damaged one is replaced like any other.
    """
    from clotho_retrieve.index.store import EmbeddingIndex  # store imports this module
    from clotho_retrieve.safety import check_space, output_lock, writes

    index_dir = Path(index_dir)
    with output_lock(index_dir), EmbeddingIndex(index_dir, in_memory_max=0, load_ann=False) as idx:
        chosen = choose_index_type(index_type, idx.count)
        if chosen == "exact":
            drop_ann_index(index_dir)
            return chosen
        if idx.count == 0:
            raise ClothoRetrieveError(f"{index_dir}: the index is empty; nothing to build")
        import faiss

        cfg = AnnConfig(**{**asdict(cfg or AnnConfig()), "index_type": chosen})
        t0 = time.perf_counter()
        with err_console.status(f"building {chosen} index over {idx.count:,} clips"):
            ann, resolved = build_faiss(idx.vectors, cfg)
        (index_dir / FAISS_META).unlink(missing_ok=True)  # never a new .json beside an old .index
        data = faiss.serialize_index(ann)  # (bytes,) uint8: the file, so its size is known before writing
        check_space(index_dir / FAISS_FILE, data.nbytes, "the FAISS index")
        with writes(index_dir / FAISS_FILE, "the FAISS index", data.nbytes):
            with atomic_path(index_dir / FAISS_FILE) as tmp, open(tmp, "wb") as fh:
                fh.write(memoryview(data))
        meta = {"config": asdict(resolved), "count": idx.count, "fingerprint": idx.fingerprint.sha256}
        atomic_write_text(index_dir / FAISS_META, json.dumps(meta, indent=2) + "\n")
        err_console.print(f"{chosen} index of {idx.count:,} clips built in {time.perf_counter() - t0:.1f} s")
    return chosen
