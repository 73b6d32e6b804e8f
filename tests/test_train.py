"""Training and evaluation: run folder, front-end checks, kill -9 / resume equality, overfitting, evaluate."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from clotho_retrieve.cli import app
from clotho_retrieve.feature_file import FeatureFile, write_feature_file
from clotho_retrieve.frontend import FrontEnd
from clotho_retrieve.models import ModelConfig
from clotho_retrieve.train import (
    TrainConfig,
    _lr_at,
    _recover_dir,
    _replace_dir,
    chance_levels,
    encode_split,
    evaluate,
    train,
)
from clotho_retrieve.utils import ClothoRetrieveError

SOUNDS = ["dog barks", "rain falls", "car horn honks", "bird sings", "door slams", "water flows"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_path):
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer: fast to save, load and train."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _clips(seed: int = 0):
    """Six clips, each loud in its own Mel band, with two captions naming its sound."""
    rng = np.random.default_rng(seed)
    mels, captions = [], []
    for i, sound in enumerate(SOUNDS):
        mel = rng.normal(-40.0, 3.0, size=(40 + 8 * i, 64)).astype(np.float32)
        mel[:, 10 * i : 10 * i + 8] += 30.0
        mels.append(mel)
        captions.append([f"a {sound} loudly", f"the {sound} nearby"])
    return mels, captions


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """development.h5 and validation.h5 holding the same six clips (so overfitting shows on validation)."""
    root = tmp_path_factory.mktemp("features")
    mels, captions = _clips()
    names = [f"clip_{i}.wav" for i in range(len(mels))]
    for split in ("development", "validation"):
        write_feature_file(root / f"{split}.h5", names, mels, [1.0] * len(mels), FrontEnd(), captions)
    return root


def _model_cfg(text_model: str, **kw) -> ModelConfig:
    return ModelConfig(backbone="tiny", attention="self", d_a=32, embed_dim=16, text_model=text_model, **kw)


def test_front_end_mismatch_is_refused(tmp_path, features, tiny_bert):
    other = tmp_path / "features"
    other.mkdir()
    mels, captions = _clips()
    names = [f"clip_{i}.wav" for i in range(len(mels))]
    os.link(features / "development.h5", other / "development.h5")
    panns_like = FrontEnd(hop_length=320)
    write_feature_file(other / "validation.h5", names, mels, [1.0] * 6, panns_like, captions)
    cfg = TrainConfig(features=str(other), out=str(tmp_path / "run"), batch_size=12, epochs=1)
    with pytest.raises(ClothoRetrieveError, match=r"validation\.h5: front end differs.*hop_length"):
        train(_model_cfg(tiny_bert), cfg)
    # a model config that names another front end is refused too
    cfg.val_split = None
    with pytest.raises(ClothoRetrieveError, match="does not match the model config"):
        train(_model_cfg(tiny_bert, front_end=panns_like.to_dict()), cfg)
    assert not (tmp_path / "run" / "config.json").exists()


def _resume_cfg(features, out, **kw) -> TrainConfig:
    settings = dict(batch_size=4, lr=1e-3, epochs=3, captions="random", warmup_epochs=0.5, time_mask=8)
    return TrainConfig(features=str(features), out=str(out), **{**settings, **kw})


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path, features, tiny_bert):
    uninterrupted = train(_model_cfg(tiny_bert), _resume_cfg(features, tmp_path / "a"))

    # The same run in a child process that SIGKILLs itself once epoch 2 is checkpointed.
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads(1)
        from clotho_retrieve.models import ModelConfig
        from clotho_retrieve.train import TrainConfig, train
        def die(epoch, record):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        train(ModelConfig(**{_model_cfg(tiny_bert).to_dict()!r}),
              TrainConfig(**{_resume_cfg(features, tmp_path / "b").__dict__!r}), on_epoch_end=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = tmp_path / "b"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    with pytest.raises(ClothoRetrieveError, match="already holds a run"):
        train(_model_cfg(tiny_bert), _resume_cfg(features, run))
    resumed = train(_model_cfg(tiny_bert), _resume_cfg(features, run, resume=True))

    a = load_file(uninterrupted / "last" / "model.safetensors")
    b = load_file(resumed / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]

    # resuming against features computed with another front end is refused
    other = tmp_path / "other"
    other.mkdir()
    mels, captions = _clips()
    for split in ("development", "validation"):
        write_feature_file(other / f"{split}.h5", [str(i) for i in range(6)], mels, [1.0] * 6,
                           FrontEnd(n_fft=2048, win_length=2048), captions)  # fmt: skip
    with pytest.raises(ClothoRetrieveError, match="does not match the run being resumed.*n_fft"):
        train(_model_cfg(tiny_bert), _resume_cfg(other, run, resume=True, epochs=4))


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, features, minilm_path):
    """Tiny backbone x MiniLM (top layer trainable) fitted to the six clips until it ranks them all right."""
    out = tmp_path_factory.mktemp("overfit") / "run"
    cfg = TrainConfig(
        features=str(features), out=str(out), batch_size=4, lr=1e-3, epochs=16, loss="supcon",
        warmup_epochs=0, spec_augment=False, eval_batch_size=6,
    )  # fmt: skip
    return train(_model_cfg(minilm_path, text_trainable_layers=1, dropout=0.0), cfg)


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


def _rank_of_truth(sim: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of each query's relevant item (brute force, ties counted against us)."""
    return np.array([(row > row[t]).sum() + 1 for row, t in zip(sim, target, strict=True)])


def test_evaluate_json_and_submission_csv(tmp_path, overfit_run, features):
    submission = tmp_path / "submission.csv"
    result = CliRunner().invoke(
        app,
        ["evaluate", "--checkpoint", str(overfit_run), "--features", str(features / "validation.h5"),
         "--json", "--submission", str(submission), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # stdout holds the JSON alone; progress and notes go to stderr
    assert out["n_clips"] == 6 and out["n_captions"] == 12
    assert out["text_to_audio"]["R@1"] == 1.0
    assert out["chance"]["text_to_audio"]["R@1"] == pytest.approx(1 / 6)

    # independent NumPy check of every text-to-audio metric from the model's embeddings
    from clotho_retrieve.models import RetrievalModel

    model = RetrievalModel.from_pretrained(overfit_run)
    ff = FeatureFile(features / "validation.h5")
    enc = encode_split(model, ff)
    sim = (enc.text @ enc.audio.T).numpy()
    ranks = _rank_of_truth(sim, enc.caption_clip.numpy())
    for k in (1, 5, 10):
        assert out["text_to_audio"][f"R@{k}"] == pytest.approx(np.mean(ranks <= k))
    assert out["text_to_audio"]["mAP@10"] == pytest.approx(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0)))

    with open(submission, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["caption"] + [f"file_name_{i}" for i in range(1, 11)]
    assert [r[0] for r in rows[1:]] == enc.captions
    for row, s in zip(rows[1:], sim, strict=True):
        assert row[1:7] == [ff.names[j] for j in np.argsort(-s, kind="stable")]
        assert row[7:] == [""] * 4  # only six clips to rank


def test_chance_levels_by_hand():
    chance = chance_levels(4, torch.tensor([0, 0, 1, 2, 3]))  # 4 clips, 5 captions, clip 0 has two
    assert chance["text_to_audio"]["R@1"] == pytest.approx(1 / 4)
    assert chance["text_to_audio"]["R@5"] == 1.0
    assert chance["text_to_audio"]["mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    # audio-to-text R@1: clip 0 hits with 2/5, the others with 1/5
    assert chance["audio_to_text"]["R@1"] == pytest.approx((2 / 5 + 3 * 1 / 5) / 4)
    # R@5 of 5 captions: always a hit
    assert chance["audio_to_text"]["R@5"] == pytest.approx(1.0)


def test_train_cli_refuses_an_existing_run_without_resume(tmp_path, overfit_run, features):
    result = CliRunner().invoke(app, ["train", "--features", str(features), "--out", str(overfit_run)])
    assert result.exit_code == 1
    assert "already holds a run" in result.output and "Traceback" not in result.output


def test_evaluate_refuses_features_of_another_front_end(tmp_path, overfit_run):
    mels, captions = _clips()
    path = tmp_path / "evaluation.h5"
    write_feature_file(path, [str(i) for i in range(6)], mels, [1.0] * 6, FrontEnd(window="hann"), captions)
    with pytest.raises(ClothoRetrieveError, match=r"evaluation\.h5: front end does not match.*window"):
        evaluate(overfit_run, path)


def test_learning_rate_schedule_by_hand():
    cfg = TrainConfig(lr=1.0, schedule="cosine")
    # 2 warmup steps of 10: 1/2, 2/2, then cosine over the remaining 8 steps
    assert [_lr_at(s, 10, 2, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert _lr_at(2, 10, 2, cfg) == pytest.approx(1.0)
    assert _lr_at(6, 10, 2, cfg) == pytest.approx(0.5)  # half way: (1 + cos(pi/2)) / 2
    assert _lr_at(10, 10, 2, cfg) == pytest.approx(0.0)
    assert _lr_at(7, 10, 0, TrainConfig(lr=3e-4, schedule="constant")) == 3e-4


def test_checkpoint_swap_recovers_from_a_crash_between_renames(tmp_path):
    last = tmp_path / "last"
    for name, text in ((".last.old", "previous"), (".last.tmp", "half-written")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
    _recover_dir(last)  # crashed after moving last/ aside: the previous checkpoint comes back
    assert (last / "f").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    new = tmp_path / ".last.tmp"
    new.mkdir()
    (new / "f").write_text("new")
    _replace_dir(new, last)
    assert (last / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_torchrun_two_processes_train_one_run(tmp_path, features, tiny_bert):
    """DistributedDataParallel on the CPU (gloo): both processes train, rank 0 alone writes the run."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "clotho_retrieve", "train", "--features", str(features), "--out", str(out),
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


def test_train_cli_starts_from_an_official_format_panns_checkpoint(tmp_path, features, tiny_bert):
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
            "train", "--features", str(features), "--out", str(out), "--backbone", "cnn6",
            "--audio-weights", str(path), "--attention", "none", "--d-a", "512", "--embed-dim", "16",
            "--text-model", tiny_bert, "--epochs", "1", "--batch-size", "6", "--lr", "0",
            "--no-spec-augment", "--device", "cpu",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = load_file(str(out / "best" / "model.safetensors"))
    for key in ("conv_block1.conv1.weight", "conv_block4.conv1.weight", "bn0.weight"):
        assert torch.equal(saved[f"audio.backbone.{key}"], ckpt["model"][key]), key
