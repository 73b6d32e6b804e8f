"""Training data: padding, (clip, caption) pairs across splits, epoch sampling and sharding, SpecAugment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clotho_retrieve.data import PairDataset, PairSampler, SpecAugment, collate_pairs, make_loader
from clotho_retrieve.encoder import pad_batch
from clotho_retrieve.feature_file import FeatureFile, write_feature_file
from clotho_retrieve.frontend import FrontEnd


def _write(path, n_clips, n_captions, seed, frames=(5, 9)) -> FeatureFile:
    rng = np.random.default_rng(seed)
    mels = [rng.normal(size=(int(rng.integers(*frames)), 64)).astype(np.float32) for _ in range(n_clips)]
    captions = [[f"{path.stem} clip {i} caption {k}" for k in range(n)] for i, n in enumerate(n_captions)]
    names = [f"{i}.wav" for i in range(n_clips)]
    write_feature_file(path, names, mels, [1.0] * n_clips, FrontEnd(), captions)
    return FeatureFile(path)


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    dev = _write(root / "development.h5", 4, [5, 5, 0, 2], seed=0)  # clip 2 has no captions
    val = _write(root / "validation.h5", 3, [5, 5, 5], seed=1)
    return dev, val


def test_pad_batch_zero_pads_and_reports_lengths():
    arrays = [np.full((n, 3), n, np.float32) for n in (2, 5, 1)]
    logmel, lengths = pad_batch(arrays)
    assert logmel.shape == (3, 5, 3)
    assert lengths.tolist() == [2, 5, 1]
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(logmel[i, : len(a)].numpy(), a)
        assert not logmel[i, len(a) :].any()


def test_pairs_span_splits_with_unique_clip_ids(two_files):
    dev, val = two_files
    ds = PairDataset([dev, val])
    assert len(ds) == 12 + 15  # every caption once; the captionless clip contributes nothing
    seen = {}
    for i in range(len(ds)):
        mel, caption, clip_id = ds[i]
        seen.setdefault(clip_id, set()).add(caption)
        file, clip = (dev, clip_id) if clip_id < len(dev) else (val, clip_id - len(dev))
        np.testing.assert_array_equal(mel, file[clip])
        assert caption in file.captions[clip]
    # global ids: dev 0..3, then val 4..6; dev clip 2 has no captions, so no pair
    assert {c: len(caps) for c, caps in seen.items()} == {0: 5, 1: 5, 3: 2, 4: 5, 5: 5, 6: 5}


def test_all_captions_sampler_is_a_seeded_permutation_per_epoch(two_files):
    ds = PairDataset(list(two_files))
    sampler = PairSampler(ds, "all", seed=3)
    orders = []
    for epoch in (1, 2, 1):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert sorted(orders[0]) == list(range(len(ds)))
    assert orders[0] != orders[1]  # reshuffled each epoch
    assert orders[0] == orders[2]  # but a pure function of (seed, epoch): resumable
    assert list(PairSampler(ds, "all", shuffle=False)) == list(range(len(ds)))


def test_random_caption_sampler_takes_one_pair_per_clip(two_files):
    ds = PairDataset(list(two_files))
    sampler = PairSampler(ds, "random", seed=0)
    draws = set()
    for epoch in range(60):
        sampler.set_epoch(epoch)
        idx = list(sampler)
        clips = ds.pair_clip[idx].tolist()
        assert sorted(clips) == [0, 1, 3, 4, 5, 6]  # every clip with captions exactly once
        draws.update(idx)
    assert len(draws) == len(ds)  # over epochs every caption gets drawn


@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_shards_cover_the_epoch_evenly(two_files, world_size):
    ds = PairDataset(list(two_files))  # 27 pairs: not a multiple of 2 or 4
    shards = []
    for rank in range(world_size):
        s = PairSampler(ds, "all", seed=1, rank=rank, world_size=world_size)
        s.set_epoch(5)
        shards.append(list(s))
    assert len({len(s) for s in shards}) == 1  # same number of steps on every process
    assert len(shards[0]) == -(-len(ds) // world_size)
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(len(ds)))
    assert len(flat) - len(set(flat)) == world_size * len(shards[0]) - len(ds)  # only the padding repeats


def test_loader_batches_are_padded_pairs(two_files):
    dev, _ = two_files
    ds = PairDataset([dev])
    sampler = PairSampler(ds, "all", shuffle=False)
    batches = list(make_loader(ds, sampler, batch_size=5))
    assert [len(b["texts"]) for b in batches] == [5, 5, 2]
    for start, b in zip((0, 5, 10), batches, strict=True):
        clips = ds.pair_clip[start : start + len(b["texts"])]
        assert b["clip_ids"].tolist() == clips.tolist()
        assert b["lengths"].tolist() == [int(dev.n_frames[c]) for c in clips]
        assert b["logmel"].shape == (len(clips), int(b["lengths"].max()), 64)
        assert b["texts"] == [ds[i][1] for i in range(start, start + len(clips))]
    assert collate_pairs([ds[0]])["logmel"].shape == (1, int(dev.n_frames[0]), 64)


def test_spec_augment_masks_whole_bands_and_frames_in_training_only():
    torch.manual_seed(0)
    logmel = torch.randn(8, 50, 64) - 40.0  # (B, T, M)
    lengths = torch.full((8,), 50)
    aug = SpecAugment(freq_mask=10, n_freq_masks=2, time_mask=12, n_time_masks=2)
    aug.eval()
    assert torch.equal(aug(logmel, lengths), logmel)
    aug.train()
    out = aug(logmel, lengths)
    assert out.shape == logmel.shape
    changed = out != logmel  # (B, T, M)
    assert changed.any()
    fill = logmel.mean()
    assert torch.allclose(out[changed], fill.expand(int(changed.sum())))
    # every changed cell lies in a fully masked Mel band or a fully masked frame of its clip
    band = changed.all(dim=1, keepdim=True)  # (B, 1, M)
    frame = changed.all(dim=2, keepdim=True)  # (B, T, 1)
    assert torch.equal(changed, band | frame)
    assert band.sum(dim=2).max() <= 2 * 10 and frame.sum(dim=1).max() <= 2 * 12
    assert not torch.equal(aug(logmel, lengths), out)  # masks drawn afresh per call
