"""Checkpoint helpers of the training loop: atomic ``torch.save``, DDP unwrapping, RNG state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.files import atomic_write


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save``, atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
