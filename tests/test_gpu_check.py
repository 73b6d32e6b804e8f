"""`make gpu-check` (benchmarks/gpu_check.py) in its CPU toy mode, end to end, and its phase guard.

The toy mode runs every phase the GPU check runs (training steps with autocast and in fp32, the CLI's
train under torchrun with 2 gloo processes and its resume, evaluate, embed, the encoder, DDP in this
process) at toy sizes, so the script is known to work before a GPU is lent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PHASES = ["text_model", "data", "train_amp", "train_fp32", "torchrun_train", "torchrun_resume",
          "evaluate", "embed", "encoder", "ddp_step"]  # fmt: skip
STEP_PHASES = ("train_amp", "train_fp32", "ddp_step")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, minilm_path):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--toy", "--out", str(out), "--budget-s", "900"],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else None
    return proc, out, report


def test_toy_mode_passes_every_phase(toy_run):
    proc, out, report = toy_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["mode"] == "toy" and report["ok"] is True
    assert list(report["phases"]) == PHASES
    assert {name: p["status"] for name, p in report["phases"].items()} == dict.fromkeys(PHASES, "ok")
    # what the device tool brings back: at most 8 files, no folders
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.txt"]
    table = (out / "gpu_check.txt").read_text()
    assert all(name in table for name in PHASES)
    assert table in proc.stdout  # the table is printed too
    assert not Path(report["work"]).exists()  # the temporary work folder is removed


def test_toy_training_steps_are_finite_falling_and_counted(toy_run):
    _, _, report = toy_run
    sizes = report["sizes"]
    k = sizes["steps"] // 2  # distinct batches; each is seen on the first pass, then again
    for name in STEP_PHASES:
        p = report["phases"][name]
        assert p["steps"] == len(p["losses"]) == len(p["step_s"]) == sizes["steps"], name
        assert all(math.isfinite(v) for v in p["losses"]), name
        first, second = sum(p["losses"][:k]) / k, sum(p["losses"][k : 2 * k]) / k
        assert second < first, (name, p["losses"])
        assert p["loss_first_pass"] == pytest.approx(first, abs=1e-4)
        assert p["clips_per_s"] == pytest.approx(sizes["batch"] / p["median_step_s"], rel=0.01)
        assert p["padded_frames"] and all(f > 0 for f in p["padded_frames"])
    assert report["phases"]["train_amp"]["precision"] == "bfloat16"  # CPU autocast in toy mode
    assert report["phases"]["train_fp32"]["precision"] == "fp32"
    assert report["phases"]["ddp_step"]["backend"] == "gloo"
    # DDP over one process averages one gradient: the same losses as train_amp (same seed and batches)
    assert report["phases"]["ddp_step"]["max_loss_diff_vs_train_amp"] < 1e-3


def test_toy_torchrun_train_and_resume(toy_run):
    _, _, report = toy_run
    sizes, phases = report["sizes"], report["phases"]
    first, resumed = phases["torchrun_train"], phases["torchrun_resume"]
    assert first["nproc"] == 2 and first["ddp"] is True and first["backend"] == "gloo"
    # one random caption per clip: `clips` pairs an epoch, `batch` pairs a step (split over 2 processes)
    assert sizes["captions"] == "random" and sizes["clips"] % sizes["batch"] == 0
    assert first["epoch"] == 1 and first["step"] == sizes["clips"] // sizes["batch"]
    assert resumed["epoch"] == 2 and resumed["step"] == 2 * first["step"]
    assert resumed["checkpoint_epoch"] == 2
    assert math.isfinite(first["loss"]) and math.isfinite(resumed["loss"])


def test_toy_evaluate_embed_encoder(toy_run):
    _, _, report = toy_run
    sizes, phases = report["sizes"], report["phases"]
    ev = phases["evaluate"]
    assert ev["clips"] == sizes["eval_clips"] and ev["captions"] == 5 * sizes["eval_clips"]
    assert all(0.0 <= v <= 1.0 for v in ev["text_to_audio"].values())
    assert ev["model"].endswith("run")  # the torchrun run, not the fallback model
    n = sizes["clips"] + sizes["eval_clips"]
    assert phases["embed"]["clips"] == n and phases["embed"]["captions_of"] == n
    enc = phases["encoder"]
    assert enc["clips"] == n and enc["captions"] == 5 * n
    assert enc["clips_per_s"] > 0 and enc["captions_per_s"] > 0


# ----------------------------------------------------------------------------------------------
# The guard: a failing phase is recorded and the next one runs; skips name their reason
# ----------------------------------------------------------------------------------------------
def test_failures_and_skips_are_recorded(tmp_path):
    gpu_check = load_script()
    ctx = gpu_check.make_ctx(
        gpu_check.parse_args(["--toy", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    )

    def boom(P, ctx, rec):
        rec["made"] = 1
        raise ValueError("boom")

    def bad_check(P, ctx, rec):
        rec["loss"] = float("nan")
        sys.modules["gpu_phases"].expect(rec, False, "loss not finite")  # imported by gpu_check

    gpu_check.run_phase(None, ctx, "text_model", boom, ())
    gpu_check.run_phase(None, ctx, "data", bad_check, ())
    gpu_check.run_phase(None, ctx, "train_amp", boom, ("text_model", "data"))
    ctx.deadline = time.monotonic()  # the budget is spent
    gpu_check.run_phase(None, ctx, "evaluate", boom, ())

    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    phases = report["phases"]
    assert phases["text_model"]["status"] == "failed"
    assert phases["text_model"]["error"] == "ValueError: boom" and phases["text_model"]["made"] == 1
    assert phases["data"]["status"] == "failed" and phases["data"]["problems"] == ["loss not finite"]
    assert phases["train_amp"] == {"status": "skipped", "reason": "needs text_model, data"}
    assert phases["evaluate"]["status"] == "skipped"
    assert phases["evaluate"]["reason"].startswith("time budget")
    assert report["ok"] is False
    assert "Traceback" in (tmp_path / "out" / "gpu_check.log").read_text()
    table = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert "ValueError: boom" in table and "needs text_model, data" in table
