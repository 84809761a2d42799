"""DataLoaders whose workers survive a signal sent to the whole job (see utils.signals)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from utils.signals import ignore_stop_signals, stop_signals_blocked


class WorkerLoader(DataLoader):
    """A DataLoader whose workers ignore SIGTERM and SIGINT, and cannot receive them before."""

    def __iter__(self) -> Iterator:
        if self.num_workers == 0:
            return super().__iter__()
        with stop_signals_blocked():  # workers start here and inherit the block
            return super().__iter__()


def make_loader(
    dataset: Dataset, num_workers: int, device: torch.device, seed: int = 0, **kwargs
) -> WorkerLoader:
    """Batches of ``dataset`` made by ``num_workers`` persistent worker processes (none: here)."""
    return WorkerLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        # Its own generator: starting an iterator must not draw from the global RNG, which
        # drives dropout and is restored on resume.
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
