"""Rank-aware reporting: console log, progress bar and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("vit")


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

    def __init__(
        self, logdir: Path | None, total_steps: int, start_step: int, log_every: int
    ) -> None:
        self.writer = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter  # slow import: rank 0 only

            self.writer = SummaryWriter(str(logdir))
        self.interactive = logdir is not None and sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", disable=not self.interactive
        )
        self.log_every = log_every
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

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer is not None:
            clean = {
                k: v if isinstance(v, int | float | str | bool) else str(v)
                for k, v in hparams.items()
            }
            self.writer.add_hparams(clean, metrics, run_name=".")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
