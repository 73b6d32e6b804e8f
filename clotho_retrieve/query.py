"""Query an embedding index: text-to-audio (the paper's task), audio-to-audio and audio-to-text.

A text query is encoded by the run's text tower only (BERT [CLS] -> projector -> unit norm); no audio
model is built. An example recording is turned into a log-Mel with the index's front end and encoded by
the audio tower. Either way the ranking is by cosine similarity (dot product of unit vectors) against the
index (see clotho_retrieve/index.py). The run is found from the index, or given and checked against the
fingerprint the index recorded, so embeddings of two different runs are never compared.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clotho_retrieve.index import EmbeddingIndex, RunFingerprint, exact_search, resolve_model_dir
from clotho_retrieve.utils import ClothoRetrieveError, err_console


@dataclass
class Hit:
    rank: int  # 1-based
    score: float  # cosine similarity
    name: str
    duration: float  # seconds
    caption: str | None  # the clip's first caption, or for caption search the matching caption
    row: int  # row of the clip in the index


@dataclass
class QueryResult:
    query: str  # the text, or the path of the example recording
    kind: str  # text | audio
    target: str = "audio"  # audio (rank clips) | captions (rank captions, needs embed --captions)
    hits: list[Hit] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading the run that built the index
# ----------------------------------------------------------------------------------------------
def load_index_model(
    index: EmbeddingIndex,
    parts: tuple[str, ...],
    checkpoint: str | os.PathLike | None = None,
    device: str = "cpu",
):
    """The model of the run that built ``index`` (only ``parts``), after checking its weights' fingerprint.

    Without ``checkpoint`` the model folder recorded in the index is used. The fingerprint is the
    SHA-256 of model.safetensors; the recorded size and mtime spare re-hashing an unchanged file.
    """
    from clotho_retrieve.models import RetrievalModel

    if checkpoint is None:
        model_dir = Path(index.fingerprint.model_dir)
        if not (model_dir / "model.safetensors").is_file():
            raise ClothoRetrieveError(
                f"{index.path}: the run that built it ({index.run}) is gone from {model_dir}; pass "
                "--checkpoint with its new location"
            )
        where = f"the run recorded in {index.path} ({model_dir})"
    else:
        model_dir = resolve_model_dir(checkpoint, index.which)
        where = f"--checkpoint {checkpoint}"
    fp = RunFingerprint.of(model_dir, known=index.fingerprint)
    if fp.sha256 != index.fingerprint.sha256:
        raise ClothoRetrieveError(
            f"{index.path}: built by another run (weights {index.fingerprint.sha256[:12]}) than {where} "
            f"(weights {fp.sha256[:12]}); embed again with this run, or pass the right --checkpoint"
        )
    # a text-only model is for inference: BERT text models skip transformers (models/bert.py)
    return RetrievalModel.from_pretrained(model_dir, parts=parts, device=device, fast_text=True)


# ----------------------------------------------------------------------------------------------
# Encoding queries
# ----------------------------------------------------------------------------------------------
def clean_queries(texts: list[str]) -> list[str]:
    """Strip whitespace; an empty query is an error (it carries no meaning to rank by)."""
    cleaned = [" ".join(t.split()) for t in texts]
    if not cleaned or any(not t for t in cleaned):
        raise ClothoRetrieveError('empty query: give a description such as "dog barking in the rain"')
    return cleaned


def encode_texts(model, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Texts -> (Q, D) unit-norm embeddings; warns when a query is cut to the model's token limit."""
    import torch

    limit = model.text.max_tokens
    for t in texts:
        n = model.text.n_tokens(t)
        if n > limit:
            err_console.print(
                f"[yellow]warning:[/] query {t[:40]!r}... has {n} tokens; only the first {limit} are used"
            )
    # One CPU thread: a query is a few tokens, and on a busy CPU every multi-threaded op waits for a
    # descheduled worker (MiniLM, one query, 2 threads on a loaded 2-core machine: 0.6 s; 1 thread: 0.02 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        with torch.inference_mode():
            for a in range(0, len(texts), batch_size):
                out.append(model.encode_text(texts[a : a + batch_size]).float().cpu().numpy())
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(out)  # (Q, D)


def encode_audio_files(model, paths: list[str | os.PathLike], front_end: dict) -> np.ndarray:
    """Recordings -> log-Mel with the index's front end -> (Q, D) unit-norm audio embeddings."""
    import torch

    from clotho_retrieve.frontend import FrontEnd, file_log_mel

    fe = FrontEnd.from_dict(front_end)
    out = []
    with torch.inference_mode():
        for p in paths:
            mel, _ = file_log_mel(p, fe)  # (T, M)
            logmel = torch.from_numpy(mel)[None]  # (1, T, M)
            out.append(model.encode_audio(logmel, torch.tensor([mel.shape[0]])).float().cpu().numpy())
    return np.concatenate(out)  # (Q, D)


# ----------------------------------------------------------------------------------------------
# Ranking
# ----------------------------------------------------------------------------------------------
def rank(
    index: EmbeddingIndex,
    queries: list[str],
    vectors: np.ndarray,
    kind: str,
    k: int = 10,
    target: str = "audio",
) -> list[QueryResult]:
    """Rank the index's clips (or captions) for query vectors (Q, D) -> one QueryResult per query."""
    if target == "captions":
        cap_vectors, cap_clip, cap_text = index.caption_vectors()  # (M, D), (M,), M texts
        scores, ids = exact_search(cap_vectors, vectors, k)
        rows = cap_clip[ids] if ids.size else ids
        texts = [[cap_text[j] for j in q] for q in ids]
    else:
        scores, rows = index.search(vectors, k)
        texts = None
    results = []
    for q, text in enumerate(queries):
        r = [int(i) for i in rows[q] if i >= 0]  # -1: a slot approximate search left empty
        names, durations = index.names(r), index.durations(r)
        if texts is not None:
            caps = texts[q]
        else:
            caps = [c[0] if c else None for c in index.captions(r)]
        hits = [
            Hit(
                rank=j + 1,
                score=float(scores[q, j]),
                name=names[j],
                duration=durations[j],
                caption=caps[j],
                row=int(r[j]),
            )
            for j in range(len(r))
        ]
        results.append(QueryResult(query=text, kind=kind, target=target, hits=hits))
    return results


def query_text(
    index: EmbeddingIndex | str | os.PathLike,
    texts: list[str],
    k: int = 10,
    checkpoint: str | os.PathLike | None = None,
    model=None,
    target: str = "audio",
    device: str = "cpu",
) -> list[QueryResult]:
    """Text-to-audio retrieval: the top-k clips of the index for each text (loads the text tower only)."""
    index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex(index)
    texts = clean_queries(texts)
    model = model or load_index_model(index, ("text",), checkpoint, device)
    return rank(index, texts, encode_texts(model, texts), "text", k, target)


def query_audio(
    index: EmbeddingIndex | str | os.PathLike,
    paths: list[str | os.PathLike],
    k: int = 10,
    checkpoint: str | os.PathLike | None = None,
    model=None,
    target: str = "audio",
    device: str = "cpu",
) -> list[QueryResult]:
    """Query by example recordings: audio-to-audio (target audio) or audio-to-text (target captions)."""
    index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex(index)
    for p in paths:
        if not Path(p).is_file():
            raise ClothoRetrieveError(f"{p}: no such audio file")
    model = model or load_index_model(index, ("audio",), checkpoint, device)
    vectors = encode_audio_files(model, paths, index.front_end)
    return rank(index, [str(p) for p in paths], vectors, "audio", k, target)


def read_queries_file(path: str | os.PathLike) -> list[str]:
    """One query per line (UTF-8); blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ClothoRetrieveError(f"{path}: no such queries file") from None
    except UnicodeDecodeError:
        raise ClothoRetrieveError(f"{path}: not UTF-8 text; save it as UTF-8, one query per line") from None
    queries = [line.strip() for line in lines if line.strip()]
    if not queries:
        raise ClothoRetrieveError(f"{path}: no queries in it (one per line)")
    return queries


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def result_table(result: QueryResult, index_path: str | os.PathLike | None = None):
    """A Rich table: rank, score, file name, duration and (when known) caption."""
    from rich.markup import escape
    from rich.table import Table

    target = "captions" if result.target == "captions" else "clips"
    query = escape(result.query)
    title = f"[bold]{query}[/]" if result.kind == "text" else f"[bold]like {query}[/]"
    where = escape(str(index_path or "the index"))
    table = Table(title=title, caption=f"top {len(result.hits)} {target} of {where}", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("file")
    table.add_column("duration", justify="right")
    show_caption = any(h.caption for h in result.hits)
    if show_caption:
        table.add_column("matching caption" if result.target == "captions" else "caption", overflow="fold")
    for h in result.hits:
        row = [str(h.rank), f"{h.score:.3f}", escape(h.name), f"{h.duration:.1f} s"]
        table.add_row(*row, *([escape(h.caption or "")] if show_caption else []))
    return table
