"""Retrieval metrics against rankings worked by hand and a NumPy brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clotho_retrieve.metrics import audio_to_text_metrics, text_to_audio_metrics
from clotho_retrieve.utils import ClothoRetrieveError


def test_text_to_audio_by_hand():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # target 0: rank 1
            [0.2, 0.4, 0.8, 0.6],  # target 1: 0.8 and 0.6 ahead -> rank 3
            [0.5, 0.5, 0.5, 0.5],  # target 3: all tied -> pessimistic rank 4
        ]
    )
    m = text_to_audio_metrics(sim, torch.tensor([0, 1, 3]))
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@5"] == m["R@10"] == pytest.approx(1.0)
    assert m["mAP@10"] == pytest.approx((1 + 1 / 3 + 1 / 4) / 3)


def test_text_to_audio_rank_beyond_ten_scores_zero():
    sim = torch.arange(12, dtype=torch.float32).flip(0)[None, :].repeat(2, 1)  # clip 0 best, clip 11 worst
    m = text_to_audio_metrics(sim, torch.tensor([9, 10]))  # ranks 10 and 11
    assert m == pytest.approx({"R@1": 0.0, "R@5": 0.0, "R@10": 0.5, "mAP@10": (1 / 10 + 0) / 2})


def test_audio_to_text_by_hand():
    caption_clip = torch.tensor([0, 0, 1, 1, 1])
    sim = torch.tensor(
        [
            # clip 0, relevant c0, c1. Order: c3, c1*, c2, c4, c0* -> ranks 2, 5: AP = (1/2 + 2/5) / 2
            [0.1, 0.9, 0.8, 0.95, 0.2],
            # clip 1, relevant c2, c3, c4. c3* first; c2* tied with c0, c1 -> after them: ranks 1, 4, 5
            [0.3, 0.3, 0.3, 0.7, 0.1],
        ]
    )
    m = audio_to_text_metrics(sim, caption_clip)
    ap0, ap1 = (1 / 2 + 2 / 5) / 2, (1 + 2 / 4 + 3 / 5) / 3
    assert m == pytest.approx({"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "mAP@10": (ap0 + ap1) / 2})


def brute_force(sim: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """Sort each row by score, ties broken with relevant items last; walk the list."""
    first, aps = [], []
    for s, rel in zip(sim, relevant, strict=True):
        order = np.lexsort((rel.astype(int), -s))  # primary: score descending; then irrelevant first
        hits, ap, best = 0, 0.0, None
        for position, j in enumerate(order, start=1):
            if rel[j]:
                hits += 1
                best = best or position
                if position <= 10:
                    ap += hits / position
        first.append(best)
        aps.append(ap / rel.sum())
    first = np.array(first)
    return {"R@1": np.mean(first <= 1), "R@5": np.mean(first <= 5), "R@10": np.mean(first <= 10),
            "mAP@10": float(np.mean(aps))}  # fmt: skip


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_against_brute_force_with_ties_and_chunks(chunk_size):
    rng = np.random.default_rng(0)
    n_clips, per_clip = 23, 5
    caption_clip = np.repeat(np.arange(n_clips), per_clip)
    caption_clip[-3:] = 0  # uneven caption counts: clip 0 has 8, clip 22 has 2
    sim = np.round(rng.normal(size=(len(caption_clip), n_clips)), 1)  # rounding creates ties
    sim[np.arange(len(caption_clip)), caption_clip] += 0.8  # better than chance

    t2a = text_to_audio_metrics(sim, caption_clip, chunk_size=chunk_size)
    assert t2a == pytest.approx(brute_force(sim, caption_clip[:, None] == np.arange(n_clips)[None, :]))
    a2t = audio_to_text_metrics(sim.T, caption_clip, chunk_size=chunk_size)
    assert a2t == pytest.approx(brute_force(sim.T, np.arange(n_clips)[:, None] == caption_clip[None, :]))
    assert 0.0 < a2t["mAP@10"] < 1.0


def test_bad_inputs_fail_clearly():
    with pytest.raises(ClothoRetrieveError, match="caption rows"):
        text_to_audio_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ClothoRetrieveError, match=r"must lie in \[0, 2\)"):
        text_to_audio_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ClothoRetrieveError, match="clip 1 has no caption"):
        audio_to_text_metrics(torch.zeros(2, 3), torch.tensor([0, 0, 0]))
    with pytest.raises(ClothoRetrieveError, match="NaN"):
        text_to_audio_metrics(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
