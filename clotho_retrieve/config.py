"""Every model and training setting, defined once: its default and its help text.

Each field of :class:`ModelConfig`, :class:`TrainConfig` and :class:`TableConfig` carries its help in
``field(metadata={"help": ...})`` (as transformers' ``TrainingArguments`` does). The Python API uses the
dataclasses; the ``train`` and ``table`` commands generate their options from the same fields
(:mod:`clotho_retrieve.cli_options`), so a default or a help text cannot differ between the two.
Fields with ``metadata["cli"] = False`` are not command-line options.

This module imports no torch, so building the command line stays fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields

from clotho_retrieve.utils import ClothoRetrieveError, err_console


def setting(default=dataclasses.MISSING, help: str = "", cli: bool = True):  # noqa: A002 - the metadata key
    """A dataclass field with its help text (``default`` left out: a required setting)."""
    return field(default=default, metadata={"help": help, "cli": cli})


# ----------------------------------------------------------------------------------------------
# The model (models/retrieval.py builds it)
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The retrieval model: backbone -> attention -> mean pooling -> projector x text tower (Sec. II)."""

    backbone: str = setting("cnn14", "cnn14 | cnn10 | cnn6 (official PANNs layouts) | tiny (CPU demo).")
    attention: str = setting("self", "none | self (Eq. 3-4) | gat (Eq. 1-2).")
    d_a: int = setting(
        1024, "D_A, the attention width (a linear map from the backbone's C channels when C != D_A)."
    )
    embed_dim: int = setting(1024, "D, the joint embedding width.")
    text_model: str = setting("bert-base-uncased", "Hugging Face BERT name or a local model folder.")
    max_text_tokens: int = setting(64, "Captions are cut to this many tokens.")
    text_trainable_layers: int = setting(
        -1, "-1: fine-tune all of BERT; 0: freeze its body; k: top k layers."
    )
    dropout: float = setting(0.2, "Dropout in the backbone and attention.")
    n_mels: int = setting(64, "Mel bands of the log-Mel input (taken from the features).", cli=False)
    front_end: dict | None = setting(
        None, "FrontEnd.to_dict() of the features the model was trained on.", cli=False
    )

    def __post_init__(self):
        from clotho_retrieve.models.attention import ATTENTIONS
        from clotho_retrieve.models.backbones import BACKBONES

        if self.backbone not in BACKBONES:
            raise ClothoRetrieveError(
                f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}"
            )
        if self.attention not in ATTENTIONS:
            raise ClothoRetrieveError(
                f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTIONS)}"
            )
        for name in ("d_a", "embed_dim", "max_text_tokens", "n_mels"):
            if int(getattr(self, name)) < 1:
                raise ClothoRetrieveError(f"model setting {name} must be a positive integer")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from JSON; unknown keys (e.g. from a newer version) are reported and ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            err_console.print(f"[yellow]warning:[/] ignoring unknown model settings: {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------
# Training (train.py)
# ----------------------------------------------------------------------------------------------
# Settings a resumed run may take from the caller instead of RUN/config.json: where the data is and
# how fast to go, never what is learned (epochs included: it sets the learning-rate schedule). Any other
# setting given with --resume must equal the saved one (checkpoints.check_resume).
RESUME_OVERRIDES = ("features", "device", "num_workers", "eval_batch_size")


@dataclass
class TrainConfig:
    """Training settings; the defaults are the paper's where it gives one (Sec. IV-A)."""

    features: str | None = setting(
        None,
        "Features folder with development.h5, validation.h5, evaluation.h5. Default: the workspace's "
        "data/features (with --resume: the run's own).",
    )
    out: str | None = setting(
        None,
        "Run folder to write (refused if it holds a run: --resume). Default: runs/ATTENTION-LOSS in the "
        "workspace, with a suffix when taken; with --resume: the latest run started.",
    )
    resume: bool = setting(
        False,
        "Continue the run in --out from its last checkpoint with the settings saved in its config.json; "
        "only "
        + ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_OVERRIDES)
        + " may be given again (another setting that differs is refused).",
    )
    loss: str = setting("ntxent", "ntxent (Eq. 6) | supcon (Eq. 7).")
    tau: float = setting(0.07, "Temperature of the loss (Eq. 6-7).")
    train_splits: tuple[str, ...] = setting(
        ("development",),
        "Comma-separated splits to train on; the paper: development,validation (with --val-split none).",
    )
    val_split: str | None = setting(
        "validation", "Split selecting best/ by mAP@10 each epoch; 'none': best = last."
    )
    batch_size: int = setting(60, "Global batch size (split across processes).")
    lr: float = setting(1e-4, "Adam learning rate.")
    weight_decay: float = setting(0.0, "Adam weight decay.")
    epochs: int = setting(40, "Training epochs.")
    schedule: str = setting("cosine", "Learning-rate schedule after warmup: cosine | constant.")
    warmup_epochs: float = setting(1.0, "Linear warmup length in epochs.")
    grad_clip: float = setting(2.0, "Max gradient L2 norm; 0 turns clipping off.")
    captions: str = setting("all", "all: every (clip, caption) pair per epoch; random: one caption per clip.")
    spec_augment: bool = setting(True, "SpecAugment masking of the training log-Mels.")
    freq_mask: int = setting(8, "SpecAugment: widest frequency mask (Mel bins).")
    n_freq_masks: int = setting(2, "SpecAugment: frequency masks per clip.")
    time_mask: int = setting(40, "SpecAugment: widest time mask (frames).")
    n_time_masks: int = setting(2, "SpecAugment: time masks per clip.")
    audio_weights: str | None = setting(
        None, "PANNs checkpoint for the backbone: .pth path or cnn14 | cnn10 | cnn6."
    )
    seed: int = setting(0, "Random seed (initialisation, data order, augmentation).")
    num_workers: int = setting(-1, "Data-loader worker processes; -1: 4 on CUDA, 0 on CPU.")
    amp: bool = setting(True, "Mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU.")
    device: str = setting("auto", "auto (CUDA if present, else CPU), cpu, cuda, ...")
    eval_batch_size: int = setting(32, "Clips per batch when validating.")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "train_splits" in kwargs:
            kwargs["train_splits"] = tuple(kwargs["train_splits"])
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# The paper's Table I (experiments.py): where to run it; the model and training settings are shared
# ----------------------------------------------------------------------------------------------
@dataclass
class TableConfig:
    features: str | None = setting(
        None, "Features folder with development.h5, validation.h5, evaluation.h5. Default: data/features."
    )
    out: str | None = setting(
        None, "Folder for one run per variant, table.md and table.csv. Default: runs/table."
    )
    variants: str = setting(
        "cnn14,gat,self,self-supcon",
        "Comma-separated subset: cnn14 (attention none), gat, self (NT-Xent), self-supcon (Eq. 7); "
        "none: train nothing (peers only).",
    )
    split: str = setting("evaluation", "Split the table is measured on.")
    peers: str | None = setting(
        None,
        "Comma-separated pretrained CLAP models (hub ids such as laion/clap-htsat-unfused, or folders) "
        "scored zero-shot beside ours: rows 'MODEL (zero-shot)'.",
    )
