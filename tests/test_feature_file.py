"""The HDF5 features cache: write then read back, refusing files that are not ours."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

from clotho_retrieve import feature_file
from clotho_retrieve.feature_file import FeatureFile, features_path, write_feature_file
from clotho_retrieve.frontend import PRESETS
from clotho_retrieve.utils import ClothoRetrieveError


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
                               format_version=feature_file.FORMAT_VERSION + 1)
    with pytest.raises(ClothoRetrieveError, match="newer"):
        FeatureFile(newer)


def test_long_and_short_clips_are_written_in_slabs(tmp_path, monkeypatch):
    """Short clips are gathered into slabs, long ones written alone: every clip reads back unchanged."""
    monkeypatch.setattr(feature_file, "WRITE_BYTES", 16 * 64 * 4 * 4)  # slabs of 64 rows; alone from 4 rows
    rng = np.random.default_rng(1)
    lengths = [1, 2, 3, 40, 1, 1, 9, 2, 100] + [3] * 30 + [2]  # 90 short rows in a row: one slab is full
    mels = [rng.standard_normal((n, 64)).astype(np.float32) for n in lengths]
    names = [f"c{i}.wav" for i in range(len(mels))]
    path = write_feature_file(tmp_path / "x.h5", names, iter(mels), [1.0] * len(mels), PRESETS["paper"],
                              n_frames=lengths)
    f = FeatureFile(path)
    assert f.n_frames.tolist() == lengths
    for i, m in enumerate(mels):
        assert np.array_equal(f[i], m), i
