"""Clotho v2.1: the one place that knows the dataset.

* its splits (``SPLITS``) and the files of its Zenodo record 4783391, with MD5s and sizes
  (``CLOTHO_FILES``; named by ``audio_archive_name``, ``captions_name``, ``metadata_name``);
* its caption CSVs: ``file_name`` then ``caption_1`` .. ``caption_5`` (UTF-8, optional BOM);
* its layout on disk, as ``download`` and ``demo-data`` make it::

      ROOT/clotho_captions_{split}.csv, ROOT/clotho_metadata_{split}.csv, ROOT/{split}/*.wav

  and the feature jobs of such a root (``clotho_jobs``: one output file per split, the clips in CSV
  order with their captions, and every mismatch between CSV and folder reported as a skipped file).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from clotho_retrieve.audio import AUDIO_SUFFIXES, audio_files
from clotho_retrieve.feature_file import features_path
from clotho_retrieve.features import Job
from clotho_retrieve.remote import RemoteFile
from clotho_retrieve.utils import ClothoRetrieveError

SPLITS = ("development", "validation", "evaluation")
CLOTHO_RECORD_URL = "https://zenodo.org/record/4783391/files/"

# Clotho v2.1 (Zenodo record 4783391): every file of the record, keyed by file name.
CLOTHO_FILES: dict[str, RemoteFile] = {
    name: RemoteFile(name, md5, size, CLOTHO_RECORD_URL)
    for name, md5, size in [
        ("clotho_audio_development.7z", "c8b05bc7acdb13895bb3c6a29608667e", 4_541_582_263),
        ("clotho_audio_validation.7z", "7dba730be08bada48bd15dc4e668df59", 1_260_701_425),
        ("clotho_audio_evaluation.7z", "4569624ccadf96223f19cb59fe4f849f", None),
        ("clotho_captions_development.csv", "d4090b39ce9f2491908eebf4d5b09bae", 1_336_762),
        ("clotho_captions_validation.csv", "5879e023032b22a2c930aaa0528bead4", 367_649),
        ("clotho_captions_evaluation.csv", "1b16b9e57cf7bdb7f13a13802aeb57e2", None),
        ("clotho_metadata_development.csv", "170d20935ecfdf161ce1bb154118cda5", 830_797),
        ("clotho_metadata_validation.csv", "2e010427c56b1ce6008b0f03f41048ce", 224_803),
        ("clotho_metadata_evaluation.csv", "13946f054d4e1bf48079813aac61bf77", None),
    ]
}


def audio_archive_name(split: str) -> str:
    return f"clotho_audio_{split}.7z"


def captions_name(split: str) -> str:
    return f"clotho_captions_{split}.csv"


def metadata_name(split: str) -> str:
    return f"clotho_metadata_{split}.csv"


# ----------------------------------------------------------------------------------------------
# Caption CSVs
# ----------------------------------------------------------------------------------------------
def clip_names(captions_csv: str | os.PathLike) -> list[str]:
    """The ``file_name`` column of a Clotho captions CSV (UTF-8)."""
    path = Path(captions_csv)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "file_name" not in reader.fieldnames:
                raise ClothoRetrieveError(f"{path}: no 'file_name' column; is this a Clotho captions CSV?")
            names = [row["file_name"] for row in reader if row.get("file_name")]
    except UnicodeDecodeError as exc:
        raise ClothoRetrieveError(
            f"{path}: not UTF-8 ({exc.reason}); is this a Clotho captions CSV?"
        ) from None
    if not names:
        raise ClothoRetrieveError(f"{path}: lists no clips; delete it and re-run")
    return names


CAPTION_COLUMNS = tuple(f"caption_{k}" for k in range(1, 6))  # Clotho: five captions per clip


def _read_captions(csv_path: Path, allow_missing: bool = False) -> list[tuple[str, list[str]]]:
    """(file_name, non-empty captions in column order) per row of a captions CSV.

    Nothing is dropped silently: a row with more values than the header has columns is refused, and so
    is a header without some of caption_1 .. caption_5 (with ``allow_missing``: a warning naming them).
    """
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "file_name" not in reader.fieldnames:
                raise ClothoRetrieveError(f"{csv_path}: no 'file_name' column; not a Clotho captions CSV")
            cols = sorted((c for c in reader.fieldnames if c.startswith("caption")), key=_caption_index)
            rows = []
            for row in reader:
                if row.get(None):  # values beyond the header's columns (csv.DictReader's restkey)
                    raise ClothoRetrieveError(
                        f"{csv_path}: line {reader.line_num} has {len(reader.fieldnames) + len(row[None])} "
                        f"values but the header names {len(reader.fieldnames)} columns "
                        f"({', '.join(reader.fieldnames)}); complete the header"
                    )
                caps = [(row[c] or "").strip() for c in cols]
                rows.append((row["file_name"], [c for c in caps if c]))
            _check_caption_columns(csv_path, reader.fieldnames, allow_missing)
            return rows
    except (UnicodeDecodeError, OSError, csv.Error) as exc:
        raise ClothoRetrieveError(f"{csv_path}: unreadable captions CSV ({exc})") from None


def _check_caption_columns(csv_path: Path, header: list[str], allow_missing: bool) -> None:
    """Refuse (or with ``allow_missing`` warn about) a header without some of caption_1 .. caption_5."""
    from rich.markup import escape

    from clotho_retrieve.utils import err_console

    missing = [c for c in CAPTION_COLUMNS if c not in header]
    if not missing:
        return
    what = f"{csv_path}: no column {', '.join(missing)} (Clotho has file_name, caption_1 .. caption_5)"
    if not allow_missing:
        raise ClothoRetrieveError(f"{what}; fix the header, or pass --allow-missing-captions to use the rest")
    err_console.print(f"[yellow]warning:[/] {escape(what)}; using the captions of the other columns",
                      highlight=False, soft_wrap=True)


def _caption_index(col: str) -> int:
    digits = re.sub(r"\D", "", col)
    return int(digits) if digits else 0


# ----------------------------------------------------------------------------------------------
# Feature jobs
# ----------------------------------------------------------------------------------------------
def clotho_jobs(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    splits: list[str] | None = None,
    allow_missing_captions: bool = False,
) -> list[Job]:
    """One job per split of a Clotho-layout root (split folders + clotho_captions_{split}.csv).

    ``allow_missing_captions``: a captions CSV without some of caption_1 .. caption_5 is used (with a
    warning naming them) instead of refused."""
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise ClothoRetrieveError(f"{root}: not a folder; pass the Clotho root (with development/ ...)")
    found = [s for s in SPLITS if (root / s).is_dir() or (root / captions_name(s)).is_file()]
    for s in splits or []:
        if s not in SPLITS:
            raise ClothoRetrieveError(f"unknown --split {s!r}; choose from {', '.join(SPLITS)}")
        if s not in found:
            raise ClothoRetrieveError(f"{root / s}: split not found (no folder and no captions CSV)")
    if not found:
        raise ClothoRetrieveError(
            f"{root}: no Clotho split found (expected development/, validation/ or evaluation/ with "
            "clotho_captions_<split>.csv); run `clotho-retrieve download` or `demo-data`"
        )
    return [_split_job(root, split, features_path(out_dir, split), allow_missing_captions)
            for split in splits or found]


def _split_job(root: Path, split: str, out: Path, allow_missing_captions: bool = False) -> Job:
    """The clips of one split in CSV order; CSV rows without a file and files without a row are skipped."""
    folder, csv_path = root / split, root / captions_name(split)
    names, paths, captions, skipped = [], [], [], []
    if csv_path.is_file():
        on_disk = {p.name: p for p in (folder.iterdir() if folder.is_dir() else []) if p.is_file()}
        seen = set()
        for name, caps in _read_captions(csv_path, allow_missing_captions):
            if name in seen:
                skipped.append((name, f"duplicated file name in {csv_path.name}"))
            elif name not in on_disk:
                skipped.append((name, f"listed in {csv_path.name} but missing from {split}/"))
            else:
                names.append(name)
                paths.append(on_disk[name])
                captions.append(caps)
            seen.add(name)
        for name in sorted(set(on_disk) - seen):
            if Path(name).suffix.lower() in AUDIO_SUFFIXES:
                skipped.append((name, f"no caption row in {csv_path.name}"))
    else:  # a split without captions: every audio file of its folder
        for p in audio_files(folder):
            names.append(p.relative_to(folder).as_posix())
            paths.append(p)
            captions.append([])
    return Job(out, names, paths, captions, skipped, {"split": split, "source": str(root.resolve())})
