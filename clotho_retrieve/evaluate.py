"""Scoring a model on a split with the DCASE 2022 Task 6B metrics, and DCASE's submission CSV.

``evaluate(run, features, split)`` loads the model (a run of ours or a pretrained CLAP model, zero-shot)
through :func:`clotho_retrieve.encoder.load_model`, encodes every clip and caption of the split
(:func:`encode_split`, also train's validation), and returns text-to-audio and audio-to-text R@1/5/10
and mAP@10 beside their chance levels. With ``relevance`` (a CSV of judged query-clip pairs, several
relevant clips per query as in DCASE 2025) it scores those queries instead: R@1/5/10 and mAP@k
(metrics.multi_relevance_metrics).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torch import Tensor

from clotho_retrieve.data import check_front_ends, open_split
from clotho_retrieve.encoder import load_model
from clotho_retrieve.feature_file import FeatureFile
from clotho_retrieve.metrics import MAP_K
from clotho_retrieve.utils import ClothoRetrieveError, atomic_path, resolve_device

CHUNK_CLIPS = 1024  # clips read into memory at once while encoding a split
CHUNK_BYTES = 256 << 20  # ... or fewer, when clips are large (a fused CLAP model's input: 1 MB a clip)


@dataclass
class EncodedSplit:
    audio: Tensor  # (N_clips, D) unit norm, CPU float32
    text: Tensor  # (N_captions, D) unit norm, CPU float32
    caption_clip: Tensor  # (N_captions,) clip index of each caption
    captions: list[str] = field(default_factory=list)


def encode_clips(encoder, feature_file: FeatureFile) -> np.ndarray:
    """(N_clips, D) unit-norm embeddings of every clip of a feature file, in file order.

    Clips go to ``encoder.encode_audio`` in length order, at most CHUNK_CLIPS (and about CHUNK_BYTES) at
    a time: a bounded memory, and the encoder batches each chunk with little padding.
    """
    audio = np.empty((len(feature_file), encoder.embed_dim), np.float32)
    order = np.argsort(feature_file.n_frames, kind="stable")
    widest = int(feature_file.n_frames.max(initial=1)) * feature_file.front_end.n_mels * 4  # bytes a clip
    chunk = max(1, min(CHUNK_CLIPS, CHUNK_BYTES // max(1, widest)))
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        audio[rows] = encoder.encode_audio([feature_file[int(i)] for i in rows])
    return audio


def encode_split(encoder, feature_file: FeatureFile) -> EncodedSplit:
    """Embeddings of all clips (:func:`encode_clips`) and all captions of one feature file, in file order."""
    captions = [c for caps in feature_file.captions for c in caps]
    caption_clip = torch.tensor(
        [i for i, caps in enumerate(feature_file.captions) for _ in caps], dtype=torch.long
    )
    return EncodedSplit(
        audio=torch.from_numpy(encode_clips(encoder, feature_file)),
        text=torch.from_numpy(encoder.encode_text(captions)),
        caption_clip=caption_clip,
        captions=captions,
    )


def score(enc: EncodedSplit) -> dict[str, dict[str, float]]:
    """Text-to-audio and audio-to-text R@1/5/10 and mAP@10 (DCASE 2022 Task 6B) from embeddings."""
    from clotho_retrieve.metrics import audio_to_text_metrics, text_to_audio_metrics

    sim = enc.text @ enc.audio.T  # (N_captions, N_clips) cosine similarities (unit vectors)
    return {
        "text_to_audio": {k: float(v) for k, v in text_to_audio_metrics(sim, enc.caption_clip).items()},
        "audio_to_text": {k: float(v) for k, v in audio_to_text_metrics(sim.T, enc.caption_clip).items()},
    }


def chance_levels(n_clips: int, caption_clip: Tensor) -> dict[str, dict[str, float]]:
    """Expected metrics of a random ranking.

    Text-to-audio (one relevant clip among N): R@k = k/N, mAP@10 = (1/N) sum_{r<=10} 1/r.
    Audio-to-text (m_i relevant captions among C): R@k = mean_i 1 - C(C-m_i, k) / C(C, k).
    """
    n_caps = len(caption_clip)
    t2a = {f"R@{k}": min(1.0, k / n_clips) for k in (1, 5, 10)}
    t2a["mAP@10"] = sum(1.0 / r for r in range(1, min(10, n_clips) + 1)) / n_clips
    counts = torch.bincount(caption_clip, minlength=n_clips).tolist()
    a2t = {}
    for k in (1, 5, 10):
        miss = [math.comb(n_caps - m, k) / math.comb(n_caps, k) if n_caps >= k else 0.0 for m in counts]
        a2t[f"R@{k}"] = 1.0 - sum(miss) / n_clips
    return {"text_to_audio": t2a, "audio_to_text": a2t}


def write_submission(path: str | os.PathLike, enc: EncodedSplit, names: list[str]) -> None:
    """DCASE's CSV: ``caption,file_name_1,...,file_name_10``, the top 10 clips of each caption."""
    top = torch.topk(enc.text @ enc.audio.T, k=min(10, len(names)), dim=1).indices  # (N_captions, <=10)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["caption"] + [f"file_name_{i}" for i in range(1, 11)])
        for caption, row in zip(enc.captions, top.tolist(), strict=True):
            clips = [names[j] for j in row]
            writer.writerow([caption] + clips + [""] * (10 - len(clips)))  # < 10 clips: empty cells


def check_model_input(ff: FeatureFile, encoder, run, split: str) -> None:
    """Refuse features that are not the model's input: a run's trained-on front end, or a CLAP model's
    ClapFeatureExtractor input (with the `features --model` command that computes them)."""
    from clotho_retrieve.clap import is_clap_front_end
    from clotho_retrieve.data import front_end_diff

    if not is_clap_front_end(encoder.front_end):
        check_front_ends([ff], encoder.front_end, f"the run's front end ({run})")
        return
    diff = front_end_diff(encoder.front_end, ff.front_end.to_dict())
    if diff:
        root = ff.attrs.get("source") or "ROOT"
        raise ClothoRetrieveError(
            f"{ff.path}: not the input of the CLAP model {run} ({diff}); compute it with `clotho-retrieve "
            f"features --root {root} --split {split} --model {run} --out DIR` and pass --features DIR"
        )


def score_relevance(encoder, ff: FeatureFile, audio: np.ndarray, relevance, k: int = MAP_K) -> dict:
    """R@1/5/10 and mAP@k of the judged queries of a ``--relevance`` CSV (several relevant clips each)."""
    from clotho_retrieve.metrics import multi_relevance_chance, multi_relevance_metrics, read_relevance_csv

    judged = read_relevance_csv(relevance, ff.names)
    sim = encoder.encode_text(judged.queries) @ audio.T  # (Q, N_clips) cosine similarities
    n_relevant = [sum(v >= 1e-12 for v in r.values()) for r in judged.relevant]  # metrics' min_relevance
    return {
        "relevance": str(relevance),
        "k": k,
        "n_queries": len(judged.queries),
        "text_to_audio": multi_relevance_metrics(sim, judged.relevant, k=k),
        "chance": {"text_to_audio": multi_relevance_chance(len(ff), n_relevant, k=k)},
    }


def evaluate(
    run: str | os.PathLike,
    features: str | os.PathLike,
    split: str = "evaluation",
    which: str = "best",
    batch_size: int = 32,
    device: str = "auto",
    submission: str | os.PathLike | None = None,
    relevance: str | os.PathLike | None = None,
    k: int = MAP_K,
) -> dict:
    """Score a model on one split: DCASE 2022 Task 6B text-to-audio metrics, plus audio-to-text.

    ``run`` is a run folder (its ``which`` model), a model folder, or a CLAP model (hub id or folder,
    zero-shot); ``features`` is a features folder (then ``split`` picks the file) or a single ``.h5``
    file, computed with the model's front end. ``submission`` writes DCASE's CSV. ``relevance``: score
    the queries of that CSV instead (:func:`score_relevance`: R@1/5/10 and mAP@``k``).
    """
    from clotho_retrieve.clap import is_clap_model

    if relevance is not None and submission is not None:
        raise ClothoRetrieveError(
            "--submission writes DCASE 2022's CSV of the split's captions; run it without --relevance"
        )
    path = Path(features)
    ff = FeatureFile(path) if path.suffix == ".h5" else open_split(path, split)
    try:
        dev = resolve_device(device)
        encoder = load_model(run, which, dev, batch_size=batch_size, amp=torch.device(dev).type == "cuda")
        check_model_input(ff, encoder, run, split)
        which_model = None if is_clap_model(run) else which  # a CLAP model has no best / last
        head = {"run": str(run), "checkpoint": which_model, "features": str(ff.path), "n_clips": len(ff)}
        if relevance is not None:
            return {**head, **score_relevance(encoder, ff, encode_clips(encoder, ff), relevance, k)}
        if not any(ff.captions):
            raise ClothoRetrieveError(f"{ff.path}: has no captions to evaluate with")
        enc = encode_split(encoder, ff)
        out = {
            **head,
            "n_captions": len(enc.captions),
            **score(enc),
            "chance": chance_levels(len(ff), enc.caption_clip),
        }
        if submission is not None:
            write_submission(submission, enc, list(ff.names))
            out["submission"] = str(submission)
    finally:
        ff.close()
    return out


def results_table(result: dict) -> Table:
    """Rich table of evaluate()'s result: metrics in %, chance level beside."""
    keys = list(result["text_to_audio"])  # R@1, R@5, R@10, then mAP@10 (or mAP@k with --relevance)
    if "relevance" in result:
        title = f"{result['features']}: {result['n_clips']} clips, {result['n_queries']} judged queries"
        directions = ("text_to_audio",)
    else:
        title = f"{result['features']}: {result['n_clips']} clips, {result['n_captions']} captions"
        directions = ("text_to_audio", "audio_to_text")
    table = Table(title=title)
    table.add_column("direction")
    for k in keys:
        table.add_column(k, justify="right")
    for direction in directions:
        name = direction.replace("_", "-")
        table.add_row(name, *(f"{100 * result[direction][k]:.2f}" for k in keys))
        chance = result["chance"][direction]
        table.add_row(
            f"[dim]{name} chance[/]",
            *(f"[dim]{100 * chance[k]:.2f}[/]" if k in chance else "[dim]-[/]" for k in keys),
        )
    return table
