"""Full disks: `features` and `embed` stop with one line naming the path and the space needed (exit 1,
never a traceback or a segfault), keep what was complete readable, and after space is freed a re-run
finishes with what an uninterrupted run writes. Real full file systems (a small tmpfs, skipped with the
reason where none can be mounted) and an injected ENOSPC (always). `train` on a full disk: test_resume.py.
"""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from audio_signals import write_clips
from robust_helpers import ENV, error_line, fill, run_cli
from test_features import _same_file
from typer.testing import CliRunner

from clotho_retrieve import feature_file, safety
from clotho_retrieve.cli import app
from clotho_retrieve.embed import EmbedConfig, embed
from clotho_retrieve.features import FeaturesConfig, compute_features
from clotho_retrieve.index import EmbeddingIndex, IndexWriter
from clotho_retrieve.utils import ClothoRetrieveError

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_second_clips(tmp_path_factory):
    """16 clips of 3 s (about 66 kB of features each) and their features computed without trouble."""
    folder = tmp_path_factory.mktemp("library")
    audio = write_clips(folder / "audio", 16, seconds=3.0)
    compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=folder / "reference.h5")
    return audio, folder / "reference.h5"


FEATURES_NOT_PORTED = ("the features stage now writes batch files (sharding, issue 14); its work-file ENOSPC "
                       "handling and these npz-shard assertions are not ported yet")


@pytest.mark.xfail(reason=FEATURES_NOT_PORTED, strict=False)
def test_features_on_a_full_disk_end_with_one_line_then_finish(tmpfs, three_second_clips):
    audio, reference = three_second_clips
    disk = tmpfs.mount("600k")
    out = disk / "sounds.h5"
    args = ["features", "--audio-dir", audio, "--out", out, "--workers", "2"]
    proc = run_cli(*args)  # the work files fill the disk
    line = error_line(proc.stderr, returncode=proc.returncode)
    needs = r" \(needs about [\d.]+ [kM]B, [\d.]+ k?B free\); free some space and re-run"
    assert re.match(re.escape(f"{out}: not enough disk space for the features of ") + r"\d+ more clips and "
                    r"the file itself" + needs, line)
    assert not out.exists()
    tmpfs.resize(disk, "1500k")  # room for the work files, not for the file as well
    proc = run_cli(*args)
    line = error_line(proc.stderr, returncode=proc.returncode)
    assert line.startswith(f"{out}: not enough disk space for the features file (needs about 1.")
    assert not out.exists() and not list(disk.glob(".*.h5.tmp"))  # no half-written file left
    tmpfs.resize(disk, "4m")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_file(out, reference)


@pytest.mark.xfail(reason=FEATURES_NOT_PORTED, strict=False)
def test_features_stop_at_an_injected_enospc_and_resume(tmp_path, monkeypatch, three_second_clips):
    audio, reference = three_second_clips
    out = tmp_path / "sounds.h5"
    real_savez, saved = np.savez, []

    def savez(*args, **kw):  # the 5th clip's work file meets a full disk
        if len(saved) == 4:
            raise ENOSPC
        saved.append(1)
        return real_savez(*args, **kw)

    monkeypatch.setattr(np, "savez", savez)
    no_space = re.escape(f"{out}: not enough disk space for the ")
    with pytest.raises(ClothoRetrieveError, match=no_space + "features of 12 more clips and the file"):
        compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    monkeypatch.setattr(np, "savez", real_savez)
    assert len(list(tmp_path.glob(".sounds.h5.*.work/*.npz"))) == 4  # the clips done before are kept
    # the output file itself: its space is refused, or its write fails inside HDF5; nothing half-written stays
    for inject in ("reserve", "write"):
        with monkeypatch.context() as m:
            if inject == "reserve":
                m.setattr(safety, "_fallocate", lambda *a: errno.ENOSPC)
            else:
                m.setattr(feature_file, "_write_mels", lambda *a: (_ for _ in ()).throw(ENOSPC))
            with pytest.raises(ClothoRetrieveError, match=no_space + r"features file \(needs about 1\.\d MB"):
                compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
        assert not out.exists() and not list(tmp_path.glob(".*.h5.tmp"))
    (result,) = compute_features(FeaturesConfig(workers=1), audio_dir=audio, out=out)
    assert result["computed"] == 0  # every clip computed before the failed writes was kept
    _same_file(out, reference)


# ----------------------------------------------------------------------------------------------
# embed
# ----------------------------------------------------------------------------------------------
def embed_args(run_dir, clips, out) -> list[str]:
    return ["embed", "--checkpoint", str(run_dir), "--features", str(clips), "--out", str(out), "--captions",
            "--chunk-size", "4"]


def same_index(a, b) -> None:
    """Two complete indexes with the same rows, embeddings and caption embeddings."""
    with EmbeddingIndex(a) as x, EmbeddingIndex(b) as y:
        assert x.incomplete is None and y.incomplete is None
        assert x.all_names() == y.all_names() and x.count == y.count
        np.testing.assert_array_equal(np.asarray(x.vectors), np.asarray(y.vectors))
        assert x.captions(range(x.count)) == y.captions(range(y.count))
        for u, v in zip(x.caption_vectors(), y.caption_vectors(), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_embed_onto_a_full_disk_says_what_it_needs_and_finishes_later(tmpfs, embed_inputs):
    run_dir, clips, reference = embed_inputs
    disk = tmpfs.mount("300k")
    out = disk / "index"
    args = embed_args(run_dir, clips, out)
    proc = run_cli(*args)
    line = error_line(proc.stderr, returncode=proc.returncode)
    assert line.startswith(f"{out / 'index.h5'}: not enough disk space for the embeddings of 12 clips (needs")
    result = CliRunner().invoke(app, ["query", "sound 3", "--index", str(out)])  # no clip, and it says so
    assert result.exit_code == 0
    assert "is incomplete (0 of 12 clips embedded" in " ".join(result.output.split())
    tmpfs.resize(disk, "2m")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    same_index(out, reference)


def test_a_disk_that_fills_up_during_embed_keeps_the_committed_clips(tmpfs, embed_inputs, monkeypatch):
    run_dir, clips, reference = embed_inputs
    disk = tmpfs.mount("2m")
    out = disk / "index"
    real_add, added = IndexWriter.add_clips, []

    def add_then_fill(self, *args, **kw):  # another program takes the last byte after the 2nd chunk
        real_add(self, *args, **kw)
        added.append(1)
        if len(added) == 2:
            fill(disk)

    monkeypatch.setattr(IndexWriter, "add_clips", add_then_fill)
    no_space = re.escape(f"{out / 'index.h5'}: not enough disk space for 4 more clips")
    with pytest.raises(ClothoRetrieveError, match=no_space + ".*re-run the same `embed` to finish"):
        embed(run_dir, clips, out, EmbedConfig(chunk_size=4, captions=True))
    monkeypatch.undo()
    with EmbeddingIndex(out) as idx, EmbeddingIndex(reference) as ref:
        assert idx.all_names() == ref.all_names()[:8]
        np.testing.assert_array_equal(np.asarray(idx.vectors), np.asarray(ref.vectors)[:8])
        assert idx.incomplete.startswith(f"{out} is incomplete (8 of 12 clips embedded")
    (disk / "junk").unlink()  # space freed
    embed(run_dir, clips, out, EmbedConfig(chunk_size=4, captions=True))
    same_index(out, reference)


def test_a_failed_write_inside_hdf5_is_one_line_and_the_index_stays_usable(tmp_path, embed_inputs,
                                                                           monkeypatch):
    run_dir, clips, reference = embed_inputs
    out = tmp_path / "index"
    real_append, appended = IndexWriter._append, []

    def append(ds, values):  # the 3rd chunk fails half-way through its columns (ENOSPC from HDF5)
        appended.append(ds.name)
        if len(appended) == 2 * 6 + 3:
            raise ENOSPC
        real_append(ds, values)

    monkeypatch.setattr(IndexWriter, "_append", staticmethod(append))
    result = CliRunner().invoke(app, embed_args(run_dir, clips, out))
    line = error_line(result.output, returncode=result.exit_code)
    assert line.startswith(f"{out / 'index.h5'}: not enough disk space for 4 more clips (needs about")
    monkeypatch.undo()
    with EmbeddingIndex(out) as idx:
        assert idx.count == 8 and "8 of 12 clips" in idx.incomplete
    embed(run_dir, clips, out, EmbedConfig(chunk_size=4, captions=True))
    same_index(out, reference)


def test_hdf5_meeting_a_full_disk_unreserved_is_still_one_line_and_repaired(tmpfs, embed_inputs):
    """Defence in depth: with the space checks and reservations switched off, HDF5 itself meets the full
    disk. Still one line and exit 1 (no traceback, no segfault at exit), and a re-run finishes the index."""
    run_dir, clips, reference = embed_inputs
    disk = tmpfs.mount("300k")
    out = disk / "index"
    script = textwrap.dedent("""
        import sys
        import clotho_retrieve.embed, clotho_retrieve.index.store, clotho_retrieve.safety
        for module in (clotho_retrieve.embed, clotho_retrieve.index.store, clotho_retrieve.safety):
            for name in ("check_space", "reserve_space"):
                if hasattr(module, name):
                    setattr(module, name, lambda *args, **kw: None)
        from clotho_retrieve.cli import main
        sys.argv = ["clotho-retrieve", *sys.argv[1:]]
        main()
    """)
    cmd = [sys.executable, "-c", script, *embed_args(run_dir, clips, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    line = error_line(proc.stderr, returncode=proc.returncode)
    assert line.startswith(f"{out / 'index.h5'}: not enough disk space for 4 more clips")
    assert "Exception ignored" not in proc.stderr
    tmpfs.resize(disk, "2m")
    result = CliRunner().invoke(app, embed_args(run_dir, clips, out))
    assert result.exit_code == 0, result.output
    same_index(out, reference)
