"""utils: atomic writes keep the old file on failure and get ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from clotho_retrieve.utils import atomic_path, atomic_write_text


def test_atomic_write_replaces_and_uses_umask_permissions(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_path_keeps_old_content_and_leaves_no_temp_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
