"""torch.distributed for meta-training: which task slots a rank computes, and the collectives.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is started with gloo
on CPU and nccl on CUDA. Task slots are numbered globally and each rank computes a contiguous
share, so a slot's tasks and noise are the same whatever the number of ranks; meta-gradients are
summed with one all-reduce; rank 0 alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistContext:
    """This process's place in the job (``rank``/``world_size`` 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """The global indices ``0..n-1`` this rank computes (contiguous, sizes differ by at most one)."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` over ranks (the tensor itself when not distributed)."""
        if not self.enabled:
            return tensor
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (CPU tensors inside) on rank 0, in rank order; None elsewhere."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment, or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return DistContext(device=dev)
    owns = False
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    comm_device = dev if dev.type == "cuda" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), comm_device, owns)
