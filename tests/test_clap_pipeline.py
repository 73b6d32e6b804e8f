"""A pretrained CLAP model through the whole pipeline, offline: a tiny random CLAP (test_clap.build_tiny_clap)
given wherever a run is: `embed --model CLAP --audio-dir` on mixed-format audio, `query`, `features --model`,
`evaluate` (same JSON and CSV as a run's), `evaluate --relevance` by hand, and `table --peers`.

The reference for every embedding is the ClapEncoder itself on each file (test_clap checks it against
transformers' ClapFeatureExtractor and ClapModel)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
sf = pytest.importorskip("soundfile")

from test_clap import analytic, build_tiny_clap  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from clotho_retrieve.clap import load_clap  # noqa: E402
from clotho_retrieve.cli import app  # noqa: E402
from clotho_retrieve.feature_file import FeatureFile, write_feature_file  # noqa: E402
from clotho_retrieve.frontend import FrontEnd  # noqa: E402
from clotho_retrieve.index import EmbeddingIndex  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# (name, sample rate, seconds, per channel: [(Hz, amplitude)], soundfile subtype or None for the default)
LIBRARY = [
    ("dog.wav", 8000, 2.0, [[(300, 0.3), (1000, 0.2)]], "PCM_16"),
    ("street/car.mp3", 22050, 3.0, [[(440, 0.3)], [(2000, 0.2)]], None),
    ("street/door.ogg", 44100, 2.5, [[(250, 0.2), (3000, 0.1)], [(800, 0.3)]], None),
    ("birds.flac", 96000, 1.5, [[(5000, 0.2)], [(9000, 0.1), (6000, 0.2)]], "PCM_24"),
    ("rain.WAV", 48000, 11.0, [[(700, 0.2), (150, 0.2)]], "FLOAT"),  # longer than 10 s: a crop
]


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def write_audio(folder, name, sr, seconds, channels, subtype):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(round(sr * seconds)) / sr
    sf.write(folder / name, analytic(channels, t).astype(np.float32), sr, subtype=subtype)


@pytest.fixture(scope="module")
def clap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-clap"
    build_tiny_clap(folder, fused=False, seed=3)
    return str(folder), load_clap(folder, batch_size=4)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Mixed formats, rates and channel counts, a sub-folder, and two bad files."""
    folder = tmp_path_factory.mktemp("sounds")
    for spec in LIBRARY:
        write_audio(folder, *spec)
    (folder / "broken.mp3").write_text("not audio at all")
    (folder / "empty.flac").write_bytes(b"")
    (folder / "notes.txt").write_text("not an audio suffix: not listed")
    return folder


def reference(enc, folder, names) -> np.ndarray:
    """(N, D) audio embeddings of the files, each computed alone from its file."""
    return np.concatenate([enc.encode_audio([enc.audio_inputs_from_file(folder / n)]) for n in names])


# ----------------------------------------------------------------------------------------------
# embed --audio-dir, then query
# ----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # Rich: no line folds in the tables and lines checked below


@pytest.fixture(scope="module")
def sounds_index(clap, library, tmp_path_factory):
    """`embed --model CLAP --audio-dir LIBRARY --out INDEX`: (index, stdout)."""
    index = tmp_path_factory.mktemp("indexes") / "sounds-index"
    result = CliRunner(env={"COLUMNS": "400"}).invoke(
        app, ["embed", "--model", clap[0], "--audio-dir", str(library), "--out", str(index), "--workers", "1",
              "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return index, result.stdout


def test_embed_a_folder_and_query_it(clap, library, sounds_index):
    model, enc = clap
    index, out = sounds_index
    assert "5 clips (5 added, 0 updated, 0 removed, 0 unchanged)" in out
    report = [line for line in out.splitlines() if "broken.mp3" in line or "empty.flac" in line]
    assert len(report) == 2 and "unreadable audio" in report[0] and "empty file" in report[1]

    with EmbeddingIndex(index) as idx:
        names = idx.all_names()
        assert sorted(names) == sorted(n for n, *_ in LIBRARY)  # notes.txt is not audio
        assert idx.run == str(Path(model).resolve()) and idx.model_config["model"] == model
        assert idx.front_end == enc.front_end
        A = np.asarray(idx.vectors)
    np.testing.assert_allclose(A, reference(enc, library, names), atol=1e-5)
    with FeatureFile(index / "features.h5") as ff:  # the features embed computed: the model's input
        assert ff.front_end == enc.clap_front_end and ff[0].shape == (1001, 64)

    # text query: the scores and order of a brute-force ranking with the model's own text embedding
    code, out, err = invoke("query", "--index", index, "dog barking", "--json", "-k", "3")
    assert code == 0, err
    hits = json.loads(out)["hits"]
    s = A @ enc.encode_text(["dog barking"])[0]  # (N,)
    top = np.argsort(-s, kind="stable")[:3]
    assert [h["name"] for h in hits] == [names[i] for i in top]
    np.testing.assert_allclose([h["score"] for h in hits], s[top], atol=1e-5)
    code, table, _ = invoke("query", "--index", index, "dog barking", "-k", "2")  # the Rich table
    assert code == 0 and names[top[0]] in table

    # query by example: the recording finds itself
    code, out, err = invoke("query", "--index", index, "--audio", library / "street" / "door.ogg", "--json")
    assert code == 0, err
    first = json.loads(out)["hits"][0]
    assert first["name"] == "street/door.ogg" and first["score"] == pytest.approx(1.0, abs=1e-5)


def test_the_index_follows_the_folder(clap, library, sounds_index, tmp_path):
    """One file more, one less: the index mirrors the folder; the unchanged clips are neither decoded nor
    embedded again."""
    model, enc = clap
    lib, index = tmp_path / "lib", tmp_path / "index"
    shutil.copytree(library, lib)  # copy2: sizes and mtimes kept, so the features are reusable
    shutil.copytree(sounds_index[0], index)
    write_audio(lib, "new/owl.wav", 16000, 1.0, [[(400, 0.3)]], "PCM_16")
    (lib / "dog.wav").unlink()
    code, out, err = invoke("embed", "--model", model, "--audio-dir", lib, "--out", index, "--workers", "1",
                            "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert "updated: 6 reused, 1 computed, 1 removed" in out  # 4 clips, 2 bad files still skipped
    assert "5 clips (1 added, 0 updated, 1 removed, 4 unchanged)" in out
    with EmbeddingIndex(index) as idx:
        names = idx.all_names()
        assert sorted(names) == sorted(["new/owl.wav"] + [n for n, *_ in LIBRARY[1:]])
        np.testing.assert_allclose(np.asarray(idx.vectors), reference(enc, lib, names), atol=1e-5)


def test_wrong_model_or_folder_is_one_line(clap, library, sounds_index, tmp_path):
    model, _ = clap
    index = tmp_path / "index"
    shutil.copytree(sounds_index[0], index)
    other = tmp_path / "other-clap"
    shutil.copytree(model, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # another checkpoint, as far as the fingerprint can tell
    weights.write_bytes(bytes(data))
    empty = tmp_path / "no-audio"
    empty.mkdir()
    cases = [
        (("query", "x", "--index", index, "--model", other), "built by other weights"),
        (("embed", "--model", other, "--audio-dir", library, "--out", index), "built by another run"),
        (("embed", "--model", model, "--audio-dir", empty, "--out", tmp_path / "i2"), "no audio files"),
        (("embed", "--model", model, "--features", index / "features.h5", "--audio-dir", library, "--out",
          tmp_path / "i3"), "either --features or --audio-dir, not both"),
        (("embed", "--model", "laion/no-such-clap", "--audio-dir", library, "--out", tmp_path / "i4"),
         "download --model laion/no-such-clap"),
    ]  # fmt: skip
    for args, message in cases:
        code, out, err = invoke(*args)
        assert code == 1, (args, out, err)
        assert message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------
# A tiny Clotho-layout dataset: features --model, evaluate (as for a run), table --peers
# ----------------------------------------------------------------------------------------------
CAPTIONS = {
    "a.wav": ["a dog barks", "dog barking loudly"],
    "b.flac": ["door creaking", "a door creaks open"],
    "c.ogg": ["rain on a roof", "rain falls"],
    "d.mp3": ["birds sing in the morning", "birds chirp"],
}


@pytest.fixture(scope="module")
def clotho(tmp_path_factory):
    root = tmp_path_factory.mktemp("clotho")
    specs = [(8000, 2.0, [[(300, 0.3), (1000, 0.2)]], "PCM_16"), (96000, 1.5, [[(5000, 0.2)], [(900, 0.1)]],
             "PCM_24"), (44100, 2.5, [[(250, 0.2)], [(800, 0.3)]], None), (22050, 3.0, [[(440, 0.3)]], None)]
    for name, spec in zip(CAPTIONS, specs, strict=True):
        write_audio(root / "evaluation", name, *spec)
    with open(root / "clotho_captions_evaluation.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])  # Clotho's header
        for name, caps in CAPTIONS.items():
            writer.writerow([name, *caps] + [""] * (5 - len(caps)))  # empty cells: fewer captions
    return root


@pytest.fixture(scope="module")
def paper_features(clotho, tmp_path_factory):
    out = tmp_path_factory.mktemp("work") / "features"
    code, _, err = invoke("features", "--root", clotho, "--out", out, "--workers", "1")
    assert code == 0, err
    return out


def test_evaluate_a_clap_model_like_a_run(clap, clotho, paper_features, tmp_path, minilm_path):
    from test_embed import make_run

    model, enc = clap
    # its features must be the model's input: a one-line hint names the command that computes them
    code, _, err = invoke("evaluate", "--model", model, "--features", paper_features, "--json")
    assert code == 1 and f"features --root {clotho.resolve()} --split evaluation --model {model}" in err
    feats = tmp_path / "features-clap"
    code, _, err = invoke("features", "--root", clotho, "--split", "evaluation", "--model", model,
                          "--out", feats, "--workers", "1")  # fmt: skip
    assert code == 0, err
    code, _, err = invoke("features", "--root", clotho, "--model", model, "--preset", "panns", "--out", feats)
    assert code == 1 and "drop --preset" in err

    csv_path = tmp_path / "submission.csv"
    code, out, err = invoke("evaluate", "--model", model, "--features", feats, "--json",
                            "--submission", csv_path, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)

    # the same JSON as for a run (a random tiny run of ours on the paper's features)
    run = tmp_path / "run"
    make_run(run, minilm_path)
    code, out, err = invoke("evaluate", "--model", run, "--features", paper_features, "--json",
                            "--submission", tmp_path / "run.csv", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    ours = json.loads(out)
    assert set(result) == set(ours)
    for key in ("text_to_audio", "audio_to_text", "chance"):
        assert json.dumps(sorted(result[key])) == json.dumps(sorted(ours[key]))
        if key == "chance":
            assert all(set(result[key][d]) == set(ours[key][d]) for d in ours[key])
    assert (result["n_clips"], result["n_captions"], result["checkpoint"]) == (4, 8, None)

    # metrics and the CSV from the model's embeddings of the files themselves
    names = list(CAPTIONS)
    A = reference(enc, clotho / "evaluation", names)
    captions = [c for n in names for c in CAPTIONS[n]]
    S = enc.encode_text(captions) @ A.T  # (8, 4)
    truth = np.repeat(np.arange(4), 2)
    rank = np.array([(row >= row[t]).sum() for row, t in zip(S, truth, strict=True)])  # pessimistic ties
    for k in (1, 5, 10):
        assert result["text_to_audio"][f"R@{k}"] == pytest.approx(np.mean(rank <= k))
    assert result["text_to_audio"]["mAP@10"] == pytest.approx(np.mean(1.0 / rank), abs=1e-6)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert [r[0] for r in rows[1:]] == captions
    assert [r[1] for r in rows[1:]] == [names[int(np.argmax(s))] for s in S]


def test_table_peers_prints_a_zero_shot_row(clap, paper_features, tmp_path):
    from clotho_retrieve.evaluate import evaluate
    from clotho_retrieve.experiments import peer_slug

    model, _ = clap
    out = tmp_path / "table"
    args = ("table", "--features", paper_features, "--out", out, "--variants", "none", "--peers", model,
            "--device", "cpu")  # fmt: skip
    code, stdout, err = invoke(*args)
    assert code == 0, err
    assert "tiny-clap (zero-shot)" in stdout.replace("\n", "")
    peer_feats = paper_features.parent / f"features-{peer_slug(model)}"
    want = evaluate(model, peer_feats, device="cpu")["text_to_audio"]  # built by `table` from the root
    with open(out / "table.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    (peer,) = [r for r in rows if r["source"] == "peer"]
    assert peer["variant"] == f"{model} (zero-shot)"
    for m in ("R@1", "R@5", "R@10", "mAP@10"):
        assert float(peer[m]) == pytest.approx(100 * want[m], abs=0.005)
    assert [r["source"] for r in rows] == ["peer"] + ["paper"] * 4 + ["chance"]
    assert f"| peer | {model} (zero-shot) |" in (out / "table.md").read_text()
    code, _, err = invoke(*args)  # again: read back, not evaluated again
    assert code == 0 and "scored earlier" in err


# ----------------------------------------------------------------------------------------------
# evaluate --relevance, by hand
# ----------------------------------------------------------------------------------------------
class HandEncoder:
    """Embeddings chosen by hand: clip i (its features' first value) and each query text map to 2-D unit
    vectors, so every similarity, tie and rank below is known exactly."""

    name, embed_dim, front_end, max_text_tokens = "hand", 2, None, 64
    AUDIO = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)  # clips a, b, c, d
    TEXT = {"q one": [1.0, 0.0], "q two": [0.0, 1.0]}

    def encode_audio(self, inputs):
        return np.stack([self.AUDIO[int(x[0, 0])] for x in inputs])

    def encode_text(self, texts):
        return np.array([self.TEXT[t] for t in texts], np.float32)

    def n_tokens(self, text):
        return 1


def test_evaluate_relevance_equals_a_hand_computation(tmp_path, monkeypatch):
    import clotho_retrieve.evaluate as evaluate_module

    names = ["a.wav", "b.wav", "c.wav", "d.wav"]
    mels = [np.full((5 + i, 64), float(i), np.float32) for i in range(4)]
    write_feature_file(tmp_path / "evaluation.h5", names, mels, [1.0] * 4, FrontEnd(), [[]] * 4)
    rel = tmp_path / "relevance.csv"
    rel.write_text("caption,file_name,relevance\n"
                   "q one,b.wav,1\nq one,c.wav,1\nq one,a.wav,0\n"
                   "q two,a.wav,1\nq two,b.wav,2\n")  # fmt: skip
    monkeypatch.setattr(evaluate_module, "load_model", lambda *a, **kw: HandEncoder())
    # Scores: q one -> a 1, b 1, c .6, d 0;  q two -> a 0, b 0, c .8, d 1.
    # q one: relevant b ties with irrelevant a -> a first: b rank 2, c rank 3.  AP@16 = (1/2 + 2/3) / 2
    # q two: d, c first; a and b (both relevant, tied) ranks 3 and 4.           AP@16 = (1/3 + 2/4) / 2
    ap_one, ap_two = (1 / 2 + 2 / 3) / 2, (1 / 3 + 2 / 4) / 2
    code, out, err = invoke("evaluate", "--model", "hand", "--features", tmp_path / "evaluation.h5",
                            "--relevance", rel, "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["n_queries"] == 2 and result["k"] == 16
    assert result["text_to_audio"] == pytest.approx(
        {"R@1": 0.0, "R@5": 1.0, "R@10": 1.0, "mAP@16": (ap_one + ap_two) / 2}
    )
    # a random order of 4 clips with 2 relevant: R@1 = 2/4; E[AP@16] by the closed form (metrics.py)
    assert result["chance"]["text_to_audio"]["R@1"] == pytest.approx(0.5)
    # --k 2: q one keeps rank 2 only (1/2 / min(2, 2)); q two has nothing in its top 2
    code, out, err = invoke("evaluate", "--model", "hand", "--features", tmp_path / "evaluation.h5",
                            "--relevance", rel, "--k", "2", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["text_to_audio"]["mAP@2"] == pytest.approx((1 / 2 / 2 + 0) / 2)
    code, out, err = invoke("evaluate", "--model", "hand", "--features", tmp_path / "evaluation.h5",
                            "--relevance", rel)  # the Rich table
    assert code == 0 and "mAP@16" in out and "2 judged queries" in out
    code, _, err = invoke("evaluate", "--model", "hand", "--features", tmp_path / "evaluation.h5", "--k", "3")
    assert code == 1 and "--k goes with --relevance" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("caption,file_name,relevance\nq one,zzz.wav,1\n")
    code, _, err = invoke("evaluate", "--model", "hand", "--features", tmp_path / "evaluation.h5",
                          "--relevance", bad)  # fmt: skip
    assert code == 1 and "bad.csv line 2" in err and "zzz.wav" in err
    with FeatureFile(tmp_path / "evaluation.h5") as ff:  # the stub really sees the clips by their first value
        assert [int(ff[i][0, 0]) for i in range(4)] == [0, 1, 2, 3]


def test_train_refuses_a_clap_models_input(tmp_path):
    """CLAP input rows have 64 columns like a log-Mel, but training on them would be nonsense."""
    from clotho_retrieve.clap import ClapFrontEnd
    from clotho_retrieve.config import ModelConfig, TrainConfig
    from clotho_retrieve.train import train
    from clotho_retrieve.utils import ClothoRetrieveError

    fe = ClapFrontEnd(truncation="rand_trunc")
    rows = [np.zeros((fe.channels * fe.frames, fe.n_mels), np.float32)] * 2
    write_feature_file(tmp_path / "development.h5", ["a.wav", "b.wav"], rows, [1.0, 1.0], fe, [["x"], ["y"]])
    cfg = TrainConfig(features=str(tmp_path), out=str(tmp_path / "run"), val_split=None, device="cpu")
    with pytest.raises(ClothoRetrieveError, match="development.h5: holds a CLAP model's input"):
        train(ModelConfig(backbone="tiny"), cfg)


def test_default_index_folder_of_a_clap_model_is_reused(clap, library, tmp_path, monkeypatch):
    """Without --out, embed writes WORKSPACE/indexes/<model name>, and a re-run brings the same folder in
    step (the index records the model as embed was given it), and query finds it as the latest index."""
    monkeypatch.setenv("CLOTHO_RETRIEVE_WORKSPACE", str(tmp_path / "ws"))
    model, _ = clap
    args = ("embed", "--model", model, "--audio-dir", library, "--workers", "1", "--device", "cpu")
    for _ in range(2):
        code, out, err = invoke(*args)
        assert code == 0, err
    indexes = (tmp_path / "ws" / "indexes").iterdir()  # and .NAME.lock files: docs/safety.md
    assert sorted(p.name for p in indexes if not p.name.startswith(".")) == ["tiny-clap"]
    assert "5 clips (0 added, 0 updated, 0 removed, 5 unchanged)" in out
    code, out, err = invoke("query", "dog barking", "--json", "-k", "1")
    assert code == 0, err
    assert json.loads(out)["hits"][0]["name"] in {n for n, *_ in LIBRARY}
