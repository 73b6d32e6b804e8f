"""The features stage: Clotho roots and folders of audio, workers, resuming after a crash or kill -9,
bad input, and re-runs over a changed library."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
from audio_signals import chirp_noise, write_clips
from typer.testing import CliRunner

from clotho_retrieve import feature_file, features
from clotho_retrieve.cli import app
from clotho_retrieve.demo import DemoConfig, make_demo_data
from clotho_retrieve.feature_file import FeatureFile, features_path
from clotho_retrieve.feature_parts import WorkFolder
from clotho_retrieve.features import FeaturesConfig, compute_features
from clotho_retrieve.frontend import PRESETS, log_mel
from clotho_retrieve.utils import ClothoRetrieveError

SLOW_CLI = Path(__file__).with_name("slow_features.py")
REPO_PATH = os.pathsep.join([str(Path(features.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])

def _csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_demo_end_to_end_with_workers(tmp_path):
    root, out = tmp_path / "demo", tmp_path / "features"
    make_demo_data(root, DemoConfig(n_development=4, n_validation=2, n_evaluation=2, duration=1.0),
                   show_progress=False)
    results = compute_features(FeaturesConfig(workers=2), root=root, out=out)
    assert [r["status"] for r in results] == ["written"] * 3
    for split in ("development", "validation", "evaluation"):
        rows = _csv_rows(root / f"clotho_captions_{split}.csv")
        f = FeatureFile(features_path(out, split))
        assert f.names == [r["file_name"] for r in rows]
        assert f.captions == [[r[f"caption_{k}"] for k in range(1, 6)] for r in rows]
        assert f.attrs["split"] == split and f.front_end == PRESETS["paper"]
        wave, sr = sf.read(str(root / split / rows[0]["file_name"]), dtype="float32")
        assert np.array_equal(f[0], log_mel(wave, sr, PRESETS["paper"]))
        assert f.durations[0] == pytest.approx(len(wave) / sr)
        assert f.n_frames[0] == 1 + len(wave) // 512
    assert not list(out.glob(".*.work"))  # shards are removed once assembled
    mtimes = [p.stat().st_mtime_ns for p in sorted(out.glob("*.h5"))]
    again = compute_features(FeaturesConfig(workers=2), root=root, out=out)
    assert [(r["status"], r["computed"]) for r in again] == [("up to date", 0)] * 3
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("*.h5"))] == mtimes
    with pytest.raises(ClothoRetrieveError, match="different front end"):
        compute_features(FeaturesConfig(preset="panns", workers=1), root=root, out=out, splits=["validation"])


def _same_file(a: Path, b: Path) -> None:
    fa, fb = FeatureFile(a), FeatureFile(b)
    assert fa.names == fb.names and fa.captions == fb.captions and fa.skipped == fb.skipped
    assert np.array_equal(fa.durations, fb.durations) and np.array_equal(fa.n_frames, fb.n_frames)
    for i in range(len(fa)):
        assert np.array_equal(fa[i], fb[i])


def test_crash_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    audio = write_clips(tmp_path / "audio", 8)
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "ref.h5")

    real, calls = features._compute_clip, []

    def crashing(*args):
        calls.append(args[0])
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if killed while computing the 4th clip
        return real(*args)

    monkeypatch.setattr(features, "_compute_clip", crashing)
    with pytest.raises(KeyboardInterrupt):
        compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()
    monkeypatch.setattr(features, "_compute_clip", real)
    # leftovers of a kill -9 during a shard write and during assembly are cleaned up
    work = next(tmp_path.glob(".out.h5.*.work"))
    (work / "deadbeef.npz.part").write_bytes(b"half")
    (tmp_path / ".out.h5.abc123.h5.tmp").write_bytes(b"half")
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "out.h5")
    assert result["computed"] == 5  # 3 clips were already done
    assert not (tmp_path / ".out.h5.abc123.h5.tmp").exists() and not work.exists()
    _same_file(tmp_path / "out.h5", tmp_path / "ref.h5")


def clips_done(folder: Path, out_name: str) -> set[str]:
    """Names of the clips the batch files of ``out_name``'s work folders hold (a killed run's progress)."""
    done = set()
    for work in folder.glob(f".{out_name}.*.work"):
        parts = WorkFolder(work, 64)
        parts.scan()
        done |= set(parts.entries)
    return done


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    audio = write_clips(tmp_path / "audio", 160, seconds=0.5)
    out = tmp_path / "out.h5"
    # the CLI, 5 ms slower per clip (tests/slow_features.py): the run lasts long enough to be killed mid-way
    cmd = [sys.executable, str(SLOW_CLI), "features", "--audio-dir", str(audio), "--out", str(out),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "CLIP_DELAY": "0.005", "PYTHONPATH": REPO_PATH})
    deadline = time.time() + 60
    while time.time() < deadline and len(clips_done(tmp_path, "out.h5")) < 10:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(clips_done(tmp_path, "out.h5"))
    assert not out.exists() and 10 <= done < 160, done
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    assert result["computed"] == 160 - done
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "ref.h5")
    _same_file(out, tmp_path / "ref.h5")


def _bad_folder(folder: Path) -> tuple[set[str], dict[str, str]]:
    """A small version of a real library: formats, rates, channels, lengths, and broken files."""
    folder.mkdir()
    (folder / "sub").mkdir()
    sf.write(str(folder / "a.wav"), chirp_noise(44100, 0.5), 44100, subtype="PCM_16")
    sf.write(str(folder / "b.flac"), np.stack([chirp_noise(8000, 0.6, 1)] * 2, axis=1), 8000)
    sf.write(str(folder / "c.ogg"), chirp_noise(96000, 0.4, 2), 96000, format="OGG")
    sf.write(str(folder / "d.mp3"), np.stack([chirp_noise(22050, 0.7, 3)] * 2, axis=1), 22050, format="MP3")
    sf.write(str(folder / "sub" / "e.WAV"), chirp_noise(44100, 0.05), 44100)  # short, but > one window
    good = {"a.wav", "b.flac", "c.ogg", "d.mp3", "sub/e.WAV"}
    (folder / "empty.wav").write_bytes(b"")
    whole = (folder / "a.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (folder / "text.mp3").write_text("this is not audio\n" * 50)
    sf.write(str(folder / "nan.wav"), np.array([0.1, np.nan] * 4000, np.float32), 44100, subtype="FLOAT")
    sf.write(str(folder / "inf.wav"), np.array([0.1, np.inf] * 4000, np.float32), 44100, subtype="FLOAT")
    sf.write(str(folder / "short.wav"), chirp_noise(44100, 0.01), 44100)  # 441 samples < 1024
    (folder / "notes.txt").write_text("ignored: not an audio suffix")
    bad = {"empty.wav": "empty file", "truncated.wav": "truncated", "text.mp3": "unreadable",
           "nan.wav": "NaN or infinite", "inf.wav": "NaN or infinite", "short.wav": "shorter than one window"}
    return good, bad


def test_bad_files_are_skipped_and_reported(tmp_path):
    good, bad = _bad_folder(tmp_path / "lib")
    out = tmp_path / "lib.h5"
    result = CliRunner().invoke(app, ["features", "--audio-dir", str(tmp_path / "lib"), "--out", str(out),
                                      "--workers", "1", "--preset", "panns"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "skipped clips (6" in result.output
    f = FeatureFile(out)
    assert set(f.names) == good
    assert {name for name, _ in f.skipped} == set(bad)
    for name, reason in f.skipped:
        assert bad[name] in reason, (name, reason)
    for i, name in enumerate(f.names):
        assert np.all(np.isfinite(f[i])) and f[i].shape == (f.n_frames[i], 64)
        wave, sr = sf.read(str(tmp_path / "lib" / name), dtype="float32", always_2d=True)
        assert f.durations[i] == pytest.approx(len(wave) / sr)
        # decoded and mixed to mono as soundfile does (threads change float32 rounding in empty bands)
        np.testing.assert_allclose(f[i], log_mel(wave.mean(axis=1), sr, PRESETS["panns"]), atol=0.02)
    assert (tmp_path / "lib.json").is_file()  # the settings, beside what they produced


def test_strict_stops_at_the_first_bad_file(tmp_path):
    _bad_folder(tmp_path / "lib")
    result = CliRunner().invoke(app, ["features", "--audio-dir", str(tmp_path / "lib"), "--out",
                                      str(tmp_path / "x.h5"), "--workers", "1", "--strict"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "(--strict)" in result.output and not (tmp_path / "x.h5").exists()


# ----------------------------------------------------------------------------------------------
# Re-running over a changed library: reuse unchanged clips, compute new or changed ones, drop removed ones
# ----------------------------------------------------------------------------------------------
def _counting_compute(monkeypatch, crash_at: int = 0) -> list[str]:
    """Record the names _compute_clip is called for; with crash_at, stop the run at that call."""
    real, calls = features._compute_clip, []

    def counting(*args):
        calls.append(args[0])
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(features, "_compute_clip", counting)
    return calls


def test_rerun_updates_a_changed_folder_like_a_fresh_run(tmp_path, monkeypatch):
    audio, out = write_clips(tmp_path / "audio", 5), tmp_path / "out.h5"
    (audio / "broken.wav").write_bytes(b"")  # skipped now, fixed later
    (audio / "text.mp3").write_text("not audio\n" * 20)  # skipped, stays broken
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    before = FeatureFile(out)
    assert len(before) == 5 and {n for n, _ in before.skipped} == {"broken.wav", "text.mp3"}

    # the library changes: 2 files added, 1 removed, 1 rewritten (same size), 1 broken file fixed
    (audio / "clip_003.wav").unlink()
    sf.write(str(audio / "new_a.wav"), chirp_noise(44100, 0.4, 10), 44100, subtype="PCM_16")
    (audio / "sub").mkdir()
    sf.write(str(audio / "sub" / "new_b.wav"), chirp_noise(44100, 0.2, 11), 44100, subtype="PCM_16")
    old_mtime = (audio / "clip_001.wav").stat().st_mtime_ns
    sf.write(str(audio / "clip_001.wav"), chirp_noise(44100, 0.3, 99), 44100, subtype="PCM_16")
    os.utime(audio / "clip_001.wav", ns=(old_mtime + 10**9, old_mtime + 10**9))
    sf.write(str(audio / "broken.wav"), chirp_noise(44100, 0.3, 12), 44100, subtype="PCM_16")
    changed = {"new_a.wav", "sub/new_b.wav", "clip_001.wav", "broken.wav"}

    calls = _counting_compute(monkeypatch, crash_at=2)  # killed while updating: the old file is intact
    with pytest.raises(KeyboardInterrupt):
        compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    _same_file(out, before.path)
    assert set(calls) <= changed and len(calls) == 2
    first, calls = calls[0], _counting_compute(monkeypatch)
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    assert sorted(calls) == sorted(changed - {first})  # the first one's shard survived the interruption
    assert result["status"] == "updated: 4 reused, 3 computed, 1 removed", result["status"]

    calls = _counting_compute(monkeypatch)
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "fresh.h5")
    assert len(calls) == 8  # 7 audio files + text.mp3
    _same_file(out, tmp_path / "fresh.h5")  # same names in the same order, identical frames, same skips
    f = FeatureFile(out)
    assert "clip_003.wav" not in f.names and f.skipped[0][0] == "text.mp3" and len(f.skipped) == 1
    for name, (size, mtime_ns) in zip(f.names, f.sources, strict=True):
        st = (audio / name).stat()
        assert (size, mtime_ns) == (st.st_size, st.st_mtime_ns)
    wave, sr = sf.read(str(audio / "clip_001.wav"), dtype="float32")
    assert np.array_equal(f[f.index("clip_001.wav")], log_mel(wave, sr, PRESETS["paper"]))

    mtime = out.stat().st_mtime_ns  # nothing changed since: nothing computed, nothing written
    calls = _counting_compute(monkeypatch)
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    assert (result["status"], calls, out.stat().st_mtime_ns) == ("up to date", [], mtime)
    sf.write(str(audio / "new_c.wav"), chirp_noise(44100, 0.3, 13), 44100, subtype="PCM_16")
    with pytest.raises(ClothoRetrieveError, match="text.mp3: .*--strict"):  # an unchanged skip still counts
        compute_features(FeaturesConfig(workers=1, strict=True), audio_dir=audio, out=out)
    assert out.stat().st_mtime_ns == mtime


def _write_captions(path: Path, rows: list[list[str]]) -> None:
    """A Clotho captions CSV: file_name, caption_1 .. caption_5 (those past ``rows``' values left empty)."""
    header = ["file_name"] + [f"caption_{k}" for k in range(1, 6)]
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header] + [r + [""] * (len(header) - len(r)) for r in rows])


def test_rerun_follows_the_captions_csv(tmp_path, monkeypatch):
    root, out = tmp_path / "clotho", tmp_path / "f"
    write_clips(root / "validation", 3)
    csv_path = root / "clotho_captions_validation.csv"
    _write_captions(csv_path, [["clip_000.wav", "a dog", ""], ["clip_001.wav", "rain", "wind"],
                               ["clip_002.wav", "a car", ""]])
    compute_features(FeaturesConfig(workers=1), root=root, out=out)
    # captions edited, rows reordered, one row dropped (its file becomes a "no caption row" skip)
    _write_captions(csv_path, [["clip_002.wav", "a red car", "engine"], ["clip_000.wav", "a dog", ""]])
    calls = _counting_compute(monkeypatch)
    (result,) = compute_features(FeaturesConfig(workers=1), root=root, out=out)
    assert calls == [] and result["status"] == "updated: 2 reused, 0 computed, 1 removed"
    f = FeatureFile(features_path(out, "validation"))
    assert f.names == ["clip_002.wav", "clip_000.wav"]
    assert f.captions == [["a red car", "engine"], ["a dog"]]
    assert f.skipped == [("clip_001.wav", "no caption row in clotho_captions_validation.csv")]
    compute_features(FeaturesConfig(workers=1), root=root, out=tmp_path / "fresh")
    _same_file(features_path(out, "validation"), features_path(tmp_path / "fresh", "validation"))


def test_format_version_1_files_are_read_and_recomputed_once(tmp_path, monkeypatch):
    audio, out = write_clips(tmp_path / "audio", 3), tmp_path / "out.h5"
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    with h5py.File(out, "a") as h5:  # what format version 1 wrote: no source sizes or mtimes
        for key in ("source_size", "source_mtime_ns", "skipped/source_size", "skipped/source_mtime_ns"):
            del h5[key]
        h5.attrs["format_version"] = 1
    old = FeatureFile(out)
    assert len(old) == 3 and old.sources.tolist() == [[feature_file.UNKNOWN] * 2] * 3
    calls = _counting_compute(monkeypatch)  # unverifiable clips are recomputed, the file upgraded
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    assert sorted(calls) == old.names and result["status"] == "updated: 0 reused, 3 computed, 0 removed"
    with h5py.File(out, "r") as h5:
        assert h5.attrs["format_version"] == feature_file.FORMAT_VERSION == 2
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    assert result["status"] == "up to date"
