"""Rank-aware reporting: console log, progress bar and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from models.errors import UsageError
from utils.data.datasets import DataSplits
from utils.files import WRITE_ERRNOS
from utils.runtime import distributed as dist
from utils.runtime.device import cpu_contention

if TYPE_CHECKING:
    from utils.training.learner import Learner
    from utils.training.saving import Saver

log = logging.getLogger("vit")

# A run's results as the HParams tab shows them. That tab reads each metric's value from the last
# point of the run's scalar series of the same tag, so these points are written as scalars too.
# TensorBoard orders tag groups by name (Scalars and Time Series tabs alike): "verdict" comes
# after the curves of train/, test/ and val/, where the customary "hparam" comes before them.
VERDICT_GROUP = "verdict"
VERDICT = ("best_accuracy", "final_accuracy", "test_accuracy_final", "test_accuracy_best")


def setup_logging(is_main: bool) -> None:
    """INFO on rank 0, warnings only elsewhere, so that N processes do not print N logs."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


class EventsUnwritable(Exception):
    """TensorBoard could not write the run's events (a full or read-only disk under --logdir),
    raised on every process at the same point (``Reporter.check_written``), so that all save the
    training state together (--output_dir may well be on another disk) and stop."""

    def after_saving(self, saver: Saver, learner: Learner, meter: Meter) -> UsageError:
        """Save the last whole step unless it is saved already; the one line that says where it
        is and what to do. A diverged step is never saved (``Saver.check_losses`` raises)."""
        saver.check_losses(meter)
        try:
            if learner.step and (saver.kept is None or saver.kept[1] != learner.step):
                saver.last(learner)
        except OSError as error:  # --output_dir is on the same disk, or fails too
            if (failed := saver.write_failed(error)) is None:
                raise
            return UsageError(f"{self}; and {failed}")
        if saver.kept is None:
            return UsageError(
                f"{self}; nothing was trained yet: free space there (or choose another --logdir), "
                "then run again"
            )
        path, step = saver.kept
        resume = "auto" if path == saver.files.last else path
        return UsageError(
            f"{self}; the training state of step {step} is saved in {path}: free space on the "
            f"--logdir disk (or choose another --logdir), then run the same command with --resume "
            f"{resume}"
        )


class Reporter:
    """TensorBoard scalars and a progress bar on rank 0; plain log lines when not on a terminal.

    The event file is made at the first thing to write (the first step's scalars), so that a run
    stopped or killed before then leaves no empty run beside the real ones in TensorBoard. On a
    terminal, log lines go through tqdm's ``logging_redirect_tqdm`` while the bar is shown, each
    on its own line above the bar. A write that fails (a full disk) stops the writing; the run
    stops at the next ``check_written`` with one line naming the folder.
    """

    def __init__(
        self,
        logdir: Path | None,
        total_steps: int,
        start_step: int,
        micro_batches: tuple[int, int] | None = None,
    ) -> None:
        self.logdir, self.total_steps = logdir, total_steps
        self._writer: Any = None  # SummaryWriter, made by ``writer``
        self._texts: list[tuple[str, str]] = []  # written when the writer is made
        self.failure: str | None = None  # why the events could not be written
        self.interactive = logdir is not None and sys.stderr.isatty()
        self._console = ExitStack()
        if self.interactive:
            self._console.enter_context(logging_redirect_tqdm())
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", disable=not self.interactive
        )
        if micro_batches is not None and start_step < total_steps:
            # a step of many micro-batches on a CPU can take minutes: say that it has begun
            count, images = micro_batches
            log.info(
                "step %d/%d under way (%d micro-batch%s of %d images); progress is shown when it "
                "ends", start_step + 1, total_steps, count, "es" if count > 1 else "", images,
            )  # fmt: skip

    @property
    def writer(self) -> Any:
        """TensorBoard's SummaryWriter on rank 0 (None elsewhere, or once a write failed), made
        at its first use."""
        if self._writer is None and self.logdir is not None and self.failure is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: rank 0 only

            quiet_writer_threads()
            with self._writing():
                self._writer = SummaryWriter(str(self.logdir))
                for tag, text in self._texts:
                    self._writer.add_text(tag, text)
            self._texts.clear()
        return self._writer

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A write refused by the disk (full, over quota, read-only) ends the writing, and is
        kept for ``check_written``; TensorBoard's writer thread is left to end on its own."""
        try:
            yield
        except OSError as error:
            if error.errno not in WRITE_ERRNOS:
                raise
            self.failure = (
                f"TensorBoard cannot write to {self.logdir}, this run's folder under --logdir "
                f"({error.strerror or error})"
            )
            self._writer = None

    def write(self, draw: Callable[..., None], *args: Any) -> None:
        """``draw(writer, *args)`` on rank 0 (``log_eval_images``, say), guarded as every write."""
        if (writer := self.writer) is not None:
            with self._writing():
                draw(writer, *args)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if (writer := self.writer) is not None:
            with self._writing():
                for tag, value in values.items():
                    writer.add_scalar(tag, value, step)

    def check_written(self) -> None:
        """Raise ``EventsUnwritable`` on every process when rank 0's events could not be
        written; asked on every process at the same points (a host all-reduce)."""
        if dist.any_rank(self.failure is not None):
            raise EventsUnwritable(next(f for f in dist.gather_objects(self.failure) if f))

    def progress(self, step: int, loss: float, lr: float, images_per_second: float) -> None:
        """Advance the bar to ``step``, or log a line when there is no terminal."""
        if self.logdir is None:
            return
        if self.interactive:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}"
            )
        else:
            log.info(
                "step %d/%d  loss %.4f  lr %.3e  %.1f images/s",
                step,
                self.total_steps,
                loss,
                lr,
                images_per_second,
            )

    def text(self, tag: str, text: str) -> None:
        """A text for TensorBoard, written with the run's first scalars."""
        if self._writer is not None:
            with self._writing():
                self._writer.add_text(tag, text)
        elif self.logdir is not None:
            self._texts.append((tag, text))

    def hparams(self, hparams: dict[str, Any], results: dict[str, float], step: int) -> None:
        """The run's flags and ``results`` (named in VERDICT) for the HParams tab.

        Every run declares all of VERDICT, the results it lacks included: TensorBoard takes the
        HParams tab's metric columns from one run of the log folder, whichever it reads first.
        """
        if (writer := self.writer) is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        assert results.keys() <= set(VERDICT), results.keys()
        clean = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()
        }
        tags = {f"{VERDICT_GROUP}/{name}": results.get(name) for name in VERDICT}
        with self._writing():
            for summary in hparams_summaries(clean, tags):  # experiment, session start and end
                writer.file_writer.add_summary(summary, step)
        self.scalars({tag: value for tag, value in tags.items() if value is not None}, step)

    def close_bar(self) -> None:
        """End the progress bar and the logging through it, so that what is printed next (an
        error's line) starts on a line of its own. Safe to call again."""
        self.bar.close()
        self._console.close()

    def close(self) -> None:
        """The bar, then the event file: written to the end, or ``EventsUnwritable`` on every
        process."""
        self.close_bar()
        if self._writer is not None:
            with self._writing():
                self._writer.flush()  # raises what the writer thread met; close() would not
                self._writer.close()
        self.check_written()


def quiet_writer_threads() -> None:
    """Leave out the traceback of TensorBoard's writer thread when a write fails: the thread
    keeps its exception (``.exception``) for the next write, which ``Reporter`` turns into one
    line naming the folder. Any other thread's exception is printed as before."""
    previous = threading.excepthook
    if getattr(previous, "quiet_writer_threads", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        handed_on = getattr(args.thread, "exception", None) is args.exc_value
        tensorboard = type(args.thread).__module__.startswith("tensorboard.")
        if not (handed_on and tensorboard and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiet_writer_threads = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def remove_events(folder: Path) -> list[Path]:
    """Delete the TensorBoard event files under ``folder`` (a run's log folder), nothing else;
    the paths deleted."""
    found = sorted(folder.rglob("events.out.tfevents.*")) if folder.is_dir() else []
    for path in found:
        path.unlink()
    return found


class Meter:
    """Per-step loss, gradient norm and learning rates (``optimizer.group_rates``: the head's,
    and the lowest layer's under --layer_decay), kept on the device and read once every log
    step."""

    def __init__(self, global_batch: int, world_size: int, layered: bool = False) -> None:
        self.global_batch, self.world_size = global_batch, world_size
        self.layered = layered  # --layer_decay: the lowest layer's rate is shown too
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, dict[str, float]]] = []
        self.skipped = 0  # fp16 steps whose gradients were inf/NaN
        self.nonfinite: tuple[int, float] | None = None  # the first (step, loss) not finite
        self.train_time, self.images = 0.0, 0
        self.start = self.tick = time.perf_counter()

    def add(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, rates: dict[str, float]
    ) -> None:
        self.pending.append((step, loss, grad_norm, rates))

    def restart_clock(self) -> None:
        """Leave evaluation and checkpointing out of the training throughput."""
        self.tick = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the meter was made: the run's wall time."""
        return time.perf_counter() - self.start

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.train_time, 1e-9)

    def flush(self, reporter: Reporter, timed: bool = True) -> float:
        """Write the pending steps to TensorBoard and the progress line; return the last loss.

        ``timed=False`` leaves these steps out of the throughput (warm-up, compilation).
        """
        if not self.pending:
            return 0.0
        # Mean loss over processes (each saw its shard); the clipped norm is the same everywhere.
        stacked = torch.stack([torch.stack((p[1], p[2])) for p in self.pending])
        values = (dist.all_reduce_sum(stacked) / self.world_size).tolist()
        elapsed = time.perf_counter() - self.tick
        speed = self.global_batch * len(self.pending) / elapsed
        if timed:
            self.train_time += elapsed
            self.images += self.global_batch * len(self.pending)
        for (step, _, _, rates), (loss, norm) in zip(self.pending, values, strict=True):
            lr = {"train/lr": rates["head"]}
            if self.layered:
                lr["train/lr_lowest"] = rates["lowest"]
            reporter.scalars({"train/loss": loss, **lr, "train/grad_norm": norm}, step)
            self.skipped += not math.isfinite(norm)
            if not math.isfinite(loss) and self.nonfinite is None:
                self.nonfinite = (step, loss)
        step, lr = self.pending[-1][0], self.pending[-1][3]["head"]
        reporter.scalars({"train/images_per_second": speed}, step)
        reporter.progress(step, values[-1][0], lr, speed)
        self.pending.clear()
        self.tick = time.perf_counter()
        reporter.check_written()  # at the same step on every process
        return values[-1][0]


def open_reports(
    flags: dict[str, Any],
    ctx: dist.Context,
    data: DataSplits,
    global_batch: int,
    precision: str,
    events: Path,
    start: str,
    step: int,
) -> Reporter:
    """The set-up in one log line; TensorBoard (rank 0), with the command line as its first
    text."""
    micro = flags["gradient_accumulation_steps"]
    log.info(
        "%s on %s: %d process(es), global batch %d (%d per process in %d micro-batch%s of %d), "
        "%s, %d steps, %d train / %d %s images%s",
        flags["model_type"], ctx.device.type, ctx.world_size, global_batch,
        flags["train_batch_size"], micro, "es" if micro > 1 else "",
        flags["train_batch_size"] // micro, precision, flags["num_steps"], len(data.train),
        len(data.select), data.select_name,
        f" / {len(data.test)} test images" if data.test is not None else "",
    )  # fmt: skip
    if ctx.is_main and (busy := cpu_contention(ctx.device)):
        log.warning(busy)
    reporter = Reporter(events if ctx.is_main else None, flags["num_steps"], step,
                        (micro, flags["train_batch_size"] // micro))  # fmt: skip
    reporter.text("args", "  \n".join([start, *(f"{k}: {v}" for k, v in sorted(flags.items()))]))
    return reporter
