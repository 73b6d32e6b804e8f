"""torch.distributed for training under ``torchrun``: join and leave the process group, rank facts,
barriers, and the differentiable all-gather the contrastive losses use.

``torchrun --nproc_per_node N -m clotho_retrieve train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
:func:`init` joins the group (NCCL on CUDA, gloo on CPU) and picks the process's device. A single
process (no torchrun) gets ``DistInfo(rank=0, world_size=1)`` and every function here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


@dataclass
class DistInfo:
    """This process's place in the group and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates, writes and prints."""
        return self.rank == 0


def init(device: str) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; ``device`` (cpu | cuda | cuda:K) becomes
    ``cuda:LOCAL_RANK`` for plain ``cuda`` across processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=torch.device(device))
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(info.local_rank)
    info.device = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return info


def teardown(info: DistInfo) -> None:
    """Leave the process group (after :func:`init` across processes)."""
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op for a single process)."""
    if info.world_size > 1:
        dist.barrier()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather x (B_r, ...) of every process keeping gradients -> (sum_r B_r, ...), in rank order.

    ``torch.distributed.nn.functional.all_gather`` carries the gradient back: each process computes the
    same global loss, and the backward pass sums the gradients of every process for this process's rows
    (as open_clip's ``gather_with_grad=True``). It needs equal shapes, so rows are padded to the largest
    batch and cut off again. A no-op (returns x) outside a multi-process group.
    """
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = dist_fn.all_gather(x.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
