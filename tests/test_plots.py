"""Plots: PNGs of the expected pixel size, time axes aligned, clear errors on bad runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from clotho_retrieve.plots import (
    CURVES_SIZE,
    DPI,
    EXPLAIN_SIZE,
    plot_attention,
    plot_training_curves,
    read_metrics,
)
from clotho_retrieve.utils import ClothoRetrieveError


def _png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, read back from the file."""
    img = imread(path)
    return img.shape[1], img.shape[0]


def _write_metrics(run, records) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_training_curves_png(tmp_path):
    run = tmp_path / "run"
    _write_metrics(
        run,
        [{"epoch": e, "train_loss": 4.0 / e, "val": {"mAP@10": 0.05 * e, "R@1": 0.01}} for e in (1, 2, 3)],
    )
    out = plot_training_curves(run)
    assert out == run / "curves.png"
    assert _png_size(out) == (CURVES_SIZE[0] * DPI, CURVES_SIZE[1] * DPI)
    img = imread(out)
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert not list(run.glob(".curves.png.*"))  # no temporary file left behind


def test_read_metrics_flattens_and_reports_bad_lines(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, [{"epoch": 1, "val": {"mAP@10": 0.5}}])
    assert read_metrics(run) == [{"epoch": 1, "val/mAP@10": 0.5}]
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{oops\n')
    with pytest.raises(ClothoRetrieveError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(run)
    with pytest.raises(ClothoRetrieveError, match="not found"):
        plot_training_curves(tmp_path / "nowhere")


def test_attention_png_size(tmp_path):
    rng = np.random.default_rng(0)
    logmel = rng.normal(size=(320, 64)).astype(np.float32)  # T = 320 frames
    attention = np.eye(10, dtype=np.float32)  # T' = 10: each frame attends only to itself
    out = plot_attention(logmel, attention, tmp_path / "a.png", hop_seconds=0.01, title="clip")
    assert _png_size(out) == (EXPLAIN_SIZE[0] * DPI, EXPLAIN_SIZE[1] * DPI)


def test_attention_axes_share_the_clip_duration(tmp_path, monkeypatch):
    """Both panels span [0, T * hop] seconds, and the diagonal of A sits at matching times."""
    import matplotlib.figure

    figures = []
    original = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_attention(np.zeros((100, 8)), np.eye(4), tmp_path / "b.png", hop_seconds=0.02)
    ax_mel, ax_recv, ax_att = figures[0].axes[:3]
    assert ax_mel.get_xlim() == pytest.approx((0.0, 2.0))  # T * hop = 100 * 0.02 s
    assert ax_att.get_xlim() == pytest.approx((0.0, 2.0))
    assert ax_att.get_ylim() == pytest.approx((2.0, 0.0))  # query time downwards
    mesh = ax_att.collections[0]
    coords = mesh.get_coordinates()  # (T'+1, T'+1, 2) cell corners
    np.testing.assert_allclose(coords[0, :, 0], np.linspace(0.0, 2.0, 5))  # 4 frames of 0.5 s each


def test_attention_frames_sit_under_the_frames_they_pool(tmp_path, monkeypatch):
    """With a pooling stride s, frame j of A covers log-Mel frames [j*s, (j+1)*s): T = 100, s = 32, T' = 3."""
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    plot_attention(np.zeros((100, 8)), np.eye(3), tmp_path / "c.png", hop_seconds=0.01, frame_stride=32)
    ax_mel, _, ax_att = figures[0].axes[:3]
    np.testing.assert_allclose(ax_att.collections[0].get_coordinates()[0, :, 0], [0.0, 0.32, 0.64, 0.96])
    assert ax_mel.get_xlim() == pytest.approx((0.0, 1.0))  # the whole clip, tail included
    assert ax_att.get_ylim() == pytest.approx((0.96, 0.0))


def test_attention_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\(T', T'\)"):
        plot_attention(np.zeros((10, 4)), np.zeros((3, 4)), tmp_path / "c.png", hop_seconds=0.01)


def test_explain_refuses_a_run_without_attention(tmp_path):
    from typer.testing import CliRunner

    from clotho_retrieve.cli import app

    run = tmp_path / "cnn14"
    (run / "best").mkdir(parents=True)  # a run folder: best/ holds the model (weights never read here)
    (run / "best" / "config.json").write_text(json.dumps({"attention": "none", "backbone": "tiny"}))
    (run / "best" / "model.safetensors").write_bytes(b"")
    result = CliRunner().invoke(
        app, ["explain", "--checkpoint", str(run), "--features", str(tmp_path), "--clip", "0"]
    )
    assert result.exit_code == 1
    assert "--attention none" in result.output and "has no attention map" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "attention.png").exists()


def test_resolve_clip():
    from clotho_retrieve.plots import resolve_clip

    names = ["a/dog bark.wav", "rain.wav", "7.wav"]
    assert resolve_clip(names, "rain.wav") == 1
    assert resolve_clip(names, "dog bark") == 0  # stem
    assert resolve_clip(names, "7") == 2  # a name wins over an index
    assert resolve_clip(names, "1") == 1
    assert resolve_clip(names, -1) == 2
    with pytest.raises(ClothoRetrieveError, match="not an index in 0..2"):
        resolve_clip(names, "5")
