"""Learning-rate schedules: linear warm-up, then cosine or linear decay to zero.

The formulas are the reference implementation's (``WarmupCosineSchedule``,
``WarmupLinearSchedule``), indexed as Google's ``create_learning_rate_schedule`` is: optimizer
update ``k`` (counted from 1) runs at ``factor(k)``, so the first update is already warm and the
last one reaches zero. The scheduler is stepped after the optimizer, as PyTorch expects.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_linear(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


SCHEDULES = {"cosine": warmup_cosine, "linear": warmup_linear}


def build_scheduler(
    optimizer: torch.optim.Optimizer, decay_type: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR under which optimizer update k (from 1) runs at ``base_lr * factor(k)``."""
    factor = SCHEDULES[decay_type]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: factor(i + 1, warmup_steps, total_steps)
    )
