"""Tiny training data shared by the train and evaluate tests (fixtures in conftest.py)."""

from __future__ import annotations

import contextlib

import numpy as np

SOUNDS = ["dog barks", "rain falls", "car horn honks", "bird sings", "door slams", "water flows"]


def clips(seed: int = 0):
    """Six clips, each loud in its own Mel band, with two captions naming its sound."""
    rng = np.random.default_rng(seed)
    mels, captions = [], []
    for i, sound in enumerate(SOUNDS):
        mel = rng.normal(-40.0, 3.0, size=(40 + 8 * i, 64)).astype(np.float32)
        mel[:, 10 * i : 10 * i + 8] += 30.0
        mels.append(mel)
        captions.append([f"a {sound} loudly", f"the {sound} nearby"])
    return mels, captions


def model_cfg(text_model: str, **kw):
    from clotho_retrieve.models import ModelConfig

    return ModelConfig(backbone="tiny", attention="self", d_a=32, embed_dim=16, text_model=text_model, **kw)


@contextlib.contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
