"""Approximate (FAISS) indexes over an index's vectors: built from chunks, tuned, measured.

Three structures, all inner product (= cosine on unit vectors):

    ivf   IVF{k},Flat                         uncompressed vectors in k cells
    hnsw  HNSW{M} (HNSW-Flat)                 a graph over the uncompressed vectors
    pq    OPQ{m}_{y},IVF{k}[_HNSW32],PQ{m}x8  rotated, then m-byte product-quantised residuals: an index
                                              past memory (10M x 1024 in 2.7 GB instead of 41 GB)

Their sizes come from :mod:`clotho_retrieve.index.rules` (autofaiss's rules). Building never holds all
vectors: the training set is read as random blocks of rows, then the vectors are added ``chunk_rows``
at a time (from HDF5, or any object with ``shape`` and row slicing). During the same pass the exact
top-k of a sample of the index's own rows is kept (search.TopK), so after building the recall@10 of the
approximate index against exact search costs no second pass. The search breadth (nprobe; efSearch of
an HNSW coarse quantizer = 2 nprobe, as autofaiss) is the largest whose median one-query latency stays
within ``latency_ms`` (autofaiss get_optimal_hyperparameters). The memory reported is the length of
the serialised index (faiss.serialize_index), which is what loading faiss.index takes.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from clotho_retrieve.index.rules import (
    COARSE_HNSW_M,
    COARSE_HNSW_MIN,
    REFINE_BITS,
    REFINE_FACTOR,
    choose_index_type,
    default_memory,
    hnsw_flat_bytes,
    ivf_flat_bytes,
    nb_clusters,
    opq_dim,
    pq_and_refine,
    pq_bytes,
    refine_bytes,
    train_points,
)
from clotho_retrieve.index.search import (
    FAISS_FILE,
    FAISS_META,
    TopK,
    chunk_ranges,
    drop_ann_index,
    faiss_search,
)
from clotho_retrieve.utils import ClothoRetrieveError, atomic_path, atomic_write_text, err_console

TWO_LEVEL_MIN = 8192  # IVF cells from which k-means is two-level (sqrt(k) clusters, then sub-clusters)
# Training effort of the codebooks, below faiss's defaults (OPQ: 50 iterations x 4 PQ k-means steps on
# 65,536 vectors; PQ: 25 k-means steps on 256 vectors per centroid), which take hours on a few cores at
# m = 256: k-means of 256 centroids needs ~40 vectors each, and alternating OPQ gains little after ~8
# rounds.
OPQ_NITER, OPQ_NITER_PQ, OPQ_NITER_PQ_0 = 8, 2, 10
OPQ_TRAIN_MAX = 40 * 256
PQ_NITER, PQ_POINTS_PER_CENTROID = 10, 64
NPROBE_MAX = 6144  # autofaiss's upper bound for nprobe
SAMPLE_BLOCK = 4096  # rows per randomly chosen block when sampling training vectors


@dataclass
class AnnConfig:
    """Settings of the approximate index. 0 means "choose from N, D and memory" (see resolved())."""

    index_type: str = "ivf"  # ivf (IVF-Flat) | hnsw (HNSW-Flat) | pq (OPQ + IVF + PQ)
    nlist: int = 0  # IVF cells; 0: rules.nb_clusters (4 sqrt(N) as a power of two below 1M)
    nprobe: int = 0  # IVF cells visited per query; 0: the largest within latency_ms
    train_size: int = 0  # IVF/PQ training vectors; 0: 30-100 per cell within memory / 2
    pq_m: int = 0  # pq: bytes per vector code; 0: the largest of 256, 128, ... within memory
    opq_dim: int = 0  # pq: OPQ output width y; 0: (min(D // m, 6) + 1) m
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_construction: int = 80
    ef_search: int = 128  # hnsw: search breadth
    memory: int = 0  # bytes the index may take; 0: half this machine's RAM
    latency_ms: float = 10.0  # budget of one query when nprobe is tuned
    refine: str = "auto"  # pq: re-rank with SQ8 | SQ6 | SQ4 | none; auto: the finest within memory
    refine_factor: int = REFINE_FACTOR  # candidates re-ranked: refine_factor x k

    def resolved(self, n: int, d: int) -> AnnConfig:
        """Every 0 replaced by the rule's value for n vectors of width d."""
        memory = self.memory or default_memory()
        if self.index_type == "hnsw":
            return replace(self, memory=memory)
        nlist = max(1, min(self.nlist or nb_clusters(n), n))
        pq_m, y, refine = 0, 0, "none"
        if self.index_type == "pq":
            pq_m, refine = pq_and_refine(n, d, memory, nlist, self.pq_m, self.refine)
            y = self.opq_dim or opq_dim(d, pq_m)
            if y % pq_m:
                raise ClothoRetrieveError(f"--opq-dim {y} is not a multiple of the PQ code size {pq_m}")
            if n < 256:
                raise ClothoRetrieveError(f"pq needs at least 256 vectors (8-bit codebooks); there are {n}")
        if refine not in ("none", *REFINE_BITS):
            raise ClothoRetrieveError(f"--refine {refine!r}: choose auto, none, {', '.join(REFINE_BITS)}")
        train = min(n, self.train_size or train_points(n, nlist, d + y, memory))
        if train < nlist:
            raise ClothoRetrieveError(f"{train} training vectors for {nlist} IVF cells; lower --nlist")
        return replace(
            self, nlist=nlist, train_size=train, pq_m=pq_m, opq_dim=y, memory=memory, refine=refine
        )

    @property
    def coarse_hnsw(self) -> bool:
        """pq: the coarse quantizer is an HNSW32 graph over the centroids (autofaiss: from 1000 cells)."""
        return self.index_type == "pq" and self.nlist >= COARSE_HNSW_MIN

    @property
    def factory(self) -> str:
        """The faiss.index_factory description of a resolved config."""
        if self.index_type == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        if self.index_type == "ivf":
            return f"IVF{self.nlist},Flat"
        coarse = f"IVF{self.nlist}" + (f"_HNSW{COARSE_HNSW_M}" if self.coarse_hnsw else "")
        key = f"OPQ{self.pq_m}_{self.opq_dim},{coarse},PQ{self.pq_m}x8"
        return key + (f",Refine({self.refine})" if self.refines else "")

    @property
    def refines(self) -> bool:
        return self.index_type == "pq" and self.refine in REFINE_BITS

    def search_params(self, nprobe: int | None = None) -> str:
        """faiss.ParameterSpace string of the search breadth (nprobe defaults to this config's)."""
        if self.index_type == "hnsw":
            return f"efSearch={self.ef_search}"
        nprobe = min(nprobe or self.nprobe or 16, self.nlist)
        params = f"nprobe={nprobe}"
        params += f",quantizer_efSearch={max(16, 2 * nprobe)}" if self.coarse_hnsw else ""
        return params + (f",k_factor_rf={self.refine_factor}" if self.refines else "")

    def estimated_bytes(self, n: int, d: int) -> int:
        """The rule's estimate of the built index's size (rules.py)."""
        if self.index_type == "hnsw":
            return hnsw_flat_bytes(n, d, self.hnsw_m)
        if self.index_type == "ivf":
            return ivf_flat_bytes(n, d, self.nlist)
        refine = refine_bytes(n, d, REFINE_BITS[self.refine]) if self.refines else 0
        return pq_bytes(n, d, self.pq_m, self.opq_dim, self.nlist) + refine


@dataclass
class BuildReport:
    """What building measured; stored in faiss.json as "report" and printed."""

    factory: str
    search: str  # the search parameters chosen
    train_size: int
    train_s: float
    add_s: float
    memory_bytes: int  # len(faiss.serialize_index(index))
    estimated_bytes: int  # the rule's estimate
    latency_p50_ms: float | None  # one query at a time, on this machine
    recall_at_10: float | None  # against exact search, queries = sampled rows (each row itself excluded)
    recall_queries: int

    def summary(self) -> str:
        recall = "-" if self.recall_at_10 is None else f"{self.recall_at_10:.3f}"
        latency = "-" if self.latency_p50_ms is None else f"{self.latency_p50_ms:.2f} ms"
        return (
            f"{self.factory} ({self.search}): built in {self.train_s + self.add_s:.1f} s, "
            f"{self.memory_bytes / 2**20:,.1f} MiB, recall@10 {recall} ({self.recall_queries} queries), "
            f"p50 {latency}"
        )


# ----------------------------------------------------------------------------------------------
# Reading vectors: random blocks for training, chunks for adding
# ----------------------------------------------------------------------------------------------
def sample_blocks(n: int, size: int, rng: np.random.Generator, block: int = SAMPLE_BLOCK):
    """Sorted [start, stop) blocks of rows, chosen at random, holding at least ``size`` rows (all rows
    when size >= n). Blocks of up to ``block`` rows keep the reads sequential; there are >= 64 of them."""
    if size >= n:
        return [(0, n)]
    if size <= 0:
        return []
    block = max(1, min(block, size // 64))
    n_blocks = -(-n // block)
    picked = np.sort(rng.choice(n_blocks, size=min(n_blocks, -(-size // block)), replace=False))
    return [(int(b) * block, min(n, (int(b) + 1) * block)) for b in picked]


def read_blocks(vectors, blocks) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``blocks`` -> (S, D) float32 and their row numbers (S,)."""
    if not blocks:
        return np.empty((0, vectors.shape[1]), np.float32), np.empty(0, np.int64)
    data = np.concatenate([np.asarray(vectors[a:b], np.float32) for a, b in blocks])
    return data, np.concatenate([np.arange(a, b) for a, b in blocks])


# ----------------------------------------------------------------------------------------------
# Making and training the FAISS index
# ----------------------------------------------------------------------------------------------
def make_index(d: int, cfg: AnnConfig):
    import faiss

    if cfg.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        return index
    if cfg.index_type not in ("ivf", "pq"):
        raise ClothoRetrieveError(f"index type {cfg.index_type!r} has no FAISS index (ivf, hnsw or pq)")
    if not cfg.refines:
        return faiss.index_factory(d, cfg.factory, faiss.METRIC_INNER_PRODUCT)
    base = faiss.index_factory(d, cfg.factory.rsplit(",Refine", 1)[0], faiss.METRIC_INNER_PRODUCT)
    qtype = getattr(faiss.ScalarQuantizer, f"QT_{REFINE_BITS[cfg.refine]}bit")
    # the Python wrapper keeps base and refine alive as long as the IndexRefine (faiss's referenced_objects)
    return faiss.IndexRefine(base, faiss.IndexScalarQuantizer(d, qtype, faiss.METRIC_INNER_PRODUCT))


def _two_level_centroids(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """k-means with many cells as faiss does for IVF at scale: sqrt(k) clusters, then each split in
    proportion to its size (faiss.contrib.clustering.two_level_clustering): O(N sqrt(k) D) per
    iteration instead of O(N k D). Spherical (unit centroids) as faiss's own IVF k-means for IP."""
    from faiss.contrib.clustering import two_level_clustering

    centroids, _ = two_level_clustering(
        x,
        int(np.sqrt(nlist)),
        nlist,
        clustering_niter=10,  # the first level; each second-level k-means runs faiss's 25 iterations
        seed=seed,
        spherical=True,
        min_points_per_centroid=1,  # no warning below faiss's 39 per centroid: the rule gives >= 30
    )
    return np.ascontiguousarray(centroids, dtype=np.float32)


def train_index(index, cfg: AnnConfig, x: np.ndarray, seed: int) -> None:
    """Train the OPQ rotation (if any) on x, then the IVF cells and the PQ codebooks on its image (and
    the re-ranking quantiser's ranges on x)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        faiss.downcast_index(index.refine_index).train(x)
        train_index(index.base_index, cfg, x, seed)
        index.is_trained = True
        return
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                vt.niter, vt.niter_pq, vt.niter_pq_0 = OPQ_NITER, OPQ_NITER_PQ, OPQ_NITER_PQ_0
                vt.max_train_points = OPQ_TRAIN_MAX
            vt.train(x)
            x = vt.apply(x)  # (S, y)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.niter, ivf.cp.seed, ivf.cp.min_points_per_centroid = 10, seed, 1
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False  # Hamming-filtered search is not used; its annealing is slow
        ivf.pq.cp.niter, ivf.pq.cp.max_points_per_centroid = PQ_NITER, PQ_POINTS_PER_CENTROID
    if cfg.nlist >= TWO_LEVEL_MIN:
        ivf.quantizer.add(_two_level_centroids(x, cfg.nlist, seed))  # IVF train then skips k-means
    ivf.train(x)
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.pq.sync_transposed_centroids()  # encoding while adding: 1.5x faster at 5-d sub-vectors
    index.is_trained = True


def set_search_params(index, cfg: AnnConfig, nprobe: int | None = None) -> None:
    import faiss

    faiss.ParameterSpace().set_index_parameters(index, cfg.search_params(nprobe))


# ----------------------------------------------------------------------------------------------
# Tuning and measuring
# ----------------------------------------------------------------------------------------------
def median_latency_ms(index, queries: np.ndarray, k: int = 10) -> float:
    """Median wall time (ms) of one query at a time (search.faiss_search), after one warm-up query."""
    faiss_search(index, queries[:1], k)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        faiss_search(index, q[None], k)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tune_nprobe(index, cfg: AnnConfig, queries: np.ndarray, k: int = 10) -> int:
    """The largest nprobe (1 ... min(nlist, 6144)) whose median latency is within cfg.latency_ms:
    doubling, then bisection between the last fast and the first slow value (to ~1/8)."""
    cap = min(cfg.nlist, NPROBE_MAX)

    def fast(nprobe: int) -> bool:
        set_search_params(index, cfg, nprobe)
        return median_latency_ms(index, queries, k) <= cfg.latency_ms

    best, p = 1, 1
    while p <= cap and fast(p):
        best, p = p, 2 * p
    hi = min(p, cap + 1)  # first value known (or assumed, past cap) too slow
    while hi - best > max(1, best // 8):
        mid = (best + hi) // 2
        best, hi = (mid, hi) if fast(mid) else (best, mid)
    return best


def recall_excluding_self(ids: np.ndarray, truth: np.ndarray, rows: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k, each query's own row removed from both lists first.

    ids and truth are (Q, k + 1) row numbers; rows (Q,) the queries' own rows."""
    hits = []
    for a, t, r in zip(ids, truth, rows, strict=True):
        a, t = [i for i in a if i != r][:k], [i for i in t if i != r][:k]
        hits.append(len(set(a) & set(t)) / len(t))
    return float(np.mean(hits))


def serialized_bytes(index) -> int:
    """len(faiss.serialize_index(index)), counted as it streams out (no copy of a GB-sized index)."""
    import faiss

    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index, writer)
    del writer
    return total


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def build_and_measure(
    vectors,
    cfg: AnnConfig,
    seed: int = 0,
    chunk_rows: int = 65_536,
    n_queries: int = 100,
    k: int = 10,
    queries: np.ndarray | None = None,
    on_chunk=None,
):
    """Build the FAISS index of ``vectors`` (N, D), streamed; tune nprobe (when 0) and measure it.

    The queries for tuning and recall are ``n_queries`` sampled rows (0: no measurement), or
    ``queries`` (Q, D) when given. ``on_chunk(block, offset)`` sees every chunk as it is added.
    Returns (index, resolved config, BuildReport)."""
    n, d = vectors.shape
    cfg = cfg.resolved(n, d)
    rng = np.random.default_rng(seed)
    index = make_index(d, cfg)
    trains = cfg.index_type != "hnsw"
    t0 = time.perf_counter()
    blocks = sample_blocks(n, max(cfg.train_size if trains else 0, n_queries if queries is None else 0), rng)
    sample, rows = read_blocks(vectors, blocks)  # (S, D), (S,)
    if trains:
        train_index(index, cfg, sample[: cfg.train_size], seed)
    if queries is None:
        pick = np.sort(rng.choice(len(sample), size=min(n_queries, len(sample)), replace=False))
        queries, q_rows = sample[pick], rows[pick]  # (Q, D), (Q,)
    else:
        queries, q_rows = np.ascontiguousarray(queries, np.float32), np.full(len(queries), -1)
    del sample
    t1 = time.perf_counter()
    if cfg.coarse_hnsw:  # assignment of added vectors to their nearest cell: HNSW efSearch 16
        set_search_params(index, cfg, 8)
    truth = TopK(queries, k + 1)
    for a, b in chunk_ranges(n, chunk_rows):
        block = np.ascontiguousarray(vectors[a:b], dtype=np.float32)  # (n_b, D)
        index.add(block)
        truth.add(block, a)
        if on_chunk is not None:
            on_chunk(block, a)
    t2 = time.perf_counter()
    if cfg.index_type != "hnsw" and not cfg.nprobe and len(queries):
        cfg = replace(cfg, nprobe=tune_nprobe(index, cfg, queries, k))
    cfg = replace(cfg, nprobe=0 if cfg.index_type == "hnsw" else min(cfg.nprobe or 16, cfg.nlist))
    set_search_params(index, cfg)
    recall = latency = None
    if len(queries):
        ids = index.search(queries, min(k + 1, n))[1]
        recall = recall_excluding_self(ids, truth.ids, q_rows, min(k, n - 1)) if n > 1 else None
        latency = median_latency_ms(index, queries, k)
    report = BuildReport(
        factory=cfg.factory,
        search=cfg.search_params(),
        train_size=cfg.train_size if trains else 0,
        train_s=t1 - t0,
        add_s=t2 - t1,
        memory_bytes=serialized_bytes(index),
        estimated_bytes=cfg.estimated_bytes(n, d),
        latency_p50_ms=latency,
        recall_at_10=recall,
        recall_queries=len(queries),
    )
    return index, cfg, report


def build_faiss(vectors, cfg: AnnConfig, seed: int = 0, chunk_rows: int = 65_536):
    """Build a FAISS inner-product index over ``vectors`` (N, D), read in chunks -> (index, resolved cfg).

    nprobe 0 is tuned under cfg.latency_ms on 100 sampled rows (see build_and_measure)."""
    index, cfg, _ = build_and_measure(vectors, cfg, seed, chunk_rows, n_queries=100)
    return index, cfg


# ----------------------------------------------------------------------------------------------
# The approximate index of an INDEX folder (`clotho-retrieve index`, and `embed` after its rows change)
# ----------------------------------------------------------------------------------------------
def build_ann_index(
    index_dir: str | os.PathLike, index_type: str = "auto", cfg: AnnConfig | None = None
) -> str:
    """Write (or remove) INDEX/faiss.index for the index's current rows; returns the type chosen.

    `exact` removes any FAISS file, so search falls back to the exact ranking. The FAISS file is
    written under a temporary name and renamed, so a reader sees the old one or the new one. The old
    FAISS file is never read: a damaged one is replaced like any other. The recall@10, memory and
    latency measured while building are printed and kept in faiss.json.
    """
    import faiss

    from clotho_retrieve.index.store import EmbeddingIndex  # store imports this module
    from clotho_retrieve.safety import check_space, output_lock, writes

    index_dir = Path(index_dir)
    cfg = cfg or AnnConfig()
    with output_lock(index_dir), EmbeddingIndex(index_dir, in_memory_max=0, load_ann=False) as idx:
        chosen = choose_index_type(index_type, idx.count, idx.embed_dim, cfg.memory)
        if chosen == "exact":
            drop_ann_index(index_dir)
            return chosen
        if idx.count == 0:
            raise ClothoRetrieveError(f"{index_dir}: the index is empty; nothing to build")
        with err_console.status(f"building a {chosen} index over {idx.count:,} clips"):
            ann, resolved, report = build_and_measure(idx.vectors, replace(cfg, index_type=chosen))
        (index_dir / FAISS_META).unlink(missing_ok=True)  # never a new .json beside an old .index
        check_space(index_dir / FAISS_FILE, report.memory_bytes, "the FAISS index")
        with writes(index_dir / FAISS_FILE, "the FAISS index", report.memory_bytes):
            with atomic_path(index_dir / FAISS_FILE) as tmp, open(tmp, "wb") as fh:
                writer = faiss.PyCallbackIOWriter(fh.write)  # streamed (no in-memory copy); OSError as is
                faiss.write_index(ann, writer)
                del writer
        meta = {
            "config": asdict(resolved),
            "count": idx.count,
            "fingerprint": idx.fingerprint.sha256,
            "report": asdict(report),
        }
        atomic_write_text(index_dir / FAISS_META, json.dumps(meta, indent=2) + "\n")
        err_console.print(f"{chosen} index of {idx.count:,} clips: {report.summary()}", highlight=False)
    return chosen
