"""Speed and size of the audio tower (per backbone x attention) and of the metrics on Clotho-sized matrices.

Audio: eval-mode ``encode_audio`` on a batch of log-Mel clips (default 10 s at 44.1 kHz / hop 512 =
862 frames), median of a few runs, plus the parameter count. Metrics: text-to-audio and audio-to-text
on a random (5 x n_clips, n_clips) similarity matrix (Clotho evaluation: 1,045 clips, 5,225 captions).

    .venv/bin/python benchmarks/bench_model.py [--frames 862] [--batch 2] [--repeats 3] [--clips 1045]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.table import Table

from clotho_retrieve.metrics import audio_to_text_metrics, text_to_audio_metrics
from clotho_retrieve.models import ModelConfig, RetrievalModel
from clotho_retrieve.utils import console

VARIANTS = [
    ("tiny", "none", 128),
    ("tiny", "self", 128),
    ("tiny", "gat", 128),
    ("cnn6", "self", 512),
    ("cnn10", "self", 512),
    ("cnn14", "none", 1024),
    ("cnn14", "self", 1024),
    ("cnn14", "gat", 1024),
]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=862, help="log-Mel frames per clip (862 = 10 s)")
    parser.add_argument("--batch", type=int, default=2, help="clips per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--clips", type=int, default=1045, help="clips in the metrics benchmark")
    args = parser.parse_args()

    table = Table(title=f"encode_audio, batch {args.batch} x {args.frames} frames, CPU, eval mode")
    for col in ("backbone", "attention", "D_A", "parameters", "T'", "seconds / batch", "clips / s"):
        table.add_column(col, justify="right" if col not in ("backbone", "attention") else "left")
    x = torch.randn(args.batch, args.frames, 64)
    lengths = torch.full((args.batch,), args.frames)
    for backbone, attention, d_a in VARIANTS:
        torch.manual_seed(0)
        model = RetrievalModel(ModelConfig(backbone=backbone, attention=attention, d_a=d_a), parts=("audio",))
        model.eval()
        with torch.no_grad():
            seconds = median_seconds(lambda m=model: m.encode_audio(x, lengths), args.repeats)
        n_params = sum(p.numel() for p in model.parameters())
        t_out = int(model.audio.backbone.output_lengths(lengths)[0])
        table.add_row(backbone, attention, str(d_a), f"{n_params / 1e6:.1f} M", str(t_out),
                      f"{seconds:.3f}", f"{args.batch / seconds:.1f}")  # fmt: skip
    console.print(table)

    n_captions = 5 * args.clips
    sim = torch.randn(n_captions, args.clips)
    caption_clip = torch.arange(args.clips).repeat_interleave(5)
    metrics = Table(title=f"metrics on a {n_captions} x {args.clips} similarity matrix")
    metrics.add_column("direction")
    metrics.add_column("seconds", justify="right")
    t2a = median_seconds(lambda: text_to_audio_metrics(sim, caption_clip), args.repeats)
    a2t = median_seconds(lambda: audio_to_text_metrics(sim.T, caption_clip), args.repeats)
    metrics.add_row("text-to-audio", f"{t2a:.3f}")
    metrics.add_row("audio-to-text", f"{a2t:.3f}")
    console.print(metrics)


if __name__ == "__main__":
    main()
