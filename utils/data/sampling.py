"""Which images a run sees, in what order, on which process: subsets that keep each image's
augmentation key, the seed-fixed validation split, and the global-batch sampler.

The data stream depends only on the seed and the global batch, not on the number of processes
or workers, which is what makes DDP equal one process and a resumed run equal a straight one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from utils.data.augment import mix_seed


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device`` without making the host wait: a CUDA copy from pinned memory is
    queued like a kernel (from pageable memory it would synchronise the stream)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class KeyedSubset(Dataset):
    """The items ``indices`` of a dataset, passing ``(index, epoch)`` keys through.

    Augmentation stays keyed by the underlying image's index, so a sample keeps its crops
    whichever split it lands in.
    """

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list:
        """A DataLoader's batch fetch, passed on in one call (``AugmentedImages`` draws a
        batch's crops at once)."""
        mapped = [
            (self.indices[k[0]], k[1]) if isinstance(k, tuple) else self.indices[k] for k in keys
        ]
        fetch = getattr(self.dataset, "__getitems__", None)
        return fetch(mapped) if fetch else [self.dataset[k] for k in mapped]


def unwrap_subset(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The data set under a KeyedSubset and the indices into it (all of them for a plain set)."""
    if isinstance(dataset, KeyedSubset):
        return dataset.dataset, dataset.indices
    return dataset, list(range(len(dataset)))


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) index lists: a fixed ``fraction`` held out, chosen by ``seed`` alone.

    The same on every process and for every world size; both lists sorted.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = round(n * fraction)
    if fraction > 0 and not 0 < n_val < n:
        raise ValueError(f"a validation fraction of {fraction} of {n} images leaves a split empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed("val", seed)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """An endless stream of global batches, of which each rank yields its own contiguous slice.

    Epoch ``e`` is a permutation of ``range(dataset_len)`` drawn from ``(seed, e)``, cut into
    ``steps_per_epoch`` global batches (the incomplete last one dropped). Global step ``k`` is
    batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``, whatever the world size, and
    iteration starts at ``start_step`` so that a resumed run continues the same stream. Items are
    ``(index, epoch)`` keys for :class:`CifarDataset`. Use as a DataLoader's ``batch_sampler``.
    """

    def __init__(
        self,
        dataset_len: int,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        start_step: int = 0,
    ) -> None:
        super().__init__()
        if global_batch % world_size:
            raise ValueError(
                f"global batch {global_batch} is not divisible by world size {world_size}"
            )
        if not 0 < global_batch <= dataset_len:
            raise ValueError(f"global batch {global_batch} must be in [1, {dataset_len}]")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.dataset_len = dataset_len
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_len // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``, identical on every rank."""
        generator = torch.Generator().manual_seed(mix_seed("order", self.seed, epoch))
        return torch.randperm(self.dataset_len, generator=generator)

    def _batches(self, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, int]]:
        """(this rank's indices, epoch) of each step from ``start_step`` on; the indices are
        sliced from the epoch's permutation, copied to ``device`` once per epoch."""
        step = self.start_step
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        while True:
            step_epoch, k = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch, order = step_epoch, to_device(self.permutation(step_epoch), device)
            start = k * self.global_batch + self.rank * self.local_batch
            yield order[start : start + self.local_batch], epoch
            step += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for indices, epoch in self._batches():
            yield [(i, epoch) for i in indices.tolist()]

    def device_keys(
        self, device: torch.device | str, indices: Sequence[int] | None = None
    ) -> Iterator[torch.Tensor]:
        """The same stream as (B, 2) int64 ``[index, epoch]`` tensors made on ``device``, with no
        host work per image; ``indices`` maps positions to a subset's indices (KeyedSubset)."""
        lookup = None if indices is None else to_device(torch.as_tensor(indices), device)
        for positions, epoch in self._batches(device):
            index = positions if lookup is None else lookup[positions]
            yield torch.stack((index, torch.full_like(index, epoch)), 1)


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of ``range(n)`` for evaluation: every index exactly once.

    Shares differ in length by at most one (the first ``n % world_size`` ranks get one more), and
    there is no padding, so summing per-rank correct counts gives the exact accuracy.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
