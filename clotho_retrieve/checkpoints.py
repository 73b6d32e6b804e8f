"""A run folder on disk: its config, checkpoints, trainer state and metrics, all written atomically.

    RUN/config.json        {"model": ModelConfig, "train": TrainConfig, "front_end": FrontEnd, "version",
                            "world_size"}
    RUN/best/              RetrievalModel.save_pretrained, chosen by validation mAP@10 (text-to-audio)
    RUN/last/              the same + trainer_state.pt (optimizer, GradScaler, epoch, step, best score)
    RUN/metrics.jsonl      one JSON object per epoch

``last/`` and ``best/`` are written to hidden folders and swapped in by renames
(:func:`clotho_retrieve.utils.atomic_dir`), so ``kill -9`` at any moment leaves a complete ``last/``
(or its predecessor) behind; :func:`recover` tidies up after such a crash before a resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from clotho_retrieve import __version__
from clotho_retrieve.config import RESUME_OVERRIDES, ModelConfig, TrainConfig
from clotho_retrieve.utils import ClothoRetrieveError, atomic_dir, atomic_write_text, recover_dir

TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainerState:
    """Where training stands after an epoch (saved with the optimizer in last/trainer_state.pt)."""

    epoch: int = 0  # last finished epoch
    step: int = 0  # optimizer steps taken
    best_score: float = -math.inf  # best validation mAP@10 so far
    best_epoch: int = 0


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------
def write_run_config(
    run: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, front_end: dict, world_size: int
) -> None:
    config = {
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(train_cfg),
        "front_end": front_end,
        "version": __version__,
        "world_size": world_size,
    }
    atomic_write_text(run / "config.json", json.dumps(config, indent=2) + "\n")


def load_resume_config(run: Path, cfg: TrainConfig) -> tuple[ModelConfig, TrainConfig, dict]:
    """(model_cfg, train_cfg, front_end dict) saved in RUN/config.json, with RESUME_OVERRIDES from cfg.

    A run killed before its first checkpoint has a config but no last/: it restarts from epoch 0.
    """
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
        if getattr(cfg, name) is not None:  # None (features): keep the run's own
            setattr(train_cfg, name, getattr(cfg, name))
    train_cfg.resume, train_cfg.out = True, str(run)
    return model_cfg, train_cfg, saved["front_end"]


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def recover(run: Path) -> None:
    """Undo a crash in the middle of :func:`save_checkpoint` (keep the newest complete folders)."""
    recover_dir(run / "last")
    recover_dir(run / "best")


def save_checkpoint(run: Path, model, optimizer, scaler, state: TrainerState, improved: bool) -> None:
    """RUN/last (weights + trainer_state.pt) and, when improved, RUN/best, each swapped in atomically.

    best/ is swapped in before last/: a crash in between resumes from the previous last/ and redoes
    the epoch, never leaving a last/ whose best score no best/ holds.
    """
    with atomic_dir(run / "last") as last:
        model.save_pretrained(last, atomic=False)
        trainer_state = {
            **dataclasses.asdict(state),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
        }
        torch.save(trainer_state, last / TRAINER_STATE)
        if improved:
            with atomic_dir(run / "best") as best:
                # hard links: checkpoint files are never modified in place, only replaced as whole folders
                skip = shutil.ignore_patterns(TRAINER_STATE)
                shutil.copytree(last, best, ignore=skip, copy_function=_link_or_copy, dirs_exist_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def has_checkpoint(run: Path) -> bool:
    return (run / "last" / TRAINER_STATE).is_file()


def load_checkpoint(run: Path):
    """(RetrievalModel on the CPU, trainer_state dict) of RUN/last."""
    from clotho_retrieve.models import RetrievalModel

    model = RetrievalModel.from_pretrained(run / "last", device="cpu")
    state = torch.load(run / "last" / TRAINER_STATE, map_location="cpu", weights_only=True)
    return model, state


def restore(state: dict, optimizer, scaler) -> TrainerState:
    """Load a trainer_state dict into the optimizer and scaler; return where training stands."""
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state.get("scaler", {}) or scaler.state_dict())
    return TrainerState(
        int(state["epoch"]), int(state["step"]), float(state["best_score"]), int(state["best_epoch"])
    )


# ----------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------
def read_metrics(run: Path, upto_epoch: int) -> list[dict]:
    """The epoch records of RUN/metrics.jsonl up to ``upto_epoch`` (later ones belong to a lost future)."""
    path = run / METRICS
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("epoch", 0) <= upto_epoch]


def write_metrics(run: Path, history: list[dict]) -> None:
    atomic_write_text(run / METRICS, "".join(json.dumps(r) + "\n" for r in history))
