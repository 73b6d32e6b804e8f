"""A folder of audio files (recursively) as one feature job, without captions."""

from __future__ import annotations

import os
from pathlib import Path

from clotho_retrieve.audio import audio_files
from clotho_retrieve.features import Job
from clotho_retrieve.utils import ClothoRetrieveError


def audio_dir_job(audio_dir: str | os.PathLike, out: str | os.PathLike) -> Job:
    """One job for every audio file under a folder (recursively); names are relative paths."""
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise ClothoRetrieveError(f"{audio_dir}: not a folder")
    paths = audio_files(audio_dir)
    if not paths:
        raise ClothoRetrieveError(
            f"{audio_dir}: no audio files in it (WAV, FLAC, OGG, MP3; searched recursively); nothing written"
        )
    names = [p.relative_to(audio_dir).as_posix() for p in paths]
    attrs = {"split": "", "source": str(audio_dir.resolve())}
    return Job(Path(out), names, paths, [[] for _ in names], [], attrs)
