"""One writer per output, between real processes: a second `features`, `embed`, `index` or `train` on an
output being written ends with one line naming the writer's process (never advice to delete a healthy
output), a query waits for the writer in one line, the first writer finishes normally; and kill -9 of
`features` leaves none of its processes behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from audio_signals import write_clips
from robust_helpers import ENV, error_line, hold_lock, run_cli, stop
from test_full_disk import embed_args, same_index
from typer.testing import CliRunner

from clotho_retrieve.cli import app
from clotho_retrieve.feature_file import FeatureFile
from clotho_retrieve.safety import lock_holder

SLOWED = Path(__file__).with_name("slowed")


def start_cli(*args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "clotho_retrieve", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def paused_when_writing(proc: subprocess.Popen, target, timeout: float = 120) -> None:
    """Wait until ``proc`` holds the writer's lock of ``target``, then freeze it there (SIGSTOP)."""
    deadline = time.time() + timeout
    while lock_holder(target) != proc.pid:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the first writer never took its lock"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)


def finish(proc: subprocess.Popen) -> str:
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def invoke(*args):
    """The second writer: this process (the first one is a real process of its own)."""
    return CliRunner().invoke(app, list(map(str, args)))


def busy_line(target, pid: int) -> str:
    return f"{target} is being written by process {pid}; wait for it or choose another --out"


def test_two_features_runs_on_one_out(tmp_path):
    audio = write_clips(tmp_path / "audio", 12)
    out = tmp_path / "sounds.h5"
    first = start_cli("features", "--audio-dir", audio, "--out", out, "--workers", 1)
    paused_when_writing(first, out)
    try:
        second = invoke("features", "--audio-dir", audio, "--out", out, "--workers", 1)  # this process
        assert error_line(second.output, returncode=second.exit_code) == busy_line(out, first.pid)
    finally:
        finish(first)
    assert len(FeatureFile(out)) == 12 and not list(tmp_path.glob(".sounds.h5.*.work"))


def test_two_embed_runs_on_one_index_and_a_query_meanwhile(tmp_path, embed_inputs):
    run_dir, clips, reference = embed_inputs
    out = tmp_path / "index"
    first = start_cli(*embed_args(run_dir, clips, out))
    paused_when_writing(first, out)
    try:
        second = invoke(*embed_args(run_dir, clips, out))
        line = error_line(second.output, returncode=second.exit_code)
        assert line == busy_line(out, first.pid) and "delete" not in line
        result = CliRunner().invoke(app, ["index", str(out), "--index-type", "hnsw"])
        assert error_line(result.output, returncode=result.exit_code) == busy_line(out, first.pid)
    finally:
        finish(first)
    same_index(out, reference)
    # a query while `embed` holds index.h5 open for writing: wait for it, in one line
    holder = hold_lock(out, hold_open=out / "index.h5")
    try:
        result = CliRunner().invoke(app, ["query", "sound 3", "--index", str(out)])
        line = error_line(result.output, returncode=result.exit_code)
        assert line == f"{out} is being written by process {holder.pid}; wait for it to finish"
    finally:
        stop(holder)
    result = CliRunner().invoke(app, ["query", "sound 3", "--index", str(out), "-k", "1", "--json"])
    assert result.exit_code == 0 and '"rank": 1' in result.output
    # `embed` while a reader (a query, a server) holds index.h5 open: close it first, in one line
    reader = hold_lock(None, hold_open=out / "index.h5", mode="r")
    try:
        result = CliRunner().invoke(app, [*embed_args(run_dir, clips, out), "--prune"])
        line = error_line(result.output, returncode=result.exit_code)
        assert line == (f"{out / 'index.h5'} is open in another process (a query or a server?); close it "
                        "and re-run")
    finally:
        stop(reader)
    same_index(out, reference)


def test_a_second_train_on_a_run_being_trained(tmp_path, six_clip_features, tiny_bert):
    run = tmp_path / "run"
    args = ["train", "--features", six_clip_features, "--out", run, "--backbone", "tiny", "--d-a", 32,
            "--embed-dim", 16, "--text-model", tiny_bert, "--batch-size", 4, "--epochs", 1]  # fmt: skip
    first = start_cli(*args)
    paused_when_writing(first, run)
    try:
        for again in (args, ["train", "--out", run, "--resume"]):
            second = invoke(*again)
            assert error_line(second.output, returncode=second.exit_code) == busy_line(run, first.pid)
    finally:
        finish(first)
    assert (run / "last" / "trainer_state.pt").is_file()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with their parent on Linux")
def test_kill_9_of_features_leaves_no_process_behind(tmp_path):
    psutil = pytest.importorskip("psutil")
    audio = write_clips(tmp_path / "audio", 300)
    out = tmp_path / "sounds.h5"
    # 20 ms per clip in the workers too (tests/slowed): about 3 s of work, so the kill lands mid-run
    slowed = {**ENV, "CLIP_DELAY": "0.02", "PYTHONPATH": os.pathsep.join([str(SLOWED), ENV["PYTHONPATH"]])}
    cmd = [sys.executable, "-m", "clotho_retrieve", "features", "--audio-dir", audio, "--out", out, "--workers", 2]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=slowed)
    deadline = time.time() + 120
    family = []
    while len(family) < 3:  # the workers are up: the forkserver, its workers, the resource tracker
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
        family = psutil.Process(proc.pid).children(recursive=True)
    time.sleep(0.2)  # computing
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 3  # the forkserver, its workers, the resource tracker
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    def gone(p) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.time() + 30
    while not all(gone(p) for p in family) and time.time() < deadline:
        time.sleep(0.1)
    assert [p.pid for p in family if not gone(p)] == []
    assert not out.exists()
    assert run_cli("features", "--audio-dir", audio, "--out", out, "--workers", 2).returncode == 0
    assert len(FeatureFile(out)) == 300
