"""Contrastive losses on the cosine-similarity matrix C of a batch: NT-Xent (Eq. 6) and SupCon (Eq. 7).

Both take unit-norm audio and text embeddings, row i of each belonging to the same (clip, caption)
pair, so C = audio @ text.T holds c_ij = cos(a_i, t_j) and the matching pairs lie on the diagonal.

Across processes (DistributedDataParallel), both losses first all-gather the embeddings and clip ids of
every process with :func:`clotho_retrieve.distributed.gather_with_grad` (as open_clip does with
``gather_with_grad=True``, on ``torch.distributed.nn.functional.all_gather``), so the
negatives are the whole global batch and every process computes the same global loss; DDP's gradient
averaging then yields exactly the single-process gradient of that global loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clotho_retrieve.distributed import gather_with_grad
from clotho_retrieve.utils import ClothoRetrieveError

__all__ = ["NTXentLoss", "SupConLoss", "build_loss", "gather_with_grad"]


def _similarity(audio: Tensor, text: Tensor, tau: float) -> Tensor:
    return audio @ text.T / tau  # C / tau: (N, N), c_ij = cos(a_i, t_j) for unit-norm inputs


class NTXentLoss(nn.Module):
    """Eq. (6): symmetric NT-Xent, the mean of the audio-to-text and text-to-audio terms

        L = -1/(2N) sum_i [ log exp(c_ii/tau) / sum_j exp(c_ij/tau)
                          + log exp(c_ii/tau) / sum_j exp(c_ji/tau) ]

    with tau = 0.07. The positives are the diagonal only; a caption of the same clip elsewhere in the
    batch counts as a negative, as in Eq. (6). With ``mask_same_clip=True`` and ``clip_ids`` given,
    such false negatives are dropped from the denominators instead (an option, off by default).
    """

    def __init__(self, tau: float = 0.07, mask_same_clip: bool = False):
        super().__init__()
        self.tau = tau
        self.mask_same_clip = mask_same_clip

    def forward(self, audio: Tensor, text: Tensor, clip_ids: Tensor | None = None) -> Tensor:
        audio, text = gather_with_grad(audio), gather_with_grad(text)  # (N, D) over all processes
        logits = _similarity(audio, text, self.tau)  # (N, N)
        if self.mask_same_clip and clip_ids is not None:
            clip_ids = gather_with_grad(clip_ids.to(audio.device))
            same = clip_ids[:, None] == clip_ids[None, :]
            false_negative = same & ~torch.eye(len(clip_ids), dtype=torch.bool, device=audio.device)
            logits = logits.masked_fill(false_negative, float("-inf"))
        a2t = -logits.log_softmax(dim=1).diagonal()  # audio i -> its caption among the row
        t2a = -logits.log_softmax(dim=0).diagonal()  # caption i -> its audio among the column
        return 0.5 * (a2t.mean() + t2a.mean())


class SupConLoss(nn.Module):
    """Eq. (7): supervised contrastive loss, symmetric over the two retrieval directions.

    K(m) = { k : clip_ids[k] == clip_ids[m] } holds every index of the batch whose audio clip is m's
    clip (m included): Clotho has 5 captions per clip, so a clip can appear more than once per batch.

        L_a2t = -1/N sum_m 1/|K(m)| sum_{k in K(m)} log exp(c_mk/tau) / sum_j exp(c_mj/tau)
        L_t2a = the same on C^T;   L = (L_a2t + L_t2a) / 2,   tau = 0.07.
    With all clip ids distinct, K(m) = {m} and this equals NT-Xent (Eq. 6).
    """

    def __init__(self, tau: float = 0.07):
        super().__init__()
        self.tau = tau

    def forward(self, audio: Tensor, text: Tensor, clip_ids: Tensor) -> Tensor:
        audio, text = gather_with_grad(audio), gather_with_grad(text)
        clip_ids = gather_with_grad(clip_ids.to(audio.device))
        logits = _similarity(audio, text, self.tau)  # (N, N)
        positive = (clip_ids[:, None] == clip_ids[None, :]).to(logits.dtype)  # K(m) as a 0/1 row
        n_positive = positive.sum(dim=1)  # |K(m)|, symmetric so also the column counts
        a2t = -(logits.log_softmax(dim=1) * positive).sum(dim=1) / n_positive
        t2a = -(logits.log_softmax(dim=0) * positive).sum(dim=0) / n_positive
        return 0.5 * (a2t.mean() + t2a.mean())


def build_loss(name: str, tau: float = 0.07) -> nn.Module:
    """ntxent (Eq. 6) | supcon (Eq. 7)."""
    if name == "ntxent":
        return NTXentLoss(tau)
    if name == "supcon":
        return SupConLoss(tau)
    raise ClothoRetrieveError(f"unknown loss {name!r}; choose ntxent or supcon")
