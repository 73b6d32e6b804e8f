"""Real-time factor of the `features` stage beside a librosa pipeline, on the same WAV clips, same run.

Generates WAV clips (44.1 kHz mono 16-bit, like Clotho), then per preset:

* "whole stage": compute_features (list, decode, resample, log-Mel, batch files, HDF5 assembly) with one
  worker, in this process, and with all cores (that includes starting the worker processes);
* "log_mel only": the transform on an in-memory waveform;
* "librosa": what PANNs-based retrieval repositories run per clip: librosa.load(sr=...) +
  librosa.feature.melspectrogram + librosa.power_to_db with the same parameters (reflect padding, Slaney
  Mel, amin 1e-10, no top_db), each clip written to one HDF5 file.

Each is repeated (--repeat) and the median reported. "audio s / CPU s" divides by this process's CPU time
(all its threads), not wall time: the per-core rate, even when other jobs share the cores; "x librosa"
compares it with the librosa pipeline's. The load average is printed before and after: on a shared
machine wall times are only indicative. BLAS is kept to one thread (OPENBLAS_NUM_THREADS=1) for both
pipelines. Goal: >= 2000x real time per core for the whole stage ('paper' preset, WAV input).

    .venv/bin/python benchmarks/features.py [--clips 60] [--seconds 20] [--workers 0] [--repeat 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: librosa's Mel product on one core

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from clotho_retrieve.features import FeaturesConfig, compute_features  # noqa: E402
from clotho_retrieve.frontend import PRESETS, FrontEnd, log_mel  # noqa: E402

console = Console(width=150)


def make_clips(folder: Path, n: int, seconds: float, sr: int = 44100) -> float:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    for i in range(n):
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(str(folder / f"clip_{i:04d}.wav"), x.astype(np.float32), sr, subtype="PCM_16")
    return n * seconds


def librosa_pipeline(paths: list[Path], fe: FrontEnd, out: Path) -> None:
    """The usual PANNs-style feature extraction, clip by clip, into one HDF5 file."""
    import h5py
    import librosa

    with h5py.File(out, "w") as h5:
        for path in paths:
            y, sr = librosa.load(path, sr=fe.sample_rate, mono=True)
            mel = librosa.feature.melspectrogram(
                y=y, sr=sr, n_fft=fe.n_fft, hop_length=fe.hop_length, win_length=fe.win_length,
                window=fe.window, center=fe.center, pad_mode=fe.pad_mode, power=fe.power, n_mels=fe.n_mels,
                fmin=fe.f_min, fmax=fe.f_max, htk=fe.mel_scale == "htk", norm=fe.mel_norm,
            )
            h5[path.name] = librosa.power_to_db(mel, ref=1.0, amin=fe.amin, top_db=None).T.astype(np.float32)


def timed(fn, repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds (this process, all threads) of ``repeat`` calls of fn(i)."""
    walls, cpus = [], []
    for i in range(repeat):
        start, cpu = time.perf_counter(), time.process_time()
        fn(i)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def measure(preset: str, audio: Path, tmp: Path, args, cores: int) -> list[tuple]:
    """(pipeline, workers, wall s, CPU s or None, audio s, cores used) for one preset."""
    fe, total = PRESETS[preset], args.clips * args.seconds
    paths = sorted(audio.glob("*.wav"))
    wave = sf.read(str(paths[0]), dtype="float32")[0]
    log_mel(wave, 44100, fe)  # warm-up: imports, Mel filter bank
    wall, cpu = timed(lambda _: [log_mel(wave, 44100, fe) for _ in range(5)], args.repeat)
    rows = [("log_mel only", "1 thread", wall, cpu, 5 * args.seconds, 1)]
    compute_features(FeaturesConfig(preset=preset, workers=1), audio_dir=audio, out=tmp / f"warm_{preset}.h5")
    for workers in sorted({1, cores}):
        def stage(i: int, w: int = workers) -> None:
            compute_features(FeaturesConfig(preset=preset, workers=w), audio_dir=audio,
                             out=tmp / f"{preset}_{w}_{i}.h5")

        wall, cpu = timed(stage, args.repeat)
        rows.append(("whole stage", str(workers), wall, cpu if workers == 1 else None, total, workers))
    librosa_pipeline(paths[:1], fe, tmp / "warm.h5")  # warm-up: imports, caches
    wall, cpu = timed(lambda i: librosa_pipeline(paths, fe, tmp / f"librosa_{preset}_{i}.h5"), args.repeat)
    rows.append(("librosa", "1", wall, cpu, total, 1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=60, help="number of generated clips")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each clip (Clotho: 15-30 s)")
    ap.add_argument("--workers", type=int, default=0, help="workers of the parallel run; 0 = all cores")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement (the median is shown)")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = ap.parse_args()
    cores = args.workers or os.cpu_count() or 1

    load = os.getloadavg()
    table = Table(title=f"features: {args.clips} WAV clips x {args.seconds:g} s (44.1 kHz, 16-bit), "
                  f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} at start, "
                  f"median of {args.repeat}")
    for col in ("preset", "pipeline", "workers", "wall s", "x real time", "x real time / core",
                "audio s / CPU s", "x librosa"):
        table.add_column(col, justify="left" if col in ("preset", "pipeline") else "right")
    torch.set_num_threads(1)  # per-core figure for the transform alone
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "audio"
        audio.mkdir()
        make_clips(audio, args.clips, args.seconds)
        for preset in args.presets:
            rows = measure(preset, audio, Path(tmp), args, cores)
            reference = rows[-1][4] / rows[-1][3]  # librosa: audio s / CPU s
            for what, workers, wall, cpu, seconds, n in rows:
                per_cpu = seconds / cpu if cpu else None
                table.add_row(preset, what, workers, f"{wall:.2f}", f"{seconds / wall:.0f}",
                              f"{seconds / wall / n:.0f}", f"{per_cpu:.0f}" if per_cpu else "-",
                              f"{per_cpu / reference:.1f}" if per_cpu and what != "log_mel only" else "-")
    console.print(table)
    load = os.getloadavg()
    console.print(f"load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")


if __name__ == "__main__":
    main()
