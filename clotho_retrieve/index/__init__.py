"""The embedding index: audio (and caption) embeddings of a trained run, searchable by cosine similarity.

``store.py`` is the INDEX folder (its layout is documented there): :class:`EmbeddingIndex` reads it;
``writer.py``'s :class:`IndexWriter` appends and updates rows. ``search.py`` ranks exactly (equal to a
brute-force NumPy ranking); ``ann.py`` builds, tunes and measures FAISS indexes (IVF-Flat, HNSW-Flat,
OPQ+IVF+PQ) whose structure ``rules.py`` chooses from N, D and a memory budget (autofaiss's rules).
``parts.py`` assembles one index from the parts a sharded `embed` wrote. Filling an index from feature
files is ``clotho_retrieve/embed.py``.
"""

from clotho_retrieve.index.ann import (
    AnnConfig,
    BuildReport,
    build_and_measure,
    build_ann_index,
    build_faiss,
    serialized_bytes,
)
from clotho_retrieve.index.integrity import CAPTION_COLUMNS, CLIP_COLUMNS
from clotho_retrieve.index.rules import (
    AUTO_EXACT_MAX,
    INDEX_TYPES,
    choose_index_type,
    parse_memory,
)
from clotho_retrieve.index.search import (
    FAISS_FILE,
    FAISS_META,
    TopK,
    drop_ann_index,
    exact_search,
    faiss_search,
)
from clotho_retrieve.index.store import (
    FORMAT_VERSION,
    INDEX_FILE,
    EmbeddingIndex,
)
from clotho_retrieve.index.writer import IndexWriter

__all__ = [
    "AUTO_EXACT_MAX",
    "CAPTION_COLUMNS",
    "CLIP_COLUMNS",
    "FAISS_FILE",
    "FAISS_META",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "INDEX_TYPES",
    "AnnConfig",
    "BuildReport",
    "EmbeddingIndex",
    "IndexWriter",
    "TopK",
    "build_and_measure",
    "build_ann_index",
    "build_faiss",
    "choose_index_type",
    "drop_ann_index",
    "exact_search",
    "faiss_search",
    "parse_memory",
    "serialized_bytes",
]
