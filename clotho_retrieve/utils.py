"""Small shared pieces: the user-facing error, atomic writes of files and folders, consoles, hashing,
devices, disk space, byte-transfer progress bars."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

# Tables and results go to stdout; progress bars, logs and errors go to stderr,
# so `clotho-retrieve query ... --json > out.json` stays machine-readable.
console = Console()
err_console = Console(stderr=True)


class ClothoRetrieveError(Exception):
    """A problem the user can act on. The CLI prints its message as one line and exits non-zero.

    Messages name the file and the problem, and where possible what to do about it.
    """


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    A reader never sees a half-written file: either the old content or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder ``.NAME.tmp`` beside ``path``; on success swap it in as ``path``.

    On an exception the temporary folder is deleted and ``path`` is left as it was. A reader sees the
    old folder or the new one, never a mix; after a crash (``kill -9``) :func:`recover_dir` restores the
    newest complete one. Nested blocks are swapped in innermost first.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Swap a fully written folder ``tmp`` in as ``final`` by two renames (``final`` -> ``.NAME.old``,
    ``tmp`` -> ``final``), then drop the old one. See :func:`recover_dir` for a crash in between."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: str | os.PathLike) -> None:
    """Undo a crash inside :func:`replace_dir` / :func:`atomic_dir`: keep the newest complete folder
    (``final``, else ``.NAME.old``) and drop half-written ones."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(final.with_name(f".{final.name}.tmp"), ignore_errors=True)


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else is passed through."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ----------------------------------------------------------------------------------------------
# Disk space and byte-transfer progress (downloads and archive extraction)
# ----------------------------------------------------------------------------------------------
DISK_MARGIN_BYTES = 64 << 20  # keep this much free beyond what a download / extraction needs


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system holding ``folder`` (its nearest existing ancestor)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def require_free(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes under ``folder`` when they would not fit."""
    free = free_bytes(folder)
    if needed + DISK_MARGIN_BYTES > free:
        raise ClothoRetrieveError(
            f"{what}: needs {_gib(needed)} but only {_gib(free)} is free on the disk holding {folder}; "
            "free some space (or choose another --root) and re-run"
        )


def disk_full(path: Path, what: str) -> ClothoRetrieveError:
    """The error for ENOSPC while ``what`` (a download or an extraction) wrote under ``path``."""
    return ClothoRetrieveError(f"{path}: the disk is full while {what}; free some space and re-run to resume")


def one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (library messages may span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def make_progress() -> Progress:
    """A Rich progress bar for byte transfers (bytes, speed, ETA) on stderr."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )


@contextlib.contextmanager
def progress_or(progress: Progress | None) -> Iterator[Progress]:
    """Use the caller's progress display (a rich Progress), or open (and close) one of our own."""
    if progress is not None:
        yield progress
        return
    with make_progress() as own:
        yield own
