"""Querying an index: brute-force ranking, the ONNX text tower (no torch) or the torch text tower, JSON vs
table, query by audio, errors, `export`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_embed import make_run, other_run
from test_search import brute_force
from typer.testing import CliRunner

from clotho_retrieve.cli import app
from clotho_retrieve.embed import EmbedConfig, embed
from clotho_retrieve.feature_file import write_feature_file
from clotho_retrieve.frontend import FrontEnd, file_log_mel
from clotho_retrieve.index import EmbeddingIndex
from clotho_retrieve.models import RetrievalModel
from clotho_retrieve.query import query_text
from clotho_retrieve.text_onnx import GRAPH_FILE, OnnxTextEncoder, read_meta, tower_dir

runner = CliRunner()
SR = 44100


def write_clips(folder, n: int = 8) -> list:
    """Short recordings that differ in pitch, noise level and length."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        t = np.arange(int(SR * (0.6 + 0.1 * i))) / SR
        wave = 0.3 * np.sin(2 * np.pi * (150 * 1.6**i) * t) + (0.01 + 0.03 * i) * rng.standard_normal(len(t))
        path = folder / f"clip{i}.wav"
        sf.write(path, wave.astype(np.float32), SR)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path):
    root = tmp_path_factory.mktemp("query")
    model = make_run(root / "run", minilm_path)
    paths = write_clips(root)
    fe = FrontEnd()
    mels = [file_log_mel(p, fe)[0] for p in paths]
    write_feature_file(
        root / "features.h5",
        [p.name for p in paths],
        mels,
        [1.0] * len(paths),
        fe,
        captions=[[f"tone number {i}", f"hum {i}"] for i in range(len(paths))],
    )
    embed(root / "run", root / "features.h5", root / "index", EmbedConfig(captions=True))
    return root, model, paths


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def without_tower(index, dest):
    """A copy of an index without its ONNX text tower (as an index built before `embed` exported one)."""
    shutil.copytree(index, dest)
    shutil.rmtree(tower_dir(dest))
    return dest


def test_embed_exports_the_text_tower_beside_the_index_once(setup):
    root, _, _ = setup
    folder = tower_dir(root / "index")
    with EmbeddingIndex(root / "index") as idx:
        assert read_meta(folder)["weights_sha256"] == idx.fingerprint.sha256
    written = (folder / GRAPH_FILE).stat().st_mtime_ns
    summary = embed(root / "run", root / "features.h5", root / "index")
    assert summary["unchanged"] == 8 and summary["text_tower"] == str(folder)
    assert (folder / GRAPH_FILE).stat().st_mtime_ns == written  # current: not exported again


@pytest.mark.parametrize("tower", [True, False], ids=["onnx", "torch"])
def test_query_text_loads_only_the_text_tower_and_equals_brute_force(setup, monkeypatch, tmp_path, tower):
    root, model, _ = setup
    index = root / "index" if tower else without_tower(root / "index", tmp_path / "index")
    loaded = []
    real = RetrievalModel.from_pretrained.__func__

    def spy(cls, path, parts=("audio", "text"), **kw):
        loaded.append(parts)
        return real(cls, path, parts=parts, **kw)

    monkeypatch.setattr(RetrievalModel, "from_pretrained", classmethod(spy))
    texts = ["tone number 3", "Café au lait — naïve 犬の鳴き声 🐕"]
    with EmbeddingIndex(index) as idx:
        results = query_text(idx, texts, k=5)
        vectors = np.asarray(idx.vectors)
    assert loaded == ([] if tower else [("text",)])  # with the ONNX tower, no torch model at all
    with torch.inference_mode():
        q = model.encode_text(texts).numpy()
    want = brute_force(vectors, q, 5)
    atol = 1e-4 if tower else 1e-5  # the ONNX tower equals torch's within 1e-4 (test_text_onnx.py)
    for r, text, ids in zip(results, texts, want, strict=True):
        assert r.query == text
        assert [h.row for h in r.hits] == list(ids)
        np.testing.assert_allclose([h.score for h in r.hits], vectors[ids] @ q[texts.index(text)], atol=atol)
        assert [h.rank for h in r.hits] == [1, 2, 3, 4, 5]


def test_json_output_parses_and_matches_the_table(setup):
    root, _, _ = setup
    queries = root / "queries.txt"
    queries.write_text("tone number 2\n\n  pluie sur le toit, chien qui aboie \n", encoding="utf-8")
    code, out, _ = invoke("query", "--queries", queries, "--index", root / "index", "-k", "3", "--json")
    assert code == 0
    objs = [json.loads(line) for line in out.strip().splitlines()]
    assert [o["query"] for o in objs] == ["tone number 2", "pluie sur le toit, chien qui aboie"]
    hits = objs[0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(h["caption"].startswith("tone number") and h["duration"] == 1.0 for h in hits)
    code, table, _ = invoke("query", "tone number 2", "--index", root / "index", "-k", "3")
    assert code == 0
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert len(rows) == 3
    for row, h in zip(rows, hits, strict=True):
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[:4] == [str(h["rank"]), f"{h['score']:.3f}", h["name"], "1.0 s"]


def test_query_by_audio_returns_the_clip_itself_first(setup):
    root, _, paths = setup
    for p in (paths[2], paths[6]):
        code, out, _ = invoke("query", "--audio", p, "--index", root / "index", "--json", "-k", "3")
        assert code == 0
        first = json.loads(out)["hits"][0]
        assert first["name"] == p.name and first["score"] == pytest.approx(1.0, abs=1e-4)


def test_caption_search_finds_the_identical_caption(setup):
    root, _, _ = setup
    code, out, _ = invoke("query", "hum 5", "--captions", "--index", root / "index", "--json", "-k", "2")
    assert code == 0
    first = json.loads(out)["hits"][0]
    assert (first["caption"], first["name"]) == ("hum 5", "clip5.wav")
    assert first["score"] == pytest.approx(1.0, abs=1e-4)


def test_long_query_is_truncated_with_a_warning(setup):
    root, _, _ = setup
    code, out, err = invoke("query", "rain " * 200, "--index", root / "index", "--json", "-k", "1")
    assert code == 0 and len(json.loads(out)["hits"]) == 1
    assert "only the first 64" in err


def test_errors_are_one_line(setup, tmp_path):
    root, _, _ = setup
    index = root / "index"
    other_run(root / "run", tmp_path / "other")
    cases = [
        (("query", "x", "--index", tmp_path / "missing"), "no index.h5"),
        (("query", "", "--index", index), "empty query"),
        (("query", "--index", index), "nothing to look for"),
        (("query", "x", "--index", index, "--checkpoint", tmp_path / "other"), "built by another run"),
        (("query", "x", "--queries", tmp_path / "none.txt", "--index", index), "no such queries file"),
        (("query", "--audio", tmp_path / "none.wav", "--index", index), "no such audio file"),
    ]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    cases.append((("query", "x", "--index", broken), "not a readable index"))
    for args, message in cases:
        code, out, err = invoke(*args)
        assert code == 1, (args, out, err)
        assert message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


def test_a_moved_run_is_reported_and_can_be_given(setup, tmp_path):
    root, _, _ = setup
    moved = without_tower(root / "index", tmp_path / "moved")
    shutil.copytree(root / "index", tmp_path / "with_tower")
    shutil.move(root / "run", tmp_path / "run_elsewhere")
    try:
        code, out, err = invoke("query", "x", "--index", tmp_path / "with_tower", "--json", "-k", "1")
        assert code == 0 and not err, err  # the index's ONNX tower needs no run
        assert len(json.loads(out)["hits"]) == 1
        code, _, err = invoke("query", "x", "--index", moved)
        assert code == 1 and "is gone" in err and "--checkpoint" in err
        # given explicitly, the moved run still answers: its weights' fingerprint matches
        code, out, err = invoke(
            "query", "x", "--index", moved, "--checkpoint", tmp_path / "run_elsewhere", "--json", "-k", "1"
        )
        assert code == 0, err
        assert len(json.loads(out)["hits"]) == 1
    finally:
        shutil.move(tmp_path / "run_elsewhere", root / "run")


# ----------------------------------------------------------------------------------------------
# A text query without torch, and an index without its ONNX text tower
# ----------------------------------------------------------------------------------------------
HEAVY = ("torch", "transformers", "torchaudio", "faiss", "matplotlib", "librosa", "scipy")


def query_in_a_fresh_process(*args) -> tuple[dict, list[str], set[str]]:
    """`python -m clotho_retrieve query ARGS --json` in a new interpreter: its answer, its stderr lines,
    and every module it imported (from ``python -X importtime``)."""
    argv = [sys.executable, "-X", "importtime", "-m", "clotho_retrieve", "query", *map(str, args), "--json"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    stderr = [line for line in lines if not line.startswith("import time:")]
    assert done.returncode == 0, stderr
    return json.loads(done.stdout), stderr, imported


def test_a_text_query_imports_neither_torch_nor_transformers(setup):
    root, model, _ = setup
    answer, stderr, imported = query_in_a_fresh_process("tone number 3", "-k", "8", "--index", root / "index")
    assert "clotho_retrieve.text_onnx" in imported and "onnxruntime" in imported
    assert not {m.split(".")[0] for m in imported} & set(HEAVY)
    assert stderr == []
    with EmbeddingIndex(root / "index") as idx, torch.inference_mode():
        want = brute_force(np.asarray(idx.vectors), model.encode_text(["tone number 3"]).numpy(), 8)[0]
    assert [h["row"] for h in answer["hits"]] == list(want)


def test_an_index_without_a_tower_answers_through_torch_with_a_note_until_exported(setup, tmp_path):
    root, _, _ = setup
    index = without_tower(root / "index", tmp_path / "index")
    args = ("query", "tone number 3", "--index", index, "--json", "-k", "8")
    code, out, err = invoke(*args)
    assert code == 0, err
    assert len(err.strip().splitlines()) == 1  # one note, saying how to export
    assert "no ONNX text tower" in err and f"clotho-retrieve export --index {index}" in " ".join(err.split())
    code, want, _ = invoke(*args[:3], root / "index", *args[4:])
    assert [h["row"] for h in json.loads(out)["hits"]] == [h["row"] for h in json.loads(want)["hits"]]

    other_run(root / "run", tmp_path / "other")
    code, _, err = invoke("export", "--index", index, "--checkpoint", tmp_path / "other")
    assert code == 1 and "built by another run" in err and len(err.strip().splitlines()) == 1
    assert not tower_dir(index).exists()
    code, out, err = invoke("export", "--index", index)
    assert code == 0, err
    assert str(tower_dir(index)) in " ".join(out.split())
    with EmbeddingIndex(index) as idx:
        assert OnnxTextEncoder(tower_dir(index)).weights_sha256 == idx.fingerprint.sha256
    code, out, err = invoke(*args)
    assert code == 0 and not err  # no note: the tower answers
    assert [h["row"] for h in json.loads(out)["hits"]] == [h["row"] for h in json.loads(want)["hits"]]
