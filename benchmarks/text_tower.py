"""What `serve` pays to encode a text query: the ONNX text tower in float32 and in int8, batches of 1 and 8.

Times the ONNX text tower of a run (default: the offline all-MiniLM-L6-v2 with a random projector to
D = 1024, the run benchmarks/serve.py builds; --run or --index for another) in three forms:

    fp32            float32, weights not prepacked: OnnxTextEncoder's default (what serve used before)
    fp32 prepacked  float32, weights prepacked at load: serve --text-precision fp32
    int8            MatMul weights int8 (clotho_retrieve/text_int8.py), prepacked: serve's default

on one onnxruntime thread (as serve runs each), on the short captions serve.py sends, in batches of 1
and 8: the median over interleaved repetitions, in ms per query, with ratios. Then how close the int8
embeddings stay to float32 ones (cosine over --queries captions) and, with --index INDEX (an index with
captions, e.g. the demo's), text-to-audio R@1/5/10 and mAP@10 over the index's own captions with each.

    .venv/bin/python benchmarks/text_tower.py [--workdir DIR] [--run RUN | --index INDEX] [--repeats 7]

The towers are written into --workdir (the run's stay untouched); on a busy machine the absolute times
inflate, the ratios of one run much less (the table prints the load average).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.table import Table
from serve import queries, random_run  # benchmarks/serve.py

from clotho_retrieve.encoder import RunFingerprint
from clotho_retrieve.text_int8 import ensure_int8_tower
from clotho_retrieve.text_onnx import OnnxTextEncoder, export_model_dir, read_meta
from clotho_retrieve.utils import console, err_console

BATCHES = (1, 8)


def towers(workdir: Path, model_dir: Path) -> tuple[Path, Path]:
    """The float32 tower of ``model_dir`` and its int8 version, in ``workdir`` (made once per weights)."""
    sha = RunFingerprint.of(model_dir).sha256
    folder = workdir / f"tower-{sha[:12]}"
    meta = read_meta(folder)
    if meta is None or meta.get("weights_sha256") != sha:
        with err_console.status(f"exporting the text tower of {model_dir}"):
            export_model_dir(model_dir, folder, sha)
    with err_console.status("quantizing it to int8"):
        return folder, ensure_int8_tower(folder)


def time_forms(forms: dict[str, OnnxTextEncoder], texts: list[str], repeats: int, per_row: int = 64) -> dict:
    """Median ms per query of each form and batch size; the forms take turns, so load drifts hit all."""
    tokens = next(iter(forms.values())).tokenize
    times: dict[tuple[str, int], list[float]] = {(f, b): [] for f in forms for b in BATCHES}
    for rep in range(repeats):
        chunk = texts[rep * per_row : (rep + 1) * per_row]
        for b in BATCHES:
            inputs = [tokens(chunk[a : a + b]) for a in range(0, len(chunk), b)]  # tokenised once
            for name, enc in forms.items():
                t0 = time.perf_counter()
                for x in inputs:
                    enc.session.run(["embedding"], x)
                times[name, b].append((time.perf_counter() - t0) * 1e3 / len(chunk))
    return {key: statistics.median(v) for key, v in times.items()}


def closeness(fp32: OnnxTextEncoder, int8: OnnxTextEncoder, texts: list[str]) -> dict:
    want, got = fp32.encode_text(texts), int8.encode_text(texts)  # (B, D) unit norm each
    cos = (want * got).sum(1)
    return {"n": len(texts), "min": float(cos.min()), "p1": float(np.percentile(cos, 1)),
            "mean": float(cos.mean())}


def retrieval(index_dir: Path, forms: dict[str, OnnxTextEncoder]) -> dict[str, dict]:
    """Text-to-audio metrics over the index's own captions (each caption's target: its clip)."""
    from clotho_retrieve.index import EmbeddingIndex
    from clotho_retrieve.metrics import text_to_audio_metrics

    with EmbeddingIndex(index_dir) as idx:
        audio = np.asarray(idx.vectors[: idx.count], np.float32)  # (N, D)
        per_clip = idx.captions(range(idx.count))
    texts = [c for caps in per_clip for c in caps]
    target = np.array([i for i, caps in enumerate(per_clip) for _ in caps])
    out = {}
    for name, enc in forms.items():
        sim = enc.encode_text(texts) @ audio.T  # (n_captions, N)
        out[name] = {**text_to_audio_metrics(sim, target), "top1": sim.argmax(1), "captions": len(texts)}
    return out


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def print_tables(ms: dict, close: dict, metrics: dict | None, loads: tuple, args) -> None:
    console.width = max(console.width, 110)
    base, packed = ms["fp32", 1], ms["fp32 prepacked", 1]
    table = Table(
        title=f"text tower per query: {args.model}, 1 onnxruntime thread, {os.cpu_count()} CPUs "
        f"({cpu_name()})",
        caption=f"median of {args.repeats} interleaved repetitions of 64 captions; load average "
        f"{loads[0]:.1f} before, {loads[1]:.1f} after",
    )
    for col in ("tower", "batch", "ms / query", "x fp32 batch 1", "x fp32 prepacked batch 1"):
        table.add_column(col, justify="right")
    for (name, b), value in ms.items():
        table.add_row(name, str(b), f"{value:.2f}", f"{base / value:.1f}", f"{packed / value:.1f}")
    console.print(table)
    console.print(
        f"cosine(int8, fp32) over {close['n']:,} captions: min {close['min']:.4f}, 1st percentile "
        f"{close['p1']:.4f}, mean {close['mean']:.4f}"
    )
    if metrics:
        n = metrics["fp32"]["captions"]
        table = Table(title=f"text-to-audio retrieval on {args.index} ({n} captions)")
        for col in ("tower", "R@1", "R@5", "R@10", "mAP@10", "same top-1 as fp32"):
            table.add_column(col, justify="right")
        for name, m in metrics.items():
            same = (m["top1"] == metrics["fp32"]["top1"]).mean()
            table.add_row(name, *(f"{m[k]:.3f}" for k in ("R@1", "R@5", "R@10", "mAP@10")), f"{same:.1%}")
        console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="keep the towers (and the random run) here, and reuse them")
    ap.add_argument("--run", type=Path, help="a run folder (or model folder) whose text tower to time")
    ap.add_argument("--index", type=Path, help="an index with captions: its run's tower, and retrieval")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (64 captions each)")
    ap.add_argument("--queries", type=int, default=2000, help="captions for the cosine check")
    ap.add_argument("--dim", type=int, default=1024, help="D of the random run")
    args = ap.parse_args()
    texts = queries()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.index is not None:
            from clotho_retrieve.index import EmbeddingIndex
            from clotho_retrieve.query import index_model_dir

            with EmbeddingIndex(args.index, in_memory_max=0) as idx:
                model_dir = index_model_dir(idx)
        elif args.run is not None:
            model_dir = args.run / "best" if (args.run / "best" / "model.safetensors").is_file() else args.run
        else:
            run = workdir / f"run-d{args.dim}"
            if not (run / "best" / "model.safetensors").is_file():
                random_run(run, args.dim)
            model_dir = run / "best"
        args.model = str(model_dir)
        fp32_dir, int8_dir = towers(workdir, model_dir.resolve())
        forms = {
            "fp32": OnnxTextEncoder(fp32_dir),
            "fp32 prepacked": OnnxTextEncoder(fp32_dir, prepack=True),
            "int8": OnnxTextEncoder(int8_dir, prepack=True),
        }
        load_before = os.getloadavg()[0]
        ms = time_forms(forms, texts, args.repeats)
        close = closeness(forms["fp32"], forms["int8"], texts[-args.queries :])
        pair = {"fp32": forms["fp32"], "int8": forms["int8"]}
        metrics = retrieval(args.index, pair) if args.index else None
        print_tables(ms, close, metrics, (load_before, os.getloadavg()[0]), args)


if __name__ == "__main__":
    main()
