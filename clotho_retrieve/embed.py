"""`clotho-retrieve embed`: a run's audio (and caption) embeddings of feature files, into an INDEX folder.

Three parts, as clip-retrieval splits its inference::

    FeatureReader (feature files)  ->  Encoder (clotho_retrieve.encoder)  ->  IndexWriter (index/store.py)
    chunks of names, log-Mels,         (T_i, M) log-Mels -> (n, D)            appends new rows, overwrites
    sources, durations, captions,      unit-norm rows, batched by length      changed ones, commits a
    clip fingerprints                                                         chunk at a time

The index is brought in step with the features: clips whose names are new are appended, clips whose
log-Mel frames changed (:func:`clip_fingerprint`) are re-embedded in place (captions too), and with
``prune`` rows whose names are not in the features are dropped; unchanged clips are kept as they are,
so re-running resumes an interrupted run. The on-disk layout is documented in index/store.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from clotho_retrieve.encoder import RunEncoder, RunFingerprint, load_model, resolve_model_dir
from clotho_retrieve.index import (
    FAISS_META,
    INDEX_FILE,
    AnnConfig,
    EmbeddingIndex,
    IndexWriter,
    build_ann_index,
    choose_index_type,
    drop_ann_index,
)
from clotho_retrieve.index.parts import (
    Shard,
    ShardJob,
    barrier,
    check_fresh_target,
    clear_done,
    clips_digest,
    done_record,
    mark_done,
    merge_parts,
    part_dir,
    reset_if_reordered,
    shard_job,
)
from clotho_retrieve.utils import ClothoRetrieveError, atomic_write_text, err_console

ClipRef = tuple[int, int]  # (feature file number, clip number in that file)


@dataclass
class EmbedConfig:
    """Settings of `embed`, saved as INDEX/embed.json."""

    batch_size: int = 16  # clips per forward pass
    chunk_size: int = 256  # clips per HDF5 write (the resume granularity)
    captions: bool = False  # also embed every caption (for audio-to-text queries)
    index_type: str = "auto"  # exact | ivf | hnsw | pq | auto (index/rules.py: exact up to 50,000 clips)
    which: str = "best"  # best | last, when the checkpoint is a run folder
    device: str = "cpu"
    memory: int = 0  # bytes the FAISS index may take (`auto` and pq choose by it); 0: half the RAM


# ----------------------------------------------------------------------------------------------
# The reader
# ----------------------------------------------------------------------------------------------
def feature_files(features: str | os.PathLike) -> list[Path]:
    """A features .h5 file, or every .h5 in a folder (a Clotho features folder: all its splits)."""
    path = Path(features)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.h5") if not p.name.startswith("."))
        if not files:
            raise ClothoRetrieveError(f"{path}: no .h5 feature files here; run `clotho-retrieve features`")
        return files
    if path.is_file():
        return [path]
    raise ClothoRetrieveError(f"{path}: no such features file or folder; run `clotho-retrieve features`")


def clip_fingerprint(mel: np.ndarray) -> bytes:
    """blake2b-128 (32 hex digits) of a clip's float32 log-Mel frames (T, M) and their shape.

    Equal fingerprints mean `embed` would write the same audio row, so it can keep it. The front end
    needs no part in it (one index holds one front end, checked on open). Captions are not part of
    it: the same clip may come with captions in one features file and without in another.
    """
    mel = np.ascontiguousarray(mel, dtype=np.float32)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(mel.shape, np.int64).tobytes())
    digest.update(mel.tobytes())
    return digest.hexdigest().encode("ascii")


@dataclass
class ClipChunk:
    """One chunk of clips as the reader hands it on: the encoder's input and the writer's columns."""

    names: list[str]
    mels: list[np.ndarray]  # (T_i, M) float32 each
    sources: list[str]  # the feature file each clip came from
    durations: list[float]  # seconds
    captions: list[list[str]]
    fingerprints: list[bytes]  # clip_fingerprint of each
    rows: np.ndarray | None = None  # (n,) index rows to overwrite (changed clips); None: new rows

    @property
    def columns(self) -> dict:
        """What IndexWriter.add_clips / update_clips store beside the embeddings."""
        return {
            "sources": self.sources,
            "durations": self.durations,
            "captions": self.captions,
            "fingerprints": self.fingerprints,
        }


class FeatureReader:
    """The clips of one or more feature files of one front end; a name in several is read from the first."""

    def __init__(self, files: Sequence[Path]):
        from clotho_retrieve.feature_file import FeatureFile

        self.files = list(files)
        self.sources = [FeatureFile(f) for f in self.files]
        self.front_end = self.sources[0].front_end
        for f, ff in zip(self.files, self.sources, strict=True):
            if ff.front_end != self.front_end:
                raise ClothoRetrieveError(
                    f"{f}: computed with another front end than {self.files[0]}; embed it separately"
                )
        self.where: dict[str, ClipRef] = {}  # name -> where it is read from (first file wins)
        for s, ff in enumerate(self.sources):
            for i, name in enumerate(ff.names):
                self.where.setdefault(name, (s, i))
        self.fingerprints: dict[ClipRef, bytes] = {}

    def keep(self, names: Sequence[str]) -> None:
        """Read only these clips (a shard), in this order."""
        self.where = {name: self.where[name] for name in names}

    def check_front_end(self, trained_on: dict | None, model: str) -> None:
        """Refuse features computed otherwise than those the model was trained on (when it says)."""
        from clotho_retrieve.frontend import FrontEnd

        if trained_on and FrontEnd.from_dict(trained_on) != self.front_end:
            differences = ", ".join(self.front_end.differences(FrontEnd.from_dict(trained_on)))
            raise ClothoRetrieveError(
                f"{self.files[0]}: features differ from the front end {model} was trained on "
                f"({differences}); recompute them"
            )

    def fingerprint(self) -> None:
        """Fingerprint every clip to be read, streamed one clip at a time."""
        with err_console.status(f"fingerprinting {len(self.where):,} clips"):
            for s, i in self.where.values():
                self.fingerprints[s, i] = clip_fingerprint(self.sources[s][i])

    def chunks(
        self, refs: Sequence[ClipRef], size: int, rows: Sequence[int] | None = None
    ) -> Iterator[ClipChunk]:
        """The clips ``refs`` (fingerprinted), ``size`` at a time; ``rows``: the index rows they replace."""
        for a in range(0, len(refs), size):
            part = refs[a : a + size]
            yield ClipChunk(
                names=[self.sources[s].names[i] for s, i in part],
                mels=[self.sources[s][i] for s, i in part],
                sources=[self.files[s].name for s, _ in part],
                durations=[float(self.sources[s].durations[i]) for s, i in part],
                captions=[list(self.sources[s].captions[i]) for s, i in part],
                fingerprints=[self.fingerprints[ref] for ref in part],
                rows=None if rows is None else np.asarray(rows[a : a + size]),
            )

    def close(self) -> None:
        for ff in self.sources:
            ff.close()

    def __enter__(self) -> FeatureReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Reader -> encoder -> writer
# ----------------------------------------------------------------------------------------------
def _recorded_run(out: Path) -> tuple[RunFingerprint | None, bool]:
    """The run fingerprint an existing index recorded (spares re-hashing unchanged weights), and whether
    it keeps caption embeddings (then they are kept complete)."""
    if not (out / INDEX_FILE).is_file():
        return None, False
    try:
        with EmbeddingIndex(out, in_memory_max=0) as old:
            return old.fingerprint, old.captions_wanted
    except ClothoRetrieveError:
        return None, False


def _prune(reader: FeatureReader, writer: IndexWriter) -> int:
    """Drop the rows whose names are not in the features; returns how many."""
    keep = np.array([n in reader.where for n in writer.names()], dtype=bool)  # (count,)
    removed = int((~keep).sum())
    if removed:
        drop_ann_index(writer.path.parent)
        writer.keep_rows(keep)
    return removed


def _changes(reader: FeatureReader, writer: IndexWriter) -> tuple[list[ClipRef], list[tuple[int, ClipRef]]]:
    """Clips new to the index, and (row, clip) of rows whose clip fingerprint changed (by row)."""
    row_of = {n: r for r, n in enumerate(writer.names())}
    old_fps = writer.clip_fingerprints()
    todo: list[ClipRef] = []
    update: list[tuple[int, ClipRef]] = []
    for name, ref in reader.where.items():
        row = row_of.get(name)
        if row is None:
            todo.append(ref)
        elif old_fps[row] != reader.fingerprints[ref]:
            update.append((row, ref))
    update.sort()
    return todo, update


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=err_console)


def _encode_and_write(chunks: Iterator[ClipChunk], encoder: RunEncoder, writer: IndexWriter, advance) -> None:
    """Each chunk: audio embeddings (n, D) by the encoder, then appended or written over its rows."""
    for chunk in chunks:
        emb = encoder.encode_audio(chunk.mels)  # (n, D) unit norm
        if chunk.rows is None:
            writer.add_clips(emb, names=chunk.names, **chunk.columns)
        else:
            writer.update_clips(chunk.rows, emb, **chunk.columns)
        advance(len(chunk.names))


def _embed_captions(encoder: RunEncoder, writer: IndexWriter, progress, chunk_size: int) -> None:
    """Embed the captions of clips [captions_done, count) with the text tower, chunk by chunk."""
    task = progress.add_task("embedding captions", total=writer.count - writer.captions_done)
    while (done := writer.captions_done) < writer.count:
        stop = min(writer.count, done + chunk_size)
        caps = writer.captions(done, stop)
        texts = [c for cs in caps for c in cs]
        clip = np.repeat(np.arange(done, stop), [len(cs) for cs in caps])  # (M_chunk,) audio row of each
        writer.add_captions(encoder.encode_text(texts), clip, texts, stop)  # (M_chunk, D) unit norm
        progress.advance(task, stop - done)


def _embed_into(
    reader: FeatureReader, encoder: RunEncoder, writer: IndexWriter, cfg: EmbedConfig, prune: bool
) -> dict:
    """Bring the writer's rows in step with the reader's clips; returns the counts of the summary."""
    reader.fingerprint()
    removed = _prune(reader, writer) if prune else 0
    todo, update = _changes(reader, writer)
    if update or todo:
        drop_ann_index(writer.path.parent)  # never a FAISS file that disagrees with the rows
    if update:
        writer.forget_captions_from(update[0][0])
    with _progress() as progress:
        if update:
            task = progress.add_task("re-embedding changed audio", total=len(update))
            chunks = reader.chunks([ref for _, ref in update], cfg.chunk_size, [r for r, _ in update])
            _encode_and_write(chunks, encoder, writer, partial(progress.advance, task))
        task = progress.add_task("embedding audio", total=len(todo))
        chunks = reader.chunks(todo, cfg.chunk_size)
        _encode_and_write(chunks, encoder, writer, partial(progress.advance, task))
        if writer.captions_wanted:  # caption rows of new and changed clips
            _embed_captions(encoder, writer, progress, cfg.chunk_size)
    return {
        "clips": writer.count,
        "added": len(todo),
        "updated": len(update),
        "removed": removed,
        "unchanged": len(reader.where) - len(todo) - len(update),
        "captions_embedded_for": writer.captions_done if writer.captions_wanted else 0,
    }


def _refresh_ann(out: Path, cfg: EmbedConfig, count: int, dim: int) -> str:
    """The search type for ``count`` clips; (re)builds faiss.index unless it is up to date."""
    chosen = choose_index_type(cfg.index_type, count, dim, cfg.memory)
    if chosen == "exact":
        build_ann_index(out, "exact")
        return chosen
    meta_path = out / FAISS_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("count") != count or meta.get("config", {}).get("index_type") != chosen:
        build_ann_index(out, chosen, AnnConfig(memory=cfg.memory))  # rows changed: the old one was dropped
    return chosen


def embed(
    checkpoint: str | os.PathLike,
    features: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EmbedConfig | None = None,
    prune: bool = False,
    shard: str | Shard | None = None,
) -> dict:
    """Embed every clip of ``features`` (file or folder) with the run's audio tower into the INDEX ``out``.

    New names are appended, changed clips re-embedded in place, and with ``prune`` rows not in the
    features removed (see the module docstring). A name in several feature files is taken from the
    first. Under torchrun, or with ``shard`` ("i/N"), this process writes one part of the index
    (index/parts.py; parts always hold exactly their shard's clips). Returns a summary dict (clips,
    added, updated, removed, unchanged, ...).
    """
    cfg = cfg or EmbedConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClothoRetrieveError(f"{out}: exists and is not a folder; --out names an index folder")
    job = shard_job(shard)
    if job is not None:
        check_fresh_target(out)
        if job.world_size > 1 and cfg.device == "cuda":
            cfg = replace(cfg, device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    target = out if job is None else part_dir(out, job.shard)  # the folder this process writes
    files = feature_files(features)
    model_dir = resolve_model_dir(checkpoint, cfg.which)
    previous, had_captions = _recorded_run(target)
    fingerprint = RunFingerprint.of(model_dir, previous)
    with_captions = cfg.captions or had_captions  # an index with caption embeddings keeps them complete
    parts = ("audio", "text") if with_captions else ("audio",)
    with err_console.status(f"loading {model_dir}"):
        encoder = load_model(model_dir, parts=parts, device=cfg.device, batch_size=cfg.batch_size)
    model_cfg = encoder.model.cfg.to_dict()
    with FeatureReader(files) as reader:
        reader.check_front_end(encoder.front_end, str(model_dir))
        run = str(Path(checkpoint).resolve())
        front_end = reader.front_end.to_dict()
        shard_of = None if job is None else _take_shard(reader, job, cfg, target)
        dim = encoder.embed_dim
        with IndexWriter(target, fingerprint, run, cfg.which, dim, front_end, model_cfg) as writer:
            writer.captions_wanted = with_captions
            atomic_write_text(target / "embed.json", json.dumps(asdict(cfg), indent=2) + "\n")
            counts = _embed_into(reader, encoder, writer, cfg, prune or job is not None)
            if job is not None:
                mark_done(target, done_record(job.shard, *shard_of, writer))
    summary = {"index": str(out), **counts, "fingerprint": fingerprint.sha256}
    if job is not None:
        barrier(job)  # under torchrun: every part is done past this point
        if not job.merges:
            return {**summary, "part": str(target), "index_type": "-"}
        summary.update(merge_parts(out, job.shard.of))
        atomic_write_text(out / "embed.json", json.dumps(asdict(cfg), indent=2) + "\n")
    return {**summary, "index_type": _refresh_ann(out, cfg, summary["clips"], encoder.embed_dim)}


def _take_shard(reader: FeatureReader, job: ShardJob, cfg: EmbedConfig, part: Path) -> tuple:
    """Restrict the reader to this job's shard of the clips; returns (start, stop, total, clip digest).

    Starts the part over if its rows are not a prefix of the shard (parts.reset_if_reordered)."""
    names = list(reader.where)
    start, stop = job.shard.clip_range(len(names), cfg.chunk_size)
    reader.keep(names[start:stop])
    clear_done(part)
    if reset_if_reordered(part, names[start:stop]):
        err_console.print(f"[yellow]warning:[/] {part}: its shard changed; started over")
    return start, stop, len(names), clips_digest(names)
