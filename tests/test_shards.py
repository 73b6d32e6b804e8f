"""Sharded embed: torchrun ranks and `--shard i/N` jobs write parts that merge into the index a single
process writes (same rows, same order, equal embeddings); a part interrupted mid-way resumes losing
nothing; the merge refuses incomplete or foreign parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from test_embed import make_run, synthetic_mels
from typer.testing import CliRunner

from clotho_retrieve.cli import app
from clotho_retrieve.embed import EmbedConfig, embed
from clotho_retrieve.feature_file import write_feature_file
from clotho_retrieve.frontend import FrontEnd
from clotho_retrieve.index import CAPTION_COLUMNS, CLIP_COLUMNS, EmbeddingIndex, IndexWriter
from clotho_retrieve.index.parts import Shard, merge_parts, part_dir, shard_job
from clotho_retrieve.utils import ClothoRetrieveError

CFG = {"chunk_size": 3, "batch_size": 2}  # 16 clips -> 6 chunks -> shards of 3 chunks (9 and 7 clips)


# ----------------------------------------------------------------------------------------------
# Shards of the clip order
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [0, 1, 16, 100, 257])
@pytest.mark.parametrize("chunk", [1, 3, 256])
@pytest.mark.parametrize("of", [1, 2, 3, 8])
def test_shards_cover_the_clips_in_whole_chunks(total, chunk, of):
    ranges = [Shard(i, of).clip_range(total, chunk) for i in range(of)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (_, stop), (start, _) in zip(ranges[:-1], ranges[1:], strict=True):
        assert start == stop  # contiguous, in shard order
    for start, stop in ranges:
        assert start % chunk == 0 and (stop % chunk == 0 or stop == total)  # whole chunks
    sizes = [-(-(b - a) // chunk) for a, b in ranges]  # chunks per shard differ by at most one
    assert max(sizes) - min(sizes) <= 1


def test_shard_parse_and_the_job_of_a_process(monkeypatch):
    assert Shard.parse("3/8") == Shard(3, 8) and Shard(3, 8).name == "shard-00003-of-00008"
    for bad in ("8/8", "-1/2", "a/b", "3"):
        with pytest.raises(ClothoRetrieveError, match="--shard"):
            Shard.parse(bad)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert shard_job(None) is None  # one process, the whole index
    job = shard_job("1/4")
    assert (job.shard, job.merges) == (Shard(1, 4), False)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    job = shard_job(None)
    assert (job.shard, job.merges) == (Shard(0, 3), True)  # rank 0 of torchrun merges
    monkeypatch.setenv("RANK", "2")
    job = shard_job("1/4")  # torchrun inside an array task: rank r takes shard i W + r of N W
    assert (job.shard, job.merges) == (Shard(5, 12), False)


# ----------------------------------------------------------------------------------------------
# Embedding in parts
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path):
    """A tiny run, two feature files sharing 3 clips (16 clips in all), and the one-process index."""
    root = tmp_path_factory.mktemp("shards")
    make_run(root / "run", minilm_path)
    mels = synthetic_mels(16, seed=3)
    names = [f"c{i:02d}.wav" for i in range(16)]
    caps = [[f"sound {i}", f"noise {i}"] for i in range(12)]
    write_feature_file(root / "f" / "1.h5", names[:12], mels[:12], [10.0] * 12, FrontEnd(), captions=caps)
    write_feature_file(root / "f" / "2.h5", names[9:], mels[9:], [5.0] * 7, FrontEnd())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:
        embed(root / "run", root / "f", root / "single", EmbedConfig(captions=True, **CFG))
    finally:
        torch.set_num_threads(threads)
    return root, names


def assert_same_index(a, b) -> None:
    """Same rows in the same order: text columns equal, embeddings equal within float tolerance."""
    with h5py.File(a / "index.h5") as x, h5py.File(b / "index.h5") as y:
        for key in ("count", "captions_done", "fingerprint", "embed_dim", "front_end"):
            assert x.attrs[key] == y.attrs[key], key
        for name in CLIP_COLUMNS + CAPTION_COLUMNS:
            if name in ("audio", "caption_embeddings"):
                np.testing.assert_allclose(x[name][:], y[name][:], rtol=0, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(x[name][:], y[name][:], err_msg=name)


def test_torchrun_two_ranks_equal_one_process(setup):
    root, names = setup
    out = root / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "clotho_retrieve", "embed", "--checkpoint", str(root / "run"), "--features", str(root / "f"),
        "--out", str(out), "--captions", "--chunk-size", "3", "--batch-size", "2", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank, (start, stop) in enumerate([(0, 9), (9, 16)]):
        done = json.loads((part_dir(out, Shard(rank, 2)) / "done.json").read_text())
        assert (done["start"], done["stop"], done["total"], done["count"]) == (start, stop, 16, stop - start)
    assert_same_index(root / "single", out)
    with h5py.File(root / "single" / "index.h5") as x, h5py.File(out / "index.h5") as y:
        bit_identical = np.array_equal(x["audio"][:], y["audio"][:])
    print(f"two ranks vs one process: audio embeddings bit-identical: {bit_identical}")
    with EmbeddingIndex(out) as idx:
        assert idx.all_names() == names and idx.has_caption_embeddings
    assert json.loads((out / "embed.json").read_text())["chunk_size"] == 3


def test_a_shard_killed_mid_way_resumes_and_the_parts_merge(setup, tmp_path, monkeypatch):
    root, names = setup
    out = tmp_path / "index"
    cfg = EmbedConfig(captions=True, **CFG)
    real_add = IndexWriter.add_clips
    calls = {"n": 0}

    def killed_in_the_second_chunk(self, emb, names, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # rows appended but never committed, then the process dies
            self._append(self.h5["audio"], emb)
            raise KeyboardInterrupt
        return real_add(self, emb, names, *args, **kw)

    monkeypatch.setattr(IndexWriter, "add_clips", killed_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        embed(root / "run", root / "f", out, cfg, shard="1/2")
    part = part_dir(out, Shard(1, 2))
    assert not (part / "done.json").exists()
    with EmbeddingIndex(part) as idx:
        assert idx.all_names() == names[9:12]  # the first chunk of shard 1 (clips 9-15) was committed
        kept = np.asarray(idx.vectors).copy()
    with pytest.raises(ClothoRetrieveError, match="no complete part"):
        merge_parts(out)
    monkeypatch.setattr(IndexWriter, "add_clips", real_add)

    summary = embed(root / "run", root / "f", out, cfg, shard="1/2")  # re-run: resumes
    assert (summary["added"], summary["unchanged"], summary["clips"]) == (4, 3, 7)
    with EmbeddingIndex(part) as idx:
        np.testing.assert_array_equal(np.asarray(idx.vectors)[:3], kept)  # nothing redone, nothing lost
    with pytest.raises(ClothoRetrieveError, match=r"shards \[0\] of 2 not done"):
        merge_parts(out)
    embed(root / "run", root / "f", out, cfg, shard="0/2")
    result = CliRunner().invoke(app, ["merge-index", str(out), "--index-type", "exact"])
    assert result.exit_code == 0, result.output
    assert "16 clips from 2 parts" in " ".join(result.output.split())
    assert_same_index(root / "single", out)

    # a finished shard re-run has nothing to do; merging again gives the same index
    assert embed(root / "run", root / "f", out, cfg, shard="0/2")["added"] == 0
    merge_parts(out)
    assert_same_index(root / "single", out)


def test_merge_refuses_to_replace_a_one_process_index(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "index"
    embed(root / "run", root / "f", out, EmbedConfig(**CFG), shard="0/1")
    merge_parts(out)
    embed(root / "run", root / "f", out, EmbedConfig(**CFG))  # a one-process embed takes the index over
    with pytest.raises(ClothoRetrieveError, match="one-process embed"):
        merge_parts(out)
    with pytest.raises(ClothoRetrieveError, match="one-process embed"):
        embed(root / "run", root / "f", out, EmbedConfig(**CFG), shard="0/1")
    # parts of another chunk size do not line up with the recorded clip order of the others
    embed(root / "run", root / "f", tmp_path / "mixed", EmbedConfig(chunk_size=3), shard="0/2")
    embed(root / "run", root / "f", tmp_path / "mixed", EmbedConfig(chunk_size=5), shard="1/2")
    with pytest.raises(ClothoRetrieveError, match="not the next part"):
        merge_parts(tmp_path / "mixed")
