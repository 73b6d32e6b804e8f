"""Pictures where people would rather look than read.

* :func:`plot_training_curves` -- ``RUN/curves.png``: training loss and validation mAP@10 per epoch,
  from ``RUN/metrics.jsonl``.
* :func:`explain` -- for one clip, its log-Mel spectrogram above the attention map of the run's self
  (Eq. 3-4) or graph (Eq. 1-2) attention module, on one shared time axis, so the "contextual
  association" between frames the paper is about can be seen.

matplotlib is imported lazily with the Agg backend (no display needed, and `import clotho_retrieve`
stays fast).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from clotho_retrieve.utils import ClothoRetrieveError, atomic_path

DPI = 100
CURVES_SIZE = (10.0, 4.0)  # inches -> 1000 x 400 px
EXPLAIN_SIZE = (8.0, 10.0)  # inches -> 800 x 1000 px


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    """Save a figure atomically as PNG at a fixed pixel size (no tight bbox: size = figsize * DPI)."""
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    _pyplot().close(fig)
    return out


# ----------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------
def _flatten(record: dict, prefix: str = "") -> dict[str, object]:
    """{"val": {"mAP@10": x}} -> {"val/mAP@10": x}."""
    flat: dict[str, object] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def read_metrics(run: str | Path) -> list[dict[str, object]]:
    """The per-epoch records of ``RUN/metrics.jsonl`` (nested dicts flattened to 'a/b' keys)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ClothoRetrieveError(f"{path}: not found; is {run} a run folder of `clotho-retrieve train`?")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(_flatten(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ClothoRetrieveError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not records:
        raise ClothoRetrieveError(f"{path}: no epochs recorded yet")
    return records


def _series(records: list[dict[str, object]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one numeric key, skipping epochs that lack it."""
    xs, ys = [], []
    for i, rec in enumerate(records):
        value = rec.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(float(rec.get("epoch", i + 1)))
            ys.append(float(value))
    return xs, ys


def plot_training_curves(run: str | Path, out: str | Path | None = None) -> Path:
    """Plot loss (every ``*loss*`` key) and validation mAP@10 (every ``*mAP@10`` key) per epoch.

    Writes ``RUN/curves.png`` (or ``out``), 1000 x 400 px, and returns its path.
    """
    run = Path(run)
    records = read_metrics(run)
    keys = sorted({k for rec in records for k in rec})
    loss_keys = [k for k in keys if "loss" in k.lower()]
    map_keys = [k for k in keys if k.endswith("mAP@10")]
    if not loss_keys and not map_keys:
        raise ClothoRetrieveError(f"{run / 'metrics.jsonl'}: no loss or mAP@10 values to plot")

    plt = _pyplot()
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=CURVES_SIZE, dpi=DPI, layout="constrained")
    for key in loss_keys:
        ax_loss.plot(*_series(records, key), marker="o", markersize=3, label=key)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="loss")
    for key in map_keys:
        xs, ys = _series(records, key)
        ax_map.plot(xs, [100.0 * y for y in ys], marker="o", markersize=3, label=key)
    ax_map.set(title="Validation mAP@10 (text-to-audio)", xlabel="epoch", ylabel="mAP@10 (%)")
    for ax in (ax_loss, ax_map):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(run.resolve().name)
    return _save(fig, Path(out) if out is not None else run / "curves.png")


# ----------------------------------------------------------------------------------------------
# Attention map beside the log-Mel spectrogram
# ----------------------------------------------------------------------------------------------
def plot_attention(
    logmel: np.ndarray,
    attention: np.ndarray,
    out: str | Path,
    hop_seconds: float,
    frame_stride: float | None = None,
    title: str = "",
) -> Path:
    """Log-Mel spectrogram (T, M) above the attention map A (T', T') on one time axis in seconds.

    Attention frame j is the average pooling of log-Mel frames [j * s, (j + 1) * s), s = ``frame_stride``
    (the backbone's time downsampling, 32 for CNN14; default T / T'), so it is drawn over
    [j * s, (j + 1) * s) * hop seconds, under the spectrogram frames it summarises (frames left over by
    the floor division of the pooling show as the uncovered tail). Row i of A is query frame i's softmax
    over key frames j; the middle panel is the attention each key frame receives, averaged over queries.
    Writes an 800 x 1000 px PNG and returns its path.
    """
    logmel = np.asarray(logmel, dtype=np.float32)
    attention = np.asarray(attention, dtype=np.float32)
    if logmel.ndim != 2 or logmel.shape[0] < 1:
        raise ValueError(f"logmel must be (T, M), got {logmel.shape}")
    if attention.ndim != 2 or attention.shape[0] != attention.shape[1] or attention.shape[0] < 1:
        raise ValueError(f"attention must be (T', T'), got {attention.shape}")
    n_frames, n_mels = logmel.shape  # T, M
    n_att = attention.shape[0]  # T'
    stride = n_frames / n_att if frame_stride is None else frame_stride  # log-Mel frames per A frame
    edges = np.arange(n_att + 1) * stride * hop_seconds  # T'+1 boundaries of the attention frames (s)
    duration = max(n_frames * hop_seconds, edges[-1])  # seconds shown (T frames; more if padded)

    plt = _pyplot()
    fig, (ax_mel, ax_recv, ax_att) = plt.subplots(
        3,
        1,
        figsize=EXPLAIN_SIZE,
        dpi=DPI,
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": [1.0, 0.45, 2.2]},
    )
    im_mel = ax_mel.imshow(
        logmel.T,
        origin="lower",
        aspect="auto",
        cmap="magma",
        interpolation="nearest",
        extent=(0.0, duration, -0.5, n_mels - 0.5),
    )
    ax_mel.set(title=f"log-Mel spectrogram (T = {n_frames} frames, {n_mels} bands)", ylabel="Mel band")
    fig.colorbar(im_mel, ax=ax_mel, label="dB", pad=0.01)

    received = attention.mean(axis=0)  # (T',): mean over query frames i of A[i, j]
    ax_recv.stairs(received, edges, fill=True, alpha=0.6)
    ax_recv.axhline(1.0 / n_att, color="grey", linestyle="--", linewidth=1, label="uniform 1/T'")
    ax_recv.set(ylabel="mean weight", title="attention received per key frame")
    ax_recv.legend(fontsize="small", loc="upper right")

    im_att = ax_att.pcolormesh(edges, edges, attention, cmap="viridis", shading="flat")
    ax_att.set_ylim(edges[-1], 0.0)  # query time runs downwards, like a matrix
    ax_att.set(
        title=f"attention map A (T' = {n_att} frames): row = query frame i, column = key frame j",
        xlabel="time (s)",
        ylabel="query frame time (s)",
    )
    fig.colorbar(im_att, ax=ax_att, label="softmax weight", pad=0.01)
    ax_att.set_xlim(0.0, duration)
    if title:
        fig.suptitle(title)
    return _save(fig, Path(out))


def _model_config(model_dir: Path) -> dict:
    """The ModelConfig fields saved in a model folder's config.json."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ClothoRetrieveError(f"{path}: unreadable model config ({exc})") from None
    if not isinstance(config, dict):
        raise ClothoRetrieveError(f"{path}: expected a JSON object of model settings")
    return config


def resolve_clip(names: list[str], clip: str | int) -> int:
    """Index of a clip given its file name, its base name or stem, or its index into the file."""
    clip = str(clip)
    for candidates in (
        [i for i, n in enumerate(names) if n == clip],
        [i for i, n in enumerate(names) if Path(n).name == clip or Path(n).stem == clip],
    ):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ClothoRetrieveError(f"--clip {clip}: matches {len(candidates)} clips; give the full name")
    if clip.lstrip("-").isdigit() and -len(names) <= int(clip) < len(names):
        return int(clip) % len(names)
    raise ClothoRetrieveError(f"--clip {clip}: no such clip name, and not an index in 0..{len(names) - 1}")


def explain(
    checkpoint: str | Path,
    features: str | Path,
    clip: str | int,
    out: str | Path,
    split: str = "evaluation",
    which: str = "best",
    device: str = "cpu",
) -> Path:
    """Plot one clip's log-Mel spectrogram above the attention map of a trained run; return the PNG path.

    ``checkpoint`` is a run folder (its ``which`` model is used) or a model folder; ``features`` is an
    HDF5 feature file or a Clotho-layout features folder (then ``split`` picks the file). Runs trained
    with ``--attention none`` have no attention map and are refused.
    """
    from clotho_retrieve.encoder import load_model, resolve_model_dir
    from clotho_retrieve.feature_file import FeatureFile, features_path

    checkpoint, features = Path(checkpoint), Path(features)
    model_dir = resolve_model_dir(checkpoint, which)
    attention_kind = _model_config(model_dir).get("attention")
    if attention_kind not in ("self", "gat"):
        raise ClothoRetrieveError(
            f"{checkpoint}: trained with --attention {attention_kind}, which has no attention map; "
            "pick a run trained with --attention self or --attention gat"
        )
    h5 = features_path(features, split) if features.is_dir() else features
    if not h5.is_file():
        raise ClothoRetrieveError(f"{h5}: feature file not found; run `clotho-retrieve features` first")

    feature_file = FeatureFile(h5)
    try:
        index = resolve_clip(list(feature_file.names), clip)
        name = feature_file.names[index]
        logmel = np.asarray(feature_file[index], dtype=np.float32)  # (T, M)
        front_end = feature_file.front_end
    finally:
        feature_file.close()

    encoder = load_model(model_dir, device=device, parts=("audio",))
    attention = encoder.attention_map(logmel)  # (T', T') or None
    if attention is None:
        raise ClothoRetrieveError(f"{checkpoint}: the model returned no attention map (attention none?)")

    module = {"self": "self-attention (Eq. 3-4)", "gat": "graph attention (Eq. 1-2)"}[attention_kind]
    return plot_attention(
        logmel,
        attention,
        out,
        hop_seconds=front_end.hop_length / front_end.sample_rate,
        frame_stride=encoder.model.audio.backbone.time_stride,
        title=f"{name}: {module}, run {checkpoint.resolve().name}",
    )
