"""The paper's attention modules over the frame features F (B, T', D_A), each with a residual.

``gat``  : graph attention, Eq. (1)-(2).   ``self``: self-attention + MLP, Eq. (3)-(4).
``none`` : the "CNN14 based" ablation (frames pass through unchanged).

All take a boolean ``mask`` (B, T') of valid frames and never attend to padded frames (keys are masked
before the softmax over j), so a clip's output frames do not depend on what it was batched with.
Every module returns ``(F_out (B, T', D_A), weights (B, T', T') | None)``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from clotho_retrieve.utils import ClothoRetrieveError

ATTENTIONS = ("none", "self", "gat")


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over j of scores (B, T, T), with padded keys j (mask (B, T) False) given weight 0."""
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return scores.softmax(dim=-1)


class NoAttention(nn.Module):
    """The "CNN14 based" ablation: F unchanged, no attention weights."""

    def forward(self, F_: Tensor, mask: Tensor) -> tuple[Tensor, None]:
        return F_, None


class GraphAttention(nn.Module):
    """Eq. (1)-(2): every frame is a node of a fully connected graph.

    Eq. (1): r_ij = LeakyReLU(W2 [W1 f_i ; W1 f_j]),  W1 in R^{D_A x D_A},  W2 in R^{1 x 2 D_A}
    Eq. (2): F_out = F + softmax_j(R) F W1^T
    Splitting W2 = [w_a, w_b] gives r_ij = LeakyReLU(w_a . h_i + w_b . h_j) with h = W1 f, which is how
    it is computed here (O(T^2) instead of materialising every concatenation).
    """

    def __init__(self, d_a: int, negative_slope: float = 0.2):
        super().__init__()
        self.W1 = nn.Linear(d_a, d_a, bias=False)
        self.W2 = nn.Linear(2 * d_a, 1, bias=False)
        self.negative_slope = negative_slope  # the GAT paper's LeakyReLU slope

    def forward(self, F_: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        d_a = F_.shape[-1]
        H = self.W1(F_)  # F W1^T: (B, T, D_A)
        w_a, w_b = self.W2.weight[0, :d_a], self.W2.weight[0, d_a:]
        R = F.leaky_relu((H @ w_a)[:, :, None] + (H @ w_b)[:, None, :], self.negative_slope)  # (B, T, T)
        A = _masked_softmax(R, mask)  # softmax over j
        return F_ + A @ H, A  # Eq. (2)


class SelfAttention(nn.Module):
    """Eq. (3)-(4): single-head scaled dot-product self-attention, then a two-layer MLP phi.

    Eq. (3): Q, K, V = F W_Q, F W_K, F W_V;  F^ = F + softmax(Q K^T / sqrt(D_A)) V
    Eq. (4): F_out = phi(F^) + F^,  phi = Linear(D_A, D_A) -> ReLU -> Dropout -> Linear(D_A, D_A)
    """

    def __init__(self, d_a: int, dropout: float = 0.2):
        super().__init__()
        self.W_Q = nn.Linear(d_a, d_a, bias=False)
        self.W_K = nn.Linear(d_a, d_a, bias=False)
        self.W_V = nn.Linear(d_a, d_a, bias=False)
        self.phi = nn.Sequential(nn.Linear(d_a, d_a), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_a, d_a))

    def forward(self, F_: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        Q, K, V = self.W_Q(F_), self.W_K(F_), self.W_V(F_)  # (B, T, D_A) each
        A = _masked_softmax(Q @ K.transpose(1, 2) / math.sqrt(F_.shape[-1]), mask)  # (B, T, T)
        F_hat = F_ + A @ V  # Eq. (3)
        return self.phi(F_hat) + F_hat, A  # Eq. (4)


def build_attention(kind: str, d_a: int, dropout: float = 0.2) -> nn.Module:
    if kind == "none":
        return NoAttention()
    if kind == "self":
        return SelfAttention(d_a, dropout)
    if kind == "gat":
        return GraphAttention(d_a)
    raise ClothoRetrieveError(f"unknown attention {kind!r}; choose one of {', '.join(ATTENTIONS)}")


def masked_mean(F_: Tensor, mask: Tensor) -> Tensor:
    """Mean pooling over the valid frames: F (B, T, D), mask (B, T) -> (B, D)."""
    m = mask.to(F_.dtype)[:, :, None]
    return (F_ * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


__all__ = ["ATTENTIONS", "GraphAttention", "NoAttention", "SelfAttention", "build_attention", "masked_mean"]
