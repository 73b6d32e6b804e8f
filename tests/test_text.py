"""Text tower with the offline MiniLM (a 6-layer BERT): [CLS], truncation, freezing, errors."""

from __future__ import annotations

import pytest
import torch

from clotho_retrieve.models.text import TextEncoder
from clotho_retrieve.utils import ClothoRetrieveError

CAPTIONS = ["A dog barks twice in the distance.", "Rain falls on a tin roof while thunder rumbles far away."]


@pytest.fixture(scope="module")
def encoder(minilm_path) -> TextEncoder:
    return TextEncoder(minilm_path, embed_dim=16, max_tokens=64).eval()


def test_cls_equals_transformers_last_hidden_state(encoder, minilm_path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    bert = AutoModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        batch = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
        expected = bert(**batch).last_hidden_state[:, 0]
        cls = encoder.cls(CAPTIONS)
        out = encoder(CAPTIONS)
    assert cls.shape == (2, 384) and encoder.d_s == 384
    torch.testing.assert_close(cls, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, encoder.projector(expected), rtol=1e-5, atol=1e-5)


def test_truncation_to_max_tokens(encoder):
    encoder.max_tokens = 6
    try:
        batch = encoder.tokenize(CAPTIONS, "cpu")
        assert batch["input_ids"].shape == (2, 6)
        assert batch["input_ids"][:, -1].tolist() == [encoder.tokenizer.sep_token_id] * 2
    finally:
        encoder.max_tokens = 64


def trainable(enc: TextEncoder) -> set[str]:
    return {n for n, p in enc.named_parameters() if p.requires_grad}


def test_trainable_layers(minilm_path):
    everything = trainable(TextEncoder(minilm_path, 8, load_weights=False))
    assert not any(n.startswith("bert.pooler") for n in everything)  # unused by [CLS]: always frozen
    assert any(n.startswith("bert.embeddings") for n in everything)

    body_frozen = trainable(TextEncoder(minilm_path, 8, trainable_layers=0, load_weights=False))
    assert body_frozen == {"projector.weight", "projector.bias"}

    top2 = trainable(TextEncoder(minilm_path, 8, trainable_layers=2, load_weights=False))
    layers = {n.split(".")[3] for n in top2 if n.startswith("bert.encoder.layer.")}
    assert layers == {"4", "5"}  # MiniLM has 6 layers: only the top two train
    assert not any(n.startswith("bert.embeddings") for n in top2)


def test_missing_local_folder_fails_clearly(tmp_path):
    with pytest.raises(ClothoRetrieveError, match="cannot load the text model"):
        TextEncoder(tmp_path / "no-model-here", 8)
