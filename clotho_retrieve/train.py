"""Training the retrieval model (Xiao et al., 2023, Sec. III).

``train(model_cfg, train_cfg)`` fits a :class:`RetrievalModel` with NT-Xent (Eq. 6) or supervised
contrastive loss (Eq. 7) on (log-Mel, caption) pairs and writes a self-describing run folder
(layout and atomic checkpoints: :mod:`clotho_retrieve.checkpoints`). It wires three steps::

    t = setup(model_cfg, train_cfg)          # resume or refuse, data, model, DDP, optimizer, AMP
    for epoch in ...:
        record = train_one_epoch(t, epoch)   # SpecAugment -> forward -> loss -> backward -> Adam
        validate_and_checkpoint(t, record)   # rank 0: validation mAP@10, last/ (+ best/), metrics

``resume=True`` continues from ``RUN/last``. Every source of randomness in an epoch (data order,
caption draw, SpecAugment, dropout) is seeded from ``(seed, epoch, rank)`` at the start of the epoch,
so a resumed run repeats exactly the epochs an uninterrupted run would have done (bit for bit on a
deterministic CPU setup).

Under ``torchrun`` (env RANK / WORLD_SIZE; :mod:`clotho_retrieve.distributed`) the model runs in
DistributedDataParallel, each process takes ``batch_size / world_size`` pairs per step, the loss sees
the embeddings of all processes (``distributed.gather_with_grad``), and only rank 0 validates and writes.
Scoring a finished run: :func:`clotho_retrieve.evaluate.evaluate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clotho_retrieve import checkpoints, distributed
from clotho_retrieve.checkpoints import TrainerState
from clotho_retrieve.config import RESUME_OVERRIDES, ModelConfig, TrainConfig
from clotho_retrieve.data import (
    CAPTION_MODES,
    PairDataset,
    PairSampler,
    SpecAugment,
    check_front_ends,
    front_end_diff,
    make_loader,
    open_split,
)
from clotho_retrieve.distributed import DistInfo
from clotho_retrieve.encoder import RunEncoder, autocast
from clotho_retrieve.evaluate import encode_split, score
from clotho_retrieve.feature_file import FeatureFile
from clotho_retrieve.frontend import PRESETS
from clotho_retrieve.utils import ClothoRetrieveError, console, err_console, resolve_device, seed_everything

__all__ = [
    "RESUME_OVERRIDES", "TrainConfig", "Trainer", "resolve_audio_weights", "setup", "train",
    "train_one_epoch", "validate_and_checkpoint",
]  # fmt: skip

PANNS_NAMES = ("cnn14", "cnn10", "cnn6")


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------
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
    if cfg.loss not in ("ntxent", "supcon"):
        raise ClothoRetrieveError(f"unknown loss {cfg.loss!r}; choose ntxent (Eq. 6) or supcon (Eq. 7)")


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


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """Everything a run holds between epochs; built by :func:`setup`."""

    run: Path
    cfg: TrainConfig
    model_cfg: ModelConfig
    ddp: DistInfo
    raw_model: nn.Module  # the RetrievalModel
    model: nn.Module  # raw_model, wrapped in DistributedDataParallel across processes
    loss_fn: nn.Module
    train_files: list[FeatureFile]
    val_file: FeatureFile | None
    sampler: PairSampler
    loader: torch.utils.data.DataLoader
    spec_augment: SpecAugment
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    state: TrainerState = field(default_factory=TrainerState)
    history: list[dict] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.ddp.device

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * len(self.loader)

    @property
    def warmup_steps(self) -> int:
        return round(self.cfg.warmup_epochs * len(self.loader))

    def close(self) -> None:
        for ff in self.train_files + ([self.val_file] if self.val_file else []):
            ff.close()


def _prepare_run(run: Path, model_cfg: ModelConfig, cfg: TrainConfig, ddp: DistInfo):
    """A resumed run's saved settings (after tidying a crash), or a refusal to overwrite a run.

    Returns (model_cfg, train_cfg, the resumed run's front end or None).
    """
    saved_front_end = None
    if cfg.resume:
        if ddp.main:
            checkpoints.recover(run)
        distributed.barrier(ddp)
        model_cfg, cfg, saved_front_end = checkpoints.load_resume_config(run, model_cfg, cfg)
    elif (run / "config.json").exists() or (run / "last").exists():
        raise ClothoRetrieveError(
            f"{run}: already holds a run; continue it with `{checkpoints.resume_command(run)}`, or choose "
            "another --out"
        )
    distributed.barrier(ddp)  # every process has looked at RUN before rank 0 writes into it
    _validate_settings(cfg, ddp.world_size)
    return model_cfg, cfg, saved_front_end


def _open_data(run: Path, model_cfg: ModelConfig, cfg: TrainConfig, saved_front_end: dict | None):
    """The training and validation files; every split used must share one front end, matching the
    resumed run's or the model config's. Returns (train_files, val_file, front_end dict)."""
    train_files = [open_split(cfg.features, s) for s in cfg.train_splits]
    val_file = open_split(cfg.features, cfg.val_split) if cfg.val_split else None
    expected, expected_from = saved_front_end, f"the run being resumed ({run / 'config.json'})"
    if expected is None and model_cfg.front_end is not None:
        expected, expected_from = model_cfg.front_end, "the model config's front end"
    front_end = check_front_ends(train_files + ([val_file] if val_file else []), expected, expected_from)
    if front_end.get("preset") == "clap":  # clap.CLAP_PRESET: a pretrained CLAP model's input rows
        raise ClothoRetrieveError(
            f"{train_files[0].path}: holds a CLAP model's input (`features --model`); train on log-Mel "
            "features (`features --preset paper` or panns)"
        )
    if front_end["n_mels"] != model_cfg.n_mels:
        raise ClothoRetrieveError(
            f"{train_files[0].path}: {front_end['n_mels']} Mel bands, the model expects {model_cfg.n_mels}"
        )
    return train_files, val_file, front_end


def _build_model(run: Path, model_cfg: ModelConfig, cfg: TrainConfig, ddp: DistInfo):
    """A fresh model (optionally with PANNs weights) or the resumed run's last checkpoint.

    Returns (model, trainer_state dict or None).
    """
    from clotho_retrieve.models import RetrievalModel

    seed_everything(cfg.seed)
    if cfg.resume and checkpoints.has_checkpoint(run):
        return checkpoints.load_checkpoint(run)
    model = RetrievalModel(model_cfg)
    if cfg.audio_weights:
        model.load_audio_weights(resolve_audio_weights(cfg.audio_weights, model_cfg.backbone))
        diff = front_end_diff(PRESETS["panns"].to_dict(), model_cfg.front_end)
        if diff and ddp.main:  # the paper fine-tunes CNN14 on 44.1 kHz features all the same
            err_console.print(f"[yellow]note:[/] PANNs weights were trained on other features ({diff})")
    return model, None


def setup(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Trainer:
    """Join the process group, resume or start the run, open the data, build model and optimizer,
    and write RUN/config.json (rank 0)."""
    from clotho_retrieve.losses import build_loss

    run = Path(train_cfg.out)
    ddp = distributed.init(resolve_device(train_cfg.device))
    model_cfg, cfg, saved_front_end = _prepare_run(run, model_cfg, train_cfg, ddp)
    loss_fn = build_loss(cfg.loss, cfg.tau)
    train_files, val_file, front_end = _open_data(run, model_cfg, cfg, saved_front_end)
    model_cfg.front_end = front_end
    raw_model, saved_state = _build_model(run, model_cfg, cfg, ddp)
    raw_model.to(ddp.device)
    model = raw_model
    if ddp.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None
        )

    dataset = PairDataset(train_files)
    sampler = PairSampler(
        dataset, cfg.captions, shuffle=True, seed=cfg.seed, rank=ddp.rank, world_size=ddp.world_size
    )
    cuda = ddp.device.type == "cuda"
    num_workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if cuda else 0)
    loader = make_loader(dataset, sampler, cfg.batch_size // ddp.world_size, num_workers, cuda)
    spec_augment = SpecAugment(cfg.freq_mask, cfg.n_freq_masks, cfg.time_mask, cfg.n_time_masks)
    spec_augment.to(ddp.device)

    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and cuda
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
    t = Trainer(run, cfg, model_cfg, ddp, raw_model, model, loss_fn, train_files, val_file, sampler, loader,
                spec_augment, optimizer, scaler, use_amp)  # fmt: skip
    if saved_state is not None:
        t.state = checkpoints.restore(saved_state, optimizer, scaler)
    t.history = checkpoints.read_metrics(run, t.state.epoch)
    if ddp.main:
        run.mkdir(parents=True, exist_ok=True)
        checkpoints.write_run_config(run, model_cfg, cfg, front_end, ddp.world_size)
        n_params = sum(p.numel() for p in params)
        procs = f" x {ddp.world_size} processes" if ddp.world_size > 1 else ""
        err_console.print(
            f"[bold]train[/] {run}: {len(dataset)} pairs ({cfg.captions} captions) from "
            f"{', '.join(cfg.train_splits)}, {len(loader)} steps/epoch x {cfg.epochs} epochs, "
            f"batch {cfg.batch_size} on {ddp.device}{procs}, {n_params / 1e6:.1f} M trainable parameters"
            + (f"; resuming after epoch {t.state.epoch}" if t.state.epoch else ""),
            soft_wrap=True,
        )
    return t


# ----------------------------------------------------------------------------------------------
# One epoch, then validation and checkpoints
# ----------------------------------------------------------------------------------------------
def train_one_epoch(t: Trainer, epoch: int) -> dict:
    """One pass over the training pairs; returns the epoch's record (loss, lr, step, seconds)."""
    cfg, device = t.cfg, t.device
    t0 = time.perf_counter()
    torch.manual_seed(_epoch_seed(cfg.seed, epoch, t.ddp.rank))  # dropout, SpecAugment, worker seeds
    t.sampler.set_epoch(epoch)
    t.model.train()
    t.spec_augment.train(cfg.spec_augment)
    params = [p for group in t.optimizer.param_groups for p in group["params"]]
    loss_sum = torch.zeros((), device=device)
    progress = _progress(t.ddp.main)
    with progress:
        task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(t.loader))
        for batch in t.loader:
            for group in t.optimizer.param_groups:
                group["lr"] = _lr_at(t.state.step, t.total_steps, t.warmup_steps, cfg)
            logmel = batch["logmel"].to(device, non_blocking=True)  # (B, T, M)
            lengths = batch["lengths"].to(device, non_blocking=True)  # (B,)
            clip_ids = batch["clip_ids"].to(device, non_blocking=True)  # (B,)
            logmel = t.spec_augment(logmel, lengths)
            with autocast(device, t.use_amp):
                audio, text = t.model(logmel, lengths, batch["texts"])  # (B, D), (B, D)
            # Eq. 6 / 7; under DDP the loss all-gathers every process's embeddings and clip ids,
            # so the negatives are the global batch.
            loss = t.loss_fn(audio.float(), text.float(), clip_ids)
            t.optimizer.zero_grad(set_to_none=True)
            t.scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                t.scaler.unscale_(t.optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            t.scaler.step(t.optimizer)
            t.scaler.update()
            loss_sum += loss.detach()
            t.state.step += 1
            progress.advance(task)
    return {
        "epoch": epoch,
        "step": t.state.step,
        "loss": float(loss_sum) / max(1, len(t.loader)),
        "lr": t.optimizer.param_groups[0]["lr"],
        "train_s": round(time.perf_counter() - t0, 2),
    }


def validate_and_checkpoint(t: Trainer, record: dict) -> None:
    """Rank 0: validation mAP@10 (text-to-audio) into ``record``, RUN/last and (if improved or no
    validation split) RUN/best, and the record appended to RUN/metrics.jsonl. Then every rank waits."""
    t.state.epoch = record["epoch"]
    if t.ddp.main:
        if t.val_file is not None:
            encoder = RunEncoder(t.raw_model, batch_size=t.cfg.eval_batch_size, amp=t.use_amp)
            record["val"] = score(encode_split(encoder, t.val_file))["text_to_audio"]
            improved = record["val"]["mAP@10"] > t.state.best_score
            if improved:
                t.state.best_score = record["val"]["mAP@10"]
        else:
            improved = True
        if improved:
            t.state.best_epoch = t.state.epoch
        record["best_epoch"] = t.state.best_epoch
        checkpoints.save_checkpoint(t.run, t.raw_model, t.optimizer, t.scaler, t.state, improved)
        t.history.append(record)
        checkpoints.write_metrics(t.run, t.history)
        _print_epoch(record, t.cfg.epochs, improved)
    distributed.barrier(t.ddp)


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train (or, with ``train_cfg.resume``, continue) a run; returns the run folder.

    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is on disk.
    """
    import contextlib
    import os

    from clotho_retrieve.safety import output_lock

    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes the run folder
    with output_lock(train_cfg.out) if main else contextlib.nullcontext():
        return _train(model_cfg, train_cfg, on_epoch_end)


def _train(model_cfg: ModelConfig, train_cfg: TrainConfig, on_epoch_end) -> Path:
    t = setup(model_cfg, train_cfg)
    try:
        for epoch in range(t.state.epoch + 1, t.cfg.epochs + 1):
            record = train_one_epoch(t, epoch)
            validate_and_checkpoint(t, record)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
        if t.ddp.main:
            from clotho_retrieve.plots import plot_training_curves

            plot_training_curves(t.run)
            console.print(
                f"run {t.run}: best epoch {t.state.best_epoch}"
                + (f", validation mAP@10 {100 * t.state.best_score:.2f}" if t.val_file is not None else "")
            )
    finally:
        t.close()
        distributed.teardown(t.ddp)
    return t.run


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
