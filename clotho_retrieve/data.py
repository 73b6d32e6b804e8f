"""Training data: (clip, caption) pairs from the HDF5 log-Mel cache, batching, SpecAugment, and the
checks that every split a run reads shares one front end (:func:`open_split`, :func:`check_front_ends`).

One item is one (log-Mel, caption) pair. A Clotho clip has five captions, so an epoch either visits
all five pairs of every clip (``captions="all"``, the default, as in the DCASE 2022 Task 6B baseline)
or one caption per clip drawn afresh each epoch (``captions="random"``, five times shorter epochs).
Several splits (the paper's development + validation) are concatenated with globally unique clip ids,
which the contrastive losses use to tell positives from negatives when a batch holds a clip twice.

The sampler shuffles with a generator seeded by ``(seed, epoch)`` only, so an epoch's order does not
depend on anything that happened before it: a resumed run sees the same batches as an uninterrupted
one. Under DistributedDataParallel it shards each epoch like ``DistributedSampler`` (pad to a multiple
of the world size, then every ``world_size``-th index from ``rank``), so each process takes
``batch_size / world_size`` items per step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torchaudio.transforms as AT
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from clotho_retrieve.encoder import pad_batch
from clotho_retrieve.feature_file import FeatureFile, features_path
from clotho_retrieve.frontend import front_end_from_dict
from clotho_retrieve.utils import ClothoRetrieveError

__all__ = [
    "CAPTION_MODES", "PairDataset", "PairSampler", "SpecAugment", "check_front_ends", "collate_pairs",
    "front_end_diff", "make_loader", "open_split", "pad_batch",
]  # fmt: skip

CAPTION_MODES = ("all", "random")


def open_split(features: str | os.PathLike, split: str) -> FeatureFile:
    """The feature file of one split of a features folder, or a clear error naming it."""
    path = features_path(features, split)
    if not path.is_file():
        raise ClothoRetrieveError(
            f"{path}: no features for split {split!r}; run `clotho-retrieve features` for it"
        )
    return FeatureFile(path)


def front_end_diff(a: dict, b: dict) -> str:
    """'key: a != b; ...' over the settings two front ends (FrontEnd.to_dict()) disagree on; '' if none."""
    return "; ".join(
        f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    )


def check_front_ends(files: list[FeatureFile], expected: dict | None = None, expected_from: str = "") -> dict:
    """All files must share one front end (and match ``expected`` when given); returns it as a dict."""
    ref = files[0].front_end.to_dict()
    for ff in files[1:]:
        diff = front_end_diff(ref, ff.front_end.to_dict())
        if diff:
            raise ClothoRetrieveError(
                f"{ff.path}: front end differs from {files[0].path} ({diff}); compute all splits with the "
                "same `clotho-retrieve features` settings"
            )
    if expected is not None:
        diff = front_end_diff(front_end_from_dict(expected).to_dict(), ref)
        if diff:
            raise ClothoRetrieveError(
                f"{files[0].path}: front end does not match {expected_from} ({diff}); recompute the features "
                "with the run's front end"
            )
    return ref


class PairDataset(Dataset):
    """All (clip, caption) pairs of one or more feature files; item ``i`` is pair ``i``.

    ``pair_clip[i]`` is the global clip id of pair ``i`` (clips of the second file are numbered after
    those of the first, and so on); ``clip_first_pair[c]`` / ``clip_n_pairs[c]`` locate a clip's pairs.
    Clips without captions are skipped.
    """

    def __init__(self, files: Sequence[FeatureFile]):
        if not files:
            raise ClothoRetrieveError("no feature files given to train on")
        self.files = list(files)
        refs: list[tuple[int, int, int]] = []  # (file index, clip index in file, caption index)
        pair_clip: list[int] = []
        clip_first, clip_count = [], []
        clip_id = 0
        for f, ff in enumerate(self.files):
            for c, captions in enumerate(ff.captions):
                clip_first.append(len(refs))
                clip_count.append(len(captions))
                for k in range(len(captions)):
                    refs.append((f, c, k))
                    pair_clip.append(clip_id)
                clip_id += 1
        if not refs:
            names = ", ".join(str(getattr(ff, "path", "?")) for ff in self.files)
            raise ClothoRetrieveError(f"{names}: no captions to train on; was the cache built with captions?")
        self.refs = refs
        self.pair_clip = torch.tensor(pair_clip, dtype=torch.long)  # (P,)
        self.clip_first_pair = torch.tensor(clip_first, dtype=torch.long)  # (N_clips,)
        self.clip_n_pairs = torch.tensor(clip_count, dtype=torch.long)  # (N_clips,)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, int]:
        f, c, k = self.refs[i]
        ff = self.files[f]
        return ff[c], ff.captions[c][k], int(self.pair_clip[i])


def collate_pairs(items: list[tuple[np.ndarray, str, int]]) -> dict:
    """Pairs -> {"logmel" (B, T_max, M), "lengths" (B,), "texts" [B], "clip_ids" (B,)}."""
    logmel, lengths = pad_batch([it[0] for it in items])
    return {
        "logmel": logmel,
        "lengths": lengths,
        "texts": [it[1] for it in items],
        "clip_ids": torch.tensor([it[2] for it in items], dtype=torch.long),
    }


class PairSampler(Sampler[int]):
    """An epoch's pair indices for one process, a pure function of ``(seed, epoch, rank, world_size)``.

    ``captions="all"``: every pair once; ``"random"``: one uniformly drawn caption per clip (clips
    without captions are left out). Call :meth:`set_epoch` before each epoch, as with
    ``DistributedSampler``.
    """

    def __init__(
        self,
        dataset: PairDataset,
        captions: str = "all",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if captions not in CAPTION_MODES:
            raise ClothoRetrieveError(f"captions sampling must be one of {CAPTION_MODES}, got {captions!r}")
        self.dataset, self.captions, self.shuffle = dataset, captions, shuffle
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_indices(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        ds = self.dataset
        if self.captions == "all":
            idx = torch.arange(len(ds))
        else:
            has = ds.clip_n_pairs > 0
            draw = (torch.rand(len(ds.clip_n_pairs), generator=g) * ds.clip_n_pairs).long()
            idx = (ds.clip_first_pair + draw)[has]
        if self.shuffle:
            idx = idx[torch.randperm(len(idx), generator=g)]
        return idx

    def __len__(self) -> int:
        n = len(self.dataset) if self.captions == "all" else int((self.dataset.clip_n_pairs > 0).sum())
        return math.ceil(n / self.world_size)

    def __iter__(self) -> Iterator[int]:
        idx = self._epoch_indices()
        total = len(self) * self.world_size
        if total > len(idx):  # pad with the first indices so every process takes the same number of steps
            idx = torch.cat([idx, idx[: total - len(idx)]])
        return iter(idx[self.rank : total : self.world_size].tolist())


def make_loader(
    dataset: PairDataset,
    sampler: PairSampler,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of padded batches; workers each open their own HDF5 handle (FeatureFile is lazy)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


class SpecAugment(nn.Module):
    """SpecAugment (Park et al., 2019) on a batch of log-Mels: frequency and time masking only.

    Uses torchaudio's FrequencyMasking / TimeMasking with an independent mask per example. Masked
    bins are set to the batch's mean log-Mel value rather than 0 dB (which would be a loud value on a
    dB scale). Active only in training mode: ``eval()`` makes it the identity.
    """

    def __init__(self, freq_mask: int = 8, n_freq_masks: int = 2, time_mask: int = 40, n_time_masks: int = 2):
        super().__init__()
        self.freq = nn.ModuleList(AT.FrequencyMasking(freq_mask, iid_masks=True) for _ in range(n_freq_masks))
        self.time = nn.ModuleList(AT.TimeMasking(time_mask, iid_masks=True) for _ in range(n_time_masks))

    def forward(self, logmel: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, M), (B,) -> (B, T, M), masked in training mode only."""
        if not self.training or (not self.freq and not self.time):
            return logmel
        valid = torch.arange(logmel.shape[1], device=logmel.device) < lengths[:, None]  # (B, T)
        # mean over real frames only, as a 0-dim tensor (no host sync on CUDA)
        fill = (logmel.detach() * valid[..., None]).sum() / (valid.sum() * logmel.shape[2]).clamp(min=1)
        spec = logmel.transpose(1, 2).unsqueeze(1)  # (B, 1, M, T): torchaudio's (..., freq, time)
        for mask in [*self.freq, *self.time]:
            spec = mask(spec, fill)
        return spec.squeeze(1).transpose(1, 2)
