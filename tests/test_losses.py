"""NT-Xent (Eq. 6) and SupCon (Eq. 7) against the formulas written as explicit loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clotho_retrieve.losses import NTXentLoss, SupConLoss, build_loss
from clotho_retrieve.utils import ClothoRetrieveError

TAU = 0.07


def embeddings(n: int, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return a, t


def cos(u, v) -> float:
    return float(sum(x * y for x, y in zip(u.tolist(), v.tolist(), strict=True)))


def ntxent_by_hand(a, t, ids=None, mask_same_clip=False) -> float:
    n = len(a)
    C = [[cos(a[i], t[j]) / TAU for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        keep = [j for j in range(n) if j == i or not (mask_same_clip and ids[j] == ids[i])]
        row = sum(math.exp(C[i][j]) for j in keep)  # audio i against captions j
        col = sum(math.exp(C[j][i]) for j in keep)  # caption i against audios j
        total += -math.log(math.exp(C[i][i]) / row) - math.log(math.exp(C[i][i]) / col)
    return total / (2 * n)


def supcon_by_hand(a, t, ids) -> float:
    n = len(a)
    C = [[cos(a[i], t[j]) / TAU for j in range(n)] for i in range(n)]
    a2t = t2a = 0.0
    for m in range(n):
        K = [k for k in range(n) if ids[k] == ids[m]]  # every index whose clip is m's clip
        row = sum(math.exp(C[m][j]) for j in range(n))
        col = sum(math.exp(C[j][m]) for j in range(n))
        a2t += -sum(math.log(math.exp(C[m][k]) / row) for k in K) / len(K)
        t2a += -sum(math.log(math.exp(C[k][m]) / col) for k in K) / len(K)
    return (a2t / n + t2a / n) / 2


def test_ntxent_matches_eq6_by_hand():
    a, t = embeddings(5)
    assert NTXentLoss()(a, t).item() == pytest.approx(ntxent_by_hand(a, t), rel=1e-10)
    ids = torch.tensor([0, 1, 0, 2, 1])
    # clip ids are ignored by plain Eq. (6) ...
    assert NTXentLoss()(a, t, ids).item() == pytest.approx(ntxent_by_hand(a, t), rel=1e-10)
    # ... and drop same-clip false negatives from the denominators when asked
    masked = NTXentLoss(mask_same_clip=True)(a, t, ids).item()
    assert masked == pytest.approx(ntxent_by_hand(a, t, ids.tolist(), mask_same_clip=True), rel=1e-10)
    assert masked < NTXentLoss()(a, t).item()


def test_supcon_matches_eq7_by_hand_with_repeated_clips():
    a, t = embeddings(6, seed=1)
    ids = torch.tensor([3, 7, 3, 3, 9, 7])  # clip 3 three times, clip 7 twice
    assert SupConLoss()(a, t, ids).item() == pytest.approx(supcon_by_hand(a, t, ids.tolist()), rel=1e-10)


def test_supcon_equals_ntxent_when_every_clip_is_distinct():
    a, t = embeddings(4, seed=2)
    ids = torch.tensor([10, 11, 12, 13])
    assert SupConLoss()(a, t, ids).item() == pytest.approx(NTXentLoss()(a, t).item(), rel=1e-12)


def test_loss_known_value_for_perfect_alignment():
    """Orthonormal audio = text: per direction -log(e^{1/tau} / (e^{1/tau} + (n-1) e^0))."""
    n = 3
    a = torch.eye(n, dtype=torch.float64)
    expected = -math.log(math.exp(1 / TAU) / (math.exp(1 / TAU) + n - 1))
    assert NTXentLoss()(a, a.clone()).item() == pytest.approx(expected, rel=1e-12)


def test_gradients_match_autograd_of_the_reference_formula():
    a, t = embeddings(4, seed=3)
    a.requires_grad_(True)
    ids = torch.tensor([0, 0, 1, 2])
    SupConLoss()(a, t, ids).backward()
    # finite differences on the hand-written formula for one coordinate
    eps = 1e-6
    for i, d in [(0, 0), (2, 3)]:
        plus, minus = a.detach().clone(), a.detach().clone()
        plus[i, d] += eps
        minus[i, d] -= eps
        numeric = (supcon_by_hand(plus, t, ids.tolist()) - supcon_by_hand(minus, t, ids.tolist())) / (2 * eps)
        assert a.grad[i, d].item() == pytest.approx(numeric, rel=1e-5, abs=1e-7)


def test_build_loss():
    assert isinstance(build_loss("ntxent"), NTXentLoss)
    assert isinstance(build_loss("supcon"), SupConLoss)
    with pytest.raises(ClothoRetrieveError, match="unknown loss"):
        build_loss("triplet")
