"""The embedding index: audio (and caption) embeddings of a trained run, searchable by cosine similarity.

``store.py`` is the INDEX folder (its layout is documented there): :class:`EmbeddingIndex` reads it,
:class:`IndexWriter` appends and updates rows. ``search.py`` ranks: exact top-k (equal to a brute-force
NumPy ranking) and FAISS (IVF-Flat or HNSW-Flat) for large collections. Filling an index from feature
files is ``clotho_retrieve/embed.py``.
"""

from clotho_retrieve.index.search import (
    AUTO_EXACT_MAX,
    FAISS_FILE,
    FAISS_META,
    INDEX_TYPES,
    AnnConfig,
    build_ann_index,
    build_faiss,
    choose_index_type,
    drop_ann_index,
    exact_search,
    faiss_search,
)
from clotho_retrieve.index.store import (
    CAPTION_COLUMNS,
    CLIP_COLUMNS,
    FORMAT_VERSION,
    INDEX_FILE,
    EmbeddingIndex,
    IndexWriter,
)

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
    "EmbeddingIndex",
    "IndexWriter",
    "build_ann_index",
    "build_faiss",
    "choose_index_type",
    "drop_ann_index",
    "exact_search",
    "faiss_search",
]
