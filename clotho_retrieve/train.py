"""Training and evaluation of the retrieval model (Xiao et al., 2023, Sec. III).

``train(model_cfg, train_cfg)`` fits a :class:`RetrievalModel` with NT-Xent (Eq. 6) or supervised
contrastive loss (Eq. 7) on (log-Mel, caption) pairs and writes a self-describing run folder::

    RUN/config.json        {"model": ModelConfig, "train": TrainConfig, "front_end": FrontEnd, "version"}
    RUN/best/              RetrievalModel.save_pretrained, chosen by validation mAP@10 (text-to-audio)
    RUN/last/              the same + trainer_state.pt (optimizer, step, epoch, best score)
    RUN/metrics.jsonl      one JSON object per epoch

Checkpoints are written to a hidden folder and swapped in by renames, so ``kill -9`` at any moment
leaves a complete ``last/`` (or its predecessor) behind; ``resume=True`` continues from it. Every
source of randomness in an epoch (data order, caption draw, SpecAugment, dropout) is seeded from
``(seed, epoch, rank)`` at the start of the epoch, so a resumed run repeats exactly the epochs an
uninterrupted run would have done (bit for bit on a deterministic CPU setup).

Under ``torchrun`` (env RANK / WORLD_SIZE) the model runs in DistributedDataParallel, each process
takes ``batch_size / world_size`` pairs per step, the loss sees the embeddings of all processes
(``losses.gather_with_grad``), and only rank 0 validates and writes.

``evaluate(run, features, split)`` scores a run with the DCASE 2022 Task 6B metrics.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.table import Table
from torch import Tensor, nn

from clotho_retrieve import __version__
from clotho_retrieve.data import CAPTION_MODES, PairDataset, PairSampler, SpecAugment, make_loader, pad_batch
from clotho_retrieve.feature_file import FeatureFile, features_path
from clotho_retrieve.frontend import PRESETS, FrontEnd
from clotho_retrieve.utils import (
    ClothoRetrieveError,
    atomic_path,
    atomic_write_text,
    console,
    err_console,
    resolve_device,
    seed_everything,
)

PANNS_NAMES = ("cnn14", "cnn10", "cnn6")
TRAINER_STATE = "trainer_state.pt"
# Settings a resumed run takes from the caller instead of RUN/config.json: where things are and how
# fast to go, never what is learned (raising `epochs` extends the run; the cosine schedule stretches).
RESUME_OVERRIDES = ("features", "epochs", "device", "num_workers", "eval_batch_size")


@dataclass
class TrainConfig:
    """Training settings; the defaults are the paper's where it gives one (Sec. IV-A)."""

    features: str = "features"  # folder with development.h5, validation.h5, evaluation.h5
    out: str = "runs/run"  # the run folder
    train_splits: tuple[str, ...] = ("development",)  # paper mode: ("development", "validation")
    val_split: str | None = "validation"  # selects best/ by mAP@10; None: best/ = last epoch
    batch_size: int = 60  # global batch (split over DDP processes)
    lr: float = 1e-4  # Adam
    weight_decay: float = 0.0
    epochs: int = 40
    schedule: str = "cosine"  # cosine | constant (after linear warmup)
    warmup_epochs: float = 1.0
    grad_clip: float = 2.0  # max global gradient L2 norm; 0 turns clipping off
    loss: str = "ntxent"  # ntxent (Eq. 6) | supcon (Eq. 7)
    tau: float = 0.07  # temperature of Eq. 6-7
    captions: str = "all"  # all: every (clip, caption) pair per epoch | random: one caption per clip
    spec_augment: bool = True
    freq_mask: int = 8  # SpecAugment: widest frequency mask (Mel bins)
    n_freq_masks: int = 2
    time_mask: int = 40  # widest time mask (frames)
    n_time_masks: int = 2
    audio_weights: str | None = None  # PANNs checkpoint: a path, or cnn14 | cnn10 | cnn6
    seed: int = 0
    num_workers: int = -1  # DataLoader workers; -1: 4 on CUDA, 0 on CPU
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + GradScaler)
    device: str = "auto"
    eval_batch_size: int = 32
    resume: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "train_splits" in kwargs:
            kwargs["train_splits"] = tuple(kwargs["train_splits"])
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    """Join the torchrun process group when RANK/WORLD_SIZE say so (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    info = _Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info


def _barrier(ddp: _Dist) -> None:
    if ddp.world_size > 1:
        dist.barrier()


def _open_split(features: str | os.PathLike, split: str) -> FeatureFile:
    path = features_path(features, split)
    if not path.is_file():
        raise ClothoRetrieveError(
            f"{path}: no features for split {split!r}; run `clotho-retrieve features` for it"
        )
    return FeatureFile(path)


def _front_end_diff(a: dict, b: dict) -> str:
    return "; ".join(
        f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    )


def check_front_ends(files: list[FeatureFile], expected: dict | None = None, expected_from: str = "") -> dict:
    """All files must share one front end (and match ``expected`` when given); returns it as a dict."""
    ref = files[0].front_end.to_dict()
    for ff in files[1:]:
        diff = _front_end_diff(ref, ff.front_end.to_dict())
        if diff:
            raise ClothoRetrieveError(
                f"{ff.path}: front end differs from {files[0].path} ({diff}); compute all splits with the "
                "same `clotho-retrieve features` settings"
            )
    if expected is not None:
        diff = _front_end_diff(FrontEnd.from_dict(expected).to_dict(), ref)
        if diff:
            raise ClothoRetrieveError(
                f"{files[0].path}: front end does not match {expected_from} ({diff}); recompute the features "
                "with the run's front end"
            )
    return ref


def resolve_audio_weights(spec: str, backbone: str) -> Path:
    """A PANNs checkpoint path from a path or a name (cnn14 | cnn10 | cnn6, via clotho_retrieve.download)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = spec.lower()
    if name not in PANNS_NAMES:
        raise ClothoRetrieveError(f"{spec}: no such checkpoint file (give a path or one of {PANNS_NAMES})")
    if name != backbone:
        raise ClothoRetrieveError(f"--audio-weights {name} does not fit --backbone {backbone}")
    try:
        from clotho_retrieve.download import panns_checkpoint_path
    except ImportError:
        raise ClothoRetrieveError(f"{spec}: cannot resolve PANNs names here; pass the .pth path") from None
    path = Path(panns_checkpoint_path(name))
    if not path.is_file():
        raise ClothoRetrieveError(
            f"{path}: PANNs {name} checkpoint not downloaded; run `clotho-retrieve download`"
        )
    return path


def _lr_at(step: int, total_steps: int, warmup_steps: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then constant or cosine decay to 0 at the last step."""
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder ``tmp`` in as ``final`` by renames (see _recover_dir for crashes)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _recover_dir(final: Path) -> None:
    """Undo a crash inside _replace_dir: keep the newest complete folder, drop half-written ones."""
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(final.with_name(f".{final.name}.tmp"), ignore_errors=True)


def _read_metrics(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("epoch", 0) <= upto_epoch]


# ----------------------------------------------------------------------------------------------
# Encoding a split (also used by embed / index)
# ----------------------------------------------------------------------------------------------
@dataclass
class EncodedSplit:
    audio: Tensor  # (N_clips, D) unit norm, CPU float32
    text: Tensor  # (N_captions, D) unit norm, CPU float32
    caption_clip: Tensor  # (N_captions,) clip index of each caption
    captions: list[str] = field(default_factory=list)


@torch.no_grad()
def encode_audio_clips(model, feature_file: FeatureFile, batch_size: int = 32, amp: bool = False) -> Tensor:
    """(N_clips, D) embeddings of every clip; clips batched in length order to limit padding."""
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort(feature_file.n_frames, kind="stable")
    out = torch.empty(len(feature_file), model.cfg.embed_dim)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        logmel, lengths = pad_batch([feature_file[int(i)] for i in idx])  # (B, T, M), (B,)
        with _autocast(device, amp):
            emb = model.encode_audio(logmel.to(device), lengths.to(device))
        out[torch.from_numpy(idx)] = emb.float().cpu()
    return out


@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int = 256, amp: bool = False) -> Tensor:
    """(N, D) embeddings of captions."""
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        with _autocast(device, amp):
            chunks.append(model.encode_text(texts[start : start + batch_size]).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, model.cfg.embed_dim)


def encode_split(model, feature_file: FeatureFile, batch_size: int = 32, amp: bool = False) -> EncodedSplit:
    """Embeddings of all clips and all captions of one feature file, in file order."""
    captions = [c for caps in feature_file.captions for c in caps]
    caption_clip = torch.tensor(
        [i for i, caps in enumerate(feature_file.captions) for _ in caps], dtype=torch.long
    )
    return EncodedSplit(
        audio=encode_audio_clips(model, feature_file, batch_size, amp),
        text=encode_texts(model, captions, amp=amp),
        caption_clip=caption_clip,
        captions=captions,
    )


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def score(enc: EncodedSplit) -> dict[str, dict[str, float]]:
    """Text-to-audio and audio-to-text R@1/5/10 and mAP@10 (DCASE 2022 Task 6B) from embeddings."""
    from clotho_retrieve.metrics import audio_to_text_metrics, text_to_audio_metrics

    sim = enc.text @ enc.audio.T  # (N_captions, N_clips) cosine similarities (unit vectors)
    return {
        "text_to_audio": {k: float(v) for k, v in text_to_audio_metrics(sim, enc.caption_clip).items()},
        "audio_to_text": {k: float(v) for k, v in audio_to_text_metrics(sim.T, enc.caption_clip).items()},
    }


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _validate_settings(cfg: TrainConfig, world_size: int) -> None:
    if cfg.captions not in CAPTION_MODES:
        raise ClothoRetrieveError(f"--captions must be one of {CAPTION_MODES}, got {cfg.captions!r}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ClothoRetrieveError(f"--schedule must be cosine or constant, got {cfg.schedule!r}")
    if cfg.batch_size < 2 or cfg.batch_size % world_size:
        raise ClothoRetrieveError(
            f"--batch-size {cfg.batch_size} must be at least 2 and divisible by the {world_size} processes"
        )
    if cfg.epochs < 1:
        raise ClothoRetrieveError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.val_split is not None and cfg.val_split in cfg.train_splits:
        raise ClothoRetrieveError(
            f"split {cfg.val_split!r} is both trained on and used for selection; pass --val-split none "
            "(best/ is then the last epoch) or leave it out of --train-splits"
        )


def _load_resume(run: Path, cfg: TrainConfig):
    """(model_cfg, train_cfg, front_end dict) saved in RUN/config.json, with RESUME_OVERRIDES from cfg.

    A run killed before its first checkpoint has a config but no last/: it restarts from epoch 0.
    """
    from clotho_retrieve.models import ModelConfig

    config_path = run / "config.json"
    if not config_path.is_file():
        raise ClothoRetrieveError(f"{config_path}: missing; nothing to resume (train without --resume)")
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg = ModelConfig.from_dict(saved["model"])
        train_cfg = TrainConfig.from_dict(saved["train"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ClothoRetrieveError(f"{config_path}: unreadable run config ({exc})") from None
    for name in RESUME_OVERRIDES:
        setattr(train_cfg, name, getattr(cfg, name))
    train_cfg.resume, train_cfg.out = True, str(run)
    return model_cfg, train_cfg, saved["front_end"]


def train(
    model_cfg,
    train_cfg: TrainConfig,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or, with ``train_cfg.resume``, continue) a run; returns the run folder.

    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is on disk.
    """
    from clotho_retrieve.losses import build_loss
    from clotho_retrieve.models import RetrievalModel

    run = Path(train_cfg.out)
    device_name = resolve_device(train_cfg.device)
    ddp = _init_distributed(device_name)
    if device_name == "cuda" and ddp.world_size > 1:
        device_name = f"cuda:{ddp.local_rank}"
        torch.cuda.set_device(ddp.local_rank)
    device = torch.device(device_name)

    saved_front_end = None
    if train_cfg.resume:
        if ddp.main:
            _recover_dir(run / "last")
            _recover_dir(run / "best")
        _barrier(ddp)
        model_cfg, train_cfg, saved_front_end = _load_resume(run, train_cfg)
    elif (run / "config.json").exists() or (run / "last").exists():
        raise ClothoRetrieveError(
            f"{run}: already holds a run; pass --resume to continue it, or another --out"
        )
    _barrier(ddp)  # every process has looked at RUN before rank 0 writes into it
    cfg = train_cfg
    _validate_settings(cfg, ddp.world_size)
    if cfg.loss not in ("ntxent", "supcon"):
        raise ClothoRetrieveError(f"unknown loss {cfg.loss!r}; choose ntxent (Eq. 6) or supcon (Eq. 7)")
    loss_fn = build_loss(cfg.loss, cfg.tau)

    # Data: every split used must share one front end, matching the model's / the resumed run's.
    train_files = [_open_split(cfg.features, s) for s in cfg.train_splits]
    val_file = _open_split(cfg.features, cfg.val_split) if cfg.val_split else None
    expected, expected_from = saved_front_end, f"the run being resumed ({run / 'config.json'})"
    if expected is None and model_cfg.front_end is not None:
        expected, expected_from = model_cfg.front_end, "the model config's front end"
    front_end = check_front_ends(train_files + ([val_file] if val_file else []), expected, expected_from)
    if front_end["n_mels"] != model_cfg.n_mels:
        raise ClothoRetrieveError(
            f"{train_files[0].path}: {front_end['n_mels']} Mel bands, the model expects {model_cfg.n_mels}"
        )
    model_cfg.front_end = front_end

    # Model: fresh (optionally with PANNs weights) or the resumed run's last checkpoint.
    seed_everything(cfg.seed)
    if cfg.resume and (run / "last" / TRAINER_STATE).is_file():
        model = RetrievalModel.from_pretrained(run / "last", device="cpu")
        state = torch.load(run / "last" / TRAINER_STATE, map_location="cpu", weights_only=True)
    else:
        model = RetrievalModel(model_cfg)
        state = None
        if cfg.audio_weights:
            model.load_audio_weights(resolve_audio_weights(cfg.audio_weights, model_cfg.backbone))
            diff = _front_end_diff(PRESETS["panns"].to_dict(), front_end)
            if diff and ddp.main:  # the paper fine-tunes CNN14 on 44.1 kHz features all the same
                err_console.print(f"[yellow]note:[/] PANNs weights were trained on other features ({diff})")
    model.to(device)
    raw_model = model
    if ddp.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ddp.local_rank] if device.type == "cuda" else None
        )

    dataset = PairDataset(train_files)
    sampler = PairSampler(
        dataset, cfg.captions, shuffle=True, seed=cfg.seed, rank=ddp.rank, world_size=ddp.world_size
    )
    num_workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if device.type == "cuda" else 0)
    loader = make_loader(
        dataset, sampler, cfg.batch_size // ddp.world_size, num_workers, device.type == "cuda"
    )
    spec_augment = SpecAugment(cfg.freq_mask, cfg.n_freq_masks, cfg.time_mask, cfg.n_time_masks).to(device)

    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    start_epoch, step, best_score, best_epoch = 0, 0, -math.inf, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state.get("scaler", {}) or scaler.state_dict())
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])

    history = _read_metrics(run / "metrics.jsonl", start_epoch)
    if ddp.main:
        run.mkdir(parents=True, exist_ok=True)
        config = {
            "model": dataclasses.asdict(model_cfg),
            "train": dataclasses.asdict(cfg),
            "front_end": front_end,
            "version": __version__,
            "world_size": ddp.world_size,
        }
        atomic_write_text(run / "config.json", json.dumps(config, indent=2) + "\n")
        n_params = sum(p.numel() for p in params)
        procs = f" x {ddp.world_size} processes" if ddp.world_size > 1 else ""
        err_console.print(
            f"[bold]train[/] {run}: {len(dataset)} pairs ({cfg.captions} captions) from "
            f"{', '.join(cfg.train_splits)}, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
            f"batch {cfg.batch_size} on {device}{procs}, {n_params / 1e6:.1f} M trainable parameters"
            + (f"; resuming after epoch {start_epoch}" if start_epoch else ""),
            soft_wrap=True,
        )

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, ddp.rank))  # dropout, SpecAugment, worker seeds
        sampler.set_epoch(epoch)
        model.train()
        spec_augment.train(cfg.spec_augment)
        loss_sum = torch.zeros((), device=device)
        progress = _progress(ddp.main)
        with progress:
            task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch)
            for batch in loader:
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total_steps, warmup_steps, cfg)
                logmel = batch["logmel"].to(device, non_blocking=True)  # (B, T, M)
                lengths = batch["lengths"].to(device, non_blocking=True)  # (B,)
                clip_ids = batch["clip_ids"].to(device, non_blocking=True)  # (B,)
                logmel = spec_augment(logmel, lengths)
                with _autocast(device, use_amp):
                    audio, text = model(logmel, lengths, batch["texts"])  # (B, D), (B, D)
                # Eq. 6 / 7; under DDP the loss all-gathers every process's embeddings and clip ids,
                # so the negatives are the global batch.
                loss = loss_fn(audio.float(), text.float(), clip_ids)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach()
                step += 1
                progress.advance(task)
        record = {
            "epoch": epoch,
            "step": step,
            "loss": float(loss_sum) / max(1, steps_per_epoch),
            "lr": optimizer.param_groups[0]["lr"],
            "train_s": round(time.perf_counter() - t0, 2),
        }

        if ddp.main:
            if val_file is not None:
                val = score(encode_split(raw_model, val_file, cfg.eval_batch_size, use_amp))["text_to_audio"]
                record["val"] = val
                improved = val["mAP@10"] > best_score
            else:
                improved = True
            if improved:
                best_score = record["val"]["mAP@10"] if val_file is not None else best_score
                best_epoch = epoch
            record["best_epoch"] = best_epoch
            _save_checkpoint(run, raw_model, optimizer, scaler, epoch, step, best_score, best_epoch, improved)
            history.append(record)
            atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            _print_epoch(record, cfg.epochs, improved)
        _barrier(ddp)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    if ddp.main:
        from clotho_retrieve.plots import plot_training_curves

        plot_training_curves(run)
        console.print(
            f"run {run}: best epoch {best_epoch}"
            + (f", validation mAP@10 {100 * best_score:.2f}" if val_file is not None else "")
        )
    for ff in train_files + ([val_file] if val_file else []):
        ff.close()
    if ddp.world_size > 1:
        dist.destroy_process_group()
    return run


def _save_checkpoint(run, model, optimizer, scaler, epoch, step, best_score, best_epoch, improved) -> None:
    """RUN/last (weights + trainer_state.pt) and, when improved, RUN/best, each swapped in atomically."""
    tmp = run / ".last.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    state = {
        "epoch": epoch,
        "step": step,
        "best_score": best_score,
        "best_epoch": best_epoch,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
    }
    with atomic_path(tmp / TRAINER_STATE) as p:
        torch.save(state, p)
    if improved:
        best_tmp = run / ".best.tmp"
        shutil.rmtree(best_tmp, ignore_errors=True)
        # hard links: checkpoint files are never modified in place, only replaced as whole folders
        skip = shutil.ignore_patterns(TRAINER_STATE)
        shutil.copytree(tmp, best_tmp, ignore=skip, copy_function=_link_or_copy)
        _replace_dir(best_tmp, run / "best")
    _replace_dir(tmp, run / "last")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not enabled,
    )


def _print_epoch(record: dict, epochs: int, improved: bool) -> None:
    line = f"epoch {record['epoch']:>3}/{epochs}  loss {record['loss']:.4f}  lr {record['lr']:.2e}"
    if "val" in record:
        v = record["val"]
        line += "  val " + "  ".join(f"{k} {100 * v[k]:5.2f}" for k in ("R@1", "R@5", "R@10", "mAP@10"))
    line += f"  {record['train_s']:.1f}s" + ("  [green]* best[/]" if improved else "")
    err_console.print(line, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def chance_levels(n_clips: int, caption_clip: Tensor) -> dict[str, dict[str, float]]:
    """Expected metrics of a random ranking.

    Text-to-audio (one relevant clip among N): R@k = k/N, mAP@10 = (1/N) sum_{r<=10} 1/r.
    Audio-to-text (m_i relevant captions among C): R@k = mean_i 1 - C(C-m_i, k) / C(C, k).
    """
    n_caps = len(caption_clip)
    t2a = {f"R@{k}": min(1.0, k / n_clips) for k in (1, 5, 10)}
    t2a["mAP@10"] = sum(1.0 / r for r in range(1, min(10, n_clips) + 1)) / n_clips
    counts = torch.bincount(caption_clip, minlength=n_clips).tolist()
    a2t = {}
    for k in (1, 5, 10):
        miss = [math.comb(n_caps - m, k) / math.comb(n_caps, k) if n_caps >= k else 0.0 for m in counts]
        a2t[f"R@{k}"] = 1.0 - sum(miss) / n_clips
    return {"text_to_audio": t2a, "audio_to_text": a2t}


def evaluate(
    run: str | os.PathLike,
    features: str | os.PathLike,
    split: str = "evaluation",
    which: str = "best",
    batch_size: int = 32,
    device: str = "auto",
    submission: str | os.PathLike | None = None,
) -> dict:
    """Score a run on one split: DCASE 2022 Task 6B text-to-audio metrics, plus audio-to-text.

    ``features`` is a features folder (then ``split`` picks the file) or a single ``.h5`` file.
    ``submission`` writes DCASE's CSV: ``caption,file_name_1,...,file_name_10`` per caption.
    """
    from clotho_retrieve.models import RetrievalModel

    run = Path(run)
    if not (run / which).is_dir() and not (run / "config.json").is_file():
        raise ClothoRetrieveError(f"{run}: not a run folder (no {which}/ or config.json); train one first")
    path = Path(features)
    ff = FeatureFile(path) if path.suffix == ".h5" else _open_split(path, split)
    dev = torch.device(resolve_device(device))
    model = RetrievalModel.from_pretrained(run, device=str(dev), which=which)
    check_front_ends([ff], model.cfg.front_end, f"the run's front end ({run})")
    if not any(ff.captions):
        raise ClothoRetrieveError(f"{ff.path}: has no captions to evaluate with")

    enc = encode_split(model, ff, batch_size, amp=dev.type == "cuda")
    results = score(enc)
    n_clips = len(ff)
    out = {
        "run": str(run),
        "checkpoint": which,
        "features": str(ff.path),
        "n_clips": n_clips,
        "n_captions": len(enc.captions),
        **results,
        "chance": chance_levels(n_clips, enc.caption_clip),
    }
    if submission is not None:
        top = torch.topk(enc.text @ enc.audio.T, k=min(10, n_clips), dim=1).indices  # (N_captions, 10)
        with atomic_path(submission) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["caption"] + [f"file_name_{i}" for i in range(1, 11)])
            for caption, row in zip(enc.captions, top.tolist(), strict=True):
                names = [ff.names[j] for j in row]
                writer.writerow([caption] + names + [""] * (10 - len(names)))  # < 10 clips: empty cells
        out["submission"] = str(submission)
    ff.close()
    return out


def results_table(result: dict) -> Table:
    """Rich table of evaluate()'s result: metrics in %, chance level beside."""
    table = Table(title=f"{result['features']}: {result['n_clips']} clips, {result['n_captions']} captions")
    table.add_column("direction")
    for k in ("R@1", "R@5", "R@10", "mAP@10"):
        table.add_column(k, justify="right")
    for direction in ("text_to_audio", "audio_to_text"):
        name = direction.replace("_", "-")
        table.add_row(name, *(f"{100 * result[direction][k]:.2f}" for k in ("R@1", "R@5", "R@10", "mAP@10")))
        chance = result["chance"][direction]
        table.add_row(
            f"[dim]{name} chance[/]",
            *(
                f"[dim]{100 * chance[k]:.2f}[/]" if k in chance else "[dim]-[/]"
                for k in ("R@1", "R@5", "R@10", "mAP@10")
            ),
        )
    return table
