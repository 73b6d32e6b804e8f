"""Search over an index's vectors: exact top-k (chunked, tie-stable) and approximate (FAISS).

Search is exact by default: a chunked matrix product with top-k selection by ``np.argpartition`` and
ties broken by row number, so its order equals a brute-force NumPy ranking. For large collections
`faiss.index` (IVF-Flat, HNSW-Flat or OPQ+IVF+PQ, built by ann.py) trades a little recall for speed.
On unit vectors the inner product is the cosine similarity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

FAISS_FILE = "faiss.index"  # INDEX/faiss.index: the approximate index over INDEX/index.h5's audio rows
FAISS_META = "faiss.json"  # its AnnConfig, BuildReport, and the row count and fingerprint it was built from


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


class TopK:
    """Running exact top-k of ``queries`` (Q, D) over blocks of rows fed in any order of offsets.

    Each block is ranked by :func:`_topk_rows`, then merged with the kept candidates by the same rule
    (score descending, row ascending), so the result does not depend on how the rows were chunked.
    """

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
        self.k = k
        self.scores = np.empty((len(self.queries), 0), dtype=np.float32)  # (Q, <= k)
        self.ids = np.empty((len(self.queries), 0), dtype=np.int64)

    def add(self, block: np.ndarray, offset: int) -> None:
        """Rows ``offset ...`` of the collection: block (n_b, D)."""
        if not len(block):
            return
        s, i = _topk_rows(self.queries @ np.asarray(block, np.float32).T, self.k, offset)  # (Q, n_b)
        scores, ids = np.concatenate([self.scores, s], 1), np.concatenate([self.ids, i], 1)
        order = np.lexsort((ids, -scores), axis=1)[:, : self.k]
        self.scores, self.ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def exact_search(
    vectors: np.ndarray | h5py.Dataset | VectorPrefix, queries: np.ndarray, k: int, chunk_rows: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` (Q, D) against ``vectors`` (N, D) -> scores, ids (Q, k).

    ``vectors`` may be an in-memory array or an HDF5 dataset: it is read ``chunk_rows`` rows at a time,
    so memory stays at O(chunk_rows * (D + Q)) whatever N is. The order equals
    ``np.argsort(-(queries @ vectors.T), kind="stable")[:, :k]``.
    """
    n = vectors.shape[0]
    top = TopK(queries, min(k, n))
    for start, stop in chunk_ranges(n, chunk_rows):
        top.add(np.asarray(vectors[start:stop], dtype=np.float32), start)  # (n_b, D)
    return top.scores, top.ids


# ----------------------------------------------------------------------------------------------
# Approximate search (FAISS; built by ann.py)
# ----------------------------------------------------------------------------------------------
FEW_QUERIES = 16  # up to this many queries FAISS searches on one thread


def faiss_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS top-k -> (scores, ids), each (Q, k). Id -1 marks a slot FAISS could not fill (an IVF probe
    that saw fewer than k vectors); `query.rank` drops those.

    A few queries run on one OpenMP thread: splitting one query's lists over threads costs more than
    it saves (measured: OPQ+IVF+PQ, 1M x 1024, one query at nprobe 16: 1.0 ms on one thread, 8 ms on
    two of a busy 2-core machine). omp_set_num_threads is per calling thread, so servers may share this.
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    threads = faiss.omp_get_max_threads()
    if len(queries) <= FEW_QUERIES and threads > 1:
        faiss.omp_set_num_threads(1)
    try:
        scores, ids = index.search(queries, min(k, index.ntotal))
    finally:
        faiss.omp_set_num_threads(threads)
    return scores, ids.astype(np.int64)


def drop_ann_index(index_dir: str | os.PathLike) -> None:
    """Remove INDEX/faiss.index and faiss.json (search falls back to exact; no stale FAISS file)."""
    for name in (FAISS_META, FAISS_FILE):
        (Path(index_dir) / name).unlink(missing_ok=True)
