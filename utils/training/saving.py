"""When and what a run saves: the best weights at an evaluation, the training state at an
evaluation, every ``--save_every`` steps and on a stop; nothing after a NaN. Each save comes
after a check that the weights are finite, so the last state on disk is always a good one; the
files' formats are ``run_files``'s."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.errors import UsageError
from models.lora import merged_state_dict
from utils.runtime import distributed as dist
from utils.runtime.rng import rng_state
from utils.training.learner import Learner
from utils.training.logger import Meter, Reporter
from utils.training.run_files import RunFiles, all_finite, write_error

log = logging.getLogger("vit")


@dataclass
class Saver:
    """Writes the run's files, each only after checking that the weights are finite; holds what
    every save records besides the learner itself, and where the last good state is."""

    files: RunFiles
    flags: dict[str, Any]  # the command line as the run used it (``flags.as_run_used``)
    classes: list[str]
    start: str  # the words for the weights the run began from
    ctx: dist.Context
    check_loss: bool  # off under fp16, whose scaler skips the steps of inf/NaN gradients
    kept: tuple[Path, int] | None = None  # the last good state on disk: (file, step)
    checked_step: int | None = None  # the step whose weights were last found finite

    def last(self, learner: Learner) -> None:
        """``<name>_last.pt``: every process's RNG state, written by rank 0."""
        self.check_weights(learner)
        rngs = dist.gather_objects(rng_state())
        is_main = self.ctx.is_main
        state = learner.state(rngs, self.flags, self.classes, self.start) if is_main else None
        dist.from_main(lambda: state.write(self.files.last), self.ctx)
        self.kept = (self.files.last, learner.step)

    def best(self, learner: Learner, model: torch.nn.Module) -> None:
        """``model``'s weights (the learner's or their average) as the best, whole and LoRA
        merged, written by rank 0 (the only process that reads them back)."""
        self.check_weights(learner)
        weights = merged_state_dict(model)  # the plain format, LoRA merged in
        config = learner.model.config.to_dict()
        save = lambda: self.files.save_best(weights, self.flags, config, self.classes)
        dist.from_main(save, self.ctx)

    def check_weights(self, learner: Learner) -> None:
        """Once per step: an evaluation writes the best weights and then the state."""
        if self.checked_step == learner.step:
            return
        if not all_finite(learner.model.state_dict()):
            raise self.diverged(
                f"the weights became NaN or infinite in step {learner.step}, whose loss was finite"
            )
        self.checked_step = learner.step

    def check_losses(self, meter: Meter) -> None:
        """Stop a diverging run, keeping the last good state; run after every read of the
        losses (``Meter.flush``)."""
        if self.check_loss and meter.nonfinite is not None:
            step, loss = meter.nonfinite
            raise self.diverged(f"the loss became {loss} at step {step}")

    def diverged(self, what: str) -> UsageError:
        """The error that stops a diverging run, with where the last good state is."""
        if self.kept is None:
            return UsageError(
                f"{what}; stopping, with nothing saved: run the same command with a lower "
                "--learning_rate"
            )
        path, step = self.kept
        return UsageError(
            f"{what}; stopping without saving it. The last good state is {path} (step {step}), "
            "trained at the learning rate that diverged: start again with a lower "
            "--learning_rate and --overwrite, or under another --name"
        )

    def write_failed(self, error: OSError) -> UsageError | None:
        """The error for a write that failed during training (disk full, quota, permissions),
        or None for an OSError that is not one."""
        if (words := write_error(error)) is None:
            return None
        if self.kept is None:
            return UsageError(f"{words}; nothing was saved yet: make room, then run again")
        path, step = self.kept
        return UsageError(
            f"{words}; the last good state, step {step}, is intact in {path}: make room (or "
            "fix the permissions), then run the same command with --resume "
            f"{'auto' if path == self.files.last else path}"
        )

    def on_stop(
        self, learner: Learner, meter: Meter, reporter: Reporter, signum: int, abandoned: bool
    ) -> int:
        """Save the state of a run stopped by a signal (the last whole step: one stopped inside
        is dropped); the exit code a shell gives that signal."""
        meter.flush(reporter)
        self.check_losses(meter)
        step = learner.step
        if abandoned:
            when = f"during step {step + 1}, which was dropped"
        else:
            when = f"before step {step + 1}" if step == 0 else f"at step {step}"
        if step == 0:
            if self.ctx.is_main:
                log.warning("stopped by signal %s: nothing was trained yet, so nothing was "
                            "saved; run the same command to start again", when)  # fmt: skip
        else:
            self.last(learner)
            if self.ctx.is_main:
                saved = "state" if not abandoned else f"the state of step {step}"
                log.warning("stopped by signal %s; %s saved to %s. Resume with the same command "
                            "and --resume auto", when, saved, self.files.last)  # fmt: skip
        reporter.close()
        return 128 + signum
