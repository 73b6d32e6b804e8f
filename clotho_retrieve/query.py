"""Query an embedding index: text-to-audio (the paper's task), audio-to-audio and audio-to-text.

Queries are encoded by the Encoder of the model that built the index (clotho_retrieve/encoder.py): a
run of ours or a pretrained CLAP model (clap.py). A text query of a run's index on the CPU runs the ONNX
export of the run's text tower kept in the index (BERT [CLS] -> projector -> unit norm, with onnxruntime
and tokenizers: no torch, no transformers; clotho_retrieve/text_onnx.py); an index without one answers
through torch, loading the text tower only, after a one-line note on how to export it. An example
recording is turned into the model's audio input (encoder.audio_inputs_from_file) and encoded by the
audio tower. Either way the ranking is by cosine similarity (dot product of unit vectors) against the index
(clotho_retrieve/index/; see docs/). The run is found from the index, or given and checked against the
fingerprint the index recorded, so embeddings of two different runs are never compared.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clotho_retrieve.encoder import Encoder, RunFingerprint, load_model, resolve_model_dir
from clotho_retrieve.index import EmbeddingIndex, exact_search
from clotho_retrieve.text_onnx import open_text_tower
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
def index_model_dir(index: EmbeddingIndex, checkpoint: str | os.PathLike | None = None) -> Path:
    """The model folder of the run that built ``index``, after checking its weights' fingerprint.

    Without ``checkpoint`` the model folder recorded in the index is used. The fingerprint is the
    SHA-256 of model.safetensors; the recorded size and mtime spare re-hashing an unchanged file.
    """
    from clotho_retrieve.clap import is_clap_front_end, is_clap_model

    if is_clap_front_end(index.front_end):
        raise ClothoRetrieveError(
            f"{index.path}: built by the CLAP model {index.run}, not by a run of ours (no run folder, no "
            "ONNX text tower)"
        )
    if checkpoint is not None and is_clap_model(checkpoint):
        raise ClothoRetrieveError(
            f"{index.path}: built by the run {index.run}, not by a CLAP model; --model {checkpoint} cannot "
            "query it (embed again with it into a new index)"
        )
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
    return model_dir


def load_index_model(
    index: EmbeddingIndex,
    parts: tuple[str, ...],
    checkpoint: str | os.PathLike | None = None,
    device: str = "cpu",
) -> Encoder:
    """The Encoder of the model that built ``index`` (only ``parts``), its weights' fingerprint checked.

    Without ``checkpoint`` the model recorded in the index is used: a run's model folder
    (:func:`index_model_dir`), or a CLAP model's hub id or folder. Text only on the CPU, for a run: the
    index's ONNX text tower when it has a current one (exported from the index's weights, so without
    ``checkpoint`` it answers even when the run has moved), else torch after a one-line note (printed by
    open_text_tower).
    """
    from clotho_retrieve.clap import is_clap_front_end

    # One CPU thread for text: a query is a few tokens, and on a busy CPU every multi-threaded op waits
    # for a descheduled worker (see RunEncoder).
    threads = 1 if tuple(parts) == ("text",) else None
    if is_clap_front_end(index.front_end):
        return _load_index_clap(index, parts, checkpoint, device, threads)
    text_cpu = tuple(parts) == ("text",) and device == "cpu"
    if text_cpu and checkpoint is None:
        tower = open_text_tower(index.path, index.fingerprint.sha256)
        if tower is not None:
            return tower
        model_dir = index_model_dir(index)
    else:
        model_dir = index_model_dir(index, checkpoint)
        if text_cpu and (tower := open_text_tower(index.path, index.fingerprint.sha256)) is not None:
            return tower  # --checkpoint is the index's run (checked above): its tower is the index's
    return load_model(model_dir, parts=tuple(parts), device=device, threads=threads)


def _load_index_clap(index: EmbeddingIndex, parts, checkpoint, device: str, threads: int | None) -> Encoder:
    """The CLAP model that built ``index`` (recorded hub id or folder, or ``checkpoint``), checked by the
    fingerprint of its weights file."""
    from clotho_retrieve.clap import is_clap_model

    spec = index.run if checkpoint is None else str(checkpoint)
    where = f"the model recorded in {index.path} ({spec})" if checkpoint is None else f"--model {spec}"
    if not is_clap_model(spec):
        if checkpoint is None:
            raise ClothoRetrieveError(
                f"{index.path}: the CLAP model that built it ({spec}) is gone; pass --model with its new "
                "location"
            )
        raise ClothoRetrieveError(f"{index.path}: built by the CLAP model {index.run}; {where} is not one")
    encoder = load_model(spec, parts=tuple(parts), device=device, threads=threads)
    if encoder.weights is None:
        raise ClothoRetrieveError(f"{spec}: found no model.safetensors or pytorch_model.bin")
    fp = RunFingerprint.of_file(encoder.weights, known=index.fingerprint)
    if fp.sha256 != index.fingerprint.sha256:
        raise ClothoRetrieveError(
            f"{index.path}: built by other weights ({index.run}, {index.fingerprint.sha256[:12]}) than "
            f"{where} ({fp.sha256[:12]}); embed again with this model, or pass the right --model"
        )
    return encoder


# ----------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------
def clean_queries(texts: list[str]) -> list[str]:
    """Strip whitespace; an empty query is an error (it carries no meaning to rank by)."""
    cleaned = [" ".join(t.split()) for t in texts]
    if not cleaned or any(not t for t in cleaned):
        raise ClothoRetrieveError('empty query: give a description such as "dog barking in the rain"')
    return cleaned


def warn_long_queries(encoder, texts: list[str]) -> None:
    """Warn about each query longer than the encoder's token limit (it is cut to the limit)."""
    limit = encoder.max_text_tokens
    for t in texts:
        n = encoder.n_tokens(t)
        if n > limit:
            err_console.print(
                f"[yellow]warning:[/] query {t[:40]!r}... has {n} tokens; only the first {limit} are used"
            )


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
    encoder=None,
    target: str = "audio",
    device: str = "cpu",
) -> list[QueryResult]:
    """Text-to-audio retrieval: the top-k clips of the index for each text (loads the text tower only)."""
    index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex(index)
    texts = clean_queries(texts)
    encoder = encoder or load_index_model(index, ("text",), checkpoint, device)
    warn_long_queries(encoder, texts)
    return rank(index, texts, encoder.encode_text(texts), "text", k, target)  # (Q, D) unit norm


def query_audio(
    index: EmbeddingIndex | str | os.PathLike,
    paths: list[str | os.PathLike],
    k: int = 10,
    checkpoint: str | os.PathLike | None = None,
    encoder=None,
    target: str = "audio",
    device: str = "cpu",
) -> list[QueryResult]:
    """Query by example recordings: audio-to-audio (target audio) or audio-to-text (target captions).

    Each recording becomes the model's input (encoder.audio_inputs_from_file: a run's log-Mel (T_i, M),
    a CLAP model's ClapFeatureExtractor input), then an embedding."""
    from clotho_retrieve.frontend import FrontEnd, file_log_mel

    index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex(index)
    for p in paths:
        if not Path(p).is_file():
            raise ClothoRetrieveError(f"{p}: no such audio file")
    encoder = encoder or load_index_model(index, ("audio",), checkpoint, device)
    if encoder.front_end:  # what the index was embedded with (embed checks the two agree)
        inputs = [encoder.audio_inputs_from_file(p) for p in paths]
    else:  # a model that records no front end: the index's
        inputs = [file_log_mel(p, FrontEnd.from_dict(index.front_end))[0] for p in paths]
    return rank(index, [str(p) for p in paths], encoder.encode_audio(inputs), "audio", k, target)


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
