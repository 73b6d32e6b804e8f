"""`features` over several processes: torchrun ranks and `--shard i/N` parts + `merge` write the very file
one process writes, and a rank killed mid-way (SIGKILL) loses nothing of what it had saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_features import REPO_PATH, SLOW_CLI, _same_file, clips_done
from typer.testing import CliRunner

from clotho_retrieve.cli import app
from clotho_retrieve.demo import DemoConfig, make_demo_data
from clotho_retrieve.feature_file import FeatureFile, features_path
from clotho_retrieve.features import FeaturesConfig, compute_features, merge_features
from clotho_retrieve.sharding import Shard, resolve_shard
from clotho_retrieve.utils import ClothoRetrieveError

SPLITS = ("development", "validation", "evaluation")


def _demo_root(tmp_path: Path) -> Path:
    """A small Clotho root; one listed file of development/ is cut short (a skip found while decoding)."""
    root = tmp_path / "clotho"
    make_demo_data(root, DemoConfig(n_development=7, n_validation=3, n_evaluation=2, duration=1.0),
                   show_progress=False)
    first = sorted((root / "development").glob("*.wav"))[0]
    first.write_bytes(first.read_bytes()[:3000])
    return root


def _torchrun(args: list[str], **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": REPO_PATH, **env})


def test_shards_partition_the_items(monkeypatch):
    parts = [set(Shard(i, 3).take(10)) for i in range(3)]
    assert set().union(*parts) == set(range(10)) and sum(map(len, parts)) == 10
    assert parts[1] == {1, 4, 7}
    assert Shard.parse(" 2/3 ") == Shard(2, 3, launcher="option")
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ClothoRetrieveError, match="--shard"):
            Shard.parse(bad)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_shard(None) == Shard(3, 4, launcher="torchrun", local_count=2)
    with pytest.raises(ClothoRetrieveError, match="torchrun"):
        resolve_shard("0/2")


def test_shard_parts_then_merge_equal_one_process(tmp_path):
    root = _demo_root(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "out"
    compute_features(FeaturesConfig(workers=1), root=root, out=ref)
    part0 = compute_features(FeaturesConfig(workers=1, shard="0/2"), root=root, out=out)
    assert [r["part"] for r in part0] == ["0/2"] * 3 and not list(out.glob("*.h5"))
    with pytest.raises(ClothoRetrieveError, match=r"clips have no features yet .*parts finished: 0/2\."):
        merge_features(out)
    part1 = compute_features(FeaturesConfig(workers=1, shard="1/2"), root=root, out=out)
    assert sum(r["computed"] for r in part0 + part1) == 12  # every clip once, by one of the parts
    merged = merge_features(out)
    assert [(r["status"], r["computed"]) for r in merged] == [("written", 7), ("written", 3), ("written", 2)]
    for split in SPLITS:
        _same_file(features_path(out, split), features_path(ref, split))
    assert FeatureFile(features_path(out, "development")).skipped[0][1].startswith("truncated")
    assert not list(out.glob(".*.work"))
    assert [r["status"] for r in merge_features(out)] == ["up to date"] * 3
    result = CliRunner().invoke(app, ["merge", "--out", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "not found" in result.output and "Traceback" not in result.output


def test_torchrun_two_ranks_write_the_file_one_process_writes(tmp_path):
    root = _demo_root(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "out"
    compute_features(FeaturesConfig(workers=1), root=root, out=ref)
    proc = _torchrun(["-m", "clotho_retrieve", "features", "--root", str(root), "--out", str(out),
                      "--workers", "1"])
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "part 1/2 computed; rank 0 assembles the file" in output  # rank 1 computed its part
    for split in SPLITS:
        _same_file(features_path(out, split), features_path(ref, split))  # bit for bit
    assert not list(out.glob(".*.work")) and (out / "features_config.json").is_file()


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (its children, read from /proc)."""
    children = []
    for task in Path(f"/proc/{launcher}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers in /proc")
def test_a_rank_killed_mid_way_loses_nothing(tmp_path):
    from audio_signals import write_clips

    audio, out = write_clips(tmp_path / "audio", 40, seconds=0.5), tmp_path / "out.h5"
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "ref.h5")
    args = [str(SLOW_CLI), "features", "--audio-dir", str(audio), "--out", str(out), "--workers", "1"]
    # 50 ms per clip: each rank's 20 clips (4 batches of 5) take a second or more
    proc = _torchrun(args, CLIP_DELAY="0.05", CLIPS_LOG=str(tmp_path / "first"))
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(".out.h5.*.work/1of2-*.batch")):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)  # rank 1 dies; torchrun stops rank 0 (SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and not out.exists(), output
    done = clips_done(tmp_path, "out.h5")
    assert 5 <= len(done) < 40, len(done)

    proc = _torchrun(args, CLIPS_LOG=str(tmp_path / "second"))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    again = set()
    for log in tmp_path.glob("second.*"):
        again |= set(log.read_text(encoding="utf-8").split())
    assert again == {f"clip_{i:03d}.wav" for i in range(40)} - done  # nothing saved was computed twice
    _same_file(out, tmp_path / "ref.h5")
