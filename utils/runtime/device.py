"""``--device`` for every script: one decision, and one line when the machine cannot honour it."""

from __future__ import annotations

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
