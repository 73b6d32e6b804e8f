"""`train --resume` continues exactly the saved run: settings from RUN/config.json, only runtime options
given again, a conflicting one refused by name; interrupted, stopped by a full disk or left with a
damaged last/, it ends with one line saying what to run, and running it gives the uninterrupted run."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from robust_helpers import error_line, run_cli
from safetensors.torch import load_file
from tiny_runs import model_cfg
from typer.testing import CliRunner

import clotho_retrieve.train as train_module
from clotho_retrieve import checkpoints, safety
from clotho_retrieve.cli import app
from clotho_retrieve.train import TrainConfig, train
from clotho_retrieve.utils import ClothoRetrieveError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
ENOSPC = OSError(errno.ENOSPC, "No space left on device")

# The run of test_train.py's resume test, as command-line options.
SETTINGS = dict(batch_size=4, lr=1e-3, epochs=3, captions="random", warmup_epochs=0.5, time_mask=8)
OPTIONS = ["--backbone", "tiny", "--attention", "self", "--d-a", "32", "--embed-dim", "16",
           "--batch-size", "4", "--lr", "0.001", "--epochs", "3", "--captions", "random",
           "--warmup-epochs", "0.5", "--time-mask", "8"]  # fmt: skip


def invoke(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def same_weights(a, b) -> None:
    x, y = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])][:5]


def epochs(run) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, six_clip_features, tiny_bert, one_thread):
    """The run trained without interruption."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return train(model_cfg(tiny_bert), TrainConfig(features=str(six_clip_features), out=str(out), **SETTINGS))


def test_resume_continues_the_saved_run_whatever_stops_it(tmp_path, six_clip_features, tiny_bert, reference,
                                                          monkeypatch):
    run = tmp_path / "run"

    # 1. Ctrl-C after the first epoch: the message gives the exact command
    real_checkpoint = train_module.validate_and_checkpoint

    def interrupt_after_epoch_1(t, record):
        real_checkpoint(t, record)
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "validate_and_checkpoint", interrupt_after_epoch_1)
    result = invoke("train", "--features", six_clip_features, "--out", run, "--text-model", tiny_bert,
                    *OPTIONS)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert f"resume with: clotho-retrieve train --out {run} --resume" in " ".join(result.output.split())
    monkeypatch.setattr(train_module, "validate_and_checkpoint", real_checkpoint)

    # 2. settings that would change the run are refused by name, even one given at its default value
    conflicts = [("--lr", "0.5", "0.001"), ("--epochs", "40", "3"), ("--lr", "0.0001", "0.001"),
                 ("--backbone", "cnn10", "tiny"), ("--train-splits", "validation", "development")]
    for option, value, saved in conflicts:
        result = invoke("train", "--out", run, "--resume", option, value)
        line = error_line(result.output, returncode=result.exit_code)
        assert f"{option} {value} (saved: {saved}) differ" in line and "another --out" in line
    assert epochs(run) == [1]

    # 3. the disk is full when epoch 2 is saved (seen by the space check, or only by the write itself):
    #    one line with the command; last/ still holds epoch 1
    for inject in ("check", "write"):
        with monkeypatch.context() as m:
            if inject == "check":
                m.setattr(safety, "free_bytes", lambda folder: 0)
            else:
                m.setattr(checkpoints.torch, "save", lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
            result = invoke("train", "--out", run, "--resume")
        line = error_line(result.output, returncode=result.exit_code)
        assert line.startswith(f"{run / 'last'}: not enough disk space for the checkpoint of epoch 2 (needs ")
        assert line.endswith(f"free some space and resume: clotho-retrieve train --out {run} --resume")
        assert torch.load(run / "last" / "trainer_state.pt", weights_only=True)["epoch"] == 1
        assert not list(run.glob(".last.*"))  # no half-written checkpoint left

    # 4. the command alone (features, epochs and schedule from config.json; --device is a runtime option)
    result = invoke("train", "--out", run, "--resume", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "3 epochs" in result.output and epochs(run) == [1, 2, 3]
    same_weights(run, reference)

    # 5. a truncated last/trainer_state.pt: one line that says what to do; doing it gives the same run
    state = run / "last" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    result = invoke("train", "--out", run, "--resume")
    line = error_line(result.output, returncode=result.exit_code)
    command = f"mv {run / 'last'} {run / 'last'}.damaged && clotho-retrieve train --out {run} --resume"
    assert line.startswith(f"{run / 'last'}: damaged checkpoint (") and line.endswith(command)
    (run / "last").rename(run / "last.damaged")
    result = invoke("train", "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert epochs(run) == [1, 2, 3]
    same_weights(run, reference)


def test_train_on_a_full_disk_stops_at_a_checkpoint_then_resumes(tmpfs, six_clip_features, tiny_bert,
                                                                  reference):
    disk = tmpfs.mount("2m")
    run = disk / "run"
    proc = run_cli("train", "--features", six_clip_features, "--out", run, "--text-model", tiny_bert,
                   *OPTIONS)
    line = error_line(proc.stderr, returncode=proc.returncode)
    assert line.startswith(f"{run / 'last'}: not enough disk space for the checkpoint of epoch 1 (needs ")
    assert line.endswith(f"free some space and resume: clotho-retrieve train --out {run} --resume")
    tmpfs.resize(disk, "64m")
    result = invoke("train", "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    same_weights(run, reference)


def test_resume_through_the_python_api_refuses_another_schedule(tmp_path, six_clip_features, tiny_bert):
    cfg = TrainConfig(features=str(six_clip_features), out=str(tmp_path / "run"), **{**SETTINGS, "epochs": 1})
    run = train(model_cfg(tiny_bert), cfg)
    cfg.resume, cfg.epochs = True, 2
    with pytest.raises(ClothoRetrieveError, match=r"--epochs 2 \(saved: 1\) differ"):
        train(model_cfg(tiny_bert), cfg)
    assert epochs(run) == [1]
