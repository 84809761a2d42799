"""Where batches come from: DataLoader workers that survive a signal sent to the whole job (see
utils.runtime.signals), or the device itself (utils.data.device_batches)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from utils.data.device_batches import DeviceBatches, DeviceCopies, DeviceEvalBatches
from utils.data.sampling import unwrap_subset
from utils.runtime.signals import ignore_stop_signals, stop_signals_blocked


class WorkerLoader(DataLoader):
    """A DataLoader whose workers ignore SIGTERM and SIGINT, and cannot receive them before."""

    def __iter__(self) -> Iterator:
        if self.num_workers == 0:
            return super().__iter__()
        with stop_signals_blocked():  # workers start here and inherit the block
            return super().__iter__()

    def close(self) -> None:
        """Stop the workers now. Left to the interpreter's exit, they would hang it: there
        multiprocessing terminates its daemonic children with SIGTERM, which these ignore, and
        then joins them for ever, whenever a reference cycle keeps the loader alive that long.
        (DataLoader has no public way to end its workers; its iterator's shutdown is the one
        its own ``__del__`` uses.)"""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


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


def evaluation_batches(
    dataset: Dataset,
    share: Sequence[int],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    copies: DeviceCopies | None,
) -> DataLoader | DeviceEvalBatches:
    """Batches of the items ``share`` of ``dataset``, in order: made on the device from its
    uint8 images when ``copies`` (the device copies shared by a run's sets) is given, else by
    DataLoader workers."""
    if copies is None:
        return make_loader(Subset(dataset, share), num_workers, device, batch_size=batch_size)
    base, indices = unwrap_subset(dataset)
    on_device = DeviceBatches.from_dataset(base, device, copies)
    return DeviceEvalBatches(on_device, [indices[i] for i in share], batch_size)
