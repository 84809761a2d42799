"""Process-group helpers that also work, as no-ops, in a single process.

Launch with ``torchrun`` (LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)
or the legacy ``torch.distributed.launch`` (``--local_rank``). NCCL on CUDA, gloo on the CPU.

Nodes need not share a disk: after the start, what every process needs from a file (a resumed
state, weights to fine-tune from, the best weights for the final score) is read by rank 0 alone
and reaches the others over the process group (:func:`from_main`). Small host-side questions
("has any process been asked to stop?") go over a CPU (gloo) group, so that asking them never
waits for the GPU.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from utils.runtime.device import resolve_device

T = TypeVar("T")
_host_group = None  # a gloo group beside an NCCL one; None: the default group is gloo already
_joined = False  # whether this process joined a process group (it may have left it since)


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
    global _host_group, _joined
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device, local_rank)
    if world_size > 1 or local_rank >= 0:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
            _joined = True
            if backend != "gloo":
                _host_group = dist.new_group(backend="gloo")
        return Context(dist.get_rank(), dist.get_world_size(), max(local_rank, 0), dev)
    return Context(0, 1, 0, dev)


def elastic_restarts() -> int:
    """How often ``torchrun --max-restarts`` has started this job's workers again (0: never).
    A restarted worker goes on from the run's own last state (``--resume auto``) and must not
    ``--overwrite`` what the first attempt wrote."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def cleanup() -> None:
    """Leave the process group, after freeing what still holds its resources: objects in
    reference cycles are otherwise freed during the interpreter's finalisation, after the group
    is gone, where gloo aborted a finished run's rank ("terminate called without an active
    exception", about 1 run in 30 of 3 processes on 2 busy cores)."""
    global _host_group
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _host_group = None


def joined_a_group() -> bool:
    """Whether this process was one of a process group (torchrun, the legacy launcher)."""
    return _joined


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one. Host memory only: it waits
    for the other processes' hosts, never for a device."""
    if not dist.is_initialized():
        return flag
    votes = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(votes, group=_host_group)
    return bool(votes[0] > 0)


def gather_objects(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def place() -> str:
    """This process in words that find it on a cluster: its rank, its node (torchrun's
    GROUP_RANK, where set) and its host."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    node = os.environ.get("GROUP_RANK")
    return (
        f"rank {rank} ({f'node {node}, ' if node is not None else ''}host {socket.gethostname()})"
    )


def unlike_main(value: T) -> list[tuple[str, T]]:
    """Where ``value`` is not rank 0's: ``[(rank 0's place, its value), (place, value) of each
    process whose value differs]``, the same list on every process; empty when every process
    agrees, as in a single process. For what must be equal everywhere before the run starts
    (a copy of the data on each node): one exchange, not one per check."""
    if not dist.is_initialized():
        return []
    everyone = gather_objects((place(), value))
    differing = [(where, other) for where, other in everyone[1:] if other != everyone[0][1]]
    return [everyone[0], *differing] if differing else []


def from_main(fn: Callable[[], T], ctx: Context) -> T:
    """``fn()`` run on rank 0 alone, its result given to every process (its tensors over the
    process group, on the devices they had there); an exception there is raised on every
    process. The other processes read no file: the nodes need not share a disk."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # raised below, on every process
            error = exc
    if dist.is_initialized():
        error, result = broadcast((error, result), ctx.device)
    if error is not None:
        raise error
    return result


def each_node_first(fn: Callable[[], T], ctx: Context) -> T:
    """``fn()`` on every process, rank 0 first, then the first process of each other node, then
    the rest: a download is made once per disk, shared by the nodes or not, and never by two
    processes of one node at once. An exception anywhere is raised on every process."""
    leader = ctx.local_rank == 0
    result = None
    for turn in (ctx.is_main, leader and not ctx.is_main, not leader):
        error = None
        if turn:
            try:
                result = fn()
            except Exception as exc:  # raised below, on every process
                error = exc
        errors = gather_objects(error)
        if first := next((e for e in errors if e is not None), None):
            raise first
    return result


def broadcast(obj: T, device: torch.device, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every process: pickled, except for its tensors, which travel
    one by one as tensors (through ``device`` for NCCL) and land where they were on ``src``."""
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensors: list[torch.Tensor] = []
    header: list = [None]
    if dist.get_rank() == src:
        buffer = io.BytesIO()
        _TensorPickler(buffer, tensors).dump(obj)
        places = [(t.shape, t.dtype, t.device.type == "cpu") for t in tensors]
        header[0] = (buffer.getvalue(), places)
    dist.broadcast_object_list(header, src=src, device=comm)
    payload, places = header[0]
    if dist.get_rank() == src:
        for t in tensors:
            dist.broadcast(t.detach().to(comm).contiguous(), src=src)
        return obj
    received = []
    for shape, dtype, on_cpu in places:
        t = torch.empty(shape, dtype=dtype, device=comm)
        dist.broadcast(t, src=src)
        received.append(t.cpu() if on_cpu else t.to(device))
    return _TensorUnpickler(io.BytesIO(payload), received).load()


class _TensorPickler(pickle.Pickler):
    def __init__(self, file, tensors: list[torch.Tensor]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj):  # a tensor is sent on its own; its place in the list stays
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, file, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid):
        return self.tensors[pid]
