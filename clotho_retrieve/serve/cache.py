"""An LRU cache of query embeddings: a query asked again (the same text after whitespace is collapsed)
skips the text tower. Hits and misses are counted for /api/health, so a benchmark can tell cached answers
from encoded ones."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np


class QueryCache:
    """``encode(texts) -> (B, D)`` behind an LRU cache of at most ``size`` rows (0: no cache)."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], size: int = 1024):
        self.encode, self.size = encode, size
        self._rows: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(B, D) vectors of ``texts``: cached rows copied, the others encoded in one call and kept."""
        found: dict[int, np.ndarray] = {}
        with self._lock:
            for i, text in enumerate(texts):
                if (row := self._rows.get(text)) is not None:
                    self._rows.move_to_end(text)
                    found[i] = row
            self.hits += len(found)
            self.misses += len(texts) - len(found)
        missing = [i for i in range(len(texts)) if i not in found]
        if not missing:
            return np.stack([found[i] for i in range(len(texts))])
        encoded = self.encode([texts[i] for i in missing])  # (M, D)
        out = np.empty((len(texts), encoded.shape[1]), encoded.dtype)
        out[missing] = encoded
        for i, row in found.items():
            out[i] = row
        if self.size > 0:
            with self._lock:
                for i, row in zip(missing, encoded, strict=True):
                    self._rows[texts[i]] = row.copy()
                    self._rows.move_to_end(texts[i])
                while len(self._rows) > self.size:
                    self._rows.popitem(last=False)
        return out

    def stats(self) -> dict:
        return {"size": self.size, "held": len(self._rows), "hits": self.hits, "misses": self.misses}
