"""One served index ("library"): the index, its run's towers, where its clips' audio and features are.

Where a clip's audio lives: index.h5 records, per clip, its name and the features file it came from
(`sources`, e.g. "evaluation.h5"). That features file records the library it was computed from in its
attributes: `source` (the Clotho root, or the --audio-dir folder) and `split` ("evaluation", or "" for
an audio folder), so the clip is ``source/split/name`` (Clotho) or ``source/name`` (audio folder). The
features file itself is looked for, in this order, at

1. the path recorded in index.h5's optional `feature_files` attribute (JSON {source name: path}),
2. the --features files or folders given to `serve`,
3. the features folder the run was trained on (its config.json), as recorded and relative to the
   current folder or to the run's parent folders,
4. beside the index: INDEX/../features/NAME and INDEX/../NAME.

``--audio-root`` replaces the recorded library root (its SPLIT sub-folder is used when it has one). A
clip whose audio cannot be found, or whose path leaves its library root (``..``, a symlink pointing
elsewhere), is reported as unavailable and never served.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clotho_retrieve.serve import backend
from clotho_retrieve.serve.backend import ClothoRetrieveError
from clotho_retrieve.serve.batcher import Batcher
from clotho_retrieve.serve.cache import QueryCache
from clotho_retrieve.serve.thumbs import thumbnail_png

AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}


@dataclass
class Source:
    """One features file an index's clips came from: where the file is, and the clips' library root."""

    name: str  # as recorded in index.h5 (`sources`)
    features: Path | None = None  # the features file, None when not found
    root: Path | None = None  # the folder clip names are relative to, None when unknown
    _rows: dict[str, int] | None = field(default=None, repr=False)  # clip name -> row in the features
    _file: object = field(default=None, repr=False)  # backend.FeatureFile, opened on first use
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def mel(self, name: str) -> np.ndarray | None:
        """The cached (T, M) log-Mel of a clip, None when the features file or the clip is missing."""
        if self.features is None:
            return None
        with self._lock:
            if self._file is None:
                self._file = backend.open_features(self.features)
                self._rows = {n: i for i, n in enumerate(self._file.names)}
            i = self._rows.get(name)
            return None if i is None else self._file[i]


def locate(root: Path, name: str) -> tuple[Path | None, str]:
    """``root/name`` resolved (symlinks followed) if it is an existing file inside ``root``, else None and
    why not. A name with ``..`` or a symlink that leads out of ``root`` is refused, not followed."""
    try:
        real_root = Path(os.path.realpath(root))
        real = Path(os.path.realpath(real_root / name))
    except (OSError, ValueError):  # e.g. a NUL byte in the name
        return None, "not a usable file name"
    if real == real_root or not real.is_relative_to(real_root):
        return None, f"its path leads out of the library root {root}"
    if not real.is_file():
        return None, f"not found in {root}"
    return real, ""


def _features_candidates(name: str, index, features: list[Path]) -> list[Path]:
    """Where the features file ``name`` of ``index`` may be, in the order of the module docstring."""
    out: list[Path] = []
    recorded = backend.index_attr(index, "feature_files")
    if recorded:
        try:
            path = json.loads(recorded).get(name)
        except (json.JSONDecodeError, AttributeError):
            path = None
        if path:
            out.append(Path(path))
    for f in features:
        out.append(f / name if f.is_dir() else f)
    run = Path(str(index.run))
    try:
        trained_on = json.loads((run / "config.json").read_text(encoding="utf-8"))["train"]["features"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        trained_on = None
    if trained_on:
        folder = Path(trained_on)
        bases = [Path.cwd(), *list(run.parents)[:3]] if not folder.is_absolute() else [Path("/")]
        out += [base / folder / name for base in bases]
    out += [index.path.parent / "features" / name, index.path.parent / name]
    return out


def find_sources(index, names: list[str], features: list[Path], audio_root: Path | None) -> dict[str, Source]:
    """A Source for each features file name the index's clips came from (see the module docstring)."""
    sources = {}
    for name in names:
        src = Source(name)
        for candidate in _features_candidates(name, index, features):
            if candidate.is_file() and candidate.name == name:
                try:
                    ff = backend.open_features(candidate)
                except ClothoRetrieveError:
                    continue
                src.features = candidate
                recorded, split = str(ff.attrs.get("source", "")), str(ff.attrs.get("split", ""))
                ff.close()
                base = audio_root or (Path(recorded) if recorded else None)
                if base is not None:
                    src.root = base / split if split and (base / split).is_dir() else base
                break
        if src.features is None and audio_root is not None:  # no features: guess the split from the name
            split = Path(name).stem
            src.root = audio_root / split if (audio_root / split).is_dir() else audio_root
        sources[name] = src
    return sources


class Library:
    """An index being served: search by text, by example clip and by clip; audio files; thumbnails."""

    def __init__(
        self,
        name: str,
        path: str | os.PathLike,
        features: list[Path] | None = None,
        audio_root: Path | None = None,
        device: str = "cpu",
        encoders: dict | None = None,
        thumbnail_cache: int = 4096,
        bf16: bool = False,
        text_precision: str = "int8",
        captions_in_memory_max: int = 2**30,
        query_cache: int = 1024,
    ):
        self.name = name
        self.device = device
        self.bf16 = bf16  # the text tower in bfloat16 (serve --bf16)
        self.text_precision = text_precision  # of an ONNX text tower (serve --text-precision)
        self._encoders = encoders if encoders is not None else {}  # (model folder, part) -> Encoder
        self._encoder_lock = threading.Lock()
        self.index = backend.open_index(path)
        try:
            self.model = self.index.run  # the run folder or CLAP model that built it
            self.text_encoder = self.encoder("text")  # loaded now: text queries are the common case
            # per-clip metadata in memory: no HDF5 read per result (a random row of index.h5 costs ~0.1 ms,
            # a quarter of a query's time with the int8 text tower). The captions stay on disk when they
            # hold more than captions_in_memory_max bytes.
            self.captions = backend.read_packed_column(self.index, "captions", captions_in_memory_max)
            self.names = backend.read_column(self.index, "names")  # (N,) UTF-8 bytes
            sources = backend.read_column(self.index, "sources")
            source_names, self.source_of = np.unique(sources, return_inverse=True)  # clip i: source_of[i]
            self.source_names = [_text(v) for v in source_names]  # the features files' names
            self.durations = backend.read_column(self.index, "durations")  # (N,) seconds
            self.sources = find_sources(self.index, self.source_names, features or [], audio_root)
        except BaseException:
            self.index.close()
            raise
        self.query_cache = QueryCache(self.encode_texts, query_cache)  # repeated queries skip the tower
        self.batcher = Batcher(
            self._search_texts, name=f"text-{name}", workers=self._text_workers(),
            # OpenMP's thread count is per thread: without this each worker's FAISS search would start
            # a team of one thread per core, whose spinning cost ~17 % of a core per worker
            init=lambda: backend.faiss_threads(1),
        )
        self._thumbs: OrderedDict[int, bytes | None] = OrderedDict()
        self._thumb_cache = thumbnail_cache
        self._thumb_lock = threading.Lock()
        self._audio_lock = threading.Lock()
        self._audio_available: bool | None = None

    def _text_workers(self) -> int:
        """Threads answering text queries: one per core (at most 8) for an ONNX tower, each on one core
        (onnxruntime and FAISS single-threaded; clotho_retrieve/serve/__init__.py), so one batch is
        encoded while another is searched; one for torch, whose tokenizer is not safe to share."""
        if getattr(self.text_encoder, "meta", None) is None:
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(8, cores or 1))

    # ------------------------------------------------------------------------------------------
    def encoder(self, part: str):
        """The run's ``part`` tower, loaded once (shared by libraries of the same run)."""
        bf16 = self.bf16 and part == "text"
        precision = self.text_precision if part == "text" else None
        key = (self.index.fingerprint.sha256, part, self.device, bf16, precision)
        with self._encoder_lock:
            if key not in self._encoders:
                self._encoders[key] = backend.load_encoder(self.index, part, self.device, bf16, precision)
            return self._encoders[key]

    @property
    def count(self) -> int:
        return self.index.count

    @property
    def audio_available(self) -> bool:
        """Whether clips' audio is found (checked on the first clips of the index, once)."""
        if self._audio_available is None:
            clips = [self.clip(row) for row in range(min(self.count, 20))]
            self._audio_available = any(
                src is not None and src.root is not None and locate(src.root, name)[0] is not None
                for name, src in clips
            )
        return self._audio_available

    def describe(self) -> dict:
        return {
            "name": self.name,
            "clips": self.count,
            "index_type": self.index.index_type,
            "embed_dim": self.index.embed_dim,
            "audio": self.audio_available,
            "thumbnails": any(s.features is not None for s in self.sources.values()),
            "model": str(self.model),
            "text_tower": self.text_tower_kind(),
            "text_queries": self.batcher.items,
            "text_batches": self.batcher.batches,
            "query_cache": self.query_cache.stats(),
        }

    def text_tower_kind(self) -> str:
        """What encodes text queries: "onnx int8", "onnx fp32", "torch" or "torch bf16"."""
        meta = getattr(self.text_encoder, "meta", None)
        if isinstance(meta, dict):
            return f"onnx {meta.get('precision', 'fp32')}"
        return "torch bf16" if self.bf16 else "torch"

    # ------------------------------------------------------------------------------------------
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (B, D) unit-norm float32 query vectors (re-normalised in float32 after bfloat16)."""
        vectors = self.text_encoder.encode_text(texts)
        if self.bf16:
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    def _search_texts(self, items: list[tuple[str, int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A batch of (text, k) -> per text (scores, rows), yielded in order: one encoder pass for the
        batch; then with FAISS one search per text, so each answer goes out as soon as it is found (FAISS
        searches the queries of a batch one after the other anyway), with exact search one matrix
        product for the batch (the vectors are read once)."""
        vectors = self.query_cache([t for t, _ in items])  # (B, D)
        if self.index.ann is not None:
            for i, (_, k) in enumerate(items):
                scores, rows = self.index.search(vectors[i : i + 1], k)  # (1, k) each
                yield scores[0], rows[0]
            return
        scores, rows = self.index.search(vectors, max(k for _, k in items))  # (B, k) each
        for i, (_, k) in enumerate(items):
            yield scores[i, :k], rows[i, :k]

    def search_text(self, text: str, k: int):
        """A concurrent.futures.Future of (scores, rows) for one text (batched with concurrent ones)."""
        return self.batcher.submit((text, k))

    def search_clip(self, path: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Audio-to-audio: the top-k clips for an example recording (ClothoRetrieveError when it is not
        decodable audio; the message does not name the temporary file)."""
        try:
            mel = backend.clip_log_mel(path, self.index.front_end)  # (T, M)
        except ClothoRetrieveError as exc:
            raise ClothoRetrieveError(str(exc).replace(str(path), "uploaded clip")) from None
        encoder = self.encoder("audio")
        with self._audio_lock:  # one audio forward pass at a time per library bounds memory
            vector = encoder.encode_audio([mel])  # (1, D)
        scores, rows = self.index.search(vector, k)
        return scores[0], rows[0]

    def similar(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """"More like this": the clips nearest to clip ``row``'s stored embedding, itself left out."""
        scores, rows = self.index.search(backend.row_vector(self.index, row), k + 1)
        keep = rows[0] != row
        return scores[0][keep][:k], rows[0][keep][:k]

    # ------------------------------------------------------------------------------------------
    def hits(self, scores: np.ndarray, rows: np.ndarray, prefix: str = "") -> list[dict]:
        """JSON results for ranked rows (-1 rows, slots approximate search left empty, are dropped)."""
        keep = [(float(s), int(r)) for s, r in zip(scores, rows, strict=True) if r >= 0]
        if self.captions is not None:
            captions = [self.captions[r] for _, r in keep]
        else:
            captions = backend.column(self.index, "captions", [r for _, r in keep])
        out = []
        for j, (score, row) in enumerate(keep):
            name, src = self.clip(row)
            audio = src is not None and src.root is not None and locate(src.root, name)[0] is not None
            thumb = src is not None and src.features is not None
            out.append(
                {
                    "rank": j + 1,
                    "score": round(score, 6),
                    "id": row,
                    "file": name,
                    "duration": round(float(self.durations[row]), 3),
                    "captions": json.loads(captions[j]),
                    "audio": f"{prefix}/audio/{self.name}/{row}" if audio else None,
                    "thumbnail": f"{prefix}/api/thumbnail/{self.name}/{row}" if thumb else None,
                }
            )
        return out

    def clip(self, row: int) -> tuple[str, Source | None]:
        """Clip ``row``'s name and the Source (features file, library root) it came from."""
        return _text(self.names[row]), self.sources.get(self.source_names[self.source_of[row]])

    def audio_file(self, row: int) -> tuple[Path | None, str]:
        """The audio file of clip ``row`` inside its library root, or None and why not."""
        name, src = self.clip(row)
        if src is None or src.root is None:
            return None, f"audio of {name} unavailable: its library root is unknown (serve --audio-root)"
        path, why = locate(src.root, name)
        return path, f"audio of {name} unavailable: {why}" if path is None else ""

    def thumbnail(self, row: int) -> bytes | None:
        """PNG of clip ``row``'s cached log-Mel (None without its features), kept in a small LRU cache."""
        with self._thumb_lock:
            if row in self._thumbs:
                self._thumbs.move_to_end(row)
                return self._thumbs[row]
        name, src = self.clip(row)
        mel = src.mel(name) if src is not None else None
        data = thumbnail_png(mel) if mel is not None else None
        with self._thumb_lock:
            self._thumbs[row] = data
            while len(self._thumbs) > self._thumb_cache:
                self._thumbs.popitem(last=False)
        return data

    def close(self) -> None:
        self.batcher.close()
        for src in self.sources.values():
            if src._file is not None:
                src._file.close()
        self.index.close()


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)
