"""The index store: an index.h5 written by hand from the documented layout (format 1 and 2) is read,
searched and extended; the writer drops uncommitted rows, refuses a mismatched index, keeps rows."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from test_search import brute_force, unit

from clotho_retrieve.encoder import RunFingerprint
from clotho_retrieve.index import FORMAT_VERSION, EmbeddingIndex, IndexWriter
from clotho_retrieve.utils import ClothoRetrieveError

D = 8
SHA = "ab" * 32
FINGERPRINT = RunFingerprint("/runs/x/best", SHA, 123, 456)
FRONT_END = {"sample_rate": 44100, "n_mels": 64}
STR = h5py.string_dtype(encoding="utf-8")


def write_by_hand(folder, n: int, committed: int, captions_done: int, version: int) -> np.ndarray:
    """index.h5 straight from the layout in index/store.py's docstring (no IndexWriter): n rows of which
    ``committed`` count, two captions per clip of which the first ``captions_done`` clips' are embedded."""
    vectors = unit(np.random.default_rng(n).standard_normal((n, D)))
    folder.mkdir()
    with h5py.File(folder / "index.h5", "w") as h5:
        h5.create_dataset("audio", data=vectors, maxshape=(None, D))
        h5.create_dataset("names", data=[f"c{i}.wav" for i in range(n)], dtype=STR, maxshape=(None,))
        h5.create_dataset("sources", data=["e.h5"] * n, dtype=STR, maxshape=(None,))
        h5.create_dataset("durations", data=np.arange(n) + 0.5, maxshape=(None,))
        captions = [json.dumps([f"a {i}", f"b {i}"]) for i in range(n)]
        h5.create_dataset("captions", data=captions, dtype=STR, maxshape=(None,))
        if version >= 2:
            fps = [f"{i:032x}".encode() for i in range(n)]
            h5.create_dataset("clip_fingerprints", data=np.array(fps, "S32"), maxshape=(None,))
        m = 2 * n  # caption rows written, in clip order (some past captions_done: uncommitted)
        h5.create_dataset("caption_embeddings", data=unit(np.ones((m, D))), maxshape=(None, D))
        h5.create_dataset("caption_clip", data=np.repeat(np.arange(n), 2), maxshape=(None,))
        texts = [t for i in range(n) for t in (f"a {i}", f"b {i}")]
        h5.create_dataset("caption_text", data=texts, dtype=STR, maxshape=(None,))
        h5.attrs.update(
            run="/runs/x",
            which="best",
            run_model_dir=FINGERPRINT.model_dir,
            fingerprint=SHA,
            weights_size=123,
            weights_mtime_ns=456,
            embed_dim=D,
            front_end=json.dumps(FRONT_END),
            model_config=json.dumps({"embed_dim": D}),
            count=committed,
            captions_done=captions_done,
        )
        if version >= 2:
            h5.attrs.update(format_version=version, captions_wanted=True)
    return vectors


def writer(folder, embed_dim: int = D, front_end: dict = FRONT_END) -> IndexWriter:
    return IndexWriter(folder, FINGERPRINT, "/runs/x", "best", embed_dim, front_end, {"embed_dim": embed_dim})


@pytest.mark.parametrize("version", [1, 2])
def test_reads_an_index_written_from_the_documented_layout(tmp_path, version):
    vectors = write_by_hand(tmp_path / "i", n=9, committed=7, captions_done=7, version=version)
    with EmbeddingIndex(tmp_path / "i") as idx:
        assert (idx.count, idx.embed_dim, idx.front_end) == (7, D, FRONT_END)
        assert idx.fingerprint == FINGERPRINT and (idx.run, idx.which) == ("/runs/x", "best")
        np.testing.assert_array_equal(np.asarray(idx.vectors), vectors[:7])  # rows past count are not data
        assert idx.all_names() == [f"c{i}.wav" for i in range(7)]
        assert idx.names([5, 1, 5]) == ["c5.wav", "c1.wav", "c5.wav"]  # any order, repeats
        assert idx.durations([2]) == [2.5] and idx.captions([3]) == [["a 3", "b 3"]]
        assert idx.captions_wanted  # format 1: inferred from caption rows being embedded
        assert idx.has_caption_embeddings and idx.caption_vectors()[2][:3] == ["a 0", "b 0", "a 1"]
        queries = vectors[[6, 8]]  # row 8 is uncommitted: never a hit
        scores, ids = idx.search(queries, 7)
        np.testing.assert_array_equal(ids, brute_force(vectors[:7], queries, 7))
        np.testing.assert_allclose(scores[0, 0], 1.0, atol=1e-6)


def test_writer_upgrades_format_1_and_drops_uncommitted_rows(tmp_path):
    vectors = write_by_hand(tmp_path / "i", n=9, committed=7, captions_done=4, version=1)
    with writer(tmp_path / "i") as w:
        assert (w.count, w.captions_done) == (7, 4) and w.h5.attrs["format_version"] == FORMAT_VERSION
        assert w.h5["audio"].shape == (7, D) and w.h5["caption_clip"].shape == (8,)  # 4 clips x 2
        assert w.clip_fingerprints() == [b""] * 7  # unknown: a later `embed` re-embeds them
        w.add_clips(vectors[7:], ["x.wav", "y.wav"], ["f.h5"] * 2, [1.0, 2.0], [[], ["z"]])
        assert w.count == 9 and w.clip_fingerprints()[7:] == [b"", b""]
    with EmbeddingIndex(tmp_path / "i") as idx:
        assert idx.all_names()[6:] == ["c6.wav", "x.wav", "y.wav"] and idx.captions([8]) == [["z"]]
        assert not idx.has_caption_embeddings  # clips 4.. have none embedded yet


def test_writer_refuses_another_runs_or_shapes_index(tmp_path):
    write_by_hand(tmp_path / "i", n=3, committed=3, captions_done=3, version=2)
    with pytest.raises(ClothoRetrieveError, match="another front end or dimension"):
        writer(tmp_path / "i", embed_dim=D + 1)
    with pytest.raises(ClothoRetrieveError, match="another front end or dimension"):
        writer(tmp_path / "i", front_end={**FRONT_END, "n_mels": 32})
    other = RunFingerprint("/runs/y/best", "cd" * 32, 1, 2)
    with pytest.raises(ClothoRetrieveError, match="built by another run"):
        IndexWriter(tmp_path / "i", other, "/runs/y", "best", D, FRONT_END, {})


def test_keep_rows_keeps_clips_and_their_caption_rows(tmp_path):
    vectors = write_by_hand(tmp_path / "i", n=5, committed=5, captions_done=5, version=2)
    keep = np.array([True, False, True, False, True])
    with writer(tmp_path / "i") as w:
        w.keep_rows(keep)
        assert (w.count, w.captions_done, w.names()) == (3, 3, ["c0.wav", "c2.wav", "c4.wav"])
    with EmbeddingIndex(tmp_path / "i") as idx:
        np.testing.assert_array_equal(np.asarray(idx.vectors), vectors[keep])
        _, clip, texts = idx.caption_vectors()
        assert list(clip) == [0, 0, 1, 1, 2, 2] and texts == ["a 0", "b 0", "a 2", "b 2", "a 4", "b 4"]
