"""Learning-rate schedules: linear warm-up, then cosine or linear decay to zero.

The formulas are the reference implementation's (``WarmupCosineSchedule``,
``WarmupLinearSchedule``), indexed as Google's ``create_learning_rate_schedule`` is: optimizer
update ``k`` (counted from 1) runs at ``factor(k)``, so the first update is already warm and the
last one reaches zero. The scheduler is stepped after the optimizer, as PyTorch expects. A
finished run trained further (``--resume`` with a larger ``--num_steps``) warms up and decays
again over the added steps.
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
    optimizer: torch.optim.Optimizer, decay_type: str, warmup_steps: int, ends: list[int]
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR under which optimizer update k (from 1) runs at ``base_lr * factor(k)``.

    ``ends`` holds the last update of each schedule: ``[num_steps]`` for a run, and one more
    for each time a finished run is trained further, whose added updates warm up again and decay
    to zero at their own end."""
    factor = SCHEDULES[decay_type]
    starts = [0, *ends[:-1]]

    def segment_factor(i: int) -> float:
        k = i + 1
        start, end = next(((s, e) for s, e in zip(starts, ends, strict=True) if k <= e),
                          (starts[-1], ends[-1]))  # fmt: skip
        return factor(k - start, warmup_steps, end - start)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, segment_factor)


def next_lr_from_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's learning rates for the next update from ``scheduler``'s own
    functions: after a restore, the saved rates were those of the saved schedule."""
    rates = [
        base * fn(scheduler.last_epoch)
        for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    scheduler._last_lr = rates
