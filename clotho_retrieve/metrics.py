"""Retrieval metrics: DCASE 2022 Task 6B text-to-audio R@1/5/10 and mAP@10, and audio-to-text.

Text-to-audio (the task's official direction): every caption is a query with exactly one relevant clip.
R@K is the share of queries whose clip ranks in the top K; mAP@10 is the mean over queries of 1/rank
when rank <= 10, else 0.

Audio-to-text: every clip is a query whose relevant items are all its captions (5 in Clotho). R@K is the
share of clips with at least one caption in the top K; mAP@10 is the mean over clips of
AP@10 = 1/|R| * sum over relevant captions ranked at r <= 10 of precision@r (|R| = the clip's captions).

Ties are ranked pessimistically: an item tied with irrelevant items is ranked after all of them, so a
model that scores everything equally gets the worst ranks, never a lucky R@1. Scores are processed in
chunks of query rows, so the full (queries x items) comparison never has to fit in memory at once.
All values are fractions in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from clotho_retrieve.utils import ClothoRetrieveError

KS = (1, 5, 10)


def _as_tensors(sim, index) -> tuple[Tensor, Tensor]:
    sim = torch.as_tensor(np.asarray(sim) if not isinstance(sim, Tensor) else sim).detach()
    if sim.dtype not in (torch.float32, torch.float64):
        sim = sim.float()  # keep float64 as is: rounding could create ties that are not there
    index = torch.as_tensor(np.asarray(index) if not isinstance(index, Tensor) else index).detach()
    index = index.to(device=sim.device, dtype=torch.long)
    if sim.ndim != 2 or index.ndim != 1:
        raise ClothoRetrieveError(
            f"metrics: expected a 2-D similarity matrix and 1-D ids, got {tuple(sim.shape)}"
        )
    if not torch.isfinite(sim).all():
        raise ClothoRetrieveError("metrics: the similarity matrix holds NaN or infinite values")
    return sim, index


def _summarise(first_rank: Tensor, ap10: Tensor) -> dict[str, float]:
    out = {f"R@{k}": (first_rank <= k).float().mean().item() for k in KS}
    out["mAP@10"] = ap10.mean().item()
    return out


def text_to_audio_metrics(sim, target, chunk_size: int = 1024) -> dict[str, float]:
    """sim (n_captions, n_clips), target (n_captions,) clip index of each caption -> R@1/5/10, mAP@10."""
    sim, target = _as_tensors(sim, target)
    if target.shape[0] != sim.shape[0]:
        raise ClothoRetrieveError(f"metrics: {sim.shape[0]} caption rows but {target.shape[0]} targets")
    if len(target) and (target.min() < 0 or target.max() >= sim.shape[1]):
        raise ClothoRetrieveError(f"metrics: target clip indices must lie in [0, {sim.shape[1]})")
    ranks = []
    for start in range(0, sim.shape[0], chunk_size):
        s = sim[start : start + chunk_size]  # (b, n_clips)
        positive = s.gather(1, target[start : start + chunk_size, None])  # (b, 1)
        ranks.append((s >= positive).sum(dim=1))  # pessimistic: ties count as ahead; the clip itself -> 1
    rank = torch.cat(ranks).float()
    return _summarise(rank, torch.where(rank <= 10, 1.0 / rank, torch.zeros_like(rank)))


def audio_to_text_metrics(sim, caption_clip, chunk_size: int = 1024) -> dict[str, float]:
    """sim (n_clips, n_captions), caption_clip (n_captions,) clip index of each caption -> same keys."""
    sim, caption_clip = _as_tensors(sim, caption_clip)
    n_clips, n_captions = sim.shape
    if caption_clip.shape[0] != n_captions:
        raise ClothoRetrieveError(
            f"metrics: {n_captions} caption columns but {caption_clip.shape[0]} clip ids"
        )
    if n_captions and (caption_clip.min() < 0 or caption_clip.max() >= n_clips):
        raise ClothoRetrieveError(f"metrics: caption clip indices must lie in [0, {n_clips})")
    counts = torch.bincount(caption_clip, minlength=n_clips)  # |R| per clip
    if (counts == 0).any():
        raise ClothoRetrieveError(f"metrics: clip {int((counts == 0).nonzero()[0])} has no caption")

    # rel_idx (n_clips, max |R|): each clip's caption columns, padded with -1.
    order = torch.argsort(caption_clip, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n_captions, device=sim.device) - starts[caption_clip[order]]
    rel_idx = torch.full((n_clips, int(counts.max())), -1, dtype=torch.long, device=sim.device)
    rel_idx[caption_clip[order], slot] = order

    first_ranks, aps = [], []
    for start in range(0, n_clips, chunk_size):
        s = sim[start : start + chunk_size]  # (b, n_captions)
        idx = rel_idx[start : start + chunk_size]  # (b, R)
        valid = idx >= 0
        rel_scores = s.gather(1, idx.clamp(min=0)).masked_fill(~valid, float("-inf"))
        rel_scores, _ = rel_scores.sort(dim=1, descending=True)  # padding sorts last
        valid, _ = valid.sort(dim=1, descending=True)
        clips = torch.arange(start, start + len(s), device=s.device)
        relevant = caption_clip[None, :] == clips[:, None]  # (b, n_captions)
        # irrelevant captions scoring >= the k-th best relevant one (pessimistic ties): (b, R)
        irrelevant_ahead = ((s[:, None, :] >= rel_scores[:, :, None]) & ~relevant[:, None, :]).sum(dim=2)
        k = torch.arange(1, idx.shape[1] + 1, device=s.device)[None, :].float()  # k-th relevant caption
        rank = k + irrelevant_ahead.float()  # its rank in the pessimistic ordering
        precision = torch.where(valid & (rank <= 10), k / rank, torch.zeros_like(rank))
        first_ranks.append(rank[:, 0])
        aps.append(precision.sum(dim=1) / counts[start : start + chunk_size].float())
    return _summarise(torch.cat(first_ranks), torch.cat(aps))
