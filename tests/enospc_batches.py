"""A disk with room for a few batch files of the `features` stage (a test helper, not a test module).

Imported by tests/slowed/sitecustomize.py when DISK_HOLDS_BATCHES=N is set, so in every process of a run,
the pool's worker processes included: writing a batch file into a work folder that already holds N of
them writes the file's header, then fails with OSError(ENOSPC), as a full disk would half-way through.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from clotho_retrieve import feature_parts

_real_write_file = feature_parts._write_file


def _write_file(path, chunks) -> None:
    if len(list(Path(path).parent.glob("*.batch"))) >= int(os.environ["DISK_HOLDS_BATCHES"]):
        _real_write_file(path, chunks[:1])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _real_write_file(path, chunks)


feature_parts._write_file = _write_file
