"""embed: reader -> encoder -> writer over a random tiny run; resume, append, re-embed, prune, FAISS."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from test_search import brute_force

from clotho_retrieve.embed import EmbedConfig, embed
from clotho_retrieve.feature_file import write_feature_file
from clotho_retrieve.frontend import FrontEnd
from clotho_retrieve.index import AnnConfig, EmbeddingIndex, IndexWriter, build_ann_index
from clotho_retrieve.models import ModelConfig, RetrievalModel
from clotho_retrieve.query import rank
from clotho_retrieve.utils import ClothoRetrieveError

# ----------------------------------------------------------------------------------------------
# embed: a random tiny run over a few synthetic clips
# ----------------------------------------------------------------------------------------------
EMBED_DIM = 24


def make_run(folder, text_model: str, seed: int = 0):
    """A randomly initialised tiny run (RUN/best/), enough for the mechanics of embed and query."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        backbone="tiny",
        attention="self",
        d_a=32,
        embed_dim=EMBED_DIM,
        text_model=text_model,
        front_end=FrontEnd().to_dict(),
    )
    model = RetrievalModel(cfg).eval()
    model.save_pretrained(folder / "best")
    return model


def other_run(run_dir, dest):
    """A copy of a run with one weight changed: another run as far as its fingerprint can tell."""
    shutil.copytree(run_dir, dest)
    weights = dest / "best" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte belongs to the last tensor's data, not the header
    weights.write_bytes(bytes(data))
    return dest


def synthetic_mels(n: int, seed: int) -> list[np.ndarray]:
    """Clips that differ in length, level and spectral tilt, so even a random encoder tells them apart."""
    rng = np.random.default_rng(seed)
    mels = []
    for _ in range(n):
        t = int(rng.integers(40, 90))
        tilt = rng.normal(size=64).cumsum() * 2
        mels.append((tilt + rng.normal(size=(t, 64)) * 4 - 40).astype(np.float32))
    return mels


@pytest.fixture(autouse=True)
def no_text_tower_export(monkeypatch):
    """Exporting MiniLM's text tower to ONNX takes ~12 s per new index, and the mechanics tested here do
    not need it: test_query.py tests embed's export and the queries that use it."""
    monkeypatch.setattr("clotho_retrieve.embed.ensure_text_tower", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm_path):
    folder = tmp_path_factory.mktemp("run")
    return folder, make_run(folder, minilm_path)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Two feature files sharing 3 clips: 12 clips with captions, then 7 (3 already seen) without."""
    folder = tmp_path_factory.mktemp("features")
    mels = synthetic_mels(16, seed=0)
    names = [f"c{i:02d}.wav" for i in range(16)]
    write_feature_file(
        folder / "a" / "evaluation.h5",
        names[:12],
        mels[:12],
        [10.0 + i for i in range(12)],
        FrontEnd(),
        captions=[[f"sound {i}", f"noise {i}"] for i in range(12)],
    )
    write_feature_file(folder / "b.h5", names[9:], mels[9:], [5.0] * 7, FrontEnd())
    return folder, names, mels


def encode_one(model, mel: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.encode_audio(torch.from_numpy(mel)[None], torch.tensor([len(mel)]))[0].numpy()


def test_embed_writes_the_documented_layout_and_appends(run, features, tmp_path):
    run_dir, model = run
    feat_dir, names, mels = features
    out = tmp_path / "index"
    summary = embed(run_dir, feat_dir / "a", out, EmbedConfig(batch_size=5, chunk_size=4, captions=True))
    assert (summary["clips"], summary["added"], summary["index_type"]) == (12, 12, "exact")
    with EmbeddingIndex(out) as idx:
        assert idx.all_names() == names[:12]
        vectors = np.asarray(idx.vectors)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        # batched, length-sorted, padded encoding == each clip encoded alone
        for i in (0, 5, 11):
            np.testing.assert_allclose(vectors[i], encode_one(model, mels[i]), atol=1e-4)
        assert idx.durations([3, 0]) == [13.0, 10.0]
        assert idx.captions([2]) == [["sound 2", "noise 2"]]
        cap_vectors, cap_clip, cap_text = idx.caption_vectors()
        assert cap_vectors.shape == (24, EMBED_DIM)
        assert cap_text[4:6] == ["sound 2", "noise 2"] and list(cap_clip[4:6]) == [2, 2]
        with torch.inference_mode():
            np.testing.assert_allclose(cap_vectors[5], model.encode_text(["noise 2"])[0].numpy(), atol=1e-4)
        assert idx.fingerprint.sha256 and json.loads(idx._h5.attrs["model_config"])["embed_dim"] == EMBED_DIM
    assert json.loads((out / "embed.json").read_text())["chunk_size"] == 4

    # adding a second file: only its 4 new clips are embedded, old rows are untouched
    summary = embed(run_dir, feat_dir / "b.h5", out, EmbedConfig(chunk_size=3, captions=True))
    assert (summary["clips"], summary["added"], summary["unchanged"]) == (16, 4, 3)
    with EmbeddingIndex(out) as idx:
        assert idx.all_names() == names
        np.testing.assert_array_equal(np.asarray(idx.vectors)[:12], vectors)
        np.testing.assert_allclose(np.asarray(idx.vectors)[14], encode_one(model, mels[14]), atol=1e-4)
        assert idx.captions([13]) == [[]] and idx.has_caption_embeddings
        assert idx.caption_vectors()[0].shape == (24, EMBED_DIM)  # the new clips have no captions


def test_embed_resumes_after_an_interruption(run, features, tmp_path, monkeypatch):
    run_dir, _ = run
    feat_dir, names, _ = features
    out = tmp_path / "index"
    real_add = IndexWriter.add_clips
    calls = {"n": 0}

    def crash_on_third_chunk(self, emb, names, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # half-written chunk: rows appended but never committed
            self._append(self.h5["audio"], emb)
            raise KeyboardInterrupt
        return real_add(self, emb, names, *args, **kw)

    monkeypatch.setattr(IndexWriter, "add_clips", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        embed(run_dir, feat_dir / "a" / "evaluation.h5", out, EmbedConfig(chunk_size=4))
    with EmbeddingIndex(out) as idx:
        assert idx.count == 8 and idx.all_names() == names[:8]
    monkeypatch.setattr(IndexWriter, "add_clips", real_add)
    summary = embed(run_dir, feat_dir / "a" / "evaluation.h5", out, EmbedConfig(chunk_size=4))
    assert (summary["added"], summary["unchanged"], summary["clips"]) == (4, 8, 12)
    with h5py.File(out / "index.h5") as h5:
        assert h5["audio"].shape == (12, EMBED_DIM) and h5["names"].shape == (12,)
    # an index too big for memory is streamed from HDF5 with the same ranking
    with EmbeddingIndex(out) as small, EmbeddingIndex(out, in_memory_max=0) as streamed:
        assert isinstance(small.vectors, np.ndarray) and not isinstance(streamed.vectors, np.ndarray)
        queries = np.asarray(small.vectors)[[1, 7]]
        np.testing.assert_array_equal(small.search(queries, 6)[1], streamed.search(queries, 6)[1])


def test_faiss_index_is_built_rebuilt_and_removed(run, features, tmp_path):
    run_dir, _ = run
    feat_dir, names, _ = features
    out = tmp_path / "index"
    embed(run_dir, feat_dir / "a", out, EmbedConfig(index_type="hnsw"))
    with EmbeddingIndex(out) as idx:
        assert idx.index_type == "hnsw" and idx.ann.ntotal == 12
        np.testing.assert_array_equal(idx.search(idx.vectors[:3], 1)[1][:, 0], [0, 1, 2])
    embed(run_dir, feat_dir / "b.h5", out, EmbedConfig(index_type="hnsw"))  # appending rebuilds it
    assert json.loads((out / "faiss.json").read_text())["count"] == 16
    assert build_ann_index(out, "exact") == "exact"
    assert not (out / "faiss.index").exists()
    assert build_ann_index(out, "ivf", AnnConfig(nlist=2, nprobe=2)) == "ivf"
    with EmbeddingIndex(out) as idx:
        assert idx.index_type == "ivf"
        queries = np.asarray(idx.vectors)[[4, 15]]
        want = brute_force(np.asarray(idx.vectors), queries, 5)
        np.testing.assert_array_equal(idx.search(queries, 5)[1], want)
    # one probed cell of 8 can hold fewer than k clips: FAISS pads with id -1, which results drop
    build_ann_index(out, "ivf", AnnConfig(nlist=8, nprobe=1))
    with EmbeddingIndex(out) as idx:
        ids = idx.search(np.asarray(idx.vectors)[:1], 16)[1][0]
        hits = rank(idx, ["q"], np.asarray(idx.vectors)[:1], "audio", k=16)[0].hits
        assert [h.row for h in hits] == [i for i in ids if i >= 0]


def test_embed_refuses_another_runs_index_and_bad_inputs(run, features, tmp_path):
    run_dir, _ = run
    feat_dir, _, _ = features
    out = tmp_path / "index"
    embed(run_dir, feat_dir / "b.h5", out)
    other = other_run(run_dir, tmp_path / "other")
    with pytest.raises(ClothoRetrieveError, match="built by another run"):
        embed(other, feat_dir / "b.h5", out)
    with pytest.raises(ClothoRetrieveError, match="no such features"):
        embed(run_dir, tmp_path / "missing.h5", tmp_path / "x")
    with pytest.raises(ClothoRetrieveError, match="no model.safetensors"):
        embed(tmp_path, feat_dir / "b.h5", tmp_path / "x")
    write_feature_file(
        tmp_path / "hop256.h5", ["x.wav"], synthetic_mels(1, 5), [1.0], FrontEnd(hop_length=256)
    )
    with pytest.raises(ClothoRetrieveError, match="hop_length"):
        embed(run_dir, tmp_path / "hop256.h5", tmp_path / "x")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "index.h5").write_bytes(b"not hdf5")
    with pytest.raises(ClothoRetrieveError, match="not a readable index"):
        EmbeddingIndex(tmp_path / "junk")
    with pytest.raises(ClothoRetrieveError, match="no index.h5"):
        EmbeddingIndex(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# embed into an existing index: changed clips re-embedded, removed ones pruned, old indexes upgraded
# ----------------------------------------------------------------------------------------------
def caption_rows_match_clips(idx: EmbeddingIndex, model) -> None:
    """Every caption row belongs to its clip, in clip order, and holds that caption's embedding."""
    cap_vectors, cap_clip, cap_text = idx.caption_vectors()
    want_clip = [r for r in range(idx.count) for _ in idx.captions([r])[0]]
    want_text = [c for r in range(idx.count) for c in idx.captions([r])[0]]
    assert list(cap_clip) == want_clip and cap_text == want_text
    with torch.inference_mode():
        np.testing.assert_allclose(cap_vectors, model.encode_text(cap_text).numpy(), atol=1e-4)


def test_embed_keeps_the_index_in_step_with_changed_features(run, features, tmp_path, monkeypatch):
    run_dir, model = run
    feat_dir, names, mels = features
    out = tmp_path / "index"
    embed(run_dir, feat_dir / "a", out, EmbedConfig(chunk_size=4, captions=True, index_type="hnsw"))
    with EmbeddingIndex(out) as idx:
        before = np.asarray(idx.vectors).copy()
    # the library changed: clips 3 and 7 re-recorded (new captions), clip 11 gone, one clip new
    new_mels = list(mels[:11]) + synthetic_mels(1, seed=9)
    new_mels[3], new_mels[7] = mels[7] + 1.0, mels[3][:50]
    new_names = names[:11] + ["new.wav"]
    captions = [[f"sound {i}", f"noise {i}"] for i in range(12)]
    captions[3], captions[7] = ["changed three"], ["changed seven", "again", "and again"]
    write_feature_file(tmp_path / "v2.h5", new_names, new_mels, [1.0] * 12, FrontEnd(), captions=captions)

    real_update = IndexWriter.update_clips

    def crash_after_audio(self, rows, emb, *args, **kw):  # rows written, fingerprints never
        self.h5["audio"][rows] = emb
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexWriter, "update_clips", crash_after_audio)
    with pytest.raises(KeyboardInterrupt):
        embed(run_dir, tmp_path / "v2.h5", out, EmbedConfig(chunk_size=1, index_type="hnsw"))
    assert not (out / "faiss.index").exists()  # dropped before any row changed: never stale
    monkeypatch.setattr(IndexWriter, "update_clips", real_update)
    summary = embed(run_dir, tmp_path / "v2.h5", out, EmbedConfig(chunk_size=1, index_type="hnsw"))
    assert [summary[k] for k in ("added", "updated", "removed", "unchanged", "clips")] == [1, 2, 0, 9, 13]
    with EmbeddingIndex(out) as idx:
        vectors = np.asarray(idx.vectors)
        assert idx.all_names() == names[:12] + ["new.wav"]  # c11 stays without --prune
        for row, mel in ((3, new_mels[3]), (7, new_mels[7]), (12, new_mels[11])):
            np.testing.assert_allclose(vectors[row], encode_one(model, mel), atol=1e-4)
        same = [r for r in range(12) if r not in (3, 7)]
        np.testing.assert_array_equal(vectors[same], before[same])
        assert idx.captions([3, 7]) == [captions[3], captions[7]]
        assert idx.durations([3, 4]) == [1.0, 14.0]  # row 4 unchanged keeps its duration
        assert idx.has_caption_embeddings  # kept complete although --captions was not given
        caption_rows_match_clips(idx, model)
        assert idx.ann.ntotal == 13  # FAISS rebuilt over the changed rows
        np.testing.assert_array_equal(idx.search(vectors[[3, 7]], 1)[1][:, 0], [3, 7])

    summary = embed(run_dir, tmp_path / "v2.h5", out, EmbedConfig(index_type="hnsw"), prune=True)
    assert [summary[k] for k in ("added", "updated", "removed", "unchanged", "clips")] == [0, 0, 1, 12, 12]
    with EmbeddingIndex(out) as idx:
        assert idx.all_names() == new_names
        np.testing.assert_array_equal(np.asarray(idx.vectors), vectors[list(range(11)) + [12]])
        caption_rows_match_clips(idx, model)
        assert idx.ann.ntotal == 12


def test_an_index_without_clip_fingerprints_is_re_embedded_once(run, features, tmp_path, monkeypatch):
    run_dir, model = run
    feat_dir, names, _ = features
    out = tmp_path / "index"
    embed(run_dir, feat_dir / "a", out, EmbedConfig(captions=True))
    with h5py.File(out / "index.h5", "a") as h5:  # what format version 1 wrote
        del h5["clip_fingerprints"]
        for key in ("format_version", "captions_wanted"):
            del h5.attrs[key]
        before = h5["audio"][:]

    # interrupted while re-embedding from row 0: the caption rows of every clip are already dropped
    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexWriter, "update_clips", interrupt)
    with pytest.raises(KeyboardInterrupt):
        embed(run_dir, feat_dir / "a", out)
    monkeypatch.undo()
    summary = embed(run_dir, feat_dir / "a", out, EmbedConfig(chunk_size=5))
    assert (summary["updated"], summary["unchanged"], summary["added"]) == (12, 0, 0)
    assert summary["captions_embedded_for"] == 12  # still wanted, although none were left
    with EmbeddingIndex(out) as idx:
        caption_rows_match_clips(idx, model)
    with h5py.File(out / "index.h5") as h5:
        assert h5.attrs["format_version"] == 2 and h5["clip_fingerprints"].shape == (12,)
        np.testing.assert_allclose(h5["audio"][:], before, atol=1e-6)
    summary = embed(run_dir, feat_dir / "a", out)
    assert (summary["updated"], summary["unchanged"]) == (0, 12)
