"""The training and evaluation transforms, and the data sets that apply them (CIFAR's here,
image folders' in ``utils.data.image_folder``).

Every random draw is a function of (seed, image index, epoch) alone (``keyed_uniform``), so that a
sample's crop and flip do not depend on the process, the worker, the batch or the order in which
it is asked for: the device path (``utils.data.device_batches``) draws the same on the GPU.
"""

from __future__ import annotations

import copy
import hashlib
import math
import operator
from collections.abc import Sequence

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


_MASK32 = 0xFFFFFFFF
SCALE = (0.05, 1.0)  # RandomResizedCrop's area range in the reference ViT-pytorch
RATIO = (3 / 4, 4 / 3)  # and its aspect-ratio range
TRIES = 10  # torchvision's tries before the central-crop fallback


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2**32) that mixes every input bit into every output bit (Wellons'
    ``lowbias32``), in int64 arithmetic so that CPU and CUDA compute the same integers."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniform(seed: int, keys: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) float64 uniforms in [0, 1) that are a function of ``(seed, index, epoch)`` alone.

    ``keys``: (B, 2) int64 ``[index, epoch]`` on any device. A counter-based generator: draw ``j``
    of a key is a hash of (key, j), so a batch is made from its keys in one pass, in any order,
    on the CPU or the GPU, with the same numbers.
    """
    key = _hash32((keys[:, 0] & _MASK32) ^ (mix_seed("crop", seed) & _MASK32))
    key = _hash32(key ^ (keys[:, 1] & _MASK32))  # (B,)
    counter = (torch.arange(count, device=keys.device) * 0x9E3779B9) & _MASK32  # (count,)
    return _hash32(key[:, None] ^ counter).double() / 2**32  # (B, count)


def draw_boxes(
    seed: int,
    keys: torch.Tensor,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    hflip: bool,
) -> torch.Tensor:
    """The random-resized-crop boxes and flips of training samples: (B, 5) int64
    ``[top, left, h, w, flip]`` on the keys' device, from ``keyed_uniform`` alone.

    torchvision's ``RandomResizedCrop.get_params`` per sample: up to ten tries at an area fraction
    uniform in ``SCALE`` and an aspect ratio log-uniform in ``RATIO``, the first that fits wins,
    else the largest central crop within ``RATIO``; all tries are drawn at once. ``height`` and
    ``width`` are ints or (B,) tensors (image folders mix sizes). The flip is its own draw, so the
    crops are the same with and without --hflip. The CPU workers (``AugmentedImages``) and the
    device path (``utils.data.device_batches``) both call this.
    """
    u = keyed_uniform(seed, keys, 4 * TRIES + 1)  # (B, 41)
    img_h, img_w = (  # each (B, 1); an int is filled in on the device, not copied there
        size.to(keys.device).double()[:, None]
        if isinstance(size, torch.Tensor)
        else torch.full((len(keys), 1), float(size), dtype=torch.float64, device=keys.device)
        for size in (height, width)
    )
    target = img_h * img_w * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[:, :TRIES])  # (B, TRIES)
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, TRIES : 2 * TRIES])
    w = torch.sqrt(target * aspect).round()  # half to even, as Python's round
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= img_w) & (h > 0) & (h <= img_h)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits (0 if none does)
    h, w = h.gather(1, first), w.gather(1, first)  # (B, 1)
    top = (u[:, 2 * TRIES : 3 * TRIES].gather(1, first) * (img_h - h + 1)).floor()
    left = (u[:, 3 * TRIES : 4 * TRIES].gather(1, first) * (img_w - w + 1)).floor()
    # fallback: the whole image, narrowed to the nearest ratio in RATIO, centred
    fall_w = torch.where(img_w / img_h > RATIO[1], (img_h * RATIO[1]).round(), img_w)
    fall_h = torch.where(img_w / img_h < RATIO[0], (img_w / RATIO[0]).round(), img_h)
    fallen = ~fits.any(1, keepdim=True)
    h, w = torch.where(fallen, fall_h, h), torch.where(fallen, fall_w, w)
    top = torch.where(fallen, ((img_h - h) / 2).floor(), top)
    left = torch.where(fallen, ((img_w - w) / 2).floor(), left)
    flip = (u[:, -1:] < 0.5) & hflip
    return torch.cat((top, left, h, w, flip.double()), 1).long()


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


class AugmentedImages(Dataset):
    """Images as normalised float32 (3, img_size, img_size) tensors with int labels; subclasses
    say where image ``index`` comes from (``load``: a uint8 (3, H, W) tensor).

    Keys: ``(index, epoch)`` for training, whose random crop (and flip, with ``hflip``) comes only
    from ``(seed, index, epoch)`` through ``draw_boxes``; for evaluation a plain ``index`` (or
    ``(index, epoch)``, epoch ignored). Resizing is done in float32 so that upsampling 32 px to
    224 px keeps sub-level precision. A DataLoader fetches a batch through ``__getitems__``,
    which draws the batch's boxes in one call.
    """

    def __init__(
        self,
        labels: Sequence[int],
        classes: Sequence[str],
        img_size: int,
        train: bool,
        seed: int = 0,
        hflip: bool = False,
    ) -> None:
        self.labels = list(labels)
        self.classes = list(classes)
        self.img_size, self.train, self.seed, self.hflip = img_size, train, seed, hflip

    def load(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def for_evaluation(self) -> AugmentedImages:
        """The same images (shared, not copied) with the evaluation transform."""
        plain = copy.copy(self)
        plain.train, plain.hflip = False, False
        return plain

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
        pairs = [key if isinstance(key, tuple) else (key, 0) for key in keys]
        if self.train and len(pairs) != sum(isinstance(key, tuple) for key in keys):
            raise TypeError(
                "a training data set needs (index, epoch) keys so that its augmentation is "
                "reproducible; use GlobalBatchSampler as the DataLoader's batch_sampler"
            )
        indices = [operator.index(i) for i, _ in pairs]
        images = [self.load(i).float() for i in indices]  # each (3, H, W), values 0..255
        if self.train:
            sizes = torch.tensor([image.shape[-2:] for image in images])  # (B, 2)
            keys_tensor = torch.tensor([(i, operator.index(e)) for i, e in pairs])  # (B, 2)
            boxes = draw_boxes(self.seed, keys_tensor, sizes[:, 0], sizes[:, 1], self.hflip)
            images = [crop(image, *box) for image, box in zip(images, boxes.tolist(), strict=True)]
        return [
            (normalize(resize(image, self.img_size)), self.labels[i])
            for image, i in zip(images, indices, strict=True)
        ]


def crop(image: torch.Tensor, top: int, left: int, h: int, w: int, flip: int) -> torch.Tensor:
    image = image[:, top : top + h, left : left + w]
    return image.flip(-1) if flip else image


class CifarDataset(AugmentedImages):
    """CIFAR images, all in one uint8 tensor (shared by the workers, and copied to the device
    whole by ``utils.data.device_batches``)."""

    def __init__(
        self, arrays: CifarArrays, img_size: int, train: bool, seed: int = 0, hflip: bool = False
    ) -> None:
        super().__init__(arrays.labels.tolist(), arrays.classes, img_size, train, seed, hflip)
        # (N, 32, 32, 3) HWC numpy -> (N, 3, 32, 32) CHW tensor, contiguous so workers share pages
        self.images = torch.from_numpy(arrays.images).permute(0, 3, 1, 2).contiguous()

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]
