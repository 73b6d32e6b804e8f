"""Unpacking a 7z archive safely: ``extract_7z``.

Every member is listed and checked before a byte is written: absolute paths, ``..`` components, names
that resolve outside the target, links and special files are refused. The uncompressed size must fit on
the disk. On any failure (including Ctrl-C) the target folder is removed again, so a half-extracted folder
never survives.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

from py7zr.callbacks import ExtractCallback
from rich.progress import Progress, TaskID

from clotho_retrieve.utils import ClothoRetrieveError, disk_full, one_line, progress_or, require_free


def _unsafe_reason(name: str, dest: Path) -> str | None:
    """Why an archive member name would land outside ``dest`` (None when it is safe)."""
    if not name or name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "an absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "a '..' component"
    target = (dest / Path(*parts)).resolve() if parts else dest.resolve()
    if not target.is_relative_to(dest.resolve()):
        return "a path outside the target folder"
    return None


class _ExtractProgress(ExtractCallback):
    """py7zr callback (called from its reporter thread) that advances a Rich task per extracted member."""

    def __init__(self, bar: Progress, task: TaskID) -> None:
        self.bar, self.task = bar, task

    def report_start_preparation(self) -> None: ...
    def report_start(self, processing_file_path, processing_bytes) -> None: ...
    def report_update(self, decompressed_bytes) -> None: ...
    def report_warning(self, message) -> None: ...
    def report_postprocess(self) -> None: ...

    def report_end(self, processing_file_path, wrote_bytes) -> None:
        # py7zr does not join this thread before extractall returns: the task may already be gone.
        with contextlib.suppress(KeyError):
            self.bar.advance(self.task, int(wrote_bytes))


def extract_7z(archive: str | os.PathLike, dest: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Unpack the 7z ``archive`` into the new folder ``dest``; return ``dest``.

    Every member is checked before anything is written: absolute paths, ``..`` components, links and
    special files are refused. The uncompressed size must fit on the disk. On any failure ``dest`` is
    removed again, so a half-extracted folder never survives.
    """
    import py7zr

    archive, dest = Path(archive), Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ClothoRetrieveError(f"{dest}: already exists and is not empty; move it away and re-run")
    try:
        with py7zr.SevenZipFile(archive, mode="r") as sz:
            members = sz.list()
            for m in members:
                reason = _unsafe_reason(m.filename, dest)
                if reason is None and (m.is_symlink or not (m.is_file or m.is_directory)):
                    reason = "a link or special file"
                if reason is not None:
                    raise ClothoRetrieveError(
                        f"{archive}: refusing to extract member {m.filename!r} ({reason}); the archive is "
                        "not safe to unpack: delete it and download it again from a trusted source"
                    )
            total = sum(m.uncompressed or 0 for m in members if m.is_file)
            require_free(dest.parent, total, f"extracting {archive.name}")
            dest.mkdir(parents=True, exist_ok=True)
            with progress_or(progress) as bar:
                task = bar.add_task(f"extract {archive.name}", total=total)
                sz.extractall(path=dest, callback=_ExtractProgress(bar, task))
                bar.remove_task(task)
    except ClothoRetrieveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise disk_full(dest, f"extracting {archive.name}") from None
        if isinstance(exc, FileNotFoundError) and not archive.exists():
            raise ClothoRetrieveError(f"{archive}: no such archive") from None
        raise ClothoRetrieveError(
            f"{archive}: cannot extract ({one_line(exc)}); delete it and re-run"
        ) from None
    except Exception as exc:  # py7zr reports damaged data with many types (Bad7zFile, CrcError, LZMAError...)
        shutil.rmtree(dest, ignore_errors=True)
        raise ClothoRetrieveError(
            f"{archive}: corrupt or unreadable 7z archive ({one_line(exc)}); delete it and "
            "re-run to download it again, or use --mirror"
        ) from None
    except BaseException:  # Ctrl-C: no half-extracted folder either
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest
