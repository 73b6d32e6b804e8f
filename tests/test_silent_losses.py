"""Nothing lost or misleading without a word: a captions CSV that would drop captions, a folder without
audio, a query on an index an `embed` did not finish, and a damaged FAISS file that the commands named in
the message do rebuild."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil

from audio_signals import write_clips
from robust_helpers import error_line
from test_full_disk import embed_args, same_index
from typer.testing import CliRunner

from clotho_retrieve.cli import app
from clotho_retrieve.feature_file import FeatureFile
from clotho_retrieve.index import FAISS_FILE, FAISS_META, IndexWriter


def invoke(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def flat(output: str) -> str:
    return " ".join(output.split())


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------
def _captions_csv(path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])


def test_a_captions_csv_that_would_lose_captions_is_refused(tmp_path):
    root, out = tmp_path / "clotho", tmp_path / "features"
    write_clips(root / "development", 2)
    csv_path = root / "clotho_captions_development.csv"
    four = ["file_name"] + [f"caption_{k}" for k in range(1, 5)]  # caption_5 left out of the header
    _captions_csv(csv_path, four, [[f"clip_00{i}.wav"] + [f"c{k}" for k in range(1, 6)] for i in range(2)])
    line = error_line(invoke("features", "--root", root, "--out", out, "--workers", 1).output, 1)
    assert line == (f"{csv_path}: line 2 has 6 values but the header names 5 columns (file_name, caption_1, "
                    "caption_2, caption_3, caption_4); complete the header")
    _captions_csv(csv_path, four, [[f"clip_00{i}.wav"] + [f"c{k}" for k in range(1, 5)] for i in range(2)])
    result = invoke("features", "--root", root, "--out", out, "--workers", 1)
    assert error_line(result.output, returncode=result.exit_code) == (
        f"{csv_path}: no column caption_5 (Clotho has file_name, caption_1 .. caption_5); fix the header, or "
        "pass --allow-missing-captions to use the rest"
    )
    assert not out.exists()
    result = invoke("features", "--root", root, "--out", out, "--workers", 1, "--allow-missing-captions")
    assert result.exit_code == 0, result.output
    assert f"warning: {csv_path}: no column caption_5" in flat(result.output)
    assert FeatureFile(out / "development.h5").captions == [["c1", "c2", "c3", "c4"]] * 2


def test_a_folder_without_audio_is_an_error_not_an_empty_file(tmp_path):
    folder, out = tmp_path / "sounds", tmp_path / "sounds.h5"
    folder.mkdir()
    for _ in range(2):  # empty, then only text files
        result = invoke("features", "--audio-dir", folder, "--out", out)
        assert error_line(result.output, returncode=result.exit_code) == (
            f"{folder}: no audio files in it (WAV, FLAC, OGG, MP3; searched recursively); nothing written"
        )
        (folder / "notes.txt").write_text("not audio")
    (folder / "a.wav").write_text("not audio either")
    (folder / "b.mp3").write_bytes(b"")
    result = invoke("features", "--audio-dir", folder, "--out", out, "--workers", 1)
    line = error_line(result.output, returncode=result.exit_code)
    assert line.startswith(f"{out}: no clip could be read, 2 skipped (first: a.wav: ") and line.endswith(
        "; nothing written"
    )
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# embed / index / query
# ----------------------------------------------------------------------------------------------
def test_a_query_on_an_unfinished_index_warns_and_says_how_to_finish(tmp_path, embed_inputs, monkeypatch):
    run_dir, clips, reference = embed_inputs
    out = tmp_path / "index"
    real_add = IndexWriter.add_clips

    def stopped_at_third_chunk(self, emb, names, *args, **kw):
        if self.count == 8:
            raise KeyboardInterrupt  # as Ctrl-C (or kill -9) in the middle of `embed`
        return real_add(self, emb, names, *args, **kw)

    monkeypatch.setattr(IndexWriter, "add_clips", stopped_at_third_chunk)
    assert CliRunner().invoke(app, embed_args(run_dir, clips, out)).exit_code == 130
    monkeypatch.undo()
    result = invoke("query", "sound 3", "--index", out, "-k", 3)
    assert result.exit_code == 0 and "sound 3" in result.output
    (warning,) = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert warning.startswith(f"warning: {out} is incomplete (8 of 12 clips embedded: an embed stopped "
                              "early); finish it with: clotho-retrieve embed --checkpoint ")
    command = shlex.split(warning.split("finish it with: ")[1])
    assert command[:2] == ["clotho-retrieve", "embed"] and "--captions" in command
    assert CliRunner().invoke(app, command[1:]).exit_code == 0
    result = invoke("query", "sound 3", "--index", out)
    assert result.exit_code == 0 and "warning" not in result.output
    assert json.loads((out / "embed.json").read_text())["captions"] is True
    same_index(out, reference)


def test_a_damaged_faiss_file_is_rebuilt_by_the_commands_its_message_names(tmp_path, embed_inputs):
    run_dir, clips, reference = embed_inputs
    out = tmp_path / "index"
    shutil.copytree(reference, out)

    def top1(*extra) -> str:
        result = invoke("query", "sound 3", "--index", out, "-k", 1, "--json", *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.output.splitlines()[-1])["hits"][0]["name"]

    def damaged_hnsw() -> None:
        assert invoke("index", out, "--index-type", "hnsw").exit_code == 0
        (out / FAISS_FILE).write_bytes(os.urandom(4096))

    best = top1()
    damaged_hnsw()
    result = invoke("query", "sound 3", "--index", out)
    line = error_line(result.output, returncode=result.exit_code)
    assert line.startswith(f"{out / FAISS_FILE}: unreadable (")
    assert line.endswith(f"rebuild it with `clotho-retrieve index {out}`, or search without it: query "
                         "--exact")
    assert top1("--exact") == best  # never reads the damaged file
    rebuilds = [["index", out], ["index", out, "--index-type", "exact"],
                ["index", out, "--index-type", "hnsw"],
                [*embed_args(run_dir, clips, out), "--index-type", "hnsw"]]
    for rebuild in rebuilds:
        damaged_hnsw()
        result = invoke(*rebuild)
        assert result.exit_code == 0, result.output
        assert top1() == best
    assert (out / FAISS_META).is_file()  # the last rebuild (embed --index-type hnsw) built a new one


def test_a_damaged_index_is_reported_and_rebuilt_by_the_next_embed(tmp_path, embed_inputs):
    run_dir, clips, reference = embed_inputs
    out = tmp_path / "index"
    shutil.copytree(reference, out)
    data = (out / "index.h5").read_bytes()
    (out / "index.h5").write_bytes(data[: len(data) // 2])  # a disk that failed under HDF5
    line = error_line(invoke("query", "sound 3", "--index", out).output, 1)
    assert line.startswith(f"{out / 'index.h5'}: not a readable index (")
    assert line.endswith("re-run `clotho-retrieve embed` with the same --out to rebuild it")
    result = CliRunner().invoke(app, embed_args(run_dir, clips, out))
    assert result.exit_code == 0, result.output
    assert f"warning: {out / 'index.h5'} is damaged (" in flat(result.output)
    assert (out / ".index.h5.damaged").read_bytes() == data[: len(data) // 2]  # kept, not deleted
    same_index(out, reference)
    # a file `embed` did not write is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.h5").write_bytes(b"not hdf5")
    result = CliRunner().invoke(app, embed_args(run_dir, clips, other))
    line = error_line(result.output, returncode=result.exit_code)
    assert line == f"{other / 'index.h5'}: not an index `embed` can extend (OSError); choose another --out"
    assert (other / "index.h5").read_bytes() == b"not hdf5"
