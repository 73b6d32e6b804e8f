"""Loss across processes: 2 CPU ranks (gloo) under DDP equal one process on the same global batch.

Each rank embeds half of the global batch; the loss all-gathers embeddings and clip ids with
``distributed.gather_with_grad`` (torch.distributed.nn.functional.all_gather), so every rank computes
the global loss, and DDP's gradient averaging must then give exactly the gradient of the single-process
run.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from clotho_retrieve.distributed import gather_with_grad
from clotho_retrieve.losses import NTXentLoss, SupConLoss

WORLD = 2
SPLITS = {"even": [4, 4], "uneven": [5, 3]}  # rows per rank of the 8-row global batch


class TwoTower(nn.Module):
    """A small stand-in for RetrievalModel: one linear map per modality, unit-norm outputs."""

    def __init__(self):
        super().__init__()
        self.audio = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)

    def forward(self, x_audio, x_text):
        return F.normalize(self.audio(x_audio), dim=-1), F.normalize(self.text(x_text), dim=-1)


def global_batch():
    g = torch.Generator().manual_seed(0)
    x_audio, x_text = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
    clip_ids = torch.tensor([0, 1, 0, 2, 3, 1, 4, 0])  # clips 0 and 1 repeat, across ranks too
    return x_audio, x_text, clip_ids


def make_model() -> TwoTower:
    torch.manual_seed(123)
    return TwoTower()


def losses():
    return {"ntxent": NTXentLoss(), "supcon": SupConLoss(), "ntxent_masked": NTXentLoss(mask_same_clip=True)}


def run_rank(rank: int, port: int, out_paths: list[str]) -> None:
    """One process of the spawned group: DDP on its share of the batch; saves loss and gradients."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        x_audio, x_text, clip_ids = global_batch()
        results = {}
        for split, sizes in SPLITS.items():
            lo = sum(sizes[:rank])
            part = slice(lo, lo + sizes[rank])
            for name, loss_fn in losses().items():
                ddp = nn.parallel.DistributedDataParallel(make_model())
                audio, text = ddp(x_audio[part], x_text[part])
                loss = loss_fn(audio, text, clip_ids[part])
                loss.backward()
                grads = {k: p.grad.clone() for k, p in ddp.module.named_parameters()}
                results[(split, name)] = (loss.detach(), grads)
        torch.save(results, out_paths[rank])
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_loss_and_gradients_equal_single_process(tmp_path):
    paths = [str(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    port = free_port()
    mp.spawn(run_rank, args=(port, paths), nprocs=WORLD, join=True)
    per_rank = [torch.load(p, weights_only=True) for p in paths]

    x_audio, x_text, clip_ids = global_batch()
    for split in SPLITS:
        for name, loss_fn in losses().items():
            model = make_model()
            audio, text = model(x_audio, x_text)
            loss = loss_fn(audio, text, clip_ids)
            loss.backward()
            for rank_results in per_rank:
                rank_loss, rank_grads = rank_results[(split, name)]
                torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-5, atol=1e-6)
                for k, p in model.named_parameters():
                    torch.testing.assert_close(
                        rank_grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=f"{split} {name} {k}"
                    )


def test_gather_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
