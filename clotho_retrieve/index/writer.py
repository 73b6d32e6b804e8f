"""Append side of an INDEX folder (`clotho-retrieve embed`): :class:`IndexWriter`.

The layout it writes is documented in store.py (the read side); rows are committed a chunk at a time
(``count`` raised after each flushed chunk), the space of each write reserved first.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import h5py
import numpy as np

from clotho_retrieve.encoder import RunFingerprint
from clotho_retrieve.index import integrity
from clotho_retrieve.index.integrity import CAPTION_COLUMNS, CLIP_COLUMNS
from clotho_retrieve.index.search import chunk_ranges
from clotho_retrieve.index.store import _FP, _STR, FORMAT_VERSION, INDEX_FILE, UNCACHED
from clotho_retrieve.safety import (
    check_space,
    close_h5,
    h5_new_file,
    is_write_error,
    release_space,
    reserve_space,
    write_failed,
)
from clotho_retrieve.utils import ClothoRetrieveError, atomic_path

# ----------------------------------------------------------------------------------------------
# Writing an index (`clotho-retrieve embed`)
# ----------------------------------------------------------------------------------------------
FINISH = "re-run the same `embed` to finish: the clips written so far are kept"


class IndexWriter:
    """Append side of INDEX/index.h5: creates it, checks it belongs to the run, commits rows chunk-wise.

    Every write reserves its space first and a failed one closes the file with care (:meth:`_writing`);
    a damaged index.h5 of an earlier `embed` is moved aside and rebuilt."""

    def __init__(
        self,
        out: Path,
        fingerprint: RunFingerprint,
        run: str,
        which: str,
        embed_dim: int,
        front_end: dict,
        model_config: dict,
    ):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / INDEX_FILE
        where = {  # where the run is now: it may have moved or been copied (the weights are the same)
            "run": run,
            "which": which,
            "run_model_dir": fingerprint.model_dir,
            "weights_size": fingerprint.size,
            "weights_mtime_ns": fingerprint.mtime_ns,
        }
        self.h5 = None
        if self.path.exists():
            self.h5 = self._open_existing(self.path, fingerprint, embed_dim, front_end)
        if self.h5 is not None:
            with self._writing("the index settings", 0):
                self.h5.attrs.update(where)
                if "merged_from" in self.h5.attrs:  # no longer just the merge of INDEX/parts (parts.py)
                    del self.h5.attrs["merged_from"]
            return
        check_space(self.path, 64 << 10, "a new index", FINISH)
        with atomic_path(self.path) as tmp:  # the empty skeleton appears whole or not at all
            with h5py.File(tmp, "w") as h5:
                self._create(h5, embed_dim)
                h5.attrs.update(
                    {
                        "format_version": FORMAT_VERSION,
                        **where,
                        "fingerprint": fingerprint.sha256,
                        "embed_dim": embed_dim,
                        "front_end": json.dumps(front_end),
                        "model_config": json.dumps(model_config),
                        "count": 0,
                        "captions_done": 0,
                        "complete": False,  # until the first `embed` finishes (IndexWriter.finish)
                    }
                )
        self.h5 = h5py.File(self.path, "a", **UNCACHED)

    def _open_existing(
        self, path: Path, fingerprint: RunFingerprint, embed_dim: int, front_end: dict
    ) -> h5py.File | None:
        """Open an index to extend: refuse another run's, upgrade format 1, drop uncommitted rows.

        A damaged index.h5 that `embed` wrote (embed.json beside it) is moved aside: returns None."""
        h5 = None
        try:
            h5 = h5py.File(path, "a", **UNCACHED)
            a = h5.attrs
            old_sha, dim, count = str(a["fingerprint"]), int(a["embed_dim"]), int(a["count"])
            old_run, old_front_end = str(a["run"]), json.loads(a["front_end"])
            captions_done = int(a["captions_done"])
            integrity.check_readable(h5, count)
        except (OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
            close_h5(h5)
            integrity.set_aside(exc, path)  # raises unless it is a damaged index of `embed`, moved aside
            return None
        if old_sha != fingerprint.sha256:
            h5.close()
            raise ClothoRetrieveError(
                f"{path}: built by another run ({old_run}, weights {old_sha[:12]}); this run's weights "
                f"are {fingerprint.sha256[:12]}. Use a new --out"
            )
        if old_front_end != front_end or dim != embed_dim:
            h5.close()
            raise ClothoRetrieveError(f"{path}: built with another front end or dimension; use a new --out")
        self.h5 = h5
        with self._writing("the index", integrity.growth(h5, 0)):
            if "clip_fingerprints" not in h5:  # format version 1: every row's features are unknown
                h5.create_dataset(
                    "clip_fingerprints", (count,), _FP, maxshape=(None,), chunks=(4096,), fillvalue=b""
                )
                h5.attrs["format_version"] = FORMAT_VERSION
            self._truncate(count, captions_done)
        return h5

    @contextlib.contextmanager
    def _writing(self, what: str, needed: int):
        """Reserve ``needed`` bytes at the end of index.h5, then write: on a full disk nothing is written
        and one line says what is needed; a write that fails anyway closes the file with care (HDF5
        must not write after a failed write) and becomes one line too."""
        reserve_space(self.path, needed, what, FINISH)
        try:
            yield
        except Exception as exc:
            if not is_write_error(exc):
                raise
            close_h5(self.h5)
            self.h5 = None
            raise write_failed(exc, self.path, what, needed, FINISH) from None

    def begin(self, target: int, command: str) -> None:
        """Mark the index unfinished until :meth:`finish`: a query warns and prints ``command``."""
        with self._writing("the index state", 0):
            self.h5.attrs.update({"complete": False, "target_count": target, "resume_command": command})
            self.h5.flush()

    def finish(self) -> None:
        with self._writing("the index state", 0):
            self.h5.attrs.update({"complete": True, "target_count": self.count})
            self.h5.flush()

    @staticmethod
    def _create(h5: h5py.File, d: int) -> None:
        h5.create_dataset("audio", (0, d), np.float32, maxshape=(None, d), chunks=(256, d))
        for name in ("names", "sources", "captions"):
            h5.create_dataset(name, (0,), _STR, maxshape=(None,), chunks=(4096,))
        h5.create_dataset("durations", (0,), np.float64, maxshape=(None,), chunks=(4096,))
        h5.create_dataset("clip_fingerprints", (0,), _FP, maxshape=(None,), chunks=(4096,))
        h5.create_dataset("caption_embeddings", (0, d), np.float32, maxshape=(None, d), chunks=(256, d))
        h5.create_dataset("caption_clip", (0,), np.int64, maxshape=(None,), chunks=(4096,))
        h5.create_dataset("caption_text", (0,), _STR, maxshape=(None,), chunks=(4096,))

    def _truncate(self, count: int, captions_done: int) -> None:
        """Drop rows an interrupted run wrote past the committed counters."""
        for name in CLIP_COLUMNS:
            self.h5[name].resize(count, axis=0)
        clip = self.h5["caption_clip"][:]
        m = int(np.searchsorted(clip, captions_done))  # caption rows are in clip order
        for name in CAPTION_COLUMNS:
            self.h5[name].resize(m, axis=0)

    @property
    def count(self) -> int:
        return int(self.h5.attrs["count"])

    @property
    def captions_done(self) -> int:
        return int(self.h5.attrs["captions_done"])

    @property
    def captions_wanted(self) -> bool:
        """Caption embeddings were asked for once: every later `embed` keeps them complete."""
        return bool(self.h5.attrs.get("captions_wanted", self.captions_done > 0))

    @captions_wanted.setter
    def captions_wanted(self, wanted: bool) -> None:
        self.h5.attrs["captions_wanted"] = wanted

    def names(self) -> list[str]:
        return [v.decode("utf-8") for v in self.h5["names"][: self.count]]

    def captions(self, start: int, stop: int) -> list[list[str]]:
        return [json.loads(v) for v in self.h5["captions"][start:stop]]

    def clip_fingerprints(self) -> list[bytes]:
        return list(self.h5["clip_fingerprints"][: self.count])

    @staticmethod
    def _append(ds: h5py.Dataset, values) -> None:
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n:] = values

    def add_clips(
        self,
        emb: np.ndarray,
        names: list[str],
        sources: list[str],
        durations: list[float],
        captions: list[list[str]],
        fingerprints: list[bytes] | None = None,
    ) -> None:
        """Append one chunk of clips (emb (n, D)), then commit it by raising `count`.

        Without ``fingerprints`` the rows' features count as unknown: a later `embed` re-embeds them."""
        assert self.h5["audio"].shape[0] == self.count, "uncommitted rows"
        needed = integrity.growth(self.h5, len(names), 0, integrity.text_bytes(names, sources, captions))
        with self._writing(f"{len(names)} more clips", needed):
            self._append(self.h5["audio"], emb.astype(np.float32))
            self._append(self.h5["names"], names)
            self._append(self.h5["sources"], sources)
            self._append(self.h5["durations"], np.asarray(durations, np.float64))
            self._append(self.h5["captions"], [json.dumps(c, ensure_ascii=False) for c in captions])
            self._append(self.h5["clip_fingerprints"], np.asarray(fingerprints or [b""] * len(names), _FP))
            self.h5.flush()
            self.h5.attrs["count"] = self.count + len(names)
            self.h5.flush()

    def update_clips(
        self,
        rows: np.ndarray,
        emb: np.ndarray,
        sources: list[str],
        durations: list[float],
        captions: list[list[str]],
        fingerprints: list[bytes],
    ) -> None:
        """Overwrite committed rows (increasing, emb (n, D)) in place; their fingerprints go last, so an
        interrupted update leaves them unequal to the features and the next `embed` redoes them."""
        assert np.all(np.diff(rows) > 0) and rows[-1] < self.count
        needed = integrity.growth(self.h5, 0, 0, integrity.text_bytes(sources, captions))  # new strings
        with self._writing(f"{len(rows)} changed clips", needed):
            self.h5["audio"][rows] = emb.astype(np.float32)
            self.h5["sources"][rows] = sources
            self.h5["durations"][rows] = np.asarray(durations, np.float64)
            self.h5["captions"][rows] = [json.dumps(c, ensure_ascii=False) for c in captions]
            self.h5.flush()
            self.h5["clip_fingerprints"][rows] = np.asarray(fingerprints, _FP)
            self.h5.flush()

    def forget_captions_from(self, row: int) -> None:
        """Drop the caption embeddings of clips >= row (they are re-embedded from there, in clip order)."""
        if row >= self.captions_done:
            return
        m = int(np.searchsorted(self.h5["caption_clip"][:], row))
        with self._writing("the index state", 0):
            self.h5.attrs["captions_done"] = row  # first: a crash leaves rows past it, which _truncate drops
            self.h5.flush()
            for name in CAPTION_COLUMNS:
                self.h5[name].resize(m, axis=0)
            self.h5.flush()

    def keep_rows(self, keep: np.ndarray, chunk_rows: int = 65_536) -> None:
        """Keep only the clips where ``keep`` (count,) is True (and their captions): index.h5 is rewritten
        chunk by chunk under a temporary name and renamed, so a reader sees the old or the new file."""
        count, captions_done = self.count, self.captions_done
        new_row = np.cumsum(keep) - 1  # (count,) new row of each kept clip
        attrs = dict(self.h5.attrs)
        attrs.update(count=int(keep.sum()), captions_done=int(keep[:captions_done].sum()))
        d = self.h5["audio"].shape[1]
        size = self.path.stat().st_size  # at most what the rewritten file takes
        with atomic_path(self.path) as tmp:
            with h5_new_file(tmp, size, "the index without the pruned clips", self.path, FINISH) as h5:
                self._create(h5, d)
                for a, b in chunk_ranges(count, chunk_rows):
                    k = keep[a:b]
                    for name in CLIP_COLUMNS:
                        self._append(h5[name], self.h5[name][a:b][k])
                n_caps = self.h5["caption_clip"].shape[0]
                for a, b in chunk_ranges(n_caps, chunk_rows):
                    clip = self.h5["caption_clip"][a:b]
                    k = keep[clip]
                    self._append(h5["caption_embeddings"], self.h5["caption_embeddings"][a:b][k])
                    self._append(h5["caption_text"], self.h5["caption_text"][a:b][k])
                    self._append(h5["caption_clip"], new_row[clip[k]])
                h5.attrs.update(attrs)
            self.h5.close()
        self.h5 = h5py.File(self.path, "a", **UNCACHED)

    def add_captions(self, emb: np.ndarray, clip: np.ndarray, texts: list[str], captions_done: int) -> None:
        """Append caption embeddings of clips [captions_done_before, captions_done), then commit them."""
        needed = integrity.growth(self.h5, 0, len(texts), integrity.text_bytes(texts))
        with self._writing(f"{len(texts)} more caption embeddings", needed):
            self._append(self.h5["caption_embeddings"], emb.astype(np.float32))
            self._append(self.h5["caption_clip"], clip.astype(np.int64))
            self._append(self.h5["caption_text"], texts)
            self.h5.flush()
            self.h5.attrs["captions_done"] = captions_done
            self.h5.flush()

    def close(self, failing: bool = False) -> None:
        """Close index.h5 (with care) and give back unused reserved space; ``failing``: an error is on its
        way already, so a failed close is not reported over it."""
        failed = close_h5(self.h5)
        self.h5 = None
        release_space(self.path)
        if failed is not None and not failing:
            raise write_failed(failed, self.path, "the index", None, FINISH)

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close(failing=exc[0] is not None)
