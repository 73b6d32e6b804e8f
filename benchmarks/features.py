"""Real-time factor of the `features` stage (seconds of audio per second of wall time) at both presets.

Generates WAV clips (44.1 kHz mono 16-bit, like Clotho), then runs the whole stage (decode, resample,
log-Mel, shards, HDF5 assembly) with one worker and with all cores (that includes starting the worker
processes, a few seconds). "audio s / CPU s" divides by this process's CPU time instead of wall time:
the per-core rate, even when other jobs share the cores. The goal is >= 500x real time per
core for WAV input. Also times the log-Mel transform alone on an in-memory waveform.

    .venv/bin/python benchmarks/features.py [--clips 60] [--seconds 20] [--workers 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from rich.table import Table

from clotho_retrieve.features import FeaturesConfig, compute_features
from clotho_retrieve.frontend import PRESETS, log_mel
from clotho_retrieve.utils import console


def make_clips(folder: Path, n: int, seconds: float, sr: int = 44100) -> float:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    for i in range(n):
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(str(folder / f"clip_{i:04d}.wav"), x.astype(np.float32), sr, subtype="PCM_16")
    return n * seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=60, help="number of generated clips")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each clip (Clotho: 15-30 s)")
    ap.add_argument("--workers", type=int, default=0, help="workers of the parallel run; 0 = all cores")
    args = ap.parse_args()
    cores = args.workers or os.cpu_count() or 1

    load = os.getloadavg()[0]
    table = Table(title=f"features: {args.clips} WAV clips x {args.seconds:g} s, {os.cpu_count()} cores, "
                  f"load average {load:.1f} at start")
    for col in ("preset", "what", "workers", "audio s", "wall s", "x real time", "x real time / core",
                "audio s / CPU s"):
        table.add_column(col, justify="left" if col in ("preset", "what") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "audio"
        audio.mkdir()
        total = make_clips(audio, args.clips, args.seconds)
        wave = sf.read(str(audio / "clip_0000.wav"), dtype="float32")[0]
        torch.set_num_threads(1)  # per-core figure for the transform alone
        for preset in PRESETS:
            log_mel(wave, 44100, PRESETS[preset])  # warm-up: imports, Mel filterbank
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(5):
                log_mel(wave, 44100, PRESETS[preset])
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            rtf = 5 * args.seconds / wall
            table.add_row(preset, "log_mel only", "1 thread", f"{5 * args.seconds:.0f}", f"{wall:.2f}",
                          f"{rtf:.0f}", f"{rtf:.0f}", f"{5 * args.seconds / cpu:.0f}")
            for workers in sorted({1, cores}):
                out = Path(tmp) / f"{preset}_{workers}.h5"
                start, cpu = time.perf_counter(), time.process_time()
                compute_features(FeaturesConfig(preset=preset, workers=workers), audio_dir=audio, out=out)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                rtf = total / wall
                per_cpu = f"{total / cpu:.0f}" if workers == 1 else "-"  # workers run in-process only then
                table.add_row(preset, "whole stage", str(workers), f"{total:.0f}", f"{wall:.2f}",
                              f"{rtf:.0f}", f"{rtf / workers:.0f}", per_cpu)
    console.print(table)


if __name__ == "__main__":
    main()
