"""ONNX text tower (text_onnx.py): same tokens and embeddings as torch + transformers, no torch to run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig

from clotho_retrieve.demo import all_descriptions, captions_for
from clotho_retrieve.encoder import Encoder
from clotho_retrieve.models import ModelConfig, RetrievalModel
from clotho_retrieve.text_onnx import (
    DATA_FILE,
    GRAPH_FILE,
    META_FILE,
    TOKENIZER_FILE,
    OnnxTextEncoder,
    export_model_dir,
    export_text_tower,
    find_text_tower,
    read_meta,
    tower_dir,
)
from clotho_retrieve.utils import ClothoRetrieveError

MAX_TOKENS = 24  # small, so that many captions are cut at the limit
TOLERANCE = 1e-4  # max |diff| of unit embeddings, the bar

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

WORDS = (
    "dog barks rain falls on a tin roof while car passes by birds sing door slams engine idles "
    "wind howls water runs people talk quietly in the distance then loudly bell rings twice"
).split()
UNICODE = [
    "Café au lait — naïve ÉCOLE",  # accents, upper case, an em dash
    "犬の鳴き声と雨の音",  # CJK
    "🐕 barks 🌧️ falls 🚗",  # emoji
    "صوت المطر على السطح",  # Arabic (right to left)
    "e\u0301te\u0301 (combining accents)",  # decomposed é
    "Straße, Œuvre, ﬁre",  # ß, ligatures
    "\u200bzero\u200bwidth\u00a0spaces",
]


def varied_captions() -> list[str]:
    """About 100 captions: demo captions, random word strings of 1..60 words, unicode, empty-ish ones,
    and "dog" repeated to end just below, at and just past the token limit ([CLS] + n + [SEP])."""
    rng = np.random.default_rng(0)
    demo = [c for d in all_descriptions()[:10] for c in captions_for(d, rng, n=3)]
    random_words = [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers(1, 61, size=48)]
    at_limit = ["dog " * n for n in (MAX_TOKENS - 3, MAX_TOKENS - 2, MAX_TOKENS - 1, MAX_TOKENS, 200)]
    empty_ish = ["", " ", "a", ".", "!!!", "\t\n"]
    punctuation = ["A dog barks.", "a DOG barks!!!", "rain; wind, (thunder)?", "12 dogs, 3.5 s, 100%"]
    return demo + random_words + at_limit + empty_ish + punctuation + UNICODE


def _model(text_model: str, embed_dim: int, seed: int = 0, load_weights: bool = True) -> RetrievalModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="tiny", text_model=text_model, embed_dim=embed_dim, max_text_tokens=MAX_TOKENS)
    return RetrievalModel(cfg, load_text_weights=load_weights, parts=("text",)).eval()


def random_bert(folder: Path, minilm_path: str, embed_dim: int = 32, **config) -> RetrievalModel:
    """A text tower of a BERT shaped by ``config`` with random weights and MiniLM's (bert-base-uncased)
    tokenizer."""
    BertConfig(**config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (folder / name).write_bytes((Path(minilm_path) / name).read_bytes())
    return _model(str(folder), embed_dim, load_weights=False)


@pytest.fixture
def tiny_bert(tmp_path, minilm_path) -> RetrievalModel:
    """A 2-layer BERT of width 32: quick to export, for the mechanics of writing and finding towers."""
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    return random_bert(tmp_path / "tiny-bert", minilm_path, **shape)


def _torch_embeddings(model: RetrievalModel, texts: list[str], batch: int = 16) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [model.encode_text(texts[a : a + batch]).numpy() for a in range(0, len(texts), batch)]
        )


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, minilm_path):
    """A MiniLM text tower (random projector) and its ONNX export."""
    model = _model(minilm_path, embed_dim=64)
    folder = export_text_tower(model, tmp_path_factory.mktemp("minilm") / "tower", weights_sha256="ab" * 32)
    return model, OnnxTextEncoder(folder)


def test_export_writes_a_complete_tower(minilm):
    model, enc = minilm
    folder = Path(enc.name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [GRAPH_FILE, DATA_FILE, TOKENIZER_FILE, META_FILE]
    )
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.") and p.is_dir()]
    meta = read_meta(folder)
    assert meta["embed_dim"] == enc.embed_dim == 64
    assert meta["max_text_tokens"] == enc.max_text_tokens == MAX_TOKENS
    assert meta["inputs"] == enc.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert (folder / DATA_FILE).stat().st_size > 4 * 20e6  # MiniLM's 22.7 M weights live outside the graph
    assert not model.training  # the exporter left the model in the mode it was given
    assert isinstance(enc, Encoder) and enc.front_end is None  # the text half of the one interface


def test_tokens_equal_the_transformers_tokenizer(minilm):
    model, enc = minilm
    texts = varied_captions()
    for batch in (texts, texts[:1], texts[-8:], ["dog " * 200, "a"]):
        want = model.text.tokenize(batch, "cpu")
        got = enc.tokenize(batch)
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key].numpy(), err_msg=key)
    assert enc.tokenize(["dog " * 200, "a"])["input_ids"].shape == (2, MAX_TOKENS)  # cut, and "a" padded
    assert [enc.n_tokens(t) for t in texts] == [model.text.n_tokens(t) for t in texts]
    assert enc.n_tokens("dog " * 200) == 202  # [CLS] + 200 x dog + [SEP], before truncation


def test_threads_may_share_an_encoder(minilm):
    """n_tokens switches truncation off for a moment: concurrent encodes must never see that."""
    from concurrent.futures import ThreadPoolExecutor

    _, enc = minilm
    texts = varied_captions()
    want_tokens, want = [enc.n_tokens(t) for t in texts], enc.encode_text(texts)
    with ThreadPoolExecutor(4) as pool:
        counts = pool.map(enc.n_tokens, texts * 3)
        vectors = list(pool.map(lambda t: enc.encode_text([t])[0], texts))
    assert list(counts) == want_tokens * 3
    assert np.abs(np.stack(vectors) - want).max() <= TOLERANCE


def test_minilm_onnx_equals_torch_on_varied_captions(minilm):
    model, enc = minilm
    texts = varied_captions()
    assert len(texts) >= 100
    assert sum(model.text.n_tokens(t) > MAX_TOKENS for t in texts) >= 20  # many are truncated
    want = _torch_embeddings(model, texts)
    enc.batch_size = 16  # batches mix short, long and truncated captions: padding must be masked out
    got = enc.encode_text(texts)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([enc.encode_text([t]) for t in texts[::7]])  # one caption, no padding at all
    assert np.abs(alone - want[::7]).max() <= TOLERANCE


def test_rankings_equal_torch(minilm):
    """Ranking demo captions (as stand-in clips) by each query gives the same order with either tower."""
    model, enc = minilm
    rng = np.random.default_rng(1)
    clips = [c for d in all_descriptions()[::6] for c in captions_for(d, rng, n=1)]
    queries = varied_captions()[:40]
    index = _torch_embeddings(model, clips)  # (N, D)
    want = np.argsort(-(_torch_embeddings(model, queries) @ index.T), axis=1, kind="stable")[:, :10]
    got = np.argsort(-(enc.encode_text(queries) @ index.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # ~1 min on 2 idle cores (export, 2 x 100 captions through 110 M parameters)
def test_bert_base_shaped_onnx_equals_torch(tmp_path, minilm_path):
    """bert-base's shape (BertConfig() defaults: 12 layers of 768, 110 M parameters), random weights."""
    model = random_bert(tmp_path / "bert-base", minilm_path, embed_dim=1024)  # the paper's D
    assert sum(p.numel() for p in model.text.bert.parameters()) > 109e6
    enc = OnnxTextEncoder(export_text_tower(model, tmp_path / "tower"))
    texts = varied_captions()
    got, want = enc.encode_text(texts), _torch_embeddings(model, texts)
    assert np.abs(got - want).max() <= TOLERANCE


def test_a_fresh_interpreter_encodes_without_torch_or_transformers(minilm):
    model, enc = minilm
    texts = ["a dog barks", "rain " * 50]
    code = (
        "import json, sys\n"
        "from clotho_retrieve.text_onnx import OnnxTextEncoder\n"
        f"enc = OnnxTextEncoder({enc.name!r})\n"
        f"v = enc.encode_text({texts!r})\n"
        f"n = enc.n_tokens({texts[1]!r})\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(json.dumps({'v': v.tolist(), 'n': n, 'heavy': heavy}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    assert result["n"] == 52
    assert np.abs(np.array(result["v"]) - _torch_embeddings(model, texts)).max() <= TOLERANCE


def test_export_model_dir_records_the_weights_and_find_checks_them(tmp_path, tiny_bert):
    model = tiny_bert
    model.save_pretrained(tmp_path / "model")
    index_dir = tmp_path / "index"
    export_model_dir(tmp_path / "model", tower_dir(index_dir), weights_sha256="cd" * 32)
    assert find_text_tower(index_dir, "cd" * 32) == tower_dir(index_dir)
    assert find_text_tower(index_dir, "ef" * 32) is None  # exported from other weights: stale
    assert find_text_tower(tmp_path / "elsewhere", "cd" * 32) is None
    texts = varied_captions()[:20]
    got = OnnxTextEncoder(tower_dir(index_dir)).encode_text(texts)
    assert np.abs(got - _torch_embeddings(model, texts)).max() <= TOLERANCE


def test_export_replaces_an_old_tower_and_refuses_a_second_writer(tmp_path, tiny_bert):
    import fcntl

    model = tiny_bert
    folder = tmp_path / "tower"
    folder.mkdir()
    (folder / "stale.txt").write_text("old", encoding="utf-8")
    with open(tmp_path / ".tower.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ClothoRetrieveError, match="another process"):
            export_text_tower(model, folder)
    assert (folder / "stale.txt").is_file()  # untouched while refused
    export_text_tower(model, folder)
    assert not (folder / "stale.txt").exists() and read_meta(folder) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tower.lock", "tiny-bert", "tower"]  # no temporary


def test_incomplete_or_corrupt_towers_are_refused_clearly(minilm, tmp_path):
    _, enc = minilm
    with pytest.raises(ClothoRetrieveError, match="not a complete ONNX text tower"):
        OnnxTextEncoder(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (META_FILE, TOKENIZER_FILE, DATA_FILE):
        (broken / name).write_bytes((Path(enc.name) / name).read_bytes())
    assert read_meta(broken) is None  # the graph is missing
    (broken / GRAPH_FILE).write_bytes(b"not a protobuf")
    with pytest.raises(ClothoRetrieveError, match="unreadable ONNX text tower"):
        OnnxTextEncoder(broken)
    (broken / META_FILE).write_text("{", encoding="utf-8")
    assert read_meta(broken) is None
    with pytest.raises(ClothoRetrieveError, match="encodes text only"):
        enc.encode_audio([np.zeros((10, 64), np.float32)])
    with pytest.raises(ClothoRetrieveError, match="encodes text only"):
        enc.audio_inputs_from_file(tmp_path / "a.wav")


def test_a_model_without_a_fast_tokenizer_is_refused(minilm):
    model, _ = minilm

    class Slow:
        is_fast = False

    saved = model.text.tokenizer
    model.text.tokenizer = Slow()
    try:
        with pytest.raises(ClothoRetrieveError, match="no fast"):
            export_text_tower(model, Path("/nonexistent/tower"))
    finally:
        model.text.tokenizer = saved


def test_an_export_that_fails_or_disagrees_with_torch_leaves_nothing(tmp_path, tiny_bert, monkeypatch):
    from clotho_retrieve import text_onnx

    folder = tmp_path / "tower"
    real_trace = text_onnx._trace

    def trace_then_change_the_model(graph, *args):
        real_trace(graph, *args)
        with torch.no_grad():
            graph.projector.bias += 0.1  # torch now differs from the traced graph

    monkeypatch.setattr(text_onnx, "_trace", trace_then_change_the_model)
    with pytest.raises(ClothoRetrieveError, match="differs from torch"):
        export_text_tower(tiny_bert, folder)

    def broken_trace(*args):
        raise RuntimeError("unsupported operator\ntraceback lines")

    monkeypatch.setattr(text_onnx, "_trace", broken_trace)
    with pytest.raises(
        ClothoRetrieveError, match=r"cannot export the text model BertModel to ONNX \(unsupported"
    ):
        export_text_tower(tiny_bert, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tower.lock", "tiny-bert"]


def test_ensure_exports_once_per_run_and_open_falls_back_with_a_note(
    tmp_path, tiny_bert, capsys, monkeypatch
):
    from clotho_retrieve import text_onnx
    from clotho_retrieve.text_onnx import ensure_text_tower, open_text_tower

    index_dir, sha = tmp_path / "index", "12" * 32
    tiny_bert.save_pretrained(tmp_path / "model")
    assert open_text_tower(index_dir, sha) is None
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "has no ONNX text tower" in note
    assert f"clotho-retrieve export --index {index_dir}" in note

    folder = ensure_text_tower(index_dir, tmp_path / "model", sha, model=tiny_bert)
    assert folder == tower_dir(index_dir)
    written = (folder / GRAPH_FILE).stat().st_mtime_ns
    assert ensure_text_tower(index_dir, tmp_path / "model", sha) == folder  # current: not exported again
    assert (folder / GRAPH_FILE).stat().st_mtime_ns == written
    enc = open_text_tower(index_dir, sha)
    assert isinstance(enc, OnnxTextEncoder) and enc.weights_sha256 == sha

    ensure_text_tower(index_dir, tmp_path / "model", "34" * 32)  # other weights: exported again (from disk)
    assert read_meta(folder)["weights_sha256"] == "34" * 32
    assert open_text_tower(index_dir, sha) is None  # stale for the old weights
    capsys.readouterr()

    (folder / GRAPH_FILE).write_bytes(b"broken")
    assert open_text_tower(index_dir, "34" * 32) is None
    assert "unusable ONNX text tower" in capsys.readouterr().err

    def broken_trace(*args):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(text_onnx, "_trace", broken_trace)
    assert ensure_text_tower(tmp_path / "other", tmp_path / "model", sha, model=tiny_bert) is None
    assert "text queries will use torch" in capsys.readouterr().err
