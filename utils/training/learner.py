"""The model under training with its optimizer, loss scaler and learning rate, and where the run
stands: what the loop advances, what a training state saves and what a resume restores."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from models.errors import UsageError, one_line
from models.npz_io import CheckpointError
from utils.runtime import distributed as dist
from utils.runtime.rng import set_rng_state
from utils.training.averaging import WeightAverage
from utils.training.finetune import WhatTrains
from utils.training.optimizer import LearningRate
from utils.training.run_files import TrainingState, all_finite, read_weights

log = logging.getLogger("vit")


@dataclass
class Learner:
    """What the loop advances and a training state restores."""

    model: torch.nn.Module  # a ViT or a Mixer, as built
    trained: torch.nn.Module  # what the step calls: ``model``, under DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr: LearningRate
    trains: WhatTrains = WhatTrains()  # what trains; a state saves only that
    average: WeightAverage | None = None  # --ema_decay's average of the weights
    frozen: str | None = None  # the digest of the frozen weights (``WhatTrains.frozen_digest``)
    step: int = 0  # optimizer updates done
    best_acc: float = 0.0
    best_step: int = 0
    best_averaged: bool = False  # whether the best weights are the average's
    last_acc: float = float("nan")
    last_averaged_acc: float = float("nan")

    def restore(self, state: TrainingState, ctx: dist.Context, seed: int) -> None:
        """Go on where ``state`` stopped: weights, momentum, loss scale, step, RNG."""
        if state.frozen != self.frozen:
            raise UsageError(
                "the weights this run keeps frozen differ from those it was trained on (another "
                "--pretrained_dir file, or the file changed): resume with the starting weights "
                "it began from, or start again with --overwrite"
            )
        try:
            self.trains.load_saved(self.model, state.model)
            self.optimizer.load_state_dict(state.optimizer)
            self.scaler.load_state_dict(state.scaler)
            if self.average is not None:
                self.average.load_state_dict(state.average)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise UsageError(
                f"the training state does not fit the model it records ({one_line(error)}); "
                "resume from another file, or start again with --overwrite"
            ) from None
        self.step, self.best_acc, self.best_step = state.step, state.best_acc, state.best_step
        self.best_averaged = state.best_averaged
        if len(state.rng) == ctx.world_size:
            set_rng_state(state.rng[ctx.rank])
        else:  # the data stream depends on the global batch alone; dropout on each process
            torch.manual_seed(seed + ctx.rank + 1_000_003 * state.step)
            if ctx.is_main:
                log.warning(
                    "resumed on %d process(es), saved on %d: the data order and augmentation "
                    "go on exactly as saved; each process's dropout draws start afresh (from "
                    "--seed and the step), so the steps differ from an uninterrupted run's",
                    ctx.world_size, len(state.rng),
                )  # fmt: skip

    def state(
        self, rngs: list, flags: dict[str, Any], classes: list[str], start: str
    ) -> TrainingState:
        """The training state to save: ``rngs`` of every process, ``flags`` as the run used
        them."""
        return TrainingState(
            model=self.trains.saved_weights(self.model),
            frozen=self.frozen,
            optimizer=self.optimizer.state_dict(),
            scheduler={"last_epoch": self.step},  # the field earlier files' LambdaLR filled
            scaler=self.scaler.state_dict(),
            step=self.step,
            global_batch=flags["train_batch_size"] * len(rngs),
            best_acc=self.best_acc,
            best_step=self.best_step,
            best_averaged=self.best_averaged,
            average=self.average.state_dict() if self.average is not None else None,
            rng=rngs,
            args=flags,
            config=self.model.config.to_dict(),
            classes=classes,
            start=start,
            schedule=list(self.lr.ends),
        )


def for_training(model: torch.nn.Module, ctx: dist.Context, compile: bool) -> torch.nn.Module:
    """``model`` as the step calls it: under DDP across processes, then compiled if asked, DDP
    inside, so that its all-reduce overlaps the compiled backward."""
    trained = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        trained = DDP(model, device_ids=device_ids)
    return torch.compile(trained) if compile else trained


def state_to_resume(
    path: Path | None, flags: dict[str, Any], global_batch: int, best: Path
) -> TrainingState | None:
    """The training state at ``path`` (``--resume``), checked to continue the run that
    ``flags`` describe (``num_steps`` as derived) and whose best weights are at ``best``; None
    for no path."""
    if path is None:
        return None
    state = TrainingState.read(path)
    if reason := state.refusal(flags, global_batch):
        raise UsageError(f"--resume {path} {reason}")
    if not all_finite(state.model):
        raise UsageError(
            f"--resume {path} holds non-finite weights (NaN or infinity): an earlier version "
            "saved them after the loss diverged; start again with a lower --learning_rate and "
            "--overwrite"
        )
    if state.best_step > 0:  # the final scores read these weights back
        try:
            read_weights(best)
        except CheckpointError as error:
            log.warning(
                "%s; the best weights so far (step %d, accuracy %.4f) are lost, so the best of "
                "the evaluations from now on takes their place",
                one_line(error), state.best_step, state.best_acc,
            )  # fmt: skip
            state.best_acc, state.best_step = 0.0, 0
    saved, now = state.args.get("gradient_accumulation_steps"), flags["gradient_accumulation_steps"]
    if isinstance(saved, int) and isinstance(now, int) and saved != now:
        log.warning(
            "resumed with %d micro-batches per step, saved with %d: the same global batch and "
            "data order, but the gradient sums run in another order and dropout is drawn per "
            "micro-batch, so the steps differ slightly from an uninterrupted run's (pass "
            "--gradient_accumulation_steps %d to go on exactly)",
            now, saved, saved,
        )  # fmt: skip
    end, steps = state.ends[-1], flags["num_steps"]
    if steps > end:
        log.info(
            "resumed from %s at step %d; %s, then steps %d to %d warm up again over %d steps "
            "and decay (%s) to zero at step %d",
            path, state.step,
            f"its run of {end} steps was finished" if state.step == end
            else f"its schedule ends at step {end}",
            end + 1, steps, flags["warmup_steps"], flags["decay_type"], steps,
        )  # fmt: skip
    else:
        log.info("resumed from %s at step %d", path, state.step)
    return state
