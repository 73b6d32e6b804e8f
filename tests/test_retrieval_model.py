"""RetrievalModel: config round trip, embeddings, batch independence, save/from_pretrained, errors."""

from __future__ import annotations

import json

import pytest
import torch

from clotho_retrieve.models import ModelConfig, RetrievalModel
from clotho_retrieve.utils import ClothoRetrieveError

CAPTIONS = ["a dog barks", "rain on a tin roof", "birds singing at dawn"]


def tiny_config(minilm_path: str, attention: str = "self") -> ModelConfig:
    return ModelConfig(backbone="tiny", attention=attention, d_a=32, embed_dim=16, text_model=minilm_path)


@pytest.fixture(scope="module")
def model(minilm_path) -> RetrievalModel:
    torch.manual_seed(0)
    return RetrievalModel(tiny_config(minilm_path, "gat")).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "best"
    model.save_pretrained(folder)
    return folder


def logmel_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    lengths = torch.tensor([80, 45, 12])
    x = torch.randn(3, 80, 64)
    for i, n in enumerate(lengths.tolist()):
        x[i, n:] = 9.0  # padding content must never matter
    return x, lengths


def test_config_json_round_trip_and_validation():
    cfg = ModelConfig(backbone="cnn10", attention="gat", d_a=512, front_end={"sample_rate": 44100})
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ClothoRetrieveError, match="unknown backbone 'resnet'"):
        ModelConfig(backbone="resnet")
    with pytest.raises(ClothoRetrieveError, match="unknown attention"):
        ModelConfig(attention="cross")


def test_embeddings_are_unit_norm(model):
    x, lengths = logmel_batch()
    with torch.no_grad():
        audio, text = model(x, lengths, CAPTIONS)
    assert audio.shape == text.shape == (3, 16)
    torch.testing.assert_close(audio.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("attention", ["none", "self", "gat"])
def test_clip_embedding_does_not_depend_on_its_batch(attention):
    torch.manual_seed(2)
    cfg = ModelConfig(backbone="tiny", attention=attention, d_a=32, embed_dim=16)
    m = RetrievalModel(cfg, parts=("audio",)).eval()  # audio only: no text model needed
    x, lengths = logmel_batch()
    with torch.no_grad():
        batch = m.encode_audio(x, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone = m.encode_audio(x[i : i + 1, :n], lengths[i : i + 1])
            torch.testing.assert_close(batch[i], alone[0], rtol=1e-4, atol=1e-6)
        A = m.attention_map(x, lengths)
    if attention == "none":
        assert A is None
    else:
        assert A.shape == (3, 5, 5)  # T' = 80 // 16
        torch.testing.assert_close(A.sum(dim=-1), torch.ones(3, 5))
        assert torch.all(A[2, :, 1:] == 0)  # clip 2 has T' = max(12 // 16, 1) = 1 frame


def test_save_and_from_pretrained_give_identical_embeddings(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors", "text"]
    # from_pretrained must not use cfg.text_model (a hub name, possibly offline): make it unusable
    cfg = json.loads((saved / "config.json").read_text())
    cfg["text_model"] = "no-such-org/no-such-model"
    (saved / "config.json").write_text(json.dumps(cfg))

    x, lengths = logmel_batch()
    loaded = RetrievalModel.from_pretrained(saved.parent)  # a run folder: uses best/
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded.encode_audio(x, lengths), model.encode_audio(x, lengths))
        assert torch.equal(loaded.encode_text(CAPTIONS), model.encode_text(CAPTIONS))

    text_only = RetrievalModel.from_pretrained(saved, parts=("text",))
    assert text_only.audio is None
    assert not any(k.startswith("audio.") for k in text_only.state_dict())
    with torch.no_grad():
        assert torch.equal(text_only.encode_text(CAPTIONS), model.encode_text(CAPTIONS))
    with pytest.raises(ClothoRetrieveError, match="without its audio tower"):
        text_only.encode_audio(x, lengths)


def test_save_replaces_an_existing_folder(model, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    model.save_pretrained(folder)
    assert not (folder / "stale.txt").exists() and (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


def test_from_pretrained_errors(saved, tmp_path):
    with pytest.raises(ClothoRetrieveError, match="no such model or run folder"):
        RetrievalModel.from_pretrained(tmp_path / "absent")
    with pytest.raises(ClothoRetrieveError, match="neither a model folder"):
        RetrievalModel.from_pretrained(tmp_path)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((saved / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ClothoRetrieveError, match="corrupt or unreadable safetensors"):
        RetrievalModel.from_pretrained(broken, parts=("audio",))

    (broken / "config.json").write_text("{not json")
    with pytest.raises(ClothoRetrieveError, match="unreadable model config"):
        RetrievalModel.from_pretrained(broken)

    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    cfg = json.loads((saved / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**cfg, "d_a": 48}))
    (mismatch / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    with pytest.raises(ClothoRetrieveError, match=r"has shape .*expected"):
        RetrievalModel.from_pretrained(mismatch, parts=("audio",))
    with pytest.raises(ClothoRetrieveError, match="missing the text model"):
        RetrievalModel.from_pretrained(mismatch, parts=("text",))


def test_bad_logmel_shape_fails_clearly(model):
    with pytest.raises(ClothoRetrieveError, match=r"expects \(B, T, 64\)"):
        model.encode_audio(torch.zeros(2, 50, 40), torch.tensor([50, 50]))
