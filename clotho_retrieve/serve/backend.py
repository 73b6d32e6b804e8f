"""Everything the server takes from the rest of clotho_retrieve, in one place.

The other serve modules import the package only through this adapter, so when the index, encoder or
feature modules move, only these imports (and the few small wrappers below) change.
"""

from __future__ import annotations

import os

import numpy as np

from clotho_retrieve.feature_file import FeatureFile
from clotho_retrieve.frontend import FrontEnd, file_log_mel
from clotho_retrieve.index import EmbeddingIndex
from clotho_retrieve.utils import ClothoRetrieveError

__all__ = [
    "ClothoRetrieveError",
    "EmbeddingIndex",
    "FeatureFile",
    "clip_log_mel",
    "column",
    "index_attr",
    "load_encoder",
    "open_features",
    "open_index",
    "row_vector",
    "read_column",
]


def open_index(path: str | os.PathLike) -> EmbeddingIndex:
    """An INDEX folder written by `embed` (ClothoRetrieveError when it is not one)."""
    return EmbeddingIndex(path, mmap=False)  # long-lived: FAISS lists in memory, no cold page faults


def load_encoder(index: EmbeddingIndex, part: str, device: str = "cpu", bf16: bool = False):
    """One tower (`part` text or audio) of the model that built ``index`` as an Encoder, its weights'
    fingerprint checked as `query` checks it: a run's (text on the CPU: the index's ONNX text tower when
    it has one) or a CLAP model's.

    ``bf16``: keep a torch text tower's weights in bfloat16 (half the memory traffic of a forward pass;
    fast on CPUs with AVX512-BF16 or AMX, slow on others). Embeddings then differ from float32 ones by
    ~1e-4 in cosine, so near-ties may swap; the ONNX tower is left as it is."""
    from clotho_retrieve.query import load_index_model

    encoder = load_index_model(index, (part,), device=device)
    if bf16 and hasattr(encoder, "model"):
        import torch

        encoder.model.to(torch.bfloat16)
    return encoder


def column(index: EmbeddingIndex, name: str, rows) -> list:
    """Values of one per-clip column of index.h5 (names, sources, durations, captions) for ``rows``."""
    return index._column(name, rows)


def read_column(index: EmbeddingIndex, name: str, chunk_rows: int = 65_536) -> np.ndarray:
    """A whole per-clip column of index.h5 (its committed rows), read chunk by chunk; text columns come
    as fixed-width UTF-8 bytes (compact: 1M names of 16 characters are 16 MB)."""
    ds = index._h5[name]
    parts = []
    for a in range(0, index.count, chunk_rows):
        part = ds[a : min(index.count, a + chunk_rows)]
        parts.append(part.astype(np.bytes_) if part.dtype == object else part)
    return np.concatenate(parts) if parts else np.empty(0, np.bytes_ if ds.dtype == object else ds.dtype)


def index_attr(index: EmbeddingIndex, key: str, default=None):
    """An attribute of index.h5 (e.g. `run`), ``default`` when absent."""
    value = index._h5.attrs.get(key, default)
    return value.decode("utf-8") if isinstance(value, bytes) else value


def row_vector(index: EmbeddingIndex, row: int) -> np.ndarray:
    """The (1, D) stored audio embedding of one clip."""
    return np.asarray(index.vectors[row : row + 1], dtype=np.float32)


def open_features(path: str | os.PathLike) -> FeatureFile:
    """A features .h5 file: .names, .attrs (source, split), clip i's (T, M) log-Mel as ff[i]."""
    return FeatureFile(path)


def clip_log_mel(path: str | os.PathLike, front_end: dict) -> np.ndarray:
    """Decode an audio file into the (T, M) log-Mel of ``front_end`` (the index's), with the bad-input
    handling of `features` (ClothoRetrieveError naming the problem)."""
    mel, _ = file_log_mel(path, FrontEnd.from_dict(front_end))
    return mel
