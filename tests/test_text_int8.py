"""int8 text tower (text_int8.py): close to the float32 torch tower, same retrieval quality, refused (and
float32 served instead) when it is not."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_text_onnx import _model, _torch_embeddings, varied_captions

from clotho_retrieve import text_int8
from clotho_retrieve.demo import all_descriptions, captions_for
from clotho_retrieve.text_int8 import (
    INT8_DIR,
    MIN_COSINE,
    find_int8_tower,
    open_serving_tower,
    quantize_text_tower,
)
from clotho_retrieve.text_onnx import (
    DATA_FILE,
    GRAPH_FILE,
    META_FILE,
    OnnxTextEncoder,
    export_text_tower,
    read_meta,
    tower_dir,
)
from clotho_retrieve.utils import ClothoRetrieveError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SHA = "ab" * 32


@pytest.fixture(scope="module")
def towers(tmp_path_factory, minilm_path):
    """A MiniLM text tower (random projector) exported beside an "index" folder, and its int8 version."""
    model = _model(minilm_path, embed_dim=64)
    index_dir = tmp_path_factory.mktemp("int8") / "index"
    folder = export_text_tower(model, tower_dir(index_dir), weights_sha256=SHA)
    return model, index_dir, folder, quantize_text_tower(folder)


def _ranks(queries: np.ndarray, clips: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ clips.T), axis=1, kind="stable")  # (Q, N) clip ids, best first


def test_int8_tower_is_quantized_and_close_to_torch_float32(towers):
    model, _, folder, int8 = towers
    assert int8 == folder / INT8_DIR and find_int8_tower(folder) == int8
    meta = read_meta(int8)
    assert meta["precision"] == "int8" and meta["weights_sha256"] == SHA
    assert MIN_COSINE <= meta["check_min_cosine"] <= 1
    ops = {n.op_type for n in onnx.load(int8 / GRAPH_FILE, load_external_data=False).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}  # integer products
    # the encoder's matrices are a quarter of their float32 size (the word embeddings stay float32)
    assert (int8 / DATA_FILE).stat().st_size < 0.75 * (folder / DATA_FILE).stat().st_size

    texts = varied_captions()  # ~100: short, long, cut at the token limit, unicode, empty-ish
    want = _torch_embeddings(model, texts)  # (B, D), the float32 torch tower
    enc = OnnxTextEncoder(int8)
    enc.batch_size = 16  # padded batches of mixed lengths
    got = enc.encode_text(texts)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = (got * want).sum(1)
    assert cosine.min() >= 0.98 and cosine.mean() >= 0.99
    assert np.abs(got - want).max() > 1e-3  # really int8 arithmetic, not the float32 graph
    alone = np.concatenate([enc.encode_text([t]) for t in texts[::9]])  # no padding at all
    assert ((alone * want[::9]).sum(1)).min() >= 0.98


def test_int8_retrieves_as_well_as_torch_float32(towers):
    """725 demo descriptions: one caption of each stands in for its clip, another is the query. The int8
    tower ranks the clips nearly as torch does and finds the right one as often (R@1, R@10, mAP@10)."""
    model, _, _, int8 = towers
    descriptions = all_descriptions()
    rng_clips, rng_queries = np.random.default_rng(1), np.random.default_rng(2)
    clips = _torch_embeddings(model, [captions_for(d, rng_clips, n=1)[0] for d in descriptions])
    queries = [captions_for(d, rng_queries, n=1)[0] for d in descriptions]
    want = _ranks(_torch_embeddings(model, queries), clips)
    got = _ranks(OnnxTextEncoder(int8).encode_text(queries), clips)
    overlap = np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(want, got, strict=True)])
    assert overlap >= 0.8 and (want[:, 0] == got[:, 0]).mean() >= 0.75  # near-duplicate captions tie often
    truth = np.arange(len(descriptions))[:, None]
    rank_want, rank_got = np.argmax(want == truth, axis=1), np.argmax(got == truth, axis=1)  # 0 = first
    for k in (1, 10):
        assert abs((rank_got < k).mean() - (rank_want < k).mean()) <= 0.02, f"R@{k}"
    map10 = [np.where(r < 10, 1 / (r + 1), 0).mean() for r in (rank_want, rank_got)]
    assert abs(map10[1] - map10[0]) <= 0.02


def test_serving_tower_is_int8_by_default_and_fp32_when_asked(towers):
    _, index_dir, folder, int8 = towers
    enc = open_serving_tower(index_dir, SHA)
    assert enc.name == str(int8) and enc.meta["precision"] == "int8"
    enc = open_serving_tower(index_dir, SHA, "fp32")
    assert enc.name == str(folder) and "precision" not in enc.meta
    assert open_serving_tower(index_dir, "cd" * 32) is None  # no tower of these weights: torch
    with pytest.raises(ClothoRetrieveError, match="choose one of int8, fp32"):
        open_serving_tower(index_dir, SHA, "int4")


def test_a_stale_or_missing_int8_tower_is_made_again(towers):
    _, index_dir, folder, int8 = towers
    meta = json.loads((int8 / META_FILE).read_text(encoding="utf-8"))
    (int8 / META_FILE).write_text(json.dumps({**meta, "weights_sha256": "ef" * 32}), encoding="utf-8")
    assert find_int8_tower(folder) is None  # from other weights
    enc = open_serving_tower(index_dir, SHA)  # made again, lazily, by the server
    assert enc.meta["precision"] == "int8" and read_meta(int8)["weights_sha256"] == SHA


def test_an_int8_tower_below_the_bar_is_refused_and_float32_served(tmp_path, tiny_bert, capsys, monkeypatch):
    model = _model(tiny_bert, embed_dim=16)  # a random 2-layer BERT of width 32: quick to export
    folder = export_text_tower(model, tower_dir(tmp_path / "index"), weights_sha256=SHA)
    monkeypatch.setattr(text_int8, "MIN_COSINE", 1.01)  # no quantized tower can pass
    refused = r"differ from float32 ones \(cosine down to [01]\.\d{4} < 1\.01\)"
    with pytest.raises(ClothoRetrieveError, match=refused):
        quantize_text_tower(folder)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == []  # nothing half-written left
    enc = open_serving_tower(tmp_path / "index", SHA)
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "int8 text tower unusable, serving float32" in warning
    assert enc.name == str(folder)

    monkeypatch.setattr(text_int8, "MIN_COSINE", 0.9)
    int8 = quantize_text_tower(folder)
    monkeypatch.setattr(text_int8, "MIN_COSINE", 1.01)  # e.g. another CPU whose integer kernels differ
    assert open_serving_tower(tmp_path / "index", SHA).name == str(folder)  # checked again when opened
    assert "cosine down to" in capsys.readouterr().err and int8.is_dir()


def test_a_folder_that_is_not_a_float32_tower_is_refused(towers, tmp_path):
    _, _, _, int8 = towers
    with pytest.raises(ClothoRetrieveError, match="not a complete float32 ONNX text tower"):
        quantize_text_tower(int8)  # already int8
    with pytest.raises(ClothoRetrieveError, match="not a complete float32 ONNX text tower"):
        quantize_text_tower(tmp_path)
