"""Training: run folder, front-end checks, kill -9 / resume equality, overfitting, DDP, PANNs weights.

Fixtures tiny_bert, six_clip_features and overfit_run: conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import clips, model_cfg
from typer.testing import CliRunner

from clotho_retrieve.cli import app
from clotho_retrieve.feature_file import write_feature_file
from clotho_retrieve.frontend import FrontEnd
from clotho_retrieve.train import TrainConfig, _lr_at, train
from clotho_retrieve.utils import ClothoRetrieveError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_front_end_mismatch_is_refused(tmp_path, six_clip_features, tiny_bert):
    other = tmp_path / "features"
    other.mkdir()
    mels, captions = clips()
    names = [f"clip_{i}.wav" for i in range(len(mels))]
    os.link(six_clip_features / "development.h5", other / "development.h5")
    panns_like = FrontEnd(hop_length=320)
    write_feature_file(other / "validation.h5", names, mels, [1.0] * 6, panns_like, captions)
    cfg = TrainConfig(features=str(other), out=str(tmp_path / "run"), batch_size=12, epochs=1)
    with pytest.raises(ClothoRetrieveError, match=r"validation\.h5: front end differs.*hop_length"):
        train(model_cfg(tiny_bert), cfg)
    # a model config that names another front end is refused too
    cfg.val_split = None
    with pytest.raises(ClothoRetrieveError, match="does not match the model config"):
        train(model_cfg(tiny_bert, front_end=panns_like.to_dict()), cfg)
    assert not (tmp_path / "run" / "config.json").exists()


def _resume_cfg(features, out, **kw) -> TrainConfig:
    settings = dict(batch_size=4, lr=1e-3, epochs=3, captions="random", warmup_epochs=0.5, time_mask=8)
    return TrainConfig(features=str(features), out=str(out), **{**settings, **kw})


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path, six_clip_features, tiny_bert):
    uninterrupted = train(model_cfg(tiny_bert), _resume_cfg(six_clip_features, tmp_path / "a"))

    # The same run in a child process that SIGKILLs itself once epoch 2 is checkpointed.
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from clotho_retrieve.models import ModelConfig
        from clotho_retrieve.train import TrainConfig, train
        def die(epoch, record):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        train(ModelConfig(**{model_cfg(tiny_bert).to_dict()!r}),
              TrainConfig(**{_resume_cfg(six_clip_features, tmp_path / "b").__dict__!r}), on_epoch_end=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = tmp_path / "b"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    with pytest.raises(ClothoRetrieveError, match="already holds a run"):
        train(model_cfg(tiny_bert), _resume_cfg(six_clip_features, run))
    resumed = train(model_cfg(tiny_bert), _resume_cfg(six_clip_features, run, resume=True))

    a = load_file(uninterrupted / "last" / "model.safetensors")
    b = load_file(resumed / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]

    # resuming against features computed with another front end is refused
    other = tmp_path / "other"
    other.mkdir()
    mels, captions = clips()
    for split in ("development", "validation"):
        write_feature_file(other / f"{split}.h5", [str(i) for i in range(6)], mels, [1.0] * 6,
                           FrontEnd(n_fft=2048, win_length=2048), captions)  # fmt: skip
    with pytest.raises(ClothoRetrieveError, match="does not match the run being resumed.*n_fft"):
        train(model_cfg(tiny_bert), _resume_cfg(other, run, resume=True))


def test_short_training_overfits_to_perfect_recall(overfit_run):
    run = overfit_run
    config = json.loads((run / "config.json").read_text())
    assert set(config) >= {"model", "train", "front_end", "version"}
    assert config["front_end"] == FrontEnd().to_dict() == config["model"]["front_end"]
    assert config["train"]["loss"] == "supcon" and config["train"]["batch_size"] == 4
    assert (run / "last" / "trainer_state.pt").is_file() and (run / "best" / "model.safetensors").is_file()
    assert not (run / "best" / "trainer_state.pt").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 17))
    assert records[-1]["loss"] < records[0]["loss"]
    best = max(records, key=lambda r: r["val"]["mAP@10"])
    assert records[-1]["best_epoch"] == best["epoch"]
    assert best["val"]["R@1"] == 1.0


def test_train_cli_refuses_an_existing_run_without_resume(tmp_path, overfit_run, six_clip_features):
    args = ["train", "--features", str(six_clip_features), "--out", str(overfit_run)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "already holds a run" in result.output and "Traceback" not in result.output


def test_learning_rate_schedule_by_hand():
    cfg = TrainConfig(lr=1.0, schedule="cosine")
    # 2 warmup steps of 10: 1/2, 2/2, then cosine over the remaining 8 steps
    assert [_lr_at(s, 10, 2, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert _lr_at(2, 10, 2, cfg) == pytest.approx(1.0)
    assert _lr_at(6, 10, 2, cfg) == pytest.approx(0.5)  # half way: (1 + cos(pi/2)) / 2
    assert _lr_at(10, 10, 2, cfg) == pytest.approx(0.0)
    assert _lr_at(7, 10, 0, TrainConfig(lr=3e-4, schedule="constant")) == 3e-4


def test_torchrun_two_processes_train_one_run(tmp_path, six_clip_features, tiny_bert):
    """DistributedDataParallel on the CPU (gloo): both processes train, rank 0 alone writes the run."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "clotho_retrieve", "train", "--features", str(six_clip_features), "--out", str(out),
        "--backbone", "tiny", "--text-model", tiny_bert, "--d-a", "32", "--embed-dim", "16",
        "--batch-size", "4", "--epochs", "1", "--val-split", "none", "--no-spec-augment",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 4 on cpu x 2 processes" in " ".join(proc.stderr.split())
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 3)]  # 12 pairs / global batch 4
    assert (out / "last" / "trainer_state.pt").is_file() and (out / "best" / "model.safetensors").is_file()


def test_train_cli_starts_from_an_official_format_panns_checkpoint(tmp_path, six_clip_features, tiny_bert):
    """`train --audio-weights FILE.pth` (the official PANNs dict format) initialises the backbone.

    With lr 0 Adam leaves every weight where it started, so the conv weights in the run's saved
    safetensors must be the checkpoint's own values (BatchNorm running statistics do move in training).
    """
    from test_backbones import fake_checkpoint

    ckpt = fake_checkpoint("cnn6", seed=7)
    path = tmp_path / "Cnn6_mAP=0.343.pth"
    torch.save(ckpt, path)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train", "--features", str(six_clip_features), "--out", str(out), "--backbone", "cnn6",
            "--audio-weights", str(path), "--attention", "none", "--d-a", "512", "--embed-dim", "16",
            "--text-model", tiny_bert, "--epochs", "1", "--batch-size", "6", "--lr", "0",
            "--no-spec-augment", "--device", "cpu",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = load_file(str(out / "best" / "model.safetensors"))
    for key in ("conv_block1.conv1.weight", "conv_block4.conv1.weight", "bn0.weight"):
        assert torch.equal(saved[f"audio.backbone.{key}"], ckpt["model"][key]), key
