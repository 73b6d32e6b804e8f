"""An INDEX folder's health: busy, damaged or incomplete, told apart and said in one line.

* busy: another process is writing it (``embed``'s lock, clotho_retrieve.safety) or holds index.h5 open
  (HDF5 locks an open file: a writer excludes readers and the other way round);
* damaged: index.h5 cannot be opened or its committed rows cannot be read (e.g. a crash of the disk
  under HDF5); ``embed`` rebuilds it, keeping the damaged file as ``.index.h5.damaged``;
* incomplete: an ``embed`` stopped before all its clips were written (``complete`` attribute false);
  queries work on what is there, with a warning that says how to finish it.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from clotho_retrieve.safety import h5_growth, lock_holder
from clotho_retrieve.utils import ClothoRetrieveError, one_line

CLIP_COLUMNS = ("audio", "names", "sources", "captions", "durations", "clip_fingerprints")  # one row a clip
CAPTION_COLUMNS = ("caption_embeddings", "caption_clip", "caption_text")  # one row a caption


def is_locked(exc: BaseException) -> bool:
    """HDF5 could not open the file because another process holds it open (its file lock)."""
    locked = getattr(exc, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK)
    return locked or "unable to lock file" in str(exc)


def busy(index_dir: Path) -> ClothoRetrieveError:
    """The error for an index another process has open."""
    pid = lock_holder(index_dir)
    if pid and pid != os.getpid():
        return ClothoRetrieveError(
            f"{index_dir} is being written by process {pid if pid > 0 else '?'}; wait for it to finish"
        )
    return ClothoRetrieveError(
        f"{index_dir / 'index.h5'} is open in another process (a query or a server?); close it and re-run"
    )


def check_readable(h5, count: int) -> None:
    """Read the first and last committed row of every column: a damaged file fails here, not mid-query."""
    for name in CLIP_COLUMNS + CAPTION_COLUMNS:
        if name not in h5:
            continue
        n = count if name in CLIP_COLUMNS else h5[name].shape[0]
        if h5[name].shape[0] < n:
            raise ValueError(f"{name} has {h5[name].shape[0]} rows, expected {n}")
        for row in {0, n - 1} if n else ():
            h5[name][row]


def damaged(h5_path: Path, exc: BaseException) -> ClothoRetrieveError:
    return ClothoRetrieveError(
        f"{h5_path}: not a readable index ({one_line(exc)[:160]}); re-run `clotho-retrieve embed` with "
        "the same --out to rebuild it"
    )


def open_failed(exc: BaseException, index_dir: Path) -> ClothoRetrieveError:
    """The error for an index.h5 that could not be opened or read: busy, or not readable."""
    return busy(index_dir) if is_locked(exc) else damaged(index_dir / "index.h5", exc)


def set_aside(exc: BaseException, h5_path: Path) -> Path:
    """A writer could not open or read ``h5_path``: raise why when it is busy or not an index of `embed`
    (no embed.json beside it); else move the damaged file aside (``.index.h5.damaged``, replacing an
    older one), say so, and return where it went: the writer then builds a new one."""
    from rich.markup import escape

    from clotho_retrieve.utils import err_console

    if is_locked(exc):
        raise busy(h5_path.parent)
    if not (h5_path.parent / "embed.json").is_file():
        raise ClothoRetrieveError(
            f"{h5_path}: not an index `embed` can extend ({type(exc).__name__}); choose another --out"
        )
    aside = h5_path.with_name(f".{h5_path.name}.damaged")
    os.replace(h5_path, aside)
    message = f"{h5_path} is damaged ({one_line(exc)[:120]}); rebuilding it (the damaged file: {aside.name})"
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return aside


def growth(h5, n_clips: int, n_captions: int = 0, payload: int = 0) -> int:
    """Bytes index.h5 grows by when ``n_clips`` clips and ``n_captions`` captions are appended, with
    ``payload`` bytes of text (names, sources, captions) in all."""
    total = sum(h5_growth(h5[name], n_clips) for name in CLIP_COLUMNS if name in h5)
    total += sum(h5_growth(h5[name], n_captions) for name in CAPTION_COLUMNS if name in h5)
    return total + h5_growth(h5["names"], 0, payload + 1) + (64 << 10)  # + object headers, B-tree nodes


def incomplete_warning(index_dir: Path, attrs, count: int) -> str | None:
    """A warning for an index an `embed` has not finished (None when it is complete)."""
    if bool(attrs.get("complete", True)):
        return None
    target = int(attrs.get("target_count", count))
    pid = lock_holder(index_dir)
    so_far = f"{count:,} of {target:,} clips embedded"
    if pid:
        return f"{index_dir} is being written by process {pid} ({so_far} so far); results may be incomplete"
    command = str(attrs.get("resume_command", "")) or f"clotho-retrieve embed ... --out {index_dir}"
    return f"{index_dir} is incomplete ({so_far}: an embed stopped early); finish it with: {command}"


def text_bytes(*columns) -> int:
    """UTF-8 bytes of text columns (lists of str, or of lists of str as stored: JSON)."""
    return sum(len(v.encode()) if isinstance(v, str) else len(json.dumps(v)) for col in columns for v in col)
