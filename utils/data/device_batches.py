"""Training and evaluation batches made on the device from the uint8 data set kept there.

The CPU path (:class:`utils.data.augment.CifarDataset` in DataLoader workers) crops, resizes and
normalises one image at a time and copies float32 images to the GPU: 600 KB per image at 224 px.
Here the whole uint8 set (150 MB for CIFAR) lives on the device and a batch is made from its
``[index, epoch]`` keys in one batched pass, with no host work per image and no worker processes:

1. Crop boxes and flips come from ``utils.data.augment.draw_boxes``, a counter-based function of
   (seed, index, epoch) that the CPU path calls too, so both paths crop the same boxes.
2. Crop + resize is separable: ``out = Wy @ image @ Wx.T`` with per-sample (S, 32) matrices that
   hold the weights of PyTorch's antialiased bilinear resize (``F.interpolate(mode="bilinear",
   antialias=True)``, which torchvision's ``resized_crop`` calls). The result is the CPU path's
   image up to float rounding, for upsampling and for downsampling alike.
3. Normalisation to [-1, 1] with ``utils.data.augment.normalize``.

Nothing in :meth:`DeviceBatches.train_batch` waits for the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from utils.data.augment import CifarDataset, draw_boxes, normalize
from utils.data.errors import DataError
from utils.data.sampling import to_device


class DeviceCopies:
    """One device copy per host image tensor: a training set and its validation split, which
    share their images on the host, share them on the device too."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._copies: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._copies)

    def of(self, images: torch.Tensor) -> torch.Tensor:
        if id(images) not in self._copies:
            self._copies[id(images)] = images.to(self.device)
        return self._copies[id(images)]


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int):
    """(B, out_size, in_size) matrices resizing pixels ``[start, start + length)`` to out_size.

    Row i holds the weights of PyTorch's antialiased bilinear resize (aten
    ``_upsample_bilinear2d_aa``): a triangle filter centred on ``scale * (i + 0.5)`` in crop
    coordinates, ``scale = length / out_size``, widened to ``scale`` pixels when downsampling,
    restricted to the crop and normalised to sum 1. When upsampling this is plain bilinear with
    half-pixel centres (``align_corners=False``), clamped at the crop's edges.
    """
    device = start.device
    start = start.float()[:, None, None]  # (B, 1, 1)
    length = length.float()[:, None, None]
    scale = length / out_size
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(out_size, device=device) + 0.5)[:, None]  # (B, out, 1)
    pos = torch.arange(in_size, device=device) - start  # (B, 1, in): position within the crop
    weight = (1 - (pos + 0.5 - centre).abs() / support).clamp(min=0)  # (B, out, in)
    weight = weight * ((pos >= 0) & (pos < length))
    return weight / weight.sum(-1, keepdim=True)


class DeviceBatches:
    """A uint8 image set and its labels on ``device``, made into normalised float32 batches.

    ``train_batch`` takes ``(index, epoch)`` keys (as a list, or a (B, 2) int64 tensor, best
    already on the device: :meth:`utils.data.sampling.GlobalBatchSampler.device_keys`) and returns
    what a DataLoader over ``CifarDataset(arrays, img_size, train=True, seed)`` returns for them,
    already on the device. ``eval_batch`` does the same for the evaluation transform.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Sequence[int] | torch.Tensor,
        img_size: int,
        seed: int,
        device: torch.device | str,
        hflip: bool = False,
    ) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4, "expected uint8 (N, C, H, W)"
        self.device = torch.device(device)
        self.images = images.to(self.device)  # (N, 3, 32, 32) uint8
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)  # (N,)
        self.img_size, self.seed, self.hflip = img_size, seed, hflip

    @classmethod
    def from_dataset(
        cls, dataset: CifarDataset, device: torch.device | str, copies: DeviceCopies | None = None
    ) -> DeviceBatches:
        """``dataset``'s images on ``device`` (through ``copies`` when given), with its size,
        seed and flip setting."""
        images = dataset.images if copies is None else copies.of(dataset.images)
        return cls(images, dataset.labels, dataset.img_size, dataset.seed, device, dataset.hflip)

    def __len__(self) -> int:
        return len(self.labels)

    @torch.no_grad()
    def train_batch(
        self, keys: Sequence[tuple[int, int]] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random-resized-crop batch: ((B, 3, S, S) float32 in [-1, 1], (B,) int64 labels)."""
        keys = to_device(torch.as_tensor(keys, dtype=torch.long), self.device)  # (B, 2)
        height, width = self.images.shape[-2:]
        top, left, h, w, flip = draw_boxes(self.seed, keys, height, width, self.hflip).unbind(1)
        index = keys[:, 0]
        with torch.autocast(self.device.type, enabled=False):  # fp32 even inside an autocast
            wy = resize_weights(top, h, height, self.img_size)  # (B, S, 32)
            wx = resize_weights(left, w, width, self.img_size)  # (B, S, 32)
            x = self.images[index].float()  # (B, 3, 32, 32), values 0..255
            x = wy[:, None] @ x @ wx[:, None].transpose(-1, -2)  # (B, 3, S, S)
            x = torch.where(flip.bool()[:, None, None, None], x.flip(-1), x)
        return normalize(x), self.labels[index]

    @torch.no_grad()
    def eval_batch(
        self, indices: Sequence[int] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole images resized to img_size: ((B, 3, S, S) float32 in [-1, 1], (B,) labels)."""
        index = to_device(torch.as_tensor(indices, dtype=torch.long), self.device)  # (B,)
        x = self.images[index].float()  # (B, 3, 32, 32)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            size = (self.img_size, self.img_size)
            x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
        return normalize(x), self.labels[index]


class DeviceEvalBatches:
    """Evaluation batches of ``indices`` (in order) made on the device.

    An iterable of ``(images, labels)`` like a DataLoader over the evaluation CifarDataset, so
    :func:`utils.training.evaluation.evaluate` takes either. The indices are copied to the
    device once.
    """

    def __init__(self, data: DeviceBatches, indices: Sequence[int], batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.indices = torch.as_tensor(list(indices), dtype=torch.long).to(data.device)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.data.eval_batch(self.indices[start : start + self.batch_size])


def use_device_data(choice: str, datasets: Sequence[Dataset], device: torch.device) -> bool:
    """``--data_on_device`` (``auto``, ``on``, ``off``) for a run over ``datasets``.

    ``auto`` is on for CUDA when every set is CIFAR and their images (a tensor shared by two sets
    counted once) take at most a quarter of the free memory. Image folders decode files, so they
    stay with the DataLoader workers; ``on`` is an error for them.
    """
    is_cifar = all(isinstance(d, CifarDataset) for d in datasets)
    if choice == "on" and not is_cifar:
        raise DataError("--data_on_device on needs a CIFAR data set; image folders stay on the CPU")
    if choice != "auto":
        return choice == "on"
    if device.type != "cuda" or not is_cifar:
        return False
    return fits_on_device(sum({id(d.images): d.images.numel() for d in datasets}.values()), device)


def fits_on_device(nbytes: int, device: torch.device, fraction: float = 0.25) -> bool:
    """Whether a data set of ``nbytes`` takes at most ``fraction`` of the device's free memory.

    CPU "devices" always fit. Asks the driver once (a synchronising call): use it at set-up only.
    """
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free
