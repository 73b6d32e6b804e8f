"""Pretrained CLAP through the Encoder interface, offline: tiny random CLAP models built with ClapConfig and
saved with save_pretrained (one in transformers 5's processor layout, one in the hub's
preprocessor_config.json layout), audio files in real formats written here, and transformers' own
ClapFeatureExtractor / ClapModel as the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

from clotho_retrieve.clap import (  # noqa: E402
    ClapEncoder,
    ClapFrontEnd,
    clap_weights_file,
    decode_mono,
    is_clap_front_end,
    is_clap_model,
    load_clap,
    resample,
)
from clotho_retrieve.encoder import Encoder  # noqa: E402
from clotho_retrieve.metrics import multi_relevance_metrics, read_relevance_csv  # noqa: E402
from clotho_retrieve.utils import ClothoRetrieveError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
CORPUS = ["a dog barks", "door creaking", "rain on a roof", "birds sing in the morning", "a car passes by"]


def tiny_tokenizer():
    """A RoBERTa-style byte-level BPE tokenizer trained in memory (<s> text </s>)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=300, min_frequency=1, special_tokens=SPECIAL)
    bpe.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    return RobertaTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=512,
    )  # fmt: skip


def build_tiny_clap(folder, fused: bool, seed: int) -> None:
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        ClapTextConfig,
    )

    tok = tiny_tokenizer()
    text = ClapTextConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    audio = ClapAudioConfig(
        patch_embeds_hidden_size=16, hidden_size=128, depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 8],
        enable_fusion=fused, fusion_type="aff_2d" if fused else None,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=24))
    fe = ClapFeatureExtractor(truncation="fusion" if fused else "rand_trunc", frequency_min=50)
    model.save_pretrained(folder)
    if fused:  # the hub's layout: preprocessor_config.json + tokenizer files
        fe.save_pretrained(folder)
        tok.save_pretrained(folder)
    else:  # transformers 5's layout: processor_config.json
        ClapProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("clap")
    out = {}
    for kind, fused in (("unfused", False), ("fused", True)):
        build_tiny_clap(root / f"tiny-{kind}", fused, seed=int(fused))
        out[kind] = str(root / f"tiny-{kind}")
    assert (root / "tiny-fused" / "preprocessor_config.json").is_file()
    assert not (root / "tiny-unfused" / "preprocessor_config.json").exists()
    return out


@pytest.fixture(scope="module")
def encoders(models):
    return {kind: load_clap(path, batch_size=2) for kind, path in models.items()}


# Each file: (name, sample rate, seconds, per channel: [(frequency Hz, amplitude)], soundfile subtype)
FILES = [
    ("w8k.wav", 8000, 3.0, [[(300, 0.3), (1000, 0.2)]], "PCM_16"),
    ("m22k_stereo.mp3", 22050, 12.5, [[(440, 0.3)], [(2000, 0.2), (660, 0.1)]], None),
    ("o44k_stereo.ogg", 44100, 4.0, [[(250, 0.2), (3000, 0.1)], [(800, 0.3)]], None),
    ("sub/f96k_stereo.flac", 96000, 10.7, [[(500, 0.2), (12000, 0.1)], [(5000, 0.3)]], "PCM_24"),
    ("w48k_corner.wav", 48000, 480200 / 48000, [[(700, 0.4)]], "FLOAT"),  # 10 s + 200 samples
]


def analytic(channels, t: np.ndarray) -> np.ndarray:
    """The written signal at times t (s): per channel a sum of sines; (len(t), channels)."""
    return np.stack(
        [sum(a * np.sin(2 * np.pi * f * t + 0.3 * i) for i, (f, a) in enumerate(ch)) for ch in channels],
        axis=1,
    )


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sounds")
    for name, sr, seconds, channels, subtype in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(round(sr * seconds)) / sr
        sf.write(folder / name, analytic(channels, t).astype(np.float32), sr, subtype=subtype)
    return folder


def reference_input(path, model_dir):
    """The checkpoint's own ClapFeatureExtractor on the decoded, mixed-down, 48-kHz clip, seed 0."""
    from transformers import ClapFeatureExtractor

    with sf.SoundFile(str(path)) as f:  # not sf.read: its seek(0) makes MP3 samples differ by a float ulp
        data, sr = f.read(dtype="float32", always_2d=True), f.samplerate
    wave = soxr.resample(data.mean(axis=1), sr, 48000)
    fe = ClapFeatureExtractor.from_pretrained(model_dir)
    np.random.seed(0)
    return fe(wave, sampling_rate=48000, return_tensors="pt")


# ----------------------------------------------------------------------------------------------
# What is a CLAP model
# ----------------------------------------------------------------------------------------------
def test_is_clap_model(models, tmp_path):
    assert is_clap_model(models["fused"]) and is_clap_model(models["unfused"])
    run = tmp_path / "runs" / "clap-run"  # a run of ours, even with "clap" in its name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"embed_dim": 1024, "attention": "self"}))
    assert not is_clap_model(run)
    assert not is_clap_model(tmp_path)  # no config.json
    assert not is_clap_model(run / "config.json")  # a file
    for hub_id in ("laion/clap-htsat-unfused", "laion/larger_clap_general", "someone/My-CLAP-finetune"):
        assert is_clap_model(hub_id)
    for other in ("bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2", "a/b/clap", "./x/clap"):
        assert not is_clap_model(other)


def test_loading_errors_are_one_line(models, tmp_path):
    assert clap_weights_file("laion/no-such-clap") is None
    with pytest.raises(ClothoRetrieveError, match="laion/no-such-clap.*download --model") as err:
        load_clap("laion/no-such-clap")  # HF_HUB_OFFLINE=1 (conftest): not in the cache
    assert "\n" not in str(err.value)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ClothoRetrieveError, match="not a CLAP model \\(model_type 'bert'\\)"):
        load_clap(bert)
    broken = tmp_path / "broken"
    shutil.copytree(models["fused"], broken)
    pre = json.loads((broken / "preprocessor_config.json").read_text())
    (broken / "preprocessor_config.json").write_text(json.dumps({**pre, "truncation": "rand_trunc"}))
    with pytest.raises(ClothoRetrieveError, match="fuses 4 Mel channel.*'rand_trunc'"):
        load_clap(broken)


# ----------------------------------------------------------------------------------------------
# Audio input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unfused", "fused"])
def test_audio_input_is_the_feature_extractors(kind, models, encoders, audio_dir):
    enc = encoders[kind]
    for name, *_ in FILES:
        got = enc.audio_inputs_from_file(audio_dir / name)
        want = reference_input(audio_dir / name, models[kind])
        np.testing.assert_array_equal(got, want["input_features"][0].numpy(), err_msg=name)
        assert got.dtype == np.float32 and got.shape == ((4 if kind == "fused" else 1), 1001, 64)
        if kind == "fused":  # a clip alone is always "longer" in fusion mode: what ClapEncoder passes
            assert bool(want["is_longer"][0, 0])


def test_decoding_and_resampling_match_the_written_signal(audio_dir):
    """Lossless files: mono mix-down at 48 kHz equals the analytic signal; lossy ones correlate with it."""
    for name, _sr, seconds, channels, subtype in FILES:
        wave, sr = decode_mono(audio_dir / name)
        x = resample(wave, sr, 48000)
        assert sr == _sr and abs(len(x) - seconds * 48000) <= 1
        t = np.arange(len(x)) / 48000
        want = analytic(channels, t).mean(axis=1)
        inner = slice(2400, len(x) - 2400)  # 50 ms from either edge
        if subtype:  # WAV, FLAC: quantisation and the resampler's ripple only
            assert np.max(np.abs(x[inner] - want[inner])) < 1e-4, name
        else:  # OGG, MP3
            assert np.corrcoef(x[inner], want[inner])[0, 1] > 0.999, name


def test_crops_are_repeatable_and_leave_numpy_alone(encoders, audio_dir):
    long_clip = audio_dir / "m22k_stereo.mp3"
    for enc in encoders.values():
        np.random.seed(123)
        state = np.random.get_state()
        a = enc.audio_inputs_from_file(long_clip)
        after = np.random.get_state()
        assert all(np.array_equal(x, y) for x, y in zip(state, after, strict=True))  # restored
        np.random.seed(7)
        np.testing.assert_array_equal(enc.audio_inputs_from_file(long_clip), a)
    # the crop is a real crop of the 12.5-s clip: another seed picks other frames
    fe = encoders["unfused"].clap_front_end
    other = ClapFrontEnd.from_dict({**fe.to_dict(), "crop_seed": 1})
    wave, sr = decode_mono(long_clip)
    assert not np.array_equal(other.inputs(wave, sr), fe.inputs(wave, sr))


def test_bad_files_fail_with_the_file_name(encoders, tmp_path):
    enc = encoders["unfused"]
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.mp3").write_text("not audio")
    sf.write(tmp_path / "cut.wav", np.zeros(48000, np.float32), 48000)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "cut.wav").read_bytes()[:20000])
    for name, reason in (("empty.wav", "empty file"), ("text.mp3", "unreadable audio"), ("cut.wav", "trunc")):
        with pytest.raises(ClothoRetrieveError, match=reason) as err:
            enc.audio_inputs_from_file(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name))


def test_front_end_dict_round_trip(encoders):
    fe = encoders["fused"].clap_front_end
    d = encoders["fused"].front_end
    assert d == fe.to_dict() and is_clap_front_end(d) and is_clap_front_end(fe)
    assert d["preset"] == "clap" and d["sample_rate"] == 48000 and d["truncation"] == "fusion"
    assert fe.shape == (4, 1001, 64) and encoders["unfused"].clap_front_end.shape == (1, 1001, 64)
    attrs = {k: (b"none" if v is None else np.asarray(v)[()] if not isinstance(v, str) else v.encode())
             for k, v in d.items()}  # fmt: skip  # as HDF5 attributes read back
    assert ClapFrontEnd.from_dict({**attrs, "format": "x"}) == fe
    assert fe.differences(encoders["unfused"].clap_front_end) == ["truncation: 'fusion' != 'rand_trunc'"]
    from clotho_retrieve.features import PRESETS

    assert not is_clap_front_end(PRESETS["paper"].to_dict()) and not is_clap_front_end(PRESETS["paper"])


def test_features_file_holds_clap_inputs(encoders, audio_dir, tmp_path):
    """The (C * T, F) rows fit the HDF5 features layout unchanged; read back, they embed the same."""
    from clotho_retrieve.feature_file import FeatureFile, write_feature_file

    enc = encoders["fused"]
    names = [name for name, *_ in FILES[:2]]
    rows = [enc.clap_front_end.file_features(audio_dir / n) for n in names]
    path = write_feature_file(tmp_path / "clap.h5", names, [r for r, _ in rows], [d for _, d in rows],
                              enc.clap_front_end)  # fmt: skip
    with FeatureFile(path) as ff:
        assert ClapFrontEnd.from_dict(ff.attrs) == enc.clap_front_end
        back = [ff[i] for i in range(len(ff))]
    assert back[0].shape == (4 * 1001, 64)
    want = enc.encode_audio([enc.audio_inputs_from_file(audio_dir / n) for n in names])
    np.testing.assert_allclose(enc.encode_audio(back), want, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unfused", "fused"])
def test_audio_embeddings_are_get_audio_features(kind, models, encoders, audio_dir):
    from transformers import ClapModel

    enc = encoders[kind]
    assert isinstance(enc, Encoder) and isinstance(enc, ClapEncoder)
    assert enc.weights == (Path(models[kind]) / "model.safetensors").resolve()
    model = ClapModel.from_pretrained(models[kind]).eval()
    names = [name for name, *_ in FILES]
    A = enc.encode_audio([enc.audio_inputs_from_file(audio_dir / n) for n in names])  # batches of 2
    assert A.shape == (len(names), 24) and A.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), 1.0, atol=1e-6)
    with torch.inference_mode():
        for name, a in zip(names, A, strict=True):
            inputs = reference_input(audio_dir / name, models[kind])  # with the extractor's own is_longer
            ref = model.get_audio_features(**inputs).pooler_output[0].numpy()
            np.testing.assert_allclose(a, ref, atol=2e-5, err_msg=name)
    assert np.abs(A @ A.T - np.eye(len(A))).max() > 1e-3  # distinct clips, distinct embeddings
    again = enc.encode_audio([enc.audio_inputs_from_file(audio_dir / n) for n in names])
    np.testing.assert_array_equal(again, A)  # deterministic
    alone = enc.encode_audio([enc.audio_inputs_from_file(audio_dir / names[-1])])  # batch of one
    np.testing.assert_allclose(alone, A[-1:], atol=1e-6)  # independent of the clips batched with it


@pytest.mark.parametrize("kind", ["unfused", "fused"])
def test_text_embeddings_are_get_text_features(kind, models, encoders):
    from transformers import ClapModel, ClapProcessor

    enc = encoders[kind]
    model = ClapModel.from_pretrained(models[kind]).eval()
    processor = ClapProcessor.from_pretrained(models[kind])
    texts = ["a dog barks", "door creaking", "rain on a roof and birds sing in the morning"]
    T = enc.encode_text(texts)
    np.testing.assert_allclose(np.linalg.norm(T, axis=1), 1.0, atol=1e-6)
    with torch.inference_mode():
        tokens = processor(text=texts, padding=True, return_tensors="pt")
        ref = model.get_text_features(**tokens).pooler_output
    np.testing.assert_allclose(T, ref.numpy(), atol=2e-5)
    assert enc.n_tokens("a dog barks") == len(processor.tokenizer("a dog barks")["input_ids"])

    long = " ".join(CORPUS * 3)  # longer than the 30 positions of the tiny model
    assert enc.max_text_tokens == 30 and enc.n_tokens(long) > 30
    ids = processor.tokenizer(long)["input_ids"]
    cut = torch.tensor([ids[:29] + [processor.tokenizer.eos_token_id]])  # <s> ... </s>, 30 tokens
    with torch.inference_mode():
        ref = model.get_text_features(input_ids=cut, attention_mask=torch.ones_like(cut)).pooler_output
    np.testing.assert_allclose(enc.encode_text([long]), ref.numpy(), atol=2e-5)


def test_one_tower_loads_alone(models, encoders, audio_dir):
    text_only = load_clap(models["fused"], parts=("text",))
    texts = ["a dog barks", "a car passes by"]
    np.testing.assert_allclose(text_only.encode_text(texts), encoders["fused"].encode_text(texts), atol=1e-6)
    assert not hasattr(text_only.model, "audio_model")
    with pytest.raises(ClothoRetrieveError, match="without its audio tower"):
        text_only.encode_audio([np.zeros((4, 1001, 64), np.float32)])
    audio_only = load_clap(models["unfused"], parts=("audio",))
    x = [encoders["unfused"].audio_inputs_from_file(audio_dir / FILES[0][0])]
    np.testing.assert_allclose(audio_only.encode_audio(x), encoders["unfused"].encode_audio(x), atol=1e-6)
    with pytest.raises(ClothoRetrieveError, match=r"shape \(4, 1001, 64\), expected \(1, 1001, 64\)"):
        audio_only.encode_audio([np.zeros((4, 1001, 64), np.float32)])


def test_end_to_end_library_search_and_evaluation(encoders, audio_dir, tmp_path):
    """A tiny sound library: decode -> embed -> query by text and by example -> evaluate with judgements."""
    enc = encoders["unfused"]
    paths = sorted(p for p in audio_dir.rglob("*") if p.is_file())
    names = [p.relative_to(audio_dir).as_posix() for p in paths]
    A = enc.encode_audio([enc.audio_inputs_from_file(p) for p in paths])  # the index: (N, D)

    queries = ["door creaking", "a dog barks"]
    S = enc.encode_text(queries) @ A.T  # (Q, N) cosine similarities
    top = np.argsort(-S, axis=1, kind="stable")  # query: best clips first
    ranked = np.take_along_axis(S, top, axis=1)
    assert S.shape == (2, len(paths)) and np.all(ranked[:, :-1] >= ranked[:, 1:])
    by_example = A[names.index("o44k_stereo.ogg")] @ A.T  # query --audio: the clip finds itself first
    assert names[int(np.argmax(by_example))] == "o44k_stereo.ogg"

    rel = tmp_path / "relevance.csv"
    best, second = names[top[0, 0]], names[top[0, 1]]
    rel.write_text(f"caption,file_name,relevance\ndoor creaking,{second},1\ndoor creaking,{best},1\n"
                   f"a dog barks,{names[top[1, -1]]},1\n")  # fmt: skip
    judged = read_relevance_csv(rel, names)
    m = multi_relevance_metrics(enc.encode_text(judged.queries) @ A.T, judged.relevant, k=16, ks=(1, 2))
    # query 1: its clips rank 1 and 2 -> AP 1; query 2: its clip ranks last (N) -> AP 1/N
    assert m == pytest.approx({"R@1": 0.5, "R@2": 0.5, "mAP@16": (1.0 + 1 / len(paths)) / 2}, abs=1e-6)


def test_download_text_model_fetches_a_clap_checkpoint(models, monkeypatch, tmp_path):
    """`download --text-model laion/...` keeps every file a CLAP checkpoint loads from (config, weights,
    preprocessor config, tokenizer) and drops duplicate .bin weights and other frameworks' files."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    from clotho_retrieve import download

    hub_files = [
        ".gitattributes", "README.md", "config.json", "merges.txt", "model.safetensors", "pytorch_model.bin",
        "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.json", "flax_model.msgpack", "tf_model.h5", "onnx/model.onnx",
    ]  # fmt: skip
    kept = {}

    def snapshot_download(repo_id, cache_dir=None, ignore_patterns=None, **kwargs):
        kept[repo_id] = set(filter_repo_objects(hub_files, ignore_patterns=ignore_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: hub_files)
    assert download.download_text_model("laion/clap-htsat-unfused") == tmp_path
    laion = kept["laion/clap-htsat-unfused"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "vocab.json",
            "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= laion  # fmt: skip
    assert not laion & {"pytorch_model.bin", "flax_model.msgpack", "tf_model.h5", "onnx/model.onnx"}
    # every file of a CLAP folder in the hub's layout (what load_clap reads) passes the same filter
    ours = sorted(p.name for p in Path(models["fused"]).iterdir())
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: ours)
    hub_files[:] = ours
    download.download_text_model("someone/clap-copy")
    assert kept["someone/clap-copy"] == set(ours)
