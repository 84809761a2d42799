"""The training and evaluation transforms of CIFAR images, and CifarDataset, which applies them.

Every random draw is keyed by (seed, epoch, image index) through ``mix_seed``, so that a sample's
crop and flip do not depend on the process, the worker or the order in which it is asked for:
the device path (``utils.data.device_batches``) reproduces them exactly.
"""

from __future__ import annotations

import copy
import hashlib
import math
import operator

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from utils.data.cifar import CifarArrays

MEAN, STD = 0.5, 0.5  # per channel, on [0, 1] pixels, as the reference ViT-pytorch


def mix_seed(*values: int | str) -> int:
    """Hash a tuple of ints/strings into a 63-bit seed, the same in every process and Python run.

    (Python's ``hash`` is salted per process for strings, and ``seed + epoch`` style sums collide.)
    Integers are canonicalised first, so ``np.int64(3)`` and ``torch.tensor(3)`` mix like ``3``.
    """
    canonical = tuple(v if isinstance(v, str) else operator.index(v) for v in values)
    digest = hashlib.blake2b(repr(canonical).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, drawing from ``generator``.

    Returns ``(top, left, h, w)``. Up to ten tries at an area fraction uniform in ``scale`` and an
    aspect ratio log-uniform in ``ratio``; if none fits, the largest central crop within ``ratio``.
    The draws are made in torchvision's order, so with equally seeded generators the boxes match.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_r = torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
        aspect_ratio = torch.exp(log_r).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """A float (3, H, W) image resized to (3, size, size): bilinear with antialiasing, what
    torchvision's ``resize`` computes for float tensors (without importing torchvision, which
    costs every script a second and a half at start)."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(
        image[None], (size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]


def normalize(image: torch.Tensor) -> torch.Tensor:
    """Map float pixels in [0, 255] to [-1, 1] (mean 0.5, std 0.5 on [0, 1]), clamping rounding."""
    return image.div(255 * STD).sub_(MEAN / STD).clamp_(-1.0, 1.0)


class CifarDataset(Dataset):
    """CIFAR images as normalised float32 (3, img_size, img_size) tensors with int labels.

    Keys: ``(index, epoch)`` for training, whose random crop (and flip, with ``hflip``) comes only
    from ``(seed, epoch, index)``; for evaluation a plain ``index`` (or ``(index, epoch)``, epoch
    ignored). Resizing is done in float32 so that upsampling 32 px to 224 px keeps sub-level
    precision. Subclasses read other sources by overriding ``load``.
    """

    SCALE = (0.05, 1.0)  # RandomResizedCrop area range of the reference ViT-pytorch
    RATIO = (3 / 4, 4 / 3)

    def __init__(
        self, arrays: CifarArrays, img_size: int, train: bool, seed: int = 0, hflip: bool = False
    ) -> None:
        # (N, 32, 32, 3) HWC numpy -> (N, 3, 32, 32) CHW tensor, contiguous so workers share pages
        self.images = torch.from_numpy(arrays.images).permute(0, 3, 1, 2).contiguous()
        self.labels = arrays.labels.tolist()
        self.classes = list(arrays.classes)
        self.img_size = img_size
        self.train = train
        self.seed = seed
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.labels)

    def for_evaluation(self) -> CifarDataset:
        """The same images (one tensor, shared) with the evaluation transform."""
        plain = copy.copy(self)
        plain.train, plain.hflip = False, False
        return plain

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` as a uint8 (3, H, W) tensor."""
        return self.images[index]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, epoch = map(operator.index, key)
        elif self.train:
            raise TypeError(
                "a training CifarDataset needs (index, epoch) keys so that its augmentation is "
                "reproducible; use GlobalBatchSampler as the DataLoader's batch_sampler"
            )
        else:
            index, epoch = operator.index(key), 0
        image = self.load(index).float()  # (3, H, W), values 0..255
        if self.train:
            (top, left, h, w), flip = draw_augmentation(
                self.seed, epoch, index, *image.shape[-2:], self.hflip
            )
            image = resize(image[:, top : top + h, left : left + w], self.img_size)
            if flip:
                image = image.flip(-1)
        else:
            image = resize(image, self.img_size)
        return normalize(image), self.labels[index]


def draw_augmentation(
    seed: int, epoch: int, index: int, height: int, width: int, hflip: bool
) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box (top, left, height, width) and the flip of one training sample, drawn from
    a generator keyed by (seed, epoch, index) alone: the CPU path (``CifarDataset``) and the
    device path (``utils.data.device_batches.CropBoxes``) both call this. The flip is drawn after
    the box, so the crops are the same with and without --hflip."""
    generator = torch.Generator().manual_seed(mix_seed("crop", seed, epoch, index))
    box = sample_crop_box(height, width, CifarDataset.SCALE, CifarDataset.RATIO, generator)
    flip = hflip and torch.rand(1, generator=generator).item() < 0.5
    return box, flip
