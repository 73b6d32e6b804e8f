"""Search: exact top-k equals a brute-force NumPy ranking (ties by row, chunked, streamed), FAISS recall."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from clotho_retrieve.index import AnnConfig, build_faiss, exact_search, faiss_search


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Reference ranking: full score matrix, stable sort (ties keep row order)."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, n_centres: int, seed: int, noise: float = 0.7) -> np.ndarray:
    """Noisy unit copies of random unit centres: neighbours are meaningful, unlike uniform vectors."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_centres, d)))
    x = centres[rng.integers(n_centres, size=n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    return unit(x)


# ----------------------------------------------------------------------------------------------
# exact search
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [7, 64, 10_000])
@pytest.mark.parametrize("k", [1, 10, 500])
def test_exact_search_equals_brute_force(chunk_rows, k):
    rng = np.random.default_rng(k + chunk_rows)
    vectors = unit(rng.standard_normal((300, 16)))
    queries = unit(rng.standard_normal((5, 16)))
    scores, ids = exact_search(vectors, queries, k, chunk_rows=chunk_rows)
    want = brute_force(vectors, queries, k)
    assert ids.shape == want.shape == (5, min(k, 300))
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, want, 1), rtol=1e-5, atol=1e-6)


def test_exact_search_breaks_ties_by_row_across_chunks():
    # Small integers make every dot product exact, so duplicated rows tie exactly in any summation order.
    rng = np.random.default_rng(1)
    base = rng.integers(-3, 4, size=(6, 8)).astype(np.float32)
    vectors = base[rng.integers(6, size=100)]  # 100 rows, many exact duplicates, spread over chunks
    queries = rng.integers(-3, 4, size=(4, 8)).astype(np.float32)
    for chunk_rows in (3, 16, 100):
        _, ids = exact_search(vectors, queries, 25, chunk_rows=chunk_rows)
        np.testing.assert_array_equal(ids, brute_force(vectors, queries, 25))


def test_exact_search_streams_from_hdf5(tmp_path):
    rng = np.random.default_rng(2)
    vectors = unit(rng.standard_normal((257, 8)))
    with h5py.File(tmp_path / "v.h5", "w") as h5:
        h5["v"] = vectors
        _, ids = exact_search(h5["v"], vectors[:3], 4, chunk_rows=50)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])  # each vector is its own nearest neighbour
    np.testing.assert_array_equal(ids, brute_force(vectors, vectors[:3], 4))


# ----------------------------------------------------------------------------------------------
# FAISS
# ----------------------------------------------------------------------------------------------
def test_faiss_recall_on_clustered_vectors():
    vectors = clustered(3000, 32, 60, seed=3)
    queries = clustered(50, 32, 60, seed=4)
    truth = brute_force(vectors, queries, 10)
    for kind in ("ivf", "hnsw"):
        index, cfg = build_faiss(vectors, AnnConfig(index_type=kind))
        scores, ids = faiss_search(index, queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
        assert recall >= 0.9, (kind, recall)
        # the reported scores are the true cosines of the returned rows
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[ids]), atol=1e-5)
    # IVF visiting every cell is exhaustive, hence exact
    index, _ = build_faiss(vectors, AnnConfig(index_type="ivf", nlist=20, nprobe=20))
    np.testing.assert_array_equal(faiss_search(index, queries, 10)[1], truth)
