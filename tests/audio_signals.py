"""Test signals shared by the front-end, audio, Clotho and features tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def chirp_noise(sr: float, seconds: float, seed: int = 0) -> np.ndarray:
    """Chirp 100 Hz -> 12 kHz plus noise: energy in every Mel band, far above the amin floor."""
    t = np.arange(int(sr * seconds)) / sr
    chirp = np.sin(2 * np.pi * (100 * t + (12000 - 100) / (2 * seconds) * t**2))
    return (0.3 * chirp + 0.05 * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


def write_clips(folder: Path, n: int, seconds: float = 0.3) -> Path:
    """``folder``/clip_000.wav ... : n distinct 16-bit 44.1 kHz clips."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(str(folder / f"clip_{i:03d}.wav"), chirp_noise(44100, seconds, i), 44100, subtype="PCM_16")
    return folder
