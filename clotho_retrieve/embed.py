"""`clotho-retrieve embed`: a model's audio (and caption) embeddings of feature files, into an INDEX folder.

The model is a run of ours or a pretrained CLAP model (clap.py), both behind the one Encoder interface.
Three parts, as clip-retrieval splits its inference::

    FeatureReader (feature files)  ->  Encoder (clotho_retrieve.encoder)  ->  IndexWriter (index/writer.py)
    chunks of names, log-Mels (or      each clip's input -> (n, D)            appends new rows, overwrites
    CLAP inputs), sources, durations,  unit-norm rows, batched                changed ones, commits a
    captions, clip fingerprints                                               chunk at a time

With ``--audio-dir`` the features come first: :func:`audio_dir_features` computes (or brings up to date)
INDEX/features.h5 for every audio file under the folder with the model's own front end (the features
stage, with its skip report), and the index then mirrors that folder.

The index is brought in step with the features: clips whose names are new are appended, clips whose
log-Mel frames changed (:func:`clip_fingerprint`) are re-embedded in place (captions too), and with
``prune`` rows whose names are not in the features are dropped; unchanged clips are kept as they are,
so re-running resumes an interrupted run. The on-disk layout is documented in index/store.py.

Beside the index, the run's text tower is exported to ONNX (INDEX/text_tower/, clotho_retrieve/text_onnx.py)
unless a current export is there, so text queries of the index start without torch.
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

from clotho_retrieve.encoder import Encoder, RunEncoder, RunFingerprint, load_model, resolve_model_dir
from clotho_retrieve.index import (
    FAISS_FILE,
    FAISS_META,
    INDEX_FILE,
    AnnConfig,
    EmbeddingIndex,
    IndexWriter,
    build_ann_index,
    choose_index_type,
    drop_ann_index,
    integrity,
)
from clotho_retrieve.index import parts as shards
from clotho_retrieve.index.writer import FINISH
from clotho_retrieve.safety import check_space, output_lock
from clotho_retrieve.text_onnx import ensure_text_tower
from clotho_retrieve.utils import ClothoRetrieveError, atomic_write_text, err_console

ClipRef = tuple[int, int]  # (feature file number, clip number in that file)
AUDIO_DIR_FEATURES = "features.h5"  # inside INDEX: the features `embed --audio-dir` computes


@dataclass
class EmbedConfig:
    """Settings of `embed`, saved as INDEX/embed.json."""

    batch_size: int = 16  # clips per forward pass
    chunk_size: int = 256  # clips per HDF5 write (the resume granularity)
    captions: bool = False  # also embed every caption (for audio-to-text queries)
    index_type: str = "auto"  # exact | ivf | hnsw | pq | auto (index/rules.py: exact up to 50,000 clips)
    which: str = "best"  # best | last, when the model is a run folder
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

    def keep(self, names: Sequence[str]) -> None:  # read only these clips (a shard), in this order
        self.where = {name: self.where[name] for name in names}

    def check_front_end(self, trained_on: dict | None, model: str) -> None:
        """Refuse features computed otherwise than the model's input (when it says: the front end a run was
        trained on, or a CLAP model's ClapFeatureExtractor input)."""
        from clotho_retrieve.frontend import front_end_from_dict

        if not trained_on:
            return
        expected = front_end_from_dict(trained_on)
        if expected != self.front_end:
            differences = ", ".join(self.front_end.differences(expected))
            hint = "recompute them"
            if "preset" in trained_on:  # a CLAP model
                hint = f"embed --audio-dir, or recompute them with `clotho-retrieve features --model {model}`"
            raise ClothoRetrieveError(
                f"{self.files[0]}: features differ from the input of {model} ({differences}); {hint}"
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
        with EmbeddingIndex(out, in_memory_max=0, load_ann=False) as old:
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


def _encode_and_write(chunks: Iterator[ClipChunk], encoder: Encoder, writer: IndexWriter, advance) -> None:
    """Each chunk: audio embeddings (n, D) by the encoder, then appended or written over its rows."""
    for chunk in chunks:
        emb = encoder.encode_audio(chunk.mels)  # (n, D) unit norm
        if chunk.rows is None:
            writer.add_clips(emb, names=chunk.names, **chunk.columns)
        else:
            writer.update_clips(chunk.rows, emb, **chunk.columns)
        advance(len(chunk.names))


def _embed_captions(encoder: Encoder, writer: IndexWriter, progress, chunk_size: int) -> None:
    """Embed the captions of clips [captions_done, count) with the text tower, chunk by chunk."""
    task = progress.add_task("embedding captions", total=writer.count - writer.captions_done)
    while (done := writer.captions_done) < writer.count:
        stop = min(writer.count, done + chunk_size)
        caps = writer.captions(done, stop)
        texts = [c for cs in caps for c in cs]
        clip = np.repeat(np.arange(done, stop), [len(cs) for cs in caps])  # (M_chunk,) audio row of each
        writer.add_captions(encoder.encode_text(texts), clip, texts, stop)  # (M_chunk, D) unit norm
        progress.advance(task, stop - done)


def _check_room(reader: FeatureReader, writer: IndexWriter, refs: list[ClipRef], captions: bool) -> None:
    """Refuse (one line, nothing written) when the new rows of ``refs`` would not fit on the disk."""
    names = [reader.sources[s].names[i] for s, i in refs]
    caps = [reader.sources[s].captions[i] for s, i in refs]
    n_caps = sum(len(c) for c in caps) if captions else 0
    needed = integrity.growth(writer.h5, len(refs), n_caps, integrity.text_bytes(names, names, caps, *caps))
    check_space(writer.path, needed, f"the embeddings of {len(refs):,} clips", FINISH)


def _embed_into(
    reader: FeatureReader, encoder: Encoder, writer: IndexWriter, cfg: EmbedConfig, prune: bool,
    finish_command: str = "",
) -> dict:
    """Bring the writer's rows in step with the reader's clips; returns the counts of the summary.

    While it works the index is marked incomplete (a query warns and prints ``finish_command``)."""
    reader.fingerprint()
    removed = _prune(reader, writer) if prune else 0
    todo, update = _changes(reader, writer)
    if update or todo:
        drop_ann_index(writer.path.parent)  # never a FAISS file that disagrees with the rows
    busy = bool(update or todo) or (writer.captions_wanted and writer.captions_done < writer.count)
    if busy:  # marked unfinished first: a run stopped by a full disk leaves it saying so
        writer.begin(writer.count + len(todo), finish_command)
        _check_room(reader, writer, todo + [ref for _, ref in update], writer.captions_wanted)
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
    if busy:
        writer.finish()
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
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        meta = {}
    stale = meta.get("count") != count or meta.get("config", {}).get("index_type") != chosen
    if stale or not _faiss_readable(out / FAISS_FILE):
        build_ann_index(out, chosen, AnnConfig(memory=cfg.memory))  # rows changed, or it is damaged
    return chosen


def _load_for_embedding(
    checkpoint: str | os.PathLike, cfg: EmbedConfig, parts: tuple[str, ...], previous: RunFingerprint | None
):
    """(encoder, fingerprint of its weights, the model to record, which, the model config to record).

    A run: its ``cfg.which`` model folder, recorded by absolute path. A CLAP model: loaded first (a hub
    id may need fetching), fingerprinted by its weights file, recorded as given (the hub id) or by the
    absolute path of its folder.
    """
    from clotho_retrieve.clap import clap_source, is_clap_model

    if is_clap_model(checkpoint):
        with err_console.status(f"loading {checkpoint}"):
            encoder = load_model(checkpoint, parts=parts, device=cfg.device, batch_size=cfg.batch_size)
        if encoder.weights is None:
            raise ClothoRetrieveError(f"{checkpoint}: found no model.safetensors or pytorch_model.bin")
        fingerprint = RunFingerprint.of_file(encoder.weights, previous)
        record = {"model": encoder.name, "embed_dim": encoder.embed_dim, "front_end": encoder.front_end,
                  "max_text_tokens": encoder.max_text_tokens}  # fmt: skip
        return encoder, fingerprint, clap_source(checkpoint), "", record
    model_dir = resolve_model_dir(checkpoint, cfg.which)
    fingerprint = RunFingerprint.of(model_dir, previous)
    with err_console.status(f"loading {model_dir}"):
        encoder = load_model(model_dir, parts=parts, device=cfg.device, batch_size=cfg.batch_size)
    return encoder, fingerprint, str(Path(checkpoint).resolve()), cfg.which, encoder.model.cfg.to_dict()


def _faiss_readable(path: Path) -> bool:
    import faiss

    try:
        faiss.read_index(str(path))
        return True
    except RuntimeError:
        return False


def embed(
    checkpoint: str | os.PathLike,
    features: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EmbedConfig | None = None,
    prune: bool = False,
    shard: str | shards.Shard | None = None,
) -> dict:
    """Embed every clip of ``features`` (file or folder) with the model's audio tower into the INDEX ``out``.

    ``checkpoint`` is a run folder, a model folder or a CLAP model (hub id or folder). New names are
    appended, changed clips re-embedded in place, and with ``prune`` rows not in the features removed
    (see the module docstring). A name in several feature files is taken from the first. A run's text
    tower is exported to ONNX beside the index unless a current one is there. Under torchrun, or with
    ``shard`` ("i/N"), this process writes one part of the index (index/parts.py: a part holds exactly
    its shard's clips; rank 0 of torchrun merges them). Returns a summary dict (clips, added, updated,
    removed, unchanged, ..., text_tower: its folder, or None for a CLAP model or a text model that could
    not be exported).
    """
    cfg = cfg or EmbedConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClothoRetrieveError(f"{out}: exists and is not a folder; --out names an index folder")
    job = shards.shard_job(shard)
    if job is not None:
        shards.check_fresh_target(out)
        if job.world_size > 1 and cfg.device == "cuda":
            cfg = replace(cfg, device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    with output_lock(out if job is None else shards.part_dir(out, job.shard)):  # one writer a folder
        return _embed(checkpoint, features, out, cfg, prune, job)


def _finish_command(checkpoint, features, out: Path, cfg: EmbedConfig, captions: bool) -> str:
    """The `embed` command that finishes this one (absolute paths: a query may run elsewhere)."""
    import shlex

    words = ["clotho-retrieve", "embed", "--checkpoint", str(Path(checkpoint).resolve()),
             "--features", str(Path(features).resolve()), "--out", str(out.resolve())]  # fmt: skip
    words += ["--captions"] if captions else []
    words += ["--which", cfg.which] if cfg.which != "best" else []
    return shlex.join(words)


def _embed(checkpoint, features, out: Path, cfg: EmbedConfig, prune: bool, job: shards.ShardJob | None):
    target = out if job is None else shards.part_dir(out, job.shard)  # the folder this process writes
    files = feature_files(features)
    previous, had_captions = _recorded_run(target)
    with_captions = cfg.captions or had_captions  # an index with caption embeddings keeps them complete
    parts = ("audio", "text") if with_captions else ("audio",)
    encoder, fingerprint, run, which, model_cfg = _load_for_embedding(checkpoint, cfg, parts, previous)
    with FeatureReader(files) as reader:
        reader.check_front_end(encoder.front_end, str(checkpoint))
        front_end = reader.front_end.to_dict()
        shard_of = None if job is None else shards.take_shard(reader, job, cfg.chunk_size, target)
        with IndexWriter(target, fingerprint, run, which, encoder.embed_dim, front_end, model_cfg) as writer:
            writer.captions_wanted = with_captions
            atomic_write_text(target / "embed.json", json.dumps(asdict(cfg), indent=2) + "\n")
            command = _finish_command(checkpoint, features, out, cfg, with_captions)
            command += "" if job is None else f" --shard {job.shard.index}/{job.shard.of}"
            counts = _embed_into(reader, encoder, writer, cfg, prune or job is not None, command)
            if job is not None:
                shards.mark_done(target, shards.done_record(job.shard, *shard_of, writer))
    if job is not None:
        merged = shards.finish_shards(job, out)  # torchrun: every rank's part is done; rank 0 merges
        if merged is None:
            return {"index": str(out), **counts, "part": str(target), "index_type": "-", "text_tower": None}
        counts = {**counts, **merged}
        atomic_write_text(out / "embed.json", json.dumps(asdict(cfg), indent=2) + "\n")
    index_type = _refresh_ann(out, cfg, counts["clips"], encoder.embed_dim)
    tower = None
    if isinstance(encoder, RunEncoder):  # our runs (an encoder of another kind has no tower to export)
        loaded = encoder.model if encoder.model.text is not None else None  # spares loading it again
        tower = ensure_text_tower(out, fingerprint.model_dir, fingerprint.sha256, model=loaded)
    return {
        "index": str(out),
        **counts,
        "index_type": index_type,
        "fingerprint": fingerprint.sha256,
        "text_tower": None if tower is None else str(tower),
    }


# ----------------------------------------------------------------------------------------------
# A folder of audio: the model's features first
# ----------------------------------------------------------------------------------------------
def model_front_end(model: str | os.PathLike, which: str = "best"):
    """The front end a model's audio input is computed with: a CLAP model's (from its preprocessor
    config, no weights loaded), or the one a run was trained on (from its config.json)."""
    from clotho_retrieve.clap import clap_front_end, is_clap_model
    from clotho_retrieve.frontend import FrontEnd

    if is_clap_model(model):
        return clap_front_end(model)
    model_dir = resolve_model_dir(model, which)
    try:
        trained_on = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("front_end")
    except (OSError, ValueError, AttributeError) as exc:
        raise ClothoRetrieveError(f"{model_dir / 'config.json'}: unreadable ({exc})") from None
    if not trained_on:
        raise ClothoRetrieveError(
            f"{model_dir}: records no front end; compute the features with `clotho-retrieve features "
            "--audio-dir DIR --out FILE.h5` and embed them with --features FILE.h5"
        )
    return FrontEnd.from_dict(trained_on)


def audio_dir_features(
    model: str | os.PathLike,
    audio_dir: str | os.PathLike,
    out: str | os.PathLike,
    which: str = "best",
    workers: int = 0,
    strict: bool = False,
) -> dict:
    """Compute, or bring up to date, INDEX/features.h5 for every audio file under ``audio_dir``
    (recursively, every format `features` reads) with ``model``'s front end; returns features.run_job's
    result (its "skipped" lists each bad file and why). Refuses a folder where no file could be read."""
    from clotho_retrieve.audio import AUDIO_SUFFIXES
    from clotho_retrieve.datasets.folder import audio_dir_job
    from clotho_retrieve.features import run_job

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClothoRetrieveError(f"{out}: exists and is not a folder; --out names an index folder")
    job = audio_dir_job(audio_dir, out / AUDIO_DIR_FEATURES)
    if not job.names:
        raise ClothoRetrieveError(f"{audio_dir}: no audio files ({', '.join(AUDIO_SUFFIXES)}) under it")
    front_end = model_front_end(model, which)
    out.mkdir(parents=True, exist_ok=True)
    result = run_job(job, front_end, workers=workers, strict=strict)
    if result["clips"] == 0:
        raise ClothoRetrieveError(
            f"{audio_dir}: none of its {len(job.names)} audio files could be read "
            f"(first: {result['skipped'][0][0]}: {result['skipped'][0][1]})"
        )
    return result
