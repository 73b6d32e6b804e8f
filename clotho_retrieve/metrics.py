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

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------
# Several relevant clips per query (DCASE 2025)
# ----------------------------------------------------------------------------------------------
MAP_K = 16  # DCASE 2025's primary metric: mAP@16


def _relevant_index(relevant, n_clips: int, min_relevance: float, device) -> tuple[Tensor, Tensor]:
    """rel_idx (Q, max |R_q|) clip columns of each query's relevant clips, -1 padded; counts (Q,) |R_q|."""
    rows = []
    for q, judged in enumerate(relevant):
        clips = sorted(int(c) for c, value in dict(judged).items() if float(value) >= min_relevance)
        if not clips:
            raise ClothoRetrieveError(
                f"metrics: query {q} has no relevant clip (relevance >= {min_relevance})"
            )
        if clips[0] < 0 or clips[-1] >= n_clips:
            raise ClothoRetrieveError(f"metrics: query {q}: relevant clip indices must lie in [0, {n_clips})")
        rows.append(clips)
    width = max((len(r) for r in rows), default=1)
    rel_idx = torch.full((len(rows), width), -1, dtype=torch.long)
    for q, clips in enumerate(rows):
        rel_idx[q, : len(clips)] = torch.tensor(clips, dtype=torch.long)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return rel_idx.to(device), counts.to(device)


def _relevant_ranks(s: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Pessimistic ranks (b, R) of each query's relevant clips, best first, and their validity mask.

    The j-th best relevant clip (j = 1..|R_q|) ranks at j + the number of irrelevant clips scoring at
    least as high: among equal scores every irrelevant clip comes first. Counting uses one sort per row:
    #(clips >= x) = N - searchsorted(ascending scores, x, left).
    """
    valid = idx >= 0  # (b, R)
    rel_scores = s.gather(1, idx.clamp(min=0)).masked_fill(~valid, float("-inf"))
    rel_scores, order = rel_scores.sort(dim=1, descending=True)  # padding sorts last
    valid = valid.gather(1, order)
    ascending, _ = s.contiguous().sort(dim=1)  # (b, N)
    n = s.shape[1]
    at_least_all = n - torch.searchsorted(ascending, rel_scores.contiguous(), side="left")  # (b, R)
    # relevant clips scoring >= the j-th best relevant one (ties among relevant clips included)
    neg = (-rel_scores).masked_fill(~valid, float("inf")).contiguous()  # ascending
    at_least_rel = torch.searchsorted(neg, neg, side="right")  # (b, R)
    j = torch.arange(1, idx.shape[1] + 1, device=s.device)[None, :]
    rank = j + (at_least_all - at_least_rel)
    return rank.masked_fill(~valid, n + 1), valid


def multi_relevance_metrics(
    sim,
    relevant,
    k: int = MAP_K,
    ks: tuple[int, ...] = KS,
    min_relevance: float = 1e-12,
    chunk_size: int = 0,
) -> dict[str, float]:
    """Text-to-audio retrieval with several relevant clips per query (the DCASE 2025 protocol).

    ``sim`` (Q, N) query-clip scores; ``relevant`` (length Q): per query a mapping {clip column: graded
    relevance}; a clip counts as relevant when its relevance >= ``min_relevance`` (by default any positive
    value; pairs not listed have relevance 0). With R_q the relevant set of query q and rel_q(r) = 1 when
    the clip at rank r is relevant:

        R@K(q)  = 1 if any clip of R_q ranks in the top K, else 0
        AP@k(q) = 1 / min(|R_q|, k) * sum_{r=1..k} P_q(r) * rel_q(r),   P_q(r) = |R_q in top r| / r
        mAP@k   = mean over queries of AP@k(q)   (k = 16 in DCASE 2025)

    With one relevant clip per query, AP@k = 1/rank when rank <= k, else 0: the DCASE 2022 mAP@10 of
    :func:`text_to_audio_metrics` for k = 10. Ties rank pessimistically as there (irrelevant first), so
    the scores never depend on the order of the clips. Returns {"R@K" for K in ks, "mAP@k"}.
    """
    if k < 1 or any(K < 1 for K in ks):
        raise ClothoRetrieveError(f"metrics: k must be positive (got k={k}, ks={tuple(ks)})")
    relevant = list(relevant)
    sim, _ = _as_tensors(sim, np.zeros(0, np.int64))
    if len(relevant) != sim.shape[0]:
        raise ClothoRetrieveError(f"metrics: {sim.shape[0]} query rows but {len(relevant)} relevance sets")
    rel_idx, counts = _relevant_index(relevant, sim.shape[1], min_relevance, sim.device)
    chunk_size = chunk_size or max(1, (1 << 22) // max(1, sim.shape[1] * 2))
    first, aps = [], []
    for start in range(0, sim.shape[0], chunk_size):
        rank, valid = _relevant_ranks(sim[start : start + chunk_size], rel_idx[start : start + chunk_size])
        j = torch.arange(1, rank.shape[1] + 1, device=rank.device)[None, :].to(sim.dtype)
        hit = valid & (rank <= k)
        norm = counts[start : start + chunk_size].clamp(max=k).to(sim.dtype)  # min(|R_q|, k)
        aps.append(torch.where(hit, j / rank.to(sim.dtype), torch.zeros_like(j)).sum(dim=1) / norm)
        first.append(rank[:, 0])  # the best relevant clip's rank
    first_rank, ap = torch.cat(first), torch.cat(aps)
    out = {f"R@{K}": (first_rank <= K).float().mean().item() for K in ks}
    out[f"mAP@{k}"] = ap.float().mean().item()
    return out


def multi_relevance_chance(
    n_clips: int, n_relevant: Sequence[int], k: int = MAP_K, ks: tuple[int, ...] = KS
) -> dict[str, float]:
    """Expected :func:`multi_relevance_metrics` of a random ranking (every order of the N clips equally
    likely), for queries with m_q = ``n_relevant[q]`` relevant clips each:

        R@K(q)       = 1 - C(N - m, K) / C(N, K)      (some relevant clip among K drawn without replacement)
        E[AP@k](q)   = 1 / min(m, k) * sum_{r=1..min(k, N)} (m / N) * (1 + (r - 1)(m - 1) / (N - 1)) / r

    (the clip at rank r is relevant with probability m/N; given it is, each of the r - 1 clips above it is
    with probability (m - 1)/(N - 1)). With m = 1 these are DCASE 2022's R@K = K/N and
    mAP@10 = (1/N) sum_{r<=10} 1/r. Means over queries; fractions in [0, 1].
    """
    import math

    n = int(n_clips)
    if n < 1 or not len(n_relevant) or any(not 1 <= int(m) <= n for m in n_relevant):
        raise ClothoRetrieveError(f"chance: need 1 <= relevant clips <= {n} clips for every query")
    out = {f"R@{K}": 0.0 for K in ks}
    out[f"mAP@{k}"] = 0.0
    for m in map(int, n_relevant):
        for K in ks:
            out[f"R@{K}"] += 1.0 - (math.comb(n - m, K) / math.comb(n, K) if K <= n else 0.0)
        above = (m - 1) / (n - 1) if n > 1 else 0.0
        ap = sum((m / n) * (1 + (r - 1) * above) / r for r in range(1, min(k, n) + 1))
        out[f"mAP@{k}"] += ap / min(m, k)
    return {key: value / len(n_relevant) for key, value in out.items()}


@dataclass
class RelevanceJudgements:
    """Queries and their judged clips, read from a ``--relevance`` CSV (see :func:`read_relevance_csv`)."""

    queries: list[str]  # query texts, in the order of their first row
    relevant: list[dict[int, float]]  # per query: {clip index in the evaluated clips: relevance}


QUERY_TEXT_COLUMNS = ("caption", "query")
QUERY_ID_COLUMNS = ("query_id", "caption_id")


def _relevance_columns(path: Path, fields: list[str] | None, has_ids: bool) -> tuple[str, str, str]:
    fields = [f.strip() for f in fields or []]
    query = [c for c in QUERY_TEXT_COLUMNS + QUERY_ID_COLUMNS if c in fields]
    missing = [c for c in ("file_name", "relevance") if c not in fields]
    if missing or len(query) != 1:
        raise ClothoRetrieveError(
            f"{path}: expected a header with file_name, relevance and one query column of "
            f"{', '.join(QUERY_TEXT_COLUMNS + QUERY_ID_COLUMNS)}; found {', '.join(fields) or 'nothing'}"
        )
    if query[0] in QUERY_ID_COLUMNS and not has_ids:
        raise ClothoRetrieveError(
            f"{path}: column {query[0]} holds ids, but no query texts were given for them"
        )
    return query[0], "file_name", "relevance"


def read_relevance_csv(
    path: str | os.PathLike,
    clip_names: Sequence[str],
    query_texts: Mapping[str, str] | None = None,
    min_relevance: float = 1e-12,
) -> RelevanceJudgements:
    """Read relevance judgements: a CSV with a header naming ``file_name``, ``relevance`` and one query
    column: ``caption`` or ``query`` (the query text itself), or ``query_id`` / ``caption_id`` (looked up in
    ``query_texts``). One row per judged (query, clip) pair; relevance is a number >= 0 (graded, or 0/1).

    Every problem is one ClothoRetrieveError naming the file and line: a missing column, an empty query,
    a file name not among ``clip_names``, a relevance that is not a finite number >= 0, a pair given
    twice, an unknown query id, or a query with no clip of relevance >= ``min_relevance``.
    """
    import csv
    import math

    path = Path(path)
    column = {name: i for i, name in enumerate(clip_names)}
    queries: dict[str, int] = {}  # query text -> position
    relevant: list[dict[int, float]] = []
    first_line: dict[tuple[int, int], int] = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, skipinitialspace=True)
            qcol, fcol, rcol = _relevance_columns(path, reader.fieldnames, query_texts is not None)
            reader.fieldnames = [f.strip() for f in reader.fieldnames]
            for row in reader:
                where = f"{path} line {reader.line_num}"
                key, name = (row.get(qcol) or "").strip(), (row.get(fcol) or "").strip()
                if not key:
                    raise ClothoRetrieveError(f"{where}: empty {qcol}")
                if qcol in QUERY_ID_COLUMNS:
                    if key not in query_texts:
                        raise ClothoRetrieveError(f"{where}: unknown {qcol} {key!r}")
                    key = query_texts[key]
                if name not in column:
                    raise ClothoRetrieveError(
                        f"{where}: file_name {name!r} is not among the {len(column)} clips evaluated"
                    )
                try:
                    value = float(row.get(rcol) or "")
                except ValueError:
                    value = math.nan
                if not (math.isfinite(value) and value >= 0):
                    raise ClothoRetrieveError(f"{where}: relevance {row.get(rcol)!r} is not a number >= 0")
                q = queries.setdefault(key, len(queries))
                if q == len(relevant):
                    relevant.append({})
                pair = (q, column[name])
                if pair in first_line:
                    raise ClothoRetrieveError(
                        f"{where}: {name!r} judged again for this query (line {first_line[pair]})"
                    )
                first_line[pair] = reader.line_num
                relevant[q][column[name]] = value
    except (UnicodeDecodeError, OSError, csv.Error) as exc:
        raise ClothoRetrieveError(f"{path}: unreadable relevance CSV ({exc})") from None
    if not queries:
        raise ClothoRetrieveError(f"{path}: no judgements (the file has a header but no rows)")
    for text, q in queries.items():
        if not any(v >= min_relevance for v in relevant[q].values()):
            raise ClothoRetrieveError(
                f"{path}: query {text!r} has no clip with relevance >= {min_relevance:g}"
            )
    return RelevanceJudgements(list(queries), relevant)
