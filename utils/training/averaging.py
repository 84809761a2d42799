"""``--ema_decay``: an exponential moving average of the weights, kept beside the weights that
train, scored at every evaluation and saved in the training state.

Built on PyTorch's own ``torch.optim.swa_utils.AveragedModel`` with its EMA update (one fused
``lerp`` over all tensors): the first update copies the weights, each later one moves the average
by ``1 - decay`` towards them. Every process applies the same update to the same weights, so the
average is the same on all of them, and a resumed run continues it bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """The average of the model's weights (parameters and buffers) over the steps so far."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"an EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.averaged = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )
        # the copy never trains: no gradient is kept for it and DDP never sees it
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model, to evaluate and save like the model itself."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """After an optimizer update: move the average towards ``model``'s weights."""
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights and how many updates they hold (``n_averaged``)."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


def horizon_warning(decay: float, num_steps: int) -> str | None:
    """Words for an average that mostly remembers the first steps' weights: a decay of D weighs
    the weights of the last 1 / (1 - D) steps, so D = 0.9999 needs some 10,000 steps."""
    horizon = 1 / (1 - decay)
    if horizon <= num_steps / 2:
        return None
    fitting = 1 - 10 / num_steps if num_steps > 20 else None
    advice = f"; --ema_decay {fitting:.4g} averages over a tenth of it" if fitting else ""
    return (
        f"--ema_decay {decay:g} averages over about {horizon:,.0f} steps, more than half of the "
        f"run's {num_steps}: the averaged weights will lag far behind the trained ones{advice}"
    )
