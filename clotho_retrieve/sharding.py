"""Splitting a stage's work over processes and machines: which share of the items this process takes.

A ``Shard`` is "part ``index`` of ``count``": the items at positions index, index + count, index + 2 count,
... of a list every process builds the same way (round robin: balanced counts, and each part spans the
whole list, so parts finish at about the same time). Two ways to get one:

* under ``torchrun --nnodes N --nproc_per_node P`` (or any launcher that sets the same variables), from
  the environment: RANK, WORLD_SIZE, and LOCAL_WORLD_SIZE (processes on this machine, to share its
  cores among them). ``barrier()`` then waits for every rank (torch.distributed over gloo, CPU only);
* from an option such as ``--shard 3/8``, for jobs launched separately (a SLURM job array); nothing
  connects the parts then, and a later step (``merge``) checks that all of them finished.

The `features` stage uses it (features.py); `embed` can shard its clips the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from clotho_retrieve.utils import ClothoRetrieveError


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (0-based) of ``count``; ``launcher``: "torchrun", "option" or "" (one process)."""

    index: int = 0
    count: int = 1
    launcher: str = ""
    local_count: int = 1  # processes of the same run on this machine (they share its cores)

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ClothoRetrieveError(f"shard {self.index}/{self.count}: need 0 <= i < N")

    @property
    def tag(self) -> str:
        """A file-name-safe label of the part, e.g. "3of8"."""
        return f"{self.index}of{self.count}"

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def is_single(self) -> bool:
        return self.count == 1

    def take(self, n: int) -> range:
        """Positions of this part among ``n`` items: index, index + count, ..."""
        return range(self.index, n, self.count)

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` (as in ``--shard 3/8``) -> Shard(3, 8)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
            raise ClothoRetrieveError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/8 (of 8 jobs)")
        return cls(int(m.group(1)), int(m.group(2)), launcher="option")

    @classmethod
    def from_env(cls) -> Shard:
        """This process's part under torchrun (RANK / WORLD_SIZE / LOCAL_WORLD_SIZE); a single process
        when WORLD_SIZE is unset or 1."""
        world = os.environ.get("WORLD_SIZE")
        if not world or int(world) <= 1:
            return cls()
        try:
            rank, world = int(os.environ["RANK"]), int(world)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except (KeyError, ValueError):
            raise ClothoRetrieveError(
                "WORLD_SIZE is set but RANK is missing or not a number; launch with torchrun"
            ) from None
        return cls(rank, world, launcher="torchrun", local_count=max(1, local))


def resolve_shard(option: str | None) -> Shard:
    """The part this process computes: ``--shard i/N`` when given, else torchrun's environment."""
    env = Shard.from_env()
    if option:
        if env.launcher == "torchrun":
            raise ClothoRetrieveError("--shard: not under torchrun, which already gives each rank its part")
        return Shard.parse(option)
    return env


def default_workers(shard: Shard) -> int:
    """Worker processes when none are asked for: this machine's cores, shared by its ranks."""
    return max(1, (os.cpu_count() or 1) // shard.local_count)


class ProcessGroup:
    """torch.distributed over gloo for the ranks of a torchrun launch (nothing for other shards).

    ``barrier()`` returns once every rank reached it; the timeout is long, as parts may take hours.
    """

    def __init__(self, shard: Shard, timeout_hours: float = 72.0):
        self.shard, self.started = shard, False
        if shard.launcher != "torchrun":
            return
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=timeout_hours))
            self.started = True

    def barrier(self) -> None:
        if self.shard.launcher == "torchrun":
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
