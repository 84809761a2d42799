"""``--device`` for every script: one decision, and one line when the machine cannot honour it."""

from __future__ import annotations

import os

import torch

from models.errors import UsageError


def resolve_device(name: str | None, local_rank: int = -1) -> torch.device:
    """CUDA when available unless ``name`` says otherwise; ``cuda`` alone means the process's
    local GPU. Selects it and allows TF32 matrix products there, as training uses."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.index is None:
        device = torch.device("cuda", max(local_rank, 0))
    count = torch.cuda.device_count()
    if device.index >= count:
        raise UsageError(
            f"--device {name}: this process would use GPU {device.index}, but {count} are visible"
        )
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device


def cpu_contention(device: torch.device) -> str | None:
    """Advice for a CPU run whose threads will wait on other work, or None: PyTorch's threads
    wait on each other when other processes hold the cores (the README's smoke test ran 6 times
    slower with 2 threads than with 1 on 2 busy cores). The load average counts this process."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    if device.type != "cpu" or threads < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    load = os.getloadavg()[0]
    if load - 1 + threads <= cores + 0.5:
        return None
    return (
        f"the CPU is busy (load average {load:.1f} on {cores} cores), so PyTorch's {threads} "
        "threads will wait on each other: with OMP_NUM_THREADS=1 before the command the run may "
        "be several times faster"
    )
