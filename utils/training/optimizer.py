"""The optimizer and its learning rate: SGD with momentum 0.9, linear warm-up, then cosine or
linear decay to zero (Google's fine-tuning recipe).

The rate is a pure function of the update, ``LearningRate.at(k)``, set on the optimizer before
each update as nanoGPT's loop does: nothing else holds it, so a resume needs only the step. The
formulas are the reference's (``WarmupCosineSchedule``, ``WarmupLinearSchedule``), indexed as
Google's ``create_learning_rate_schedule`` is: update ``k`` (counted from 1) runs at
``peak * factor(k)``, so the first update is already warm and the last one reaches zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LearningRate:
    """The learning rate of every update of a run.

    ``ends`` holds the last update of each schedule: ``(num_steps,)`` for a run, and one more for
    each time a finished run is trained further (``--resume`` with a larger ``--num_steps``),
    whose added updates warm up again and decay to zero at their own end.
    """

    peak: float
    warmup_steps: int
    decay: str  # a key of SCHEDULES
    ends: tuple[int, ...]

    @classmethod
    def of_run(
        cls, peak: float, warmup_steps: int, decay: str, num_steps: int, saved_ends: list[int]
    ) -> LearningRate:
        """The schedule of a run of ``num_steps``; ``saved_ends``, a resumed state's, gain a
        segment when the run goes on past their last end."""
        ends = tuple(saved_ends) or (num_steps,)
        return cls(peak, warmup_steps, decay, ends if num_steps == ends[-1] else (*ends, num_steps))

    def at(self, update: int) -> float:
        """The rate of optimizer update ``update`` (from 1)."""
        starts = (0, *self.ends[:-1])
        start, end = next(
            ((s, e) for s, e in zip(starts, self.ends, strict=True) if update <= e),
            (starts[-1], self.ends[-1]),
        )
        return self.peak * SCHEDULES[self.decay](update - start, self.warmup_steps, end - start)


def build_optimizer(model: torch.nn.Module, weight_decay: float, fp16: bool) -> torch.optim.SGD:
    """SGD with momentum 0.9 over every parameter; its rate is set before each update."""
    return torch.optim.SGD(
        model.parameters(),
        lr=0.0,
        momentum=0.9,
        weight_decay=weight_decay,
        # One kernel for all parameters, except under fp16: a fused SGD whose first step the
        # loss scaler skips keeps uninitialised momentum buffers (torch 2.14, CPU and CUDA).
        fused=not fp16,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
