"""Rank-aware reporting: console log, progress bar and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from utils.runtime import distributed as dist

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


class Reporter:
    """TensorBoard scalars and a progress bar on rank 0; plain log lines when not on a terminal."""

    def __init__(self, logdir: Path | None, total_steps: int, start_step: int) -> None:
        self.writer = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: rank 0 only

            self.writer = SummaryWriter(str(logdir))
        self.interactive = logdir is not None and sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", disable=not self.interactive
        )
        self.total_steps = total_steps

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def progress(self, step: int, loss: float, lr: float, images_per_second: float) -> None:
        """Advance the bar to ``step``, or log a line when there is no terminal."""
        if self.writer is None:
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
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def hparams(self, hparams: dict[str, Any], results: dict[str, float], step: int) -> None:
        """The run's flags and ``results`` (named in VERDICT) for the HParams tab.

        Every run declares all of VERDICT, the results it lacks included: TensorBoard takes the
        HParams tab's metric columns from one run of the log folder, whichever it reads first.
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        assert results.keys() <= set(VERDICT), results.keys()
        clean = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()
        }
        tags = {f"{VERDICT_GROUP}/{name}": results.get(name) for name in VERDICT}
        for summary in hparams_summaries(clean, tags):  # experiment, session start and end
            self.writer.file_writer.add_summary(summary, step)
        self.scalars({tag: value for tag, value in tags.items() if value is not None}, step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def remove_events(folder: Path) -> list[Path]:
    """Delete the TensorBoard event files under ``folder`` (a run's log folder), nothing else;
    the paths deleted."""
    found = sorted(folder.rglob("events.out.tfevents.*")) if folder.is_dir() else []
    for path in found:
        path.unlink()
    return found


class Meter:
    """Per-step loss, gradient norm and lr, kept on the device and read once every log step."""

    def __init__(self, global_batch: int, world_size: int) -> None:
        self.global_batch, self.world_size = global_batch, world_size
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        self.skipped = 0  # fp16 steps whose gradients were inf/NaN
        self.nonfinite: tuple[int, float] | None = None  # the first (step, loss) not finite
        self.train_time, self.images = 0.0, 0
        self.start = self.tick = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self.pending.append((step, loss, grad_norm, lr))

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
        for (step, _, _, lr), (loss, norm) in zip(self.pending, values, strict=True):
            reporter.scalars({"train/loss": loss, "train/lr": lr, "train/grad_norm": norm}, step)
            self.skipped += not math.isfinite(norm)
            if not math.isfinite(loss) and self.nonfinite is None:
                self.nonfinite = (step, loss)
        step, lr = self.pending[-1][0], self.pending[-1][3]
        reporter.scalars({"train/images_per_second": speed}, step)
        reporter.progress(step, values[-1][0], lr, speed)
        self.pending.clear()
        self.tick = time.perf_counter()
        return values[-1][0]
