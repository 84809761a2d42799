"""Training and evaluation batches made on the device from the uint8 data set kept there.

The CPU path (:class:`utils.data.augment.CifarDataset` in DataLoader workers) crops, resizes and
normalises one image at a time and copies float32 images to the GPU: 600 KB per image at 224 px.
Here the whole uint8 set (150 MB for CIFAR) lives on the device and a batch is made in one batched
pass:

1. Crop boxes come from the same per-sample keyed draws as the CPU path
   (``mix_seed("crop", seed, epoch, index)`` -> ``torch.Generator`` -> ``sample_crop_box``), so
   for the same ``(index, epoch)`` keys both paths crop the same boxes. This is host work on four
   ints per image; :class:`CropBoxes` is a Dataset so that DataLoader workers can do it ahead of
   time, and only a small (B, 6) int64 tensor is copied to the device.
2. Crop + resize is separable: ``out = Wy @ image @ Wx.T`` with per-sample (S, 32) matrices that
   hold the weights of PyTorch's antialiased bilinear resize (``F.interpolate(mode="bilinear",
   antialias=True)``, which torchvision's ``resized_crop`` calls). The result is the CPU path's
   image up to float rounding, for upsampling and for downsampling alike.
3. Normalisation to [-1, 1] with ``utils.data.augment.normalize``.

Nothing in :meth:`DeviceBatches.train_batch` waits for the device.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from utils.data.augment import CifarDataset, draw_augmentation, normalize
from utils.data.cifar import DataError


class CropBoxes(Dataset):
    """``(index, epoch) -> int64 [index, top, left, h, w, flip]``: CifarDataset's training crop.

    Use it as a DataLoader's dataset with :class:`utils.data.sampling.GlobalBatchSampler` as the
    batch_sampler: batches are then (B, 6) tensors drawn in worker processes, pinned if asked.
    """

    def __init__(
        self, num_images: int, seed: int, height: int = 32, width: int = 32, hflip: bool = False
    ) -> None:
        self.num_images, self.seed, self.size, self.hflip = num_images, seed, (height, width), hflip

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        index, epoch = map(operator.index, key)
        box, flip = draw_augmentation(self.seed, epoch, index, *self.size, self.hflip)
        return torch.tensor((index, *box, int(flip)))

    def batch(self, keys: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The boxes of a list of keys, in this process: (B, 6)."""
        return torch.stack([self[key] for key in keys])


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

    ``train_batch`` takes the keys a :class:`utils.data.sampling.GlobalBatchSampler` yields (or the
    (B, 6) boxes a DataLoader over :attr:`crop_boxes` yields) and returns what a DataLoader over
    ``CifarDataset(arrays, img_size, train=True, seed)`` would return for them, already on the
    device. ``eval_batch`` does the same for the evaluation transform.
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
        self.img_size = img_size
        self.crop_boxes = CropBoxes(len(images), seed, *images.shape[-2:], hflip=hflip)

    @classmethod
    def from_dataset(
        cls,
        dataset: CifarDataset,
        device: torch.device | str,
        copies: dict[int, torch.Tensor] | None = None,
    ) -> DeviceBatches:
        """``dataset``'s images on ``device``, with its size, seed and flip setting.

        ``copies`` (host tensor id -> device tensor) lets data sets that share one host tensor,
        such as a training set and its validation split, share one device copy.
        """
        images = dataset.images
        if copies is not None:
            if id(images) not in copies:
                copies[id(images)] = images.to(device)
            images = copies[id(images)]
        return cls(images, dataset.labels, dataset.img_size, dataset.seed, device, dataset.hflip)

    def __len__(self) -> int:
        return len(self.labels)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()  # so that the copy below does not wait for the device
        return t.to(self.device, non_blocking=True)

    @torch.no_grad()
    def train_batch(
        self, keys: Sequence[tuple[int, int]] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random-resized-crop batch: ((B, 3, S, S) float32 in [-1, 1], (B,) int64 labels).

        ``keys``: ``(index, epoch)`` pairs, or their (B, 6) ``[index, top, left, h, w, flip]``.
        """
        boxes = keys if isinstance(keys, torch.Tensor) else self.crop_boxes.batch(keys)
        boxes = self._to_device(boxes)  # (B, 6)
        index, top, left, h, w, flip = boxes.unbind(1)  # each (B,)
        height, width = self.images.shape[-2:]
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
        index = self._to_device(torch.as_tensor(indices, dtype=torch.long))  # (B,)
        x = self.images[index].float()  # (B, 3, 32, 32)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            size = (self.img_size, self.img_size)
            x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
        return normalize(x), self.labels[index]


class DeviceEvalBatches:
    """Evaluation batches of ``indices`` (in order) made on the device.

    An iterable of ``(images, labels)`` like a DataLoader over the evaluation CifarDataset, so
    :func:`utils.training.engine.evaluate` takes either. The indices are copied to the device once.
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
    is_cifar = all(type(d) is CifarDataset for d in datasets)
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
