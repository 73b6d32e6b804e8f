"""Clotho: the Zenodo file table, caption CSVs, and the feature jobs of a Clotho root (through the stage)."""

from __future__ import annotations

import csv

import pytest
import soundfile as sf
from audio_signals import chirp_noise, write_clips

from clotho_retrieve.datasets import clotho
from clotho_retrieve.feature_file import FeatureFile
from clotho_retrieve.features import FeaturesConfig, compute_features
from clotho_retrieve.utils import ClothoRetrieveError


def test_file_table_covers_every_split():
    for split in clotho.SPLITS:
        names = (clotho.audio_archive_name(split), clotho.captions_name(split), clotho.metadata_name(split))
        for name in names:
            entry = clotho.CLOTHO_FILES[name]
            assert len(entry.md5) == 32 and int(entry.md5, 16) >= 0
            assert entry.url() == f"https://zenodo.org/record/4783391/files/{name}?download=1"
    assert len(clotho.CLOTHO_FILES) == 3 * len(clotho.SPLITS)
    assert clotho.captions_name("validation") == "clotho_captions_validation.csv"


def test_caption_csv_parsing(tmp_path):
    path = tmp_path / "captions.csv"  # a BOM, caption columns out of order, blanks, caption_10 after _2
    path.write_bytes("\ufefffile_name,caption_10,caption_2,caption_1\na.wav,ten, two ,one\nb.wav,,,only\n"
                     .encode("utf-8"))
    parsed = clotho._read_captions(path, allow_missing=True)  # caption_3 .. caption_5 are missing
    assert parsed == [("a.wav", ["one", "two", "ten"]), ("b.wav", ["only"])]
    assert clotho.clip_names(path) == ["a.wav", "b.wav"]
    (tmp_path / "other.csv").write_text("name,caption_1\na.wav,x\n", encoding="utf-8")
    with pytest.raises(ClothoRetrieveError, match="other.csv: no 'file_name' column"):
        clotho._read_captions(tmp_path / "other.csv")
    with pytest.raises(ClothoRetrieveError, match="other.csv: no 'file_name' column"):
        clotho.clip_names(tmp_path / "other.csv")


def test_clotho_layout_problems(tmp_path):
    root = tmp_path / "clotho"
    write_clips(root / "development", 3)  # clip_000..002
    sf.write(str(root / "development" / "extra.wav"), chirp_noise(44100, 0.3), 44100)
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
