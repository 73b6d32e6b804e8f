"""Which approximate index for N vectors of width D within a memory budget: autofaiss's rules, re-implemented.

The rules are those of autofaiss (criteo/autofaiss, ``external/optimize.py``: get_optimal_index_keys_v2,
get_optimal_nb_clusters, get_optimal_quantization, get_optimal_train_size), written out here so the
project needs no autofaiss (and its Spark/fsspec dependencies)::

    N <= AUTO_EXACT_MAX (50,000)          exact: the chunked matrix product of search.py (autofaiss: Flat
                                          under 1k, HNSW15 under 10k; exact search at 50k x 1024 takes a
                                          few ms here, so it covers both)
    N < 1M and IVF-Flat fits in memory    IVF{k},Flat               k = 2^round(log2(4 sqrt N))
    otherwise                             OPQ{m}_{y},IVF{k}[_HNSW32],PQ{m}x8
        m  the first of 256, 128, 64, 48, 32, 24, 16, 8, 4 below D with N (m + 8) <= memory
           (m bytes of PQ code and an 8-byte id per vector)
        y  = (min(D // m, 6) + 1) m: the OPQ output width, a multiple of m a little above D
        k  16,384 for N <= 10M, 65,536 below 300M, 131,072 beyond (the first of autofaiss's lists);
           an HNSW32 graph over the k centroids when k >= 1000 (coarse search in O(log k))
    training  between 30 and 100 vectors per IVF cell: as many as half the memory budget holds
              (train vectors of width D plus their OPQ images of width y), at most N
    refine    (ours, beyond autofaiss) when the memory allows, a scalar-quantised copy of the vectors
              re-ranks the IVF-PQ candidates (REFINE_FACTOR x k of them): the finest of SQ8, SQ6, SQ4
              that fits beside a PQ code of at least MIN_REFINED_M bytes (the largest such code).
              autofaiss stops at PQ256, whose ranking of close neighbours is coarse (recall@10 0.84 on
              1M clustered 1024-d vectors here; its cosine error, std 0.04 without IVF residuals, is
              far above the ~0.007 gap between 10th and 11th neighbours, SQ6's is 0.001): the final
              order needs the finer codes, the candidates do not. 10M x 1024 in 8 GiB:
              OPQ64_448,IVF16384_HNSW32,PQ64x8 + SQ6 (8.44 GB) rather than PQ256 alone (2.73 GB).

autofaiss first tries an HNSW over the full vectors when it fits in memory; that step is left out:
HNSW-Flat over 1M x 1024 needs > 4 GB and hours of single-machine build time, and IVF-Flat serves
that range at recall ~0.95.
"""

from __future__ import annotations

import math
import os
import re

from clotho_retrieve.utils import ClothoRetrieveError

INDEX_TYPES = ("auto", "exact", "ivf", "hnsw", "pq")
AUTO_EXACT_MAX = 50_000  # `auto`: exact search up to this many clips
IVF_FLAT_MAX = 1_000_000  # `auto`: IVF-Flat (uncompressed) below this many clips when it fits
PQ_VALUES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # PQ code sizes tried, largest (most accurate) first
ID_BYTES = 8  # an inverted list stores an int64 id beside each code
REFINE_BITS = {"SQ8": 8, "SQ6": 6, "SQ4": 4}  # re-ranking codes, finest first: bits a dimension
REFINE_FACTOR = 32  # candidates re-ranked: REFINE_FACTOR x k (8 misses ~1 in 10 at PQ64: docs/scaling.md)
MIN_REFINED_M = 32  # the smallest PQ code (bytes) kept under a re-ranking copy
COARSE_HNSW_MIN = 1000  # IVF cells from which the coarse quantizer is an HNSW32 graph
COARSE_HNSW_M = 32
MIN_POINTS_PER_CELL, MAX_POINTS_PER_CELL = 30, 100
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(text: str | int) -> int:
    """'8G', '512M', '1.5GB', '8GiB' or a byte count -> bytes (binary units); 0 stays 0 (= the default)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise ClothoRetrieveError(f"--memory {text!r}: expected a size such as 8G, 512M or 2.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def default_memory() -> int:
    """Half of this machine's RAM: the index budget when none is given."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def nb_clusters(n: int) -> int:
    """IVF cells for n vectors (autofaiss get_optimal_nb_clusters, its first choice)."""
    if n < 1_000_000:
        return max(1, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))
    if n <= 10_000_000:  # autofaiss: < 10M; 10M itself ("1-10M") keeps the smaller, cheaper training
        return 16_384
    if n < 300_000_000:
        return 65_536
    return 131_072


def opq_dim(d: int, m: int) -> int:
    """OPQ output width y for m sub-quantizers: a multiple of m, a little above d (autofaiss)."""
    return (min(d // m, 6) + 1) * m


def pq_m_for(n: int, d: int, memory: int) -> int:
    """The largest PQ code size (bytes) below d whose codes and ids of n vectors fit in ``memory``."""
    for m in PQ_VALUES:
        if m < d and n * (m + ID_BYTES) <= memory:
            return m
    raise ClothoRetrieveError(
        f"{n:,} vectors do not fit in {memory / 2**30:.2f} GiB even as 4-byte PQ codes "
        f"({n * (4 + ID_BYTES) / 2**30:.2f} GiB); raise --memory"
    )


def pq_and_refine(n: int, d: int, memory: int, nlist: int, pq_m: int = 0, refine: str = "auto"):
    """(PQ code bytes, re-ranking quantiser) for n vectors within ``memory``: the finest SQ that fits
    beside the largest PQ code of >= MIN_REFINED_M bytes (or beside ``pq_m`` when given); else PQ alone,
    autofaiss's code size. An explicit ``refine`` is kept."""
    if refine == "auto":
        for name, bits in REFINE_BITS.items():
            for m in [pq_m] if pq_m else [m for m in PQ_VALUES if MIN_REFINED_M <= m < d]:
                if pq_bytes(n, d, m, opq_dim(d, m), nlist) + refine_bytes(n, d, bits) <= memory:
                    return m, name
        refine = "none"
    return pq_m or pq_m_for(n, d, memory), refine


def refine_bytes(n: int, d: int, bits: int) -> int:
    """An IndexScalarQuantizer of n vectors: d * bits / 8 bytes each, plus its per-dimension range."""
    return n * (d * bits // 8) + 2 * d * 4


def train_points(n: int, nlist: int, width: int, memory: int) -> int:
    """Training vectors for nlist cells: 30-100 per cell, as many as memory / 2 holds at ``width``
    float32 values each (autofaiss get_optimal_train_size), at most n."""
    per_cell = memory / 2 / (nlist * width * 4)
    per_cell = min(MAX_POINTS_PER_CELL, max(MIN_POINTS_PER_CELL, per_cell))
    return int(min(n, round(per_cell * nlist)))


def ivf_flat_bytes(n: int, d: int, nlist: int) -> int:
    """IVF-Flat: float32 vectors and int64 ids in the lists, plus the centroids."""
    return n * (4 * d + ID_BYTES) + nlist * d * 4


def hnsw_flat_bytes(n: int, d: int, m: int) -> int:
    """HNSW-Flat: float32 vectors plus ~2m int32 links a node on level 0 (upper levels add ~1/m)."""
    return n * (4 * d + 2 * m * 4 + 8)


def pq_bytes(n: int, d: int, m: int, y: int, nlist: int) -> int:
    """OPQ + IVF + PQ: m-byte codes and ids, centroids (with an HNSW graph), the y x d rotation and
    the m x 256 x (y / m) PQ codebooks."""
    coarse = nlist * y * 4 + (nlist * (2 * COARSE_HNSW_M * 4 + 8) if nlist >= COARSE_HNSW_MIN else 0)
    return n * (m + ID_BYTES) + coarse + y * d * 4 + 256 * y * 4


def choose_index_type(index_type: str, n: int, d: int, memory: int = 0) -> str:
    """`auto` -> exact up to AUTO_EXACT_MAX, IVF-Flat below IVF_FLAT_MAX when it fits ``memory`` (bytes;
    0: half this machine's RAM), else pq; any other type is checked and passed through."""
    if index_type not in INDEX_TYPES:
        raise ClothoRetrieveError(f"--index-type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    if index_type != "auto":
        return index_type
    if n <= AUTO_EXACT_MAX:
        return "exact"
    memory = memory or default_memory()
    if n < IVF_FLAT_MAX and ivf_flat_bytes(n, d, nb_clusters(n)) <= memory:
        return "ivf"
    return "pq"
