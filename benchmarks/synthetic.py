"""Synthetic embeddings for the search benchmarks, generated block by block from a seed.

Real embeddings are neither uniform on the sphere nor isotropic around their clusters: a few hundred
directions carry most of their variance. ``SyntheticVectors`` draws unit vectors as

    x = normalise(c_j + B_j z + e)    c_j  one of `centres` random unit centres (isotropic in D)
                                      B_j z  within-cluster variation in a random `rank`-dimensional
                                           subspace of the cluster's own (one of `bases`),
                                           variances decaying as 1/i (i = 1 ... rank), total spread^2
                                      e    isotropic noise of norm ~`noise`

so nearest neighbours are decided mostly in a low-dimensional local subspace, as with learned
embeddings. ``rank=0`` gives the isotropic clusters of benchmarks/query.py's default data (noise 0.7).

Any rows can be read in any order (``vectors[a:b]``): row blocks of `block` rows are each generated from
their own seed, so 10M x 1024 (40 GB as float32) never has to exist in memory or on disk.
"""

from __future__ import annotations

import numpy as np


class SyntheticVectors:
    """(n, d) float32 unit vectors, sliceable like an array; queries() draws more from the same law."""

    def __init__(
        self,
        n: int,
        d: int,
        seed: int = 0,
        centres: int = 4000,
        rank: int = 32,
        spread: float = 0.6,
        noise: float = 0.1,
        bases: int = 256,
        block: int = 4096,
    ):
        self.shape = (n, d)
        self.seed, self.rank, self.noise, self.block = seed, rank, noise, block
        rng = np.random.default_rng([seed, 1])
        self.centres = rng.standard_normal((centres, d)).astype(np.float32)  # (C, D)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        scale = 1.0 / np.arange(1, rank + 1)  # variance of each direction, decaying as 1/i
        scale *= spread**2 / max(scale.sum(), 1e-12)
        self.bases = (
            np.stack(  # (P, r, D): orthonormal rows scaled by their std
                [
                    (np.linalg.qr(rng.standard_normal((d, max(rank, 1))))[0][:, :rank] * np.sqrt(scale)).T
                    for _ in range(bases if rank else 0)
                ]
            ).astype(np.float32, order="C")  # C order: each (r, D) basis a plain matmul operand
            if rank
            else None
        )

    def _draw(self, rng: np.random.Generator, m: int) -> np.ndarray:
        d = self.shape[1]
        j = rng.integers(len(self.centres), size=m)
        x = self.centres[j]  # (m, D)
        if self.rank:
            z = rng.standard_normal((m, self.rank), dtype=np.float32)  # (m, r)
            p = j % len(self.bases)  # each cluster's subspace
            order = np.argsort(p, kind="stable")  # rows grouped by subspace: one matmul per group
            starts = np.searchsorted(p[order], np.arange(len(self.bases) + 1))
            for b in np.flatnonzero(np.diff(starts)):
                rows = order[starts[b] : starts[b + 1]]
                x[rows] += z[rows] @ self.bases[b]
        x = x + rng.standard_normal((m, d), dtype=np.float32) * np.float32(self.noise / np.sqrt(d))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def _block(self, i: int) -> np.ndarray:
        n = self.shape[0]
        m = min(self.block, n - i * self.block)
        return self._draw(np.random.default_rng([self.seed, 2, i]), m)

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b = max(0, sl.start or 0), min(self.shape[0], self.shape[0] if sl.stop is None else sl.stop)
        if b <= a:
            return np.empty((0, self.shape[1]), np.float32)
        first, last = a // self.block, (b - 1) // self.block
        rows = np.concatenate([self._block(i) for i in range(first, last + 1)])
        return rows[a - first * self.block : b - first * self.block]

    def queries(self, q: int) -> np.ndarray:
        """(q, D) more vectors of the same law, not rows of the collection."""
        return self._draw(np.random.default_rng([self.seed, 3]), q)
