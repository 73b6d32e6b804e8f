"""Log-Mel front end against librosa, the HDF5 cache, resuming after a crash or kill -9, bad input."""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import librosa
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from clotho_retrieve import features
from clotho_retrieve.cli import app
from clotho_retrieve.demo import DemoConfig, make_demo_data
from clotho_retrieve.features import (
    PRESETS,
    FeatureFile,
    FeaturesConfig,
    FrontEnd,
    compute_features,
    decode_log_mel,
    features_path,
    log_mel,
    write_feature_file,
)
from clotho_retrieve.utils import ClothoRetrieveError


def _test_signal(sr: float, seconds: float, seed: int = 0) -> np.ndarray:
    """Chirp 100 Hz -> 12 kHz plus noise: energy in every Mel band, far above the amin floor."""
    t = np.arange(int(sr * seconds)) / sr
    chirp = np.sin(2 * np.pi * (100 * t + (12000 - 100) / (2 * seconds) * t**2))
    return (0.3 * chirp + 0.05 * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


def _librosa_log_mel(y: np.ndarray, fe: FrontEnd) -> np.ndarray:
    """The reference: librosa (float64), as PANNs' torchlibrosa front end computes it."""
    mel = librosa.feature.melspectrogram(
        y=y.astype(np.float64), sr=fe.sample_rate, n_fft=fe.n_fft, hop_length=fe.hop_length,
        win_length=fe.win_length, window=fe.window, center=True, pad_mode="reflect", power=2.0,
        n_mels=fe.n_mels, fmin=fe.f_min, fmax=fe.f_max, htk=False, norm="slaney",
    )
    return (10 * np.log10(np.maximum(mel, fe.amin))).T


@pytest.mark.parametrize("preset", ["paper", "panns"])
def test_presets_match_librosa(preset):
    fe = PRESETS[preset]
    y = _test_signal(fe.sample_rate, 1.5)
    ours = log_mel(y, fe.sample_rate, fe)
    ref = _librosa_log_mel(y, fe)
    assert ours.shape == ref.shape == (1 + len(y) // fe.hop_length, 64)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 0.05  # dB


def test_preset_values():
    paper, panns = PRESETS["paper"], PRESETS["panns"]
    assert (paper.sample_rate, paper.window, paper.n_fft, paper.hop_length) == (44100, "hamming", 1024, 512)
    assert (panns.sample_rate, panns.window, panns.n_fft, panns.hop_length) == (32000, "hann", 1024, 320)
    for fe in (paper, panns):
        assert (fe.n_mels, fe.f_min, fe.f_max) == (64, 50.0, 14000.0)
        assert (fe.mel_scale, fe.mel_norm) == ("slaney", "slaney")
        assert (fe.power, fe.amin, fe.center, fe.pad_mode) == (2.0, 1e-10, True, "reflect")


def test_resampling_keeps_a_band_limited_signal():
    """Two tones recorded at 48 kHz give the features of the same tones recorded at 44.1 kHz."""
    fe = PRESETS["paper"]

    def tones(sr):
        t = np.arange(int(sr * 1.0)) / sr
        return (0.4 * np.sin(2 * np.pi * 1000 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)

    a, b = log_mel(tones(48000), 48000, fe)[4:-4], log_mel(tones(44100), 44100, fe)[4:-4]
    loud = b > b.max() - 40  # bands that carry the tones
    assert np.abs(a - b)[loud].max() < 0.1


def test_front_end_round_trip_and_validation():
    fe = FrontEnd(mel_norm=None, n_mels=40, f_max=8000.0)
    assert FrontEnd.from_dict(fe.to_dict()) == fe
    assert FrontEnd.from_dict({**fe.to_dict(), "mel_norm": "none", "extra": 1}) == fe
    assert fe.differences(PRESETS["paper"]) == ["n_mels: 40 != 64", "f_max: 8000.0 != 14000.0",
                                                 "mel_norm: None != 'slaney'"]
    with pytest.raises(ClothoRetrieveError, match="f_max"):
        FrontEnd(sample_rate=16000)  # f_max 14 kHz above Nyquist
    with pytest.raises(ClothoRetrieveError, match="window"):
        FrontEnd(window="blackman")


def test_log_mel_refuses_bad_waveforms():
    fe = PRESETS["paper"]
    with pytest.raises(ClothoRetrieveError, match="shorter than one window"):
        log_mel(np.zeros(1023, np.float32), 44100, fe)
    assert log_mel(np.zeros(1024, np.float32), 44100, fe).shape == (3, 64)  # silence: the amin floor
    assert np.all(log_mel(np.zeros(1024, np.float32), 44100, fe) == -100.0)
    with pytest.raises(ClothoRetrieveError, match="NaN"):
        log_mel(np.array([0.0, np.nan] * 1000, np.float32), 44100, fe)
    with pytest.raises(ClothoRetrieveError, match="mono"):
        log_mel(np.zeros((2, 4000), np.float32), 44100, fe)


@pytest.mark.parametrize("preset,sr", [("paper", 44100), ("paper", 48000), ("panns", 44100), ("panns", 8000)])
def test_block_decoding_equals_whole_file(tmp_path, preset, sr):
    """Long files are decoded in blocks; the frames equal those of the whole signal."""
    fe = PRESETS[preset]
    stereo = np.stack([_test_signal(sr, 1.7, 1), _test_signal(sr, 1.7, 2)], axis=1)
    path = tmp_path / "long.flac"
    sf.write(str(path), stereo, sr, subtype="PCM_24")
    whole = log_mel(sf.read(str(path), dtype="float32")[0].mean(axis=1), sr, fe)
    blocks, duration = decode_log_mel(path, fe, stream_above=1000, block=12345)  # several blocks
    assert blocks.shape == whole.shape
    assert np.abs(blocks - whole).max() < 1e-3
    assert duration == pytest.approx(len(stereo) / sr)


def test_feature_file_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mels = [rng.standard_normal((n, 64)).astype(np.float32) for n in (5, 1, 9)]
    path = write_feature_file(
        tmp_path / "x.h5", ["a.wav", "b/c.wav", "d.wav"], mels, [1.0, 0.5, 2.0], PRESETS["panns"],
        captions=[["one", "two"], [], ["three"]], skipped=[("bad.wav", "unreadable")], split="validation",
    )
    f = FeatureFile(path)
    assert len(f) == 3 and f.names == ["a.wav", "b/c.wav", "d.wav"]
    assert f.captions == [["one", "two"], [], ["three"]]
    assert f.front_end == PRESETS["panns"] and f.attrs["split"] == "validation"
    assert f.n_frames.tolist() == [5, 1, 9] and f.durations.tolist() == [1.0, 0.5, 2.0]
    assert f.skipped == [("bad.wav", "unreadable")]
    for i in (2, 0, 1, -1):
        assert np.array_equal(f[i], mels[i])
    copy = pickle.loads(pickle.dumps(f))  # after the handle was opened: DataLoader workers reopen it
    assert np.array_equal(copy[2], mels[2])
    with pytest.raises(IndexError):
        f[3]
    f.close()
    with h5py.File(path, "r") as h5:  # every front-end parameter is an attribute
        assert {k: h5.attrs[k] for k in ("sample_rate", "hop_length", "window")} == {
            "sample_rate": 32000, "hop_length": 320, "window": "hann"}
    assert features_path(tmp_path, "evaluation") == tmp_path / "evaluation.h5"


def test_feature_file_refuses_other_files(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ClothoRetrieveError, match="junk.h5"):
        FeatureFile(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = 1
    with pytest.raises(ClothoRetrieveError, match="not a clotho-retrieve features file"):
        FeatureFile(tmp_path / "other.h5")
    with pytest.raises(ClothoRetrieveError, match="not found"):
        FeatureFile(tmp_path / "missing.h5")
    newer = write_feature_file(tmp_path / "newer.h5", [], [], [], PRESETS["paper"],
                               format_version=features.FORMAT_VERSION + 1)
    with pytest.raises(ClothoRetrieveError, match="newer"):
        FeatureFile(newer)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
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


def _clips(folder: Path, n: int, seconds: float = 0.3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(str(folder / f"clip_{i:03d}.wav"), _test_signal(44100, seconds, i), 44100, subtype="PCM_16")
    return folder


def _same_file(a: Path, b: Path) -> None:
    fa, fb = FeatureFile(a), FeatureFile(b)
    assert fa.names == fb.names and fa.captions == fb.captions and fa.skipped == fb.skipped
    assert np.array_equal(fa.durations, fb.durations) and np.array_equal(fa.n_frames, fb.n_frames)
    for i in range(len(fa)):
        assert np.array_equal(fa[i], fb[i])


def test_crash_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    audio = _clips(tmp_path / "audio", 8)
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "ref.h5")

    real, calls = features._compute_shard, []

    def crashing(*args):
        calls.append(args[0])
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if killed while computing the 4th clip
        return real(*args)

    monkeypatch.setattr(features, "_compute_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()
    monkeypatch.setattr(features, "_compute_shard", real)
    # leftovers of a kill -9 during a shard write and during assembly are cleaned up
    work = next(tmp_path.glob(".out.h5.*.work"))
    (work / "deadbeef.npz.part").write_bytes(b"half")
    (tmp_path / ".out.h5.abc123.h5.tmp").write_bytes(b"half")
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "out.h5")
    assert result["computed"] == 5  # 3 clips were already done
    assert not (tmp_path / ".out.h5.abc123.h5.tmp").exists() and not work.exists()
    _same_file(tmp_path / "out.h5", tmp_path / "ref.h5")


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    audio = _clips(tmp_path / "audio", 160, seconds=0.5)
    out = tmp_path / "out.h5"
    cmd = [sys.executable, "-m", "clotho_retrieve", "features", "--audio-dir", str(audio), "--out", str(out),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(tmp_path.glob(".out.h5.*.work/*.npz"))) < 10:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(tmp_path.glob(".out.h5.*.work/*.npz")))
    assert not out.exists() and 10 <= done < 160, done
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    assert result["computed"] == 160 - done
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=tmp_path / "ref.h5")
    _same_file(out, tmp_path / "ref.h5")


def _bad_folder(folder: Path) -> tuple[set[str], dict[str, str]]:
    """A small version of a real library: formats, rates, channels, lengths, and broken files."""
    folder.mkdir()
    (folder / "sub").mkdir()
    sf.write(str(folder / "a.wav"), _test_signal(44100, 0.5), 44100, subtype="PCM_16")
    sf.write(str(folder / "b.flac"), np.stack([_test_signal(8000, 0.6, 1)] * 2, axis=1), 8000)
    sf.write(str(folder / "c.ogg"), _test_signal(96000, 0.4, 2), 96000, format="OGG")
    sf.write(str(folder / "d.mp3"), np.stack([_test_signal(22050, 0.7, 3)] * 2, axis=1), 22050, format="MP3")
    sf.write(str(folder / "sub" / "e.WAV"), _test_signal(44100, 0.05), 44100)  # short, but > one window
    good = {"a.wav", "b.flac", "c.ogg", "d.mp3", "sub/e.WAV"}
    (folder / "empty.wav").write_bytes(b"")
    whole = (folder / "a.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (folder / "text.mp3").write_text("this is not audio\n" * 50)
    sf.write(str(folder / "nan.wav"), np.array([0.1, np.nan] * 4000, np.float32), 44100, subtype="FLOAT")
    sf.write(str(folder / "inf.wav"), np.array([0.1, np.inf] * 4000, np.float32), 44100, subtype="FLOAT")
    sf.write(str(folder / "short.wav"), _test_signal(44100, 0.01), 44100)  # 441 samples < 1024
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


def test_clotho_layout_problems(tmp_path):
    root = tmp_path / "clotho"
    _clips(root / "development", 3)  # clip_000..002
    sf.write(str(root / "development" / "extra.wav"), _test_signal(44100, 0.3), 44100)
    rows = [["clip_000.wav", "a dog barks", "", "", "", ""], ["clip_001.wav", "rain", "wind", "", "", ""],
            ["missing.wav", "x", "", "", "", ""], ["clip_000.wav", "again", "", "", "", ""],
            ["clip_002.wav", "c1", "c2", "c3", "c4", "c5"]]
    with open(root / "clotho_captions_development.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["file_name"] + [f"caption_{k}" for k in range(1, 6)]] + rows)
    (result,) = compute_features(FeaturesConfig(workers=1), root=root, out=tmp_path / "f")
    f = FeatureFile(result["out"])
    assert f.names == ["clip_000.wav", "clip_001.wav", "clip_002.wav"]
    assert f.captions == [["a dog barks"], ["rain", "wind"], ["c1", "c2", "c3", "c4", "c5"]]
    reasons = dict(f.skipped)
    assert "missing" in reasons["missing.wav"] and "no caption row" in reasons["extra.wav"]
    assert any(n == "clip_000.wav" and "duplicated" in r for n, r in f.skipped)
    with pytest.raises(ClothoRetrieveError, match="split not found"):
        compute_features(FeaturesConfig(workers=1), root=root, out=tmp_path / "g", splits=["evaluation"])
    with pytest.raises(ClothoRetrieveError, match="no Clotho split"):
        compute_features(FeaturesConfig(workers=1), root=tmp_path / "f", out=tmp_path / "g")
    with pytest.raises(ClothoRetrieveError, match="is a file"):
        compute_features(FeaturesConfig(workers=1), audio_dir=root / "development", out=tmp_path)
    with pytest.raises(ClothoRetrieveError, match="is a folder"):
        compute_features(FeaturesConfig(workers=1), root=root, out=result["out"])


# ----------------------------------------------------------------------------------------------
# Re-running over a changed library: reuse unchanged clips, compute new or changed ones, drop removed ones
# ----------------------------------------------------------------------------------------------
def _counting_compute(monkeypatch, crash_at: int = 0) -> list[str]:
    """Record the names _compute_shard is called for; with crash_at, stop the run at that call."""
    real, calls = features._compute_shard, []

    def counting(*args):
        calls.append(args[0])
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(features, "_compute_shard", counting)
    return calls


def test_rerun_updates_a_changed_folder_like_a_fresh_run(tmp_path, monkeypatch):
    audio, out = _clips(tmp_path / "audio", 5), tmp_path / "out.h5"
    (audio / "broken.wav").write_bytes(b"")  # skipped now, fixed later
    (audio / "text.mp3").write_text("not audio\n" * 20)  # skipped, stays broken
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    before = FeatureFile(out)
    assert len(before) == 5 and {n for n, _ in before.skipped} == {"broken.wav", "text.mp3"}

    # the library changes: 2 files added, 1 removed, 1 rewritten (same size), 1 broken file fixed
    (audio / "clip_003.wav").unlink()
    sf.write(str(audio / "new_a.wav"), _test_signal(44100, 0.4, 10), 44100, subtype="PCM_16")
    (audio / "sub").mkdir()
    sf.write(str(audio / "sub" / "new_b.wav"), _test_signal(44100, 0.2, 11), 44100, subtype="PCM_16")
    old_mtime = (audio / "clip_001.wav").stat().st_mtime_ns
    sf.write(str(audio / "clip_001.wav"), _test_signal(44100, 0.3, 99), 44100, subtype="PCM_16")
    os.utime(audio / "clip_001.wav", ns=(old_mtime + 10**9, old_mtime + 10**9))
    sf.write(str(audio / "broken.wav"), _test_signal(44100, 0.3, 12), 44100, subtype="PCM_16")
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
    sf.write(str(audio / "new_c.wav"), _test_signal(44100, 0.3, 13), 44100, subtype="PCM_16")
    with pytest.raises(ClothoRetrieveError, match="text.mp3: .*--strict"):  # an unchanged skip still counts
        compute_features(FeaturesConfig(workers=1, strict=True), audio_dir=audio, out=out)
    assert out.stat().st_mtime_ns == mtime


def _write_captions(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["file_name", "caption_1", "caption_2"]] + rows)


def test_rerun_follows_the_captions_csv(tmp_path, monkeypatch):
    root, out = tmp_path / "clotho", tmp_path / "f"
    _clips(root / "validation", 3)
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
    audio, out = _clips(tmp_path / "audio", 3), tmp_path / "out.h5"
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    with h5py.File(out, "a") as h5:  # what format version 1 wrote: no source sizes or mtimes
        for key in ("source_size", "source_mtime_ns", "skipped/source_size", "skipped/source_mtime_ns"):
            del h5[key]
        h5.attrs["format_version"] = 1
    old = FeatureFile(out)
    assert len(old) == 3 and old.sources.tolist() == [[features.UNKNOWN] * 2] * 3
    calls = _counting_compute(monkeypatch)  # unverifiable clips are recomputed, the file upgraded
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    assert sorted(calls) == old.names and result["status"] == "updated: 0 reused, 3 computed, 0 removed"
    with h5py.File(out, "r") as h5:
        assert h5.attrs["format_version"] == features.FORMAT_VERSION == 2
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    assert result["status"] == "up to date"
