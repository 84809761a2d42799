"""The random state of one process (CPU and CUDA generators), saved with a training state so that
a resumed run draws the dropout masks an uninterrupted one would have drawn."""

from __future__ import annotations

from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
