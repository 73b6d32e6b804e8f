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


def resume_command(run: Path) -> str:
    """The command that continues the run in ``run`` (everything else comes from its config.json)."""
    import shlex

    return f"clotho-retrieve train --out {shlex.quote(str(run))} --resume"


def _read_run_config(run: Path) -> tuple[ModelConfig, TrainConfig, dict]:
    config_path = run / "config.json"
    if not config_path.is_file():
        raise ClothoRetrieveError(f"{config_path}: missing; nothing to resume (train without --resume)")
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg, train_cfg = ModelConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved["train"])
        return model_cfg, train_cfg, saved["front_end"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ClothoRetrieveError(f"{config_path}: unreadable run config ({exc})") from None


def check_resume(run: Path, given: dict[str, object]) -> None:
    """Refuse settings ``given`` (field name -> value) for a resumed run that differ from its saved ones.

    Only RESUME_OVERRIDES (where the data is, how fast to run) may differ: everything that decides what
    is learned comes from RUN/config.json, so a resumed run continues exactly the saved one."""
    if not (run / "config.json").is_file():
        return  # load_resume_config says what is wrong
    saved_model, saved_train, _ = _read_run_config(run)
    conflicts = []
    for name, value in given.items():
        if name in RESUME_OVERRIDES or name in ("out", "resume"):
            continue
        saved = saved_model if hasattr(saved_model, name) else saved_train
        if hasattr(saved, name) and getattr(saved, name) != value:
            option = "--" + name.replace("_", "-")
            conflicts.append(f"{option} {_show(value)} (saved: {_show(getattr(saved, name))})")
    if conflicts:
        raise ClothoRetrieveError(
            f"{run}: --resume continues the run with the settings saved in {run / 'config.json'}, but "
            f"{', '.join(conflicts)} differ; leave them out to continue it, or train a new run with another "
            "--out"
        )


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _non_defaults(*configs) -> dict[str, object]:
    """Fields of config dataclasses set to something else than their default (what a caller asked for)."""
    given = {}
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            default = f.default if f.default is not dataclasses.MISSING else object()
            if f.metadata.get("cli", True) and getattr(cfg, f.name) != default:
                given[f.name] = getattr(cfg, f.name)
    return given


def load_resume_config(
    run: Path, model_cfg: ModelConfig, cfg: TrainConfig
) -> tuple[ModelConfig, TrainConfig, dict]:
    """(model_cfg, train_cfg, front_end dict) of the run saved in RUN/config.json.

    Settings the caller left at their defaults come from the saved run; RESUME_OVERRIDES set to
    something else are used; any other setting that differs from the saved run is refused
    (:func:`check_resume`). A run killed before its first checkpoint has a config but no last/: it
    restarts from epoch 0 with its saved settings.
    """
    from clotho_retrieve.utils import err_console

    model_saved, train_cfg, front_end = _read_run_config(run)
    given = _non_defaults(model_cfg, cfg)
    check_resume(run, given)
    for name in RESUME_OVERRIDES:
        if name in given:
            if name == "features" and given[name] != train_cfg.features:
                err_console.print(f"note: resuming {run} on the features in {given[name]} "
                                  f"(it was trained on {train_cfg.features})", highlight=False)
            setattr(train_cfg, name, given[name])
    train_cfg.resume, train_cfg.out = True, str(run)
    return model_saved, train_cfg, front_end


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
    from clotho_retrieve.safety import check_space, errno_of, write_failed
    from clotho_retrieve.utils import free_bytes

    what, then = f"the checkpoint of epoch {state.epoch}", f"resume: {resume_command(run)}"
    needed = _checkpoint_bytes(model, optimizer)
    check_space(run / "last", needed, what, then)
    try:
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
    except Exception as exc:  # torch and safetensors report a full disk in their own exception types
        if errno_of(exc) is None and free_bytes(run) > needed:
            raise
        raise write_failed(exc, run / "last", what, needed, then) from None


def _checkpoint_bytes(model, optimizer) -> int:
    """About what a checkpoint takes on disk: weights, optimizer moments, and the text tokenizer files."""
    tensors = list(model.state_dict().values())
    tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors) + (4 << 20)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def has_checkpoint(run: Path) -> bool:
    """Whether RUN/last exists (complete or not: load_checkpoint checks it)."""
    return (run / "last").is_dir()


def load_checkpoint(run: Path):
    """(RetrievalModel on the CPU, trainer_state dict) of RUN/last; a damaged one is refused with the
    command that starts the run again (there is no older checkpoint with an optimizer state)."""
    from clotho_retrieve.models import RetrievalModel

    try:
        model = RetrievalModel.from_pretrained(run / "last", device="cpu")
        state = torch.load(run / "last" / TRAINER_STATE, map_location="cpu", weights_only=True)
        for key in ("epoch", "step", "best_score", "best_epoch", "optimizer"):
            state[key]  # noqa: B018 - a state without them is damaged too
    except Exception as exc:  # noqa: BLE001 - truncated, missing or unreadable: the checkpoint is damaged
        last = run / "last"
        raise ClothoRetrieveError(
            f"{last}: damaged checkpoint ({' '.join(str(exc).split())[:160]}); restore it from a copy, or "
            f"start the run over with its saved settings: mv {last} {last}.damaged && {resume_command(run)}"
        ) from None
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
