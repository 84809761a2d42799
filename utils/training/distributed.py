"""Process-group helpers that also work, as no-ops, in a single process.

Launch with ``torchrun`` (LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)
or the legacy ``torch.distributed.launch`` (``--local_rank``). NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from utils.training.device import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(local_rank_arg: int, device: str | None) -> Context:
    """Join the process group when launched by torchrun or the legacy launcher; pick the device."""
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device, local_rank)
    if world_size > 1 or local_rank >= 0:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
        return Context(dist.get_rank(), dist.get_world_size(), max(local_rank, 0), dev)
    return Context(0, 1, 0, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on at least one."""
    if not dist.is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def gather_objects(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main_first(fn: Callable[[], T], is_main: bool) -> T:
    """Run ``fn`` on rank 0, then on the others once it is done (downloads, extraction).

    An exception on rank 0 is re-raised on every process instead of leaving them at the barrier.
    """
    error: list = [None]
    result = None
    if is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, on every rank
            error[0] = exc
    if dist.is_initialized():
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]
    return result if is_main else fn()
