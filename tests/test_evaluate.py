"""Evaluation: the CLI's JSON and DCASE submission CSV checked against NumPy, chance levels, front ends.

Fixtures six_clip_features and overfit_run: conftest.py.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from tiny_runs import clips
from typer.testing import CliRunner

from clotho_retrieve.cli import app
from clotho_retrieve.encoder import load_model
from clotho_retrieve.evaluate import chance_levels, encode_split, evaluate
from clotho_retrieve.feature_file import FeatureFile, write_feature_file
from clotho_retrieve.frontend import FrontEnd
from clotho_retrieve.utils import ClothoRetrieveError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _rank_of_truth(sim: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of each query's relevant item (brute force, ties counted against us)."""
    return np.array([(row > row[t]).sum() + 1 for row, t in zip(sim, target, strict=True)])


def test_evaluate_json_and_submission_csv(tmp_path, overfit_run, six_clip_features):
    submission = tmp_path / "submission.csv"
    features = six_clip_features
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
    ff = FeatureFile(features / "validation.h5")
    enc = encode_split(load_model(overfit_run), ff)
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


def test_evaluate_refuses_features_of_another_front_end(tmp_path, overfit_run):
    mels, captions = clips()
    path = tmp_path / "evaluation.h5"
    write_feature_file(path, [str(i) for i in range(6)], mels, [1.0] * 6, FrontEnd(window="hann"), captions)
    with pytest.raises(ClothoRetrieveError, match=r"evaluation\.h5: front end does not match.*window"):
        evaluate(overfit_run, path)
