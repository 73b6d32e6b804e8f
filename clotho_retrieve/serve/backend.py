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
    "PackedTexts",
    "clip_log_mel",
    "column",
    "faiss_threads",
    "index_attr",
    "load_encoder",
    "open_features",
    "open_index",
    "row_vector",
    "read_column",
    "read_packed_column",
]


def open_index(path: str | os.PathLike) -> EmbeddingIndex:
    """An INDEX folder written by `embed` (ClothoRetrieveError when it is not one)."""
    return EmbeddingIndex(path, mmap=False)  # long-lived: FAISS lists in memory, no cold page faults


def faiss_threads(n: int) -> None:
    """FAISS's OpenMP threads in this process (a search of several queries spreads over them)."""
    import faiss

    faiss.omp_set_num_threads(n)


def load_encoder(
    index: EmbeddingIndex, part: str, device: str = "cpu", bf16: bool = False, text_precision: str = "int8"
):
    """One tower (`part` text or audio) of the model that built ``index`` as an Encoder, its weights'
    fingerprint checked as `query` checks it: a run's (text on the CPU: the index's ONNX text tower when
    it has one, in ``text_precision`` int8 or fp32, weights prepacked for a long-lived server) or a CLAP
    model's.

    ``bf16``: keep a torch text tower's weights in bfloat16 (half the memory traffic of a forward pass;
    fast on CPUs with AVX512-BF16 or AMX, slow on others). Embeddings then differ from float32 ones by
    ~1e-4 in cosine, so near-ties may swap; the ONNX tower is left as it is."""
    from clotho_retrieve.query import load_index_model
    from clotho_retrieve.text_int8 import open_serving_tower

    if part == "text" and device == "cpu":
        tower = open_serving_tower(index.path, index.fingerprint.sha256, text_precision)
        if tower is not None:
            return tower
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


class PackedTexts:
    """A text column in memory as one UTF-8 buffer: row i is ``data[starts[i]:starts[i + 1]]`` (1M short
    captions: their bytes plus 8 MB of offsets, where Python strings would take ~60 bytes more each)."""

    def __init__(self, data: bytes, starts: np.ndarray):
        self.data, self.starts = data, starts  # starts: (N + 1,) int64

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, row: int) -> str:
        return self.data[self.starts[row] : self.starts[row + 1]].decode("utf-8")


def read_packed_column(
    index: EmbeddingIndex, name: str, max_bytes: int, chunk_rows: int = 65_536
) -> PackedTexts | None:
    """A whole variable-length text column of index.h5 (its committed rows) as PackedTexts, or None when
    it holds more than ``max_bytes`` of text (then the caller reads rows from disk as they are needed)."""
    ds = index._h5[name]
    parts, lengths, total = [], [], 0
    for a in range(0, index.count, chunk_rows):
        chunk = ds[a : min(index.count, a + chunk_rows)]
        values = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in chunk]
        size = np.fromiter(map(len, values), np.int64, len(values))
        total += int(size.sum())
        if total > max_bytes:
            return None
        parts.append(b"".join(values))
        lengths.append(size)
    starts = np.zeros(index.count + 1, np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=starts[1:])
    return PackedTexts(b"".join(parts), starts)


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
