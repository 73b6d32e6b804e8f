"""utils: atomic writes keep the old file (or folder) on failure and get ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from clotho_retrieve.utils import atomic_dir, atomic_path, atomic_write_text, recover_dir, replace_dir


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


def test_checkpoint_swap_recovers_from_a_crash_between_renames(tmp_path):
    last = tmp_path / "last"
    for name, text in ((".last.old", "previous"), (".last.tmp", "half-written")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
    recover_dir(last)  # crashed after moving last/ aside: the previous checkpoint comes back
    assert (last / "f").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    new = tmp_path / ".last.tmp"
    new.mkdir()
    (new / "f").write_text("new")
    replace_dir(new, last)
    assert (last / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_atomic_dir_swaps_in_on_success_and_keeps_the_old_folder_on_error(tmp_path):
    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        assert tmp != folder and not folder.exists()  # nothing visible until the block succeeds
        (tmp / "f").write_text("first")
    assert (folder / "f").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "f").write_text("half-written")
        raise RuntimeError("crash mid-write")
    assert (folder / "f").read_text() == "first"
    with atomic_dir(folder) as tmp:
        (tmp / "g").write_text("second")
    assert sorted(p.name for p in folder.iterdir()) == ["g"]  # replaced as a whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's private 0700
    assert (folder / "g").stat().st_mode & 0o777 == 0o666 & ~umask
