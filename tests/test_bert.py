"""Fast BERT text path (models/bert.py): same tokens and [CLS] as transformers, loading, fallback, imports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_embed import make_run

from clotho_retrieve.encoder import RunFingerprint
from clotho_retrieve.index import IndexWriter
from clotho_retrieve.models import RetrievalModel
from clotho_retrieve.models.bert import BertConfig, BertTextEncoder
from clotho_retrieve.models.text import TextEncoder

CAPTIONS = [
    "A dog barks.",  # short: padded in the batch
    "Rain falls on a tin roof while thunder rumbles far away and a car drives past slowly.",
    "Café au lait — naïve 犬の鳴き声 🐕 ÉCOLE",  # accents, CJK, emoji, upper case
    "birds " * 40,  # longer than max_tokens: truncated
]
MAX_TOKENS = 24


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def towers(minilm_path) -> tuple[TextEncoder, BertTextEncoder]:
    """transformers' TextEncoder and the fast encoder holding the same weights."""
    torch.manual_seed(0)
    reference = TextEncoder(minilm_path, embed_dim=16, max_tokens=MAX_TOKENS).eval()
    fast = BertTextEncoder.from_folder(minilm_path, embed_dim=16, max_tokens=MAX_TOKENS)
    assert fast is not None
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(fast.unused_prefixes)}
    fast.load_state_dict(state, strict=True)
    return reference, fast.eval()


def test_tokens_equal_the_transformers_tokenizer(towers):
    reference, fast = towers
    want = reference.tokenize(CAPTIONS, "cpu")
    got = fast.tokenizer(CAPTIONS)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert got["input_ids"].shape == (4, MAX_TOKENS)  # padded to the truncated longest
    assert got["attention_mask"][0].sum() < MAX_TOKENS  # the short caption is padded
    for text in CAPTIONS:
        assert fast.n_tokens(text) == reference.n_tokens(text)
    assert fast.n_tokens(CAPTIONS[3]) == 42  # [CLS] + 40 x "birds" + [SEP], before truncation


def test_cls_equals_transformers_last_hidden_state(towers):
    reference, fast = towers
    with torch.no_grad():
        batch = reference.tokenize(CAPTIONS, "cpu")
        want = reference.bert(**batch).last_hidden_state[:, 0]  # (B, D_S)
        got = fast.cls(CAPTIONS)
        alone = fast.cls(CAPTIONS[:1])  # the short caption without padding
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(alone, want[:1], rtol=0, atol=1e-5)  # padding is masked out
        torch.testing.assert_close(fast(CAPTIONS), reference(CAPTIONS), rtol=0, atol=1e-5)


def test_config_accepts_bert_and_refuses_what_it_cannot_reproduce(minilm_path):
    hf = json.loads((Path(minilm_path) / "config.json").read_text(encoding="utf-8"))
    cfg = BertConfig.from_hf(hf)
    assert cfg is not None and (cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_act) == (384, 6, "gelu")
    for change in (
        {"model_type": "roberta"},
        {"position_embedding_type": "relative_key"},
        {"is_decoder": True},
        {"hidden_act": "silu"},
        {"num_attention_heads": 5},  # 384 is not a multiple of 5
    ):
        assert BertConfig.from_hf({**hf, **change}) is None, change
    assert BertConfig.from_hf({k: v for k, v in hf.items() if k != "vocab_size"}) is None


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm_path):
    folder = tmp_path_factory.mktemp("bert") / "run"
    return folder, make_run(folder, minilm_path)


def test_from_pretrained_fast_text_equals_the_transformers_path(run):
    folder, model = run
    fast = RetrievalModel.from_pretrained(folder, parts=("text",), fast_text=True)
    assert isinstance(fast.text, BertTextEncoder)
    assert not any(k.startswith("text.bert.pooler") for k in fast.state_dict())
    full = RetrievalModel.from_pretrained(folder, parts=("text",))
    assert isinstance(full.text, TextEncoder)
    with torch.no_grad():
        want = model.encode_text(CAPTIONS)
        torch.testing.assert_close(fast.encode_text(CAPTIONS), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(full.encode_text(CAPTIONS), want, rtol=0, atol=1e-6)


def test_a_text_model_it_cannot_reproduce_falls_back_to_transformers(run, tmp_path):
    folder, _ = run
    other = tmp_path / "run"
    shutil.copytree(folder, other)
    hf_path = other / "best" / "text" / "config.json"
    hf = json.loads(hf_path.read_text(encoding="utf-8"))
    hf_path.write_text(json.dumps({**hf, "hidden_act": "silu"}), encoding="utf-8")  # same weights, other act.
    loaded = RetrievalModel.from_pretrained(other, parts=("text",), fast_text=True)
    assert isinstance(loaded.text, TextEncoder)
    assert loaded.text.bert.config.hidden_act == "silu"

    no_fast_tokenizer = tmp_path / "text"
    shutil.copytree(folder / "best" / "text", no_fast_tokenizer)
    (no_fast_tokenizer / "tokenizer.json").unlink()
    assert BertTextEncoder.from_folder(no_fast_tokenizer, 16, MAX_TOKENS) is None


def test_text_query_imports_nothing_heavy(run, tmp_path):
    """The CLI's text query on an exact index never imports transformers, torchaudio, faiss, ..."""
    folder, model = run
    model_dir = (folder / "best").resolve()
    cfg = model.cfg.to_dict()
    vectors = np.eye(5, cfg["embed_dim"], dtype=np.float32)
    writer = IndexWriter(
        tmp_path / "index",
        RunFingerprint.of(model_dir),
        str(folder),
        "best",
        cfg["embed_dim"],
        cfg["front_end"],
        cfg,
    )
    writer.add_clips(vectors, [f"c{i}.wav" for i in range(5)], ["x.h5"] * 5, [1.0] * 5, [[]] * 5)
    writer.close()
    index = tmp_path / "index"
    heavy = ["transformers", "torchaudio", "faiss", "matplotlib", "librosa", "scipy"]
    code = (
        "import json, runpy, sys\n"
        f"sys.argv = ['clotho-retrieve', 'query', '--index', {str(index)!r}, 'a dog', '--json']\n"
        "try:\n    runpy.run_module('clotho_retrieve', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    result, imported = out.strip().splitlines()
    assert json.loads(imported) == []
    hits = json.loads(result)["hits"]
    with torch.no_grad():
        q = model.encode_text(["a dog"])[0].numpy()
    assert [h["row"] for h in hits] == list(np.argsort(-(vectors @ q), kind="stable"))
