"""Data-parallel training under ``torchrun`` (PyTorch's own launcher, DDP underneath).

What each rank does, and why it stays in step with the others without extra messages:

- Every rank holds the same seeded generator and draws the same shuffles and flips for
  the *global* batch (``size`` x the per-rank batch), then takes its own slice of it.
  So the ranks' shares are disjoint, together they are exactly the batch one process
  would take with ``size`` times the batch, and a resumed run continues the same order.
- The student is wrapped in ``DistributedDataParallel``: gradients are averaged over
  the ranks during backward, so every rank takes the same optimizer step.
- BatchNorm's running statistics are broadcast from rank 0 after each step; the EMA
  teacher (Eq. 7) is then a plain per-rank copy updated from the same student weights,
  identical everywhere without being sent. (GroupNorm, ``norm="group"``, has no batch
  statistics at all; on GPUs ``SyncBatchNorm`` normalises over the global batch.)
- Decisions that depend on the clock (the time budget, the cosine schedule, a burn-in
  given as a share of the time) use rank 0's clock, broadcast each step, and a
  non-finite loss on any rank stops every rank.
- Only rank 0 writes checkpoints, events and logs.

The learning rate is multiplied by the world size (the linear scaling rule: the global
batch is ``size`` times larger); docs/scaling.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (``rank`` 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto") -> tuple[World, str]:
    """Join the process group torchrun describes in the environment.

    NCCL with one GPU per process (``cuda:LOCAL_RANK``) where CUDA is asked for or
    available, gloo on CPUs. Returns the world and the device this rank trains on.
    """
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current_world(), device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The student wrapped for data-parallel gradients (SyncBatchNorm on GPUs)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def from_main(values: list[float], world: World, device: torch.device | str = "cpu") -> list[float]:
    """Rank 0's ``values`` on every rank."""
    if world.size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def any_rank(flag: bool, world: World, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any."""
    if world.size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sync_buffers(model: nn.Module, world: World) -> None:
    """BatchNorm's running statistics (every buffer) from rank 0."""
    if world.size == 1:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)
