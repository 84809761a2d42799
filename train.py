"""Fine-tune a Vision Transformer on CIFAR-10/100: one process or many, CPU or CUDA.

python train.py --name cifar10-100_500 --model_type ViT-B_16
torchrun --nproc_per_node=8 train.py --name cifar10-100_500 --model_type ViT-B_16 --fp16

The story of a run, top-down: ``main`` parses the flags; ``train`` checks the inputs and claims
the run's name; ``set_up`` builds what the loop needs, each check before anything slower it can
spare; ``train_loop`` runs ``one_step`` after another, with ``evaluate_and_save`` between them;
``finish`` scores and summarises. Every concept it uses lives in a file named after it
(docs/architecture.md).
"""

from __future__ import annotations

import argparse
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.configs import with_gelu
from models.errors import UsageError
from models.families import build_model
from utils.cli import run_main
from utils.data.batches import BatchSource
from utils.data.cifar import CIFAR, download_problem, ensure_cifar
from utils.data.datasets import DataSplits, build_on_every_process, check_global_batch
from utils.files import FoldersMade
from utils.inspection.figures import log_eval_images
from utils.runtime import distributed as dist
from utils.runtime.rng import rng_state, set_rng_state
from utils.runtime.signals import StopRequest
from utils.training import update
from utils.training.averaging import WeightAverage, horizon_warning
from utils.training.evaluation import Scores, evaluate
from utils.training.finetune import WhatTrains
from utils.training.flags import (
    as_run_used,
    batch_mixing,
    parse_flags,
    total_steps,
    what_trains,
)
from utils.training.learner import Learner, for_training, state_to_resume
from utils.training.logger import (
    EventsUnwritable,
    Meter,
    Reporter,
    open_reports,
    remove_events,
    setup_logging,
)
from utils.training.memory import StepToFit, averaged_bytes
from utils.training.optimizer import (
    STATE_VALUES,
    LearningRate,
    build_optimizer,
    group_rates,
    set_learning_rate,
)
from utils.training.precision import Precision
from utils.training.run_files import RunFiles, TrainingState, precision_of
from utils.training.saving import Saver
from utils.training.starting_weights import StartingWeights
from utils.training.summary import final_scores

log = logging.getLogger("vit")


def main(argv: list[str] | None = None) -> int:
    args = parse_flags(argv)  # checked, and final: nothing below changes it
    ctx = dist.setup(args.local_rank, args.device)
    setup_logging(ctx.is_main)
    stop = StopRequest()
    try:
        code = train(args, ctx, stop)
        # No process tears its links down while another still uses them (gloo aborts a peer
        # mid-exchange: "terminate called without an active exception", seen once in CI)
        dist.barrier()
        return code
    finally:
        stop.restore()
        dist.cleanup()


def train(args: argparse.Namespace, ctx: dist.Context, stop: StopRequest) -> int:
    """Rank 0 writes every file of the run (and reads them back): it checks the inputs and
    claims the name, and its verdict reaches every rank, so none is left waiting for one that
    exited. A start that fails removes the folders it made; the name is released however the
    run ends."""
    files = RunFiles(Path(args.output_dir), args.name)
    events = Path(args.logdir) / args.name
    weights = StartingWeights.of(args.pretrained_dir, args.model_type)
    made = FoldersMade(files.output, events, Path(args.data_dir),
                       *([weights.path.parent] if weights.path is not None else []))  # fmt: skip
    try:
        dist.from_main(lambda: check_and_claim(args, files, weights, events), ctx)
        try:
            run = set_up(args, ctx, files, weights, events)
        except BaseException:
            files.release()  # held by rank 0 alone
            made.remove_empty()  # on every node, each its own: nodes need not share a disk
            raise
        try:
            return train_loop(run, stop)
        except EventsUnwritable as error:  # TensorBoard's disk: the state is saved, then said
            raise error.after_saving(run.saver, run.learner, run.meter) from None
        except OSError as error:  # a save that failed: one line, with where the last good state is
            if (failed := run.saver.write_failed(error)) is None:
                raise
            raise failed from None
        finally:
            run.reporter.close_bar()  # an error's line below the bar, not glued to it
            run.batches.close()  # the loader workers end now, not at the interpreter's exit
    finally:
        files.release()


def check_and_claim(
    args: argparse.Namespace, files: RunFiles, weights: StartingWeights, events: Path
) -> None:
    """Every missing input named in one line, then every place the run writes checked, before
    anything slow (data set scan, memory estimate, download); then the name is held against a
    second run."""
    problems = [
        download_problem(args.dataset, args.data_dir) if args.dataset in CIFAR else None,
        weights.problem(),
        files.resume_problem(args.resume),
        f"--data_dir {Path(args.data_dir).absolute()} has no train/ folder; expected "
        f"{Path(args.data_dir).absolute()}/train/<class>/<images>"
        if args.dataset == "imagefolder" and not (Path(args.data_dir) / "train").is_dir()
        else None,
    ]
    if found := [p for p in problems if p]:
        raise UsageError("; and ".join(found))
    files.check_writable("--output_dir", files.output)
    files.check_writable("--logdir", events)
    files.claim(args.resume, args.overwrite)


@dataclass
class Training:
    """What ``set_up`` builds and the loop uses."""

    learner: Learner
    batches: BatchSource
    data: DataSplits
    precision: Precision
    saver: Saver
    reporter: Reporter
    meter: Meter
    ctx: dist.Context
    flags: dict[str, Any]  # as the run uses them, num_steps and micro-batches included
    out_of_memory: str  # what an out-of-memory error in a step says (``StepToFit.advice``)


def set_up(
    args: argparse.Namespace,
    ctx: dist.Context,
    files: RunFiles,
    weights: StartingWeights,
    events: Path,
) -> Training:
    """The data, the run's length, a resumed state, the model fitted in memory with its
    starting weights, the learner, the batches and the reports: in this order, so that each
    check comes before what it can spare (a download, a memory search)."""
    global_batch = args.train_batch_size * ctx.world_size
    data = load_data(args, ctx)
    num_steps = total_steps(args, len(data.train), global_batch)
    # what the run read is recorded beside its flags: a resume checks it (TrainingState.refusal)
    flags = as_run_used(args, num_steps, args.gradient_accumulation_steps) | data.recorded()

    def resume() -> tuple[Path | None, TrainingState | None]:  # rank 0's file, for every rank
        path = files.resume_from(args.resume)
        return path, state_to_resume(path, flags, global_batch, files.best)

    resumed_from, state = dist.from_main(resume, ctx)
    start = weights.words if state is None else (state.start or weights.words)
    log.info(start if state is None else f"resuming a run that began {start}")

    # the GELU the weights learned with: the resumed run's, else the starting file's
    gelu = state.gelu if state is not None else dist.from_main(weights.gelu, ctx)
    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = build_model(
        args.model_type, with_gelu(args.config, gelu), args.img_size, len(data.classes),
        zero_head=True,
    )  # fmt: skip
    trains = what_trains(args)
    log.info(trains.apply(model))  # adapters added, frozen weights frozen: before the estimate
    model.set_grad_checkpointing(args.grad_checkpointing)  # before torch.compile sees it
    model.to(ctx.device)
    precision = Precision(precision_of(flags), ctx.device, args.loss_scale)
    micro_batches, out_of_memory = fit_in_memory(args, model, precision, state)
    flags = as_run_used(args, num_steps, micro_batches) | data.recorded()
    if (state is None or trains.partial) and weights.path is not None:  # after the memory check
        weights.load_into(model, ctx)
    torch.manual_seed(args.seed + ctx.rank)  # dropout differs across processes
    learner = build_learner(model, args, ctx, precision, num_steps, state, trains)
    if args.overwrite:  # every check has passed: the earlier run's files go now
        dist.from_main(lambda: remove_earlier_run(files, events), ctx)

    batches = BatchSource(
        data, ctx, global_batch, learner.step, seed=args.seed,
        data_on_device=args.data_on_device, num_workers=args.num_workers,
        eval_batch_size=args.eval_batch_size, mixing=batch_mixing(args, len(data.classes)),
    )  # fmt: skip
    reporter = open_reports(
        flags, ctx, data, global_batch, precision.name, events, start, learner.step
    )
    saver = Saver(files, flags, data.classes, start, ctx, check_loss=precision.name != "fp16")
    if state is not None:
        saver.kept = (resumed_from, state.step)
    meter = Meter(global_batch, ctx.world_size, layered=args.layer_decay is not None)
    return Training(
        learner, batches, data, precision, saver, reporter, meter, ctx, flags, out_of_memory
    )


def load_data(args: argparse.Namespace, ctx: dist.Context) -> DataSplits:
    """The run's three sets, the same in every process; CIFAR is downloaded once per disk,
    while the other processes wait."""
    if args.dataset in CIFAR:
        dist.each_node_first(lambda: ensure_cifar(args.dataset, args.data_dir), ctx)
    data = build_on_every_process(  # the same images in every process, or one line
        args.dataset, args.data_dir, args.img_size, args.seed, args.val_split, args.hflip
    )
    check_global_batch(len(data.train), args.train_batch_size, ctx.world_size,
                       args.gradient_accumulation_steps)  # fmt: skip
    return data


def fit_in_memory(
    args: argparse.Namespace,
    model: torch.nn.Module,
    precision: Precision,
    state: TrainingState | None,
) -> tuple[int, str]:
    """The micro-batches of a step (``auto``: the fewest that fit; a resumed run's own while
    they fit), and the advice an out-of-memory error will give; a step that cannot fit is
    refused now, before a download that it would waste."""
    fit = StepToFit(model, args.model_type, args.img_size, args.train_batch_size, precision,
                    args.grad_checkpointing, STATE_VALUES[args.optimizer],
                    averaged_bytes(model, args.ema_decay is not None))  # fmt: skip
    footprint = fit.measure()
    auto = args.gradient_accumulation_steps == "auto"
    micro_batches = args.gradient_accumulation_steps
    if auto:
        saved = state.args.get("gradient_accumulation_steps") if state is not None else None
        resumed = saved if isinstance(saved, int) else None
        micro_batches = fit.fewest_micro_batches(footprint, resumed)
    return micro_batches, fit.advice(footprint, micro_batches, auto)


def build_learner(
    model: torch.nn.Module,
    args: argparse.Namespace,
    ctx: dist.Context,
    precision: Precision,
    num_steps: int,
    state: TrainingState | None,
    trains: WhatTrains,
) -> Learner:
    """SGD with momentum (or AdamW, --layer_decay scaling each layer's rate) and its learning
    rate: a linear warm-up over --warmup_steps to --learning_rate, then cosine (or linear) decay
    to zero at the last step. A resumed run keeps the schedule it saved; one trained past its end
    (a larger --num_steps) warms up and decays again over the added steps
    (``LearningRate.ends``). Only the parameters that ``trains`` has in its optimizer;
    ``--ema_decay`` keeps an average of all of them beside it."""
    optimizer = build_optimizer(model, args.weight_decay, fp16=precision.name == "fp16",
                                name=args.optimizer, layer_decay=args.layer_decay)  # fmt: skip
    saved_ends = state.ends if state is not None else []
    lr = LearningRate.of_run(
        args.learning_rate, args.warmup_steps, args.decay_type, num_steps, saved_ends
    )
    trained = for_training(model, ctx, args.compile)
    average = WeightAverage(model, args.ema_decay) if args.ema_decay is not None else None
    if average is not None and ctx.is_main and (lag := horizon_warning(args.ema_decay, num_steps)):
        log.warning(lag)
    learner = Learner(model, trained, optimizer, precision.scaler(), lr, trains, average)
    learner.frozen = trains.frozen_digest(model)
    if state is not None:
        learner.restore(state, ctx, args.seed)
    return learner


def train_loop(run: Training, stop: StopRequest) -> int:
    """Step until the last step: evaluate and save every --eval_every steps, save every
    --save_every, log every --log_every; a stop request saves the last whole step and ends."""
    learner, meter, saver, flags = run.learner, run.meter, run.saver, run.flags
    first_step = learner.step + 1
    # Asked before every micro-batch. Under DDP every process gets the same answer at the same
    # point (a host all-reduce: it waits for no device); in one process it is the flag.
    stop_asked = lambda: dist.any_rank(stop.signum is not None)
    learner.model.train()
    while learner.step < flags["num_steps"]:
        batch = run.batches.next_batch()
        if stop_asked():  # asked during the last step, its evaluation or save, or this batch
            signum = stop.signum or signal.SIGTERM
            return saver.on_stop(learner, meter, run.reporter, signum, abandoned=False)
        if not one_step(run, batch, stop_asked):  # asked between micro-batches
            signum = stop.signum or signal.SIGTERM
            return saver.on_stop(learner, meter, run.reporter, signum, abandoned=True)
        step = learner.step
        evaluate_now = step % flags["eval_every"] == 0 or step == flags["num_steps"]
        save_now = not evaluate_now and flags["save_every"] and step % flags["save_every"] == 0
        if step == first_step and not evaluate_now:
            meter.flush(run.reporter, timed=False)  # warm-up (and compilation) is not throughput
        elif step % flags["log_every"] == 0 or evaluate_now or save_now:
            meter.flush(run.reporter)
        saver.check_losses(meter)  # the first step's, and before any save
        if evaluate_now:
            evaluate_and_save(run)
            meter.restart_clock()
        elif save_now:
            saver.last(learner)
            meter.restart_clock()
    finish(run)
    return 0


def one_step(run: Training, batch: tuple[torch.Tensor, torch.Tensor], stop_asked) -> bool:
    """One optimizer update at the schedule's rate; False when a stop request abandoned it
    between micro-batches (the RNG is then put back as the last whole step left it, for the
    state to be saved). Nothing here waits for the device."""
    learner = run.learner
    lr = learner.lr.at(learner.step + 1)
    set_learning_rate(learner.optimizer, lr)
    micro_batches = run.flags["gradient_accumulation_steps"]
    rng = rng_state() if micro_batches > 1 else None  # dropout draws before an abandon
    try:
        done = update.train_step(
            learner.trained, batch, learner.optimizer, learner.scaler, run.precision,
            micro_batches, run.flags["max_grad_norm"], stop_asked, run.flags["label_smoothing"],
        )  # fmt: skip
    except torch.OutOfMemoryError:
        raise UsageError(f"out of memory in step {learner.step + 1}: {run.out_of_memory}") from None
    if done is None:
        if rng is not None:
            set_rng_state(rng)
        return False
    learner.step += 1
    if learner.average is not None:
        learner.average.update(learner.model)
    run.meter.add(learner.step, *done, group_rates(learner.optimizer))
    return True


def evaluate_and_save(run: Training) -> None:
    """Score the selection set, with the weight average beside the weights if there is one;
    keep the higher scoring as the best weights when they beat the best so far, and save the
    training state."""
    learner = run.learner
    scores = score(run, learner.model, averaged=False)
    learner.last_acc, best = scores.accuracy, (scores.accuracy, learner.model, False)
    if learner.average is not None:
        averaged = score(run, learner.average.module, averaged=True)
        learner.last_averaged_acc = averaged.accuracy
        if averaged.accuracy > scores.accuracy:
            best = (averaged.accuracy, learner.average.module, True)
    accuracy, model, from_average = best
    if accuracy > learner.best_acc or learner.best_step == 0:
        learner.best_acc, learner.best_step = accuracy, learner.step
        learner.best_averaged = from_average
        run.saver.best(learner, model)
    run.saver.last(learner)


def score(run: Training, model: torch.nn.Module, averaged: bool) -> Scores:
    """One evaluation on the selection set, logged and written to TensorBoard (the averaged
    weights' under ``<set>/accuracy_averaged``)."""
    data, step, name = run.data, run.learner.step, run.data.select_name
    scores = evaluate(model, run.batches.select, run.ctx.device, run.precision, len(data.classes))
    suffix = "_averaged" if averaged else ""
    if not averaged:
        run.reporter.write(log_eval_images, step, *scores.samples, scores.confusion, data.classes,
                           name)  # fmt: skip
    run.reporter.scalars(
        {f"{name}/accuracy{suffix}": scores.accuracy, f"{name}/loss{suffix}": scores.loss}, step
    )
    log.info(
        "step %d: %s accuracy %.4f, loss %.4f (%d images%s)",
        step, name, scores.accuracy, scores.loss, scores.count,
        ", averaged weights" if averaged else "",
    )  # fmt: skip
    return scores


def finish(run: Training) -> None:
    """Score the test set where a validation split selected the weights; the summary line."""
    meter, ctx = run.meter, run.ctx
    wall = meter.elapsed()
    if meter.skipped:  # under fp16 the scaler skipped them; in fp32 and bf16 nothing can
        what = "skipped by the fp16 loss scaler" if run.precision.name == "fp16" else "applied"
        log.warning("%d steps had inf/NaN gradients (%s)", meter.skipped, what)
    verdict, metrics = final_scores(run.learner, run.data, run.batches, ctx, run.precision,
                                    run.reporter, run.saver.files.best)  # fmt: skip
    skipped = set().union(*dist.gather_objects(run.data.unreadable_images()))  # every rank's
    if ctx.is_main and skipped:
        log.warning("%d unreadable image(s) skipped, each named in a warning", len(skipped))
    hparams = {**run.flags, "config": " ".join(run.flags["config"])}
    run.reporter.hparams(hparams, metrics, run.learner.step)
    run.reporter.close()
    if ctx.is_main:
        print(f"summary: {verdict} | {run.learner.step} steps | wall time {wall:.1f} s | "
              f"{meter.images_per_second:.1f} images/s | {run.saver.start}")  # fmt: skip


def remove_earlier_run(files: RunFiles, events: Path) -> None:
    """``--overwrite``: the earlier run's files and TensorBoard events, deleted and logged."""
    removed = [*files.remove(), *remove_events(events)]
    if removed:
        log.warning("--overwrite: deleted %s", ", ".join(str(p) for p in removed))


if __name__ == "__main__":
    run_main(main, "train.py")
