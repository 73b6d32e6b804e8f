"""Attention modules against the paper's equations computed element by element, and their masking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clotho_retrieve.models.attention import (
    GraphAttention,
    NoAttention,
    SelfAttention,
    build_attention,
    masked_mean,
)
from clotho_retrieve.utils import ClothoRetrieveError

T, D_A = 5, 4


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def matvec(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W v, one dot product per output element."""
    return torch.stack([sum(W[r, c] * v[c] for c in range(len(v))) for r in range(W.shape[0])])


def test_graph_attention_is_eq_1_2():
    torch.manual_seed(0)
    gat = GraphAttention(D_A).eval()
    F_ = torch.randn(1, T, D_A, dtype=torch.float64)
    gat.double()
    with torch.no_grad():
        out, A = gat(F_, torch.ones(1, T, dtype=torch.bool))
        W1, W2 = gat.W1.weight, gat.W2.weight  # (D_A, D_A), (1, 2 D_A)
        f = F_[0]
        h = [matvec(W1, f[i]) for i in range(T)]  # W1 f_i
        for i in range(T):
            # Eq. (1): r_ij = LeakyReLU(W2 [W1 f_i ; W1 f_j])
            r = []
            for j in range(T):
                z = float(matvec(W2, torch.cat([h[i], h[j]]))[0])
                r.append(z if z > 0 else 0.2 * z)
            alpha = softmax(r)  # softmax over j
            assert A[0, i].tolist() == pytest.approx(alpha, abs=1e-12)
            # Eq. (2): f_i + sum_j alpha_ij W1 f_j
            expected = f[i] + sum(alpha[j] * h[j] for j in range(T))
            torch.testing.assert_close(out[0, i], expected)


def test_self_attention_is_eq_3_4():
    torch.manual_seed(1)
    sa = SelfAttention(D_A, dropout=0.5).double().eval()  # eval: dropout off
    F_ = torch.randn(1, T, D_A, dtype=torch.float64)
    with torch.no_grad():
        out, A = sa(F_, torch.ones(1, T, dtype=torch.bool))
        f = F_[0]
        q = [matvec(sa.W_Q.weight, f[i]) for i in range(T)]
        k = [matvec(sa.W_K.weight, f[i]) for i in range(T)]
        v = [matvec(sa.W_V.weight, f[i]) for i in range(T)]
        lin1, lin2 = sa.phi[0], sa.phi[3]
        for i in range(T):
            scores = [float(sum(q[i][d] * k[j][d] for d in range(D_A))) / math.sqrt(D_A) for j in range(T)]
            alpha = softmax(scores)
            assert A[0, i].tolist() == pytest.approx(alpha, abs=1e-12)
            f_hat = f[i] + sum(alpha[j] * v[j] for j in range(T))  # Eq. (3)
            hidden = torch.clamp(matvec(lin1.weight, f_hat) + lin1.bias, min=0)
            phi = matvec(lin2.weight, hidden) + lin2.bias
            torch.testing.assert_close(out[0, i], phi + f_hat)  # Eq. (4)


@pytest.mark.parametrize("kind", ["self", "gat"])
def test_padded_frames_are_never_attended(kind):
    torch.manual_seed(2)
    module = build_attention(kind, D_A).eval()
    F_ = torch.randn(2, 7, D_A)
    F_[1, 3:] = 100.0  # clip 1 has 3 valid frames; garbage after
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3])[:, None]
    with torch.no_grad():
        out, A = module(F_, mask)
        alone, _ = module(F_[1:2, :3], torch.ones(1, 3, dtype=torch.bool))
    assert torch.all(A[1, :, 3:] == 0)
    torch.testing.assert_close(A.sum(dim=-1), torch.ones(2, 7))
    torch.testing.assert_close(out[1, :3], alone[0])


def test_none_is_identity_and_unknown_kind_fails():
    F_ = torch.randn(2, 3, D_A)
    out, A = NoAttention()(F_, torch.ones(2, 3, dtype=torch.bool))
    assert out is F_ and A is None
    with pytest.raises(ClothoRetrieveError, match="unknown attention 'cross'"):
        build_attention("cross", D_A)


def test_masked_mean_averages_valid_frames_only():
    F_ = torch.arange(24, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out = masked_mean(F_, mask)
    torch.testing.assert_close(out[0], F_[0].mean(dim=0))
    torch.testing.assert_close(out[1], (F_[1, 0] + F_[1, 1]) / 2)


def test_gat_leaky_relu_slope():
    """W2 split as [w_a, w_b]: with h_i = h_j = h, r = LeakyReLU((w_a + w_b) . h) takes the 0.2 slope."""
    gat = GraphAttention(2)
    with torch.no_grad():
        gat.W1.weight.copy_(torch.eye(2))
        gat.W2.weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    F_ = torch.tensor([[[-1.0, 0.0], [2.0, 0.0]]])
    _, A = gat(F_, torch.ones(1, 2, dtype=torch.bool))
    # row 0: r_00 = LReLU(-2) = -0.4, r_01 = LReLU(1) = 1
    torch.testing.assert_close(A[0, 0], F.softmax(torch.tensor([-0.4, 1.0]), dim=0))
