"""A run's batches: training batches in the global order from a step on, and each process's
share of the evaluation sets, made on the device (``--data_on_device``) or by DataLoader
workers."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch

from utils.data.datasets import DataSplits
from utils.data.device_batches import DeviceBatches, DeviceCopies, use_device_data
from utils.data.loader import WorkerLoader, evaluation_batches
from utils.data.loader import make_loader as worker_loader
from utils.data.mixing import BatchMixing
from utils.data.sampling import GlobalBatchSampler, shard_indices, unwrap_subset
from utils.runtime import distributed as dist

log = logging.getLogger("vit")


class BatchSource:
    """The run's batches: training batches in the global order from ``step`` on, and the
    evaluation batches of the selection set (and, at the end, of the test set), made on the
    device (``--data_on_device``) or by DataLoader workers."""

    def __init__(
        self,
        data: DataSplits,
        ctx: dist.Context,
        global_batch: int,
        step: int,
        *,
        seed: int,
        data_on_device: str,
        num_workers: int,
        eval_batch_size: int,
        mixing: BatchMixing | None = None,
    ) -> None:
        self.ctx, self.seed, self.num_workers = ctx, seed, num_workers
        self.loaders: list[WorkerLoader] = []  # the ones with workers to end (``close``)
        self.eval_batch_size, self.test_set = eval_batch_size, data.test
        sets = [unwrap_subset(d)[0] for d in (data.train, data.select, data.test) if d]
        on_device = use_device_data(data_on_device, sets, ctx.device)
        # the device copies of the run's images, shared by sets that share them; None: workers
        self.copies = DeviceCopies(ctx.device) if on_device else None
        sampler = GlobalBatchSampler(
            len(data.train), global_batch, ctx.rank, ctx.world_size, seed, step
        )
        self.next_batch = self.training_batches(data.train, sampler)
        if mixing is not None and mixing.active:  # pairs of the global batch, drawn per step
            offset = ctx.rank * (global_batch // ctx.world_size)
            self.next_batch = mixed(self.next_batch, mixing, step, offset, global_batch)
        self.select = self.eval_batches(data.select)

    def training_batches(self, train_set, sampler: GlobalBatchSampler):
        """A function returning the next (images, labels) on the device. On the device path a
        batch is made there from its keys alone (``utils.data.device_batches``): no workers, no
        host work per image; otherwise workers decode and transform every image."""
        device = self.ctx.device
        if self.copies is None:
            loader = worker_loader(
                train_set, self.num_workers, device, self.seed, batch_sampler=sampler
            )
            self.loaders.append(loader)
            batches = iter(loader)

            def next_batch():
                x, y = next(batches)
                return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

            return next_batch
        base, indices = unwrap_subset(train_set)
        device_data = DeviceBatches.from_dataset(base, device, self.copies)
        keys = sampler.device_keys(device, indices)
        log.info("data on %s: %d images, batches made there", device, len(device_data))
        return lambda: device_data.train_batch(next(keys))

    def eval_batches(self, dataset):
        """This process's share of ``dataset``: every image is scored exactly once in all."""
        share = shard_indices(len(dataset), self.ctx.rank, self.ctx.world_size)
        batches = evaluation_batches(
            dataset, share, self.eval_batch_size, self.num_workers, self.ctx.device, self.copies
        )
        if isinstance(batches, WorkerLoader):
            self.loaders.append(batches)
        return batches

    def close(self) -> None:
        """End the worker processes of every loader this source started (``WorkerLoader.close``)."""
        for loader in self.loaders:
            loader.close()

    def test(self):
        """The test set's batches, or None when the selection set is the test set."""
        return self.test_set and self.eval_batches(self.test_set)


Batch = tuple[torch.Tensor, torch.Tensor]


def mixed(
    next_batch: Callable[[], Batch], mixing: BatchMixing, step: int, offset: int, global_batch: int
) -> Callable[[], Batch]:
    """``next_batch`` with ``--mixup``/``--cutmix`` applied: the batch of step ``step + 1``
    first, this process's images at global positions ``offset`` on, labels become
    probabilities."""
    steps = itertools.count(step + 1)
    return lambda: mixing(*next_batch(), next(steps), offset, global_batch)
