"""A log-Mel spectrogram as a small PNG thumbnail (numpy + zlib, no imaging library)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

# Anchor colours of a dark-to-bright map (close to matplotlib's "magma"), interpolated to 256 entries.
_ANCHORS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [252, 255, 164]],
    dtype=np.float64,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)],
    axis=1,
).astype(np.uint8)  # (256, 3)


def downsample(mel: np.ndarray, width: int) -> np.ndarray:
    """(T, M) frames -> (min(T, width), M): the mean of each of ``width`` equal runs of frames."""
    mel = np.asarray(mel, dtype=np.float32)
    t = mel.shape[0]
    if t <= width:
        return mel
    edges = np.linspace(0, t, width + 1).astype(np.int64)  # (width + 1,) run boundaries
    sums = np.add.reduceat(mel, edges[:-1], axis=0)  # (width, M)
    return sums / np.diff(edges)[:, None]


def to_pixels(mel: np.ndarray, width: int = 240) -> np.ndarray:
    """(T, M) log-Mel -> (M, W, 3) uint8 image: time left to right, low frequencies at the bottom,
    levels scaled between the clip's 2nd and 99th percentiles."""
    small = downsample(mel, width).T[::-1]  # (M, W), row 0 = highest band
    if small.size == 0:
        return np.zeros((max(1, small.shape[0]), 1, 3), np.uint8)
    lo, hi = np.percentile(small, [2, 99])
    level = np.clip((small - lo) / max(float(hi - lo), 1e-6), 0, 1)
    return _LUT[np.round(level * 255).astype(np.uint8)]


def png(pixels: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG (8-bit RGB, no filter)."""
    h, w, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + np.ascontiguousarray(pixels[y]).tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(
        b"IEND", b""
    )


def thumbnail_png(mel: np.ndarray, width: int = 240) -> bytes:
    return png(to_pixels(mel, width))
