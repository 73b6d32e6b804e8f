"""Stage 1: fetch Clotho v2.1, the official PANNs checkpoints and a Hugging Face model (text or CLAP).

Everything a training node needs can be fetched here once, on a machine with internet:

* ``download_clotho`` — the three audio archives and the caption / metadata CSVs of Clotho v2.1
  (Zenodo record 4783391; the file table is datasets/clotho.py's), unpacked into
  ``ROOT/{development,validation,evaluation}/``.
* ``download_panns`` — the PANNs Cnn14 / Cnn10 / Cnn6 AudioSet checkpoints (Zenodo record 3987831)
  into a cache folder, so ``train --audio-weights cnn14`` can resolve the name offline.
* ``download_text_model`` — a Hugging Face model into the local hub cache: a text model (BERT) to train
  with, or a pretrained CLAP model (laion/clap-htsat-unfused, ...) to embed and query with offline.

Safety rules, in the order a run meets them:

1. ``download_file`` streams to ``NAME.part``, resumes it with an HTTP Range request, retries
   transient failures with exponential back-off, checks the MD5 (or size / sanity where the MD5 is
   unknown) and only then renames the file into place. A file in place is therefore always verified.
2. ``extract_7z`` (archive.py) lists the archive first and refuses absolute paths, ``..`` components and links
   before writing a byte; it checks the free disk space against the uncompressed size.
3. A split is unpacked into ``ROOT/.SPLIT.extracting/`` and renamed to ``ROOT/SPLIT/`` only once
   every ``file_name`` of its captions CSV is on disk, with a manifest inside. A failed or interrupted
   run never leaves a ``ROOT/SPLIT/`` that a later run would take as complete.
4. A complete split (manifest present, captions verified, every clip on disk) is left alone without
   a single network request, so running the command twice is safe and cheap.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import unicodedata
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit

from rich.progress import Progress, TaskID

from clotho_retrieve import __version__
from clotho_retrieve.archive import extract_7z
from clotho_retrieve.datasets import clotho
from clotho_retrieve.remote import RemoteFile
from clotho_retrieve.utils import (
    ClothoRetrieveError,
    atomic_write_text,
    disk_full,
    err_console,
    make_progress,
    md5sum,
    one_line,
    progress_or,
    require_free,
)

PANNS_RECORD_URL = "https://zenodo.org/record/3987831/files/"
MANIFEST_NAME = ".clotho_retrieve_complete.json"  # written inside ROOT/SPLIT/ once the split is complete
USER_AGENT = f"clotho-retrieve/{__version__} (+python urllib)"
CHUNK_BYTES = 1 << 20
TRANSIENT_HTTP_CODES = {408, 425, 429, 500, 502, 503, 504}


# Official PANNs AudioSet checkpoints (Zenodo record 3987831). Zenodo names them ``Cnn14_mAP=0.431.pth``
# (``%3D`` in the URL). Only Cnn14's MD5 is published; Cnn10 / Cnn6 get a size and format check.
PANNS_FILES: dict[str, RemoteFile] = {
    "cnn14": RemoteFile(
        "Cnn14_mAP=0.431.pth", "541141fa2ee191a88f24a3219fff024e", 327_428_481, PANNS_RECORD_URL
    ),
    "cnn10": RemoteFile("Cnn10_mAP=0.380.pth", None, None, PANNS_RECORD_URL),
    "cnn6": RemoteFile("Cnn6_mAP=0.343.pth", None, None, PANNS_RECORD_URL),
}


# ----------------------------------------------------------------------------------------------
# download_file: .part, Range resume, retries with back-off, MD5, rename into place
# ----------------------------------------------------------------------------------------------
class _ShortRead(Exception):
    """The server closed the connection before sending Content-Length bytes (http.client says nothing)."""


def _check_existing(dest: Path, md5: str | None, size: int | None) -> bool:
    """True when ``dest`` is already in place and verified; raise when it is there but wrong."""
    if not dest.is_file():
        return False
    if size is not None and dest.stat().st_size != size:
        raise ClothoRetrieveError(
            f"{dest}: is {dest.stat().st_size} bytes, expected {size}; delete it (or move it away) and re-run"
        )
    if md5 is not None and (got := md5sum(dest)) != md5:
        raise ClothoRetrieveError(
            f"{dest}: MD5 is {got}, expected {md5}; delete it (or move it away) and re-run to fetch it again"
        )
    return True


def download_file(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    size: int | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    verify: Callable[[Path], None] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fetch ``url`` into ``dest`` unless a verified copy is already there; return ``dest``.

    Bytes stream into ``dest.part``. A ``.part`` left by a dropped connection or an earlier run is
    resumed with ``Range: bytes=N-`` (a server that ignores Range sends the whole file and we start
    over). Connection errors, timeouts, short reads and HTTP 408/429/5xx are retried up to ``retries``
    times in a row, sleeping ``backoff * 2**k`` seconds; an attempt that received bytes resets the count.
    The finished ``.part`` must match ``size`` and ``md5`` (and pass ``verify``, which raises
    ClothoRetrieveError) before it is renamed to ``dest``; a mismatch deletes it, after one fresh
    re-download when the bad file came from a resumed ``.part``.
    """
    dest = Path(dest)
    if _check_existing(dest, md5, size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    host = urlsplit(url).netloc or url
    may_restart = True  # one fresh download allowed when a resumed .part turns out wrong
    with progress_or(progress) as bar:
        task = bar.add_task(dest.name, total=size)
        while True:
            resumed = _fetch_to_part(url, part, size, retries, backoff, timeout, bar, task, host, dest)
            problem = _verify_part(part, md5, size, verify)
            if problem is None:
                break
            part.unlink(missing_ok=True)
            if resumed and may_restart:
                may_restart = False
                err_console.print(
                    f"[yellow]{dest.name}: resumed file failed its check ({problem}); restarting"
                )
                continue
            raise ClothoRetrieveError(
                f"{dest.name}: {problem} after downloading {url}; the server sent wrong bytes: re-run, "
                f"use another --mirror, or put a verified copy at {dest} yourself"
            )
        bar.remove_task(task)
    os.replace(part, dest)
    return dest


def _verify_part(
    part: Path, md5: str | None, size: int | None, verify: Callable[[Path], None] | None
) -> str | None:
    """None when the finished ``.part`` is right, else a short description of what is wrong."""
    got_size = part.stat().st_size
    size_ok = size is None or got_size == size
    if md5 is not None:
        got = md5sum(part)  # also when the size is wrong already: the message names both
        if got != md5 or not size_ok:
            expected_size = "" if size is None else f", expected {size:,}"
            return f"checksum mismatch (MD5 {got}, expected {md5}; {got_size:,} bytes{expected_size})"
    elif not size_ok:
        return f"size mismatch ({got_size:,} bytes, expected {size:,}; no published MD5)"
    if verify is not None:
        try:
            verify(part)
        except ClothoRetrieveError as exc:
            return str(exc)
    return None


def _fetch_to_part(
    url: str,
    part: Path,
    size: int | None,
    retries: int,
    backoff: float,
    timeout: float,
    bar: Progress,
    task: TaskID,
    host: str,
    dest: Path,
) -> bool:
    """Bring ``part`` to the end of the remote file, resuming and retrying; True if it resumed a .part."""
    resumed = False
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset > size:  # not the file we expect: start over
            part.unlink()
            offset = 0
        if size is not None and offset == size:
            return resumed or offset > 0
        resumed = resumed or offset > 0
        bar.update(task, completed=offset)
        received = 0
        try:
            received = _fetch_once(url, part, offset, size, timeout, bar, task, dest)
            return resumed
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset > 0:  # resume past the end: complete already, or a foreign .part
                if (exc.headers.get("Content-Range") or "").endswith(f"/{offset}"):
                    return True  # "bytes */N" with N == our length: the .part is the whole file
                part.unlink()
                error = f"HTTP 416 for a resume at byte {offset}"
            elif exc.code in TRANSIENT_HTTP_CODES:
                error = f"HTTP {exc.code} {exc.reason}"
            else:
                raise ClothoRetrieveError(
                    f"{dest.name}: {url} answered HTTP {exc.code} {exc.reason}; check the URL, use --mirror, "
                    f"or put the file at {dest} yourself"
                ) from None
        except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError, _ShortRead) as exc:
            received = getattr(exc, "received", received)
            error = one_line(exc)
        except OSError as exc:  # a local write problem, not a network one: retrying would not help
            if exc.errno == errno.ENOSPC:
                raise disk_full(part, f"downloading {dest.name}") from None
            raise ClothoRetrieveError(
                f"{part}: cannot write ({exc.strerror}); check the folder and re-run"
            ) from None
        failures = 0 if received > 0 else failures + 1
        if failures > retries:
            raise ClothoRetrieveError(
                f"{dest.name}: could not download from {host} after {failures} tries ({error}); check the "
                f"connection, use --mirror URL, or put the file at {dest} yourself (a .part file resumes)"
            )
        if failures:
            delay = backoff * 2 ** (failures - 1)
            err_console.print(f"[yellow]{dest.name}: {error}; retry {failures}/{retries} in {delay:.0f} s")
            time.sleep(delay)


def _fetch_once(
    url: str,
    part: Path,
    offset: int,
    size: int | None,
    timeout: float,
    bar: Progress,
    task: TaskID,
    dest: Path,
) -> int:
    """One HTTP request appending to ``part`` from ``offset``; return the bytes received.

    Raises _ShortRead (carrying ``received``) when the body ends before its Content-Length.
    """
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if offset and response.status != 206:  # the server ignored Range: it sends the whole file
            offset = 0
            bar.update(task, completed=0)
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        if expected is not None:
            bar.update(task, total=offset + expected)
            require_free(part.parent, expected, f"downloading {dest.name}")
        elif size is not None:
            require_free(part.parent, size - offset, f"downloading {dest.name}")
        received = 0
        with open(part, "ab" if offset else "wb") as fh:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    fh.write(chunk)
                    received += len(chunk)
                    bar.advance(task, len(chunk))
            except (HTTPException, ConnectionError, TimeoutError) as exc:
                exc.received = received
                raise
        if expected is not None and received < expected:
            short = _ShortRead(f"connection closed after {received} of {expected} bytes")
            short.received = received
            raise short
        return received


# ----------------------------------------------------------------------------------------------
# Clotho: fetch, verify and unpack the record's files into a Clotho root
# ----------------------------------------------------------------------------------------------
def missing_clips(folder: Path, names: Sequence[str]) -> list[str]:
    """Names from ``names`` with no file in ``folder`` (compared in Unicode NFC, as file systems differ)."""
    if not folder.is_dir():
        return list(names)
    present = {unicodedata.normalize("NFC", p.name) for p in folder.iterdir() if p.is_file()}
    return [n for n in names if unicodedata.normalize("NFC", n) not in present]


@dataclass
class SplitReport:
    """What ``download_clotho`` found or did for one split."""

    split: str
    clips: int
    status: str  # "in place" | "downloaded" | "extracted"
    folder: Path


@dataclass
class DownloadReport:
    root: Path
    splits: list[SplitReport] = field(default_factory=list)


def _resolve_splits(splits: str | Sequence[str]) -> list[str]:
    items = [splits] if isinstance(splits, str) else list(splits)
    out: list[str] = []
    for s in items:
        for name in clotho.SPLITS if s == "all" else [s]:
            if name not in clotho.SPLITS:
                choices = ", ".join(clotho.SPLITS)
                raise ClothoRetrieveError(f"unknown split {s!r}; choose one of {choices} or all")
            if name not in out:
                out.append(name)
    return out


def _entry(table: dict[str, RemoteFile], name: str) -> RemoteFile:
    if name not in table:
        raise ClothoRetrieveError(f"{name}: not in the checksum table; nothing known to download")
    return table[name]


def _write_manifest(folder: Path, split: str, clips: int, files: dict[str, str | None]) -> None:
    manifest = {"split": split, "clips": clips, "md5": files, "clotho_retrieve": __version__}
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def download_clotho(
    root: str | os.PathLike,
    splits: str | Sequence[str] = "all",
    mirror: str | None = None,
    keep_archives: bool = False,
    table: dict[str, RemoteFile] | None = None,
    retries: int = 5,
    backoff: float = 1.0,
) -> DownloadReport:
    """Make ``root`` a complete, verified Clotho v2.1 tree for ``splits``; return what was done.

    Layout: ``ROOT/clotho_{captions,metadata}_SPLIT.csv`` and ``ROOT/SPLIT/*.wav`` (flat, as in the
    archives), plus ``ROOT/SPLIT/.clotho_retrieve_complete.json``. ``table`` replaces ``clotho.CLOTHO_FILES``
    (tests inject their own checksums); ``mirror`` replaces Zenodo's base URL.
    """
    root = Path(root)
    table = clotho.CLOTHO_FILES if table is None else table
    report = DownloadReport(root=root)
    with make_progress() as bar:
        fetch = dict(mirror=mirror, retries=retries, backoff=backoff, progress=bar)
        for split in _resolve_splits(splits):
            captions = _fetch_entry(_entry(table, clotho.captions_name(split)), root, **fetch)
            metadata = _fetch_entry(_entry(table, clotho.metadata_name(split)), root, **fetch)
            names = clotho.clip_names(captions)
            md5s = {captions.name: table[captions.name].md5, metadata.name: table[metadata.name].md5}
            folder = root / split
            if folder.exists():
                missing = missing_clips(folder, names)
                if missing:
                    raise ClothoRetrieveError(
                        f"{folder}: exists but lacks {len(missing)} of {len(names)} clips listed in "
                        f"{captions.name} (e.g. {missing[0]!r}); move it away (or delete it) and re-run"
                    )
                if not (folder / MANIFEST_NAME).exists():  # put there by hand: adopt it
                    _write_manifest(folder, split, len(names), md5s)
                report.splits.append(SplitReport(split, len(names), "in place", folder))
                continue
            entry = _entry(table, clotho.audio_archive_name(split))
            had_archive = (root / entry.name).is_file()
            archive = _fetch_entry(entry, root, **fetch)
            _extract_split(archive, root, split, names, {**md5s, entry.name: entry.md5}, bar)
            if not keep_archives:
                archive.unlink()
            status = "extracted" if had_archive else "downloaded"
            report.splits.append(SplitReport(split, len(names), status, folder))
    return report


def _fetch_entry(entry: RemoteFile, folder: Path, mirror, retries, backoff, progress) -> Path:
    return download_file(
        entry.url(mirror), folder / entry.name, md5=entry.md5, size=entry.size,
        retries=retries, backoff=backoff, progress=progress,
    )  # fmt: skip


def _extract_split(
    archive: Path, root: Path, split: str, names: list[str], md5s: dict, bar: Progress
) -> None:
    """Unpack ``archive`` next to ``ROOT/SPLIT`` and rename it into place once every clip is there."""
    staging = root / f".{split}.extracting"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run: extraction restarts
    try:
        extract_7z(archive, staging, progress=bar)
        entries = list(staging.iterdir())
        # Clotho's archives hold one top-level folder named after the split; accept a flat archive too.
        inner = (
            staging / split
            if [e.name for e in entries] == [split] and (staging / split).is_dir()
            else staging
        )
        missing = missing_clips(inner, names)
        if missing:
            csv_name = clotho.captions_name(split)
            raise ClothoRetrieveError(
                f"{archive}: lacks {len(missing)} of {len(names)} clips listed in {csv_name} "
                f"(e.g. {missing[0]!r}); the archive does not match the captions: delete it and re-run"
            )
        _write_manifest(inner, split, len(names), md5s)
        os.replace(inner, root / split)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# PANNs checkpoints and the text model
# ----------------------------------------------------------------------------------------------
def panns_cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$CLOTHO_RETRIEVE_CACHE``, else ``~/.cache/clotho-retrieve/panns``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("CLOTHO_RETRIEVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clotho-retrieve" / "panns"


def _panns_entry(name: str) -> RemoteFile:
    key = name.lower()
    if key not in PANNS_FILES:
        raise ClothoRetrieveError(
            f"unknown PANNs checkpoint {name!r}; choose one of {', '.join(PANNS_FILES)}"
        )
    return PANNS_FILES[key]


def panns_checkpoint_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Where ``download_panns(name)`` puts (or put) the official checkpoint; the file may not exist yet."""
    return panns_cache_dir(cache) / _panns_entry(name).name


def check_torch_checkpoint(path: Path) -> None:
    """Sanity check for a checkpoint without a published MD5: plausible size and a PyTorch file format.

    ``torch.save`` writes a zip archive (checked in full, CRCs included) or, before PyTorch 1.6, a
    pickle stream (first byte 0x80). A proxy's HTML error page or a truncated zip fails here.
    """
    if path.stat().st_size < (1 << 20):
        raise ClothoRetrieveError(
            f"{path.name}: only {path.stat().st_size} bytes, too small for a checkpoint"
        )
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise ClothoRetrieveError(f"{path.name}: damaged zip member {bad!r}")
        return
    with open(path, "rb") as fh:
        if fh.read(1) != b"\x80":
            raise ClothoRetrieveError(f"{path.name}: not a PyTorch checkpoint (neither zip nor pickle)")


def download_panns(
    name: str,
    cache: str | os.PathLike | None = None,
    mirror: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
) -> Path:
    """Fetch the official PANNs ``name`` (cnn14 | cnn10 | cnn6) checkpoint into the cache; return its path."""
    entry = _panns_entry(name)
    dest = panns_checkpoint_path(name, cache)
    if entry.md5 is None:
        err_console.print(f"[yellow]{entry.name}: no published MD5; checking its size and format only")
    return download_file(
        entry.url(mirror), dest, md5=entry.md5, size=entry.size, retries=retries, backoff=backoff,
        verify=None if entry.md5 else check_torch_checkpoint,
    )  # fmt: skip


# Weights in formats the PyTorch pipeline never reads; skipping them saves gigabytes per model.
_TEXT_MODEL_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "onnx/*", "openvino/*", "coreml/*"]


def download_text_model(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Pre-fetch the Hugging Face model ``name`` (config, tokenizer, feature extractor, PyTorch weights)
    into the hub cache: a text model, or a CLAP checkpoint.

    Later ``from_pretrained(name)`` calls then work with ``HF_HUB_OFFLINE=1``. When the repository has
    safetensors weights the duplicate ``*.bin`` files are skipped. A local folder needs no download.
    """
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    from huggingface_hub import HfApi, snapshot_download

    ignore = list(_TEXT_MODEL_IGNORE)
    with contextlib.suppress(Exception):  # listing is an optimisation; snapshot_download reports real errors
        if any(f.endswith(".safetensors") for f in HfApi().list_repo_files(name)):
            ignore.append("*.bin")
    try:
        return Path(snapshot_download(name, cache_dir=cache_dir, ignore_patterns=ignore))
    except (OSError, ValueError) as exc:
        raise ClothoRetrieveError(
            f"model {name!r}: could not fetch it ({one_line(exc)}); check the name and "
            "the connection (HF_HUB_OFFLINE must be unset), or pass a local folder"
        ) from None
