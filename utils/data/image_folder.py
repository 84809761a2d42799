"""Your own images: ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``, any format Pillow reads.

An unreadable image is skipped wherever it is found, with a warning naming the file (absolute
path) and the reason:

- at the scan, which reads headers only (``Image.open`` + ``verify``: 0.03 ms a file, where a
  full decode takes about 2 ms, three minutes for 100k images): files Pillow cannot identify,
  PNGs whose chunks fail their checksums, pixel modes :func:`to_rgb` cannot convert. Each
  folder's count follows its warnings.
- at the first read, for what only a full decode shows (a truncated JPEG passes the scan):
  ``ImageFolderDataset.load`` then delivers the next image of the same class that decodes (in
  the scan's order, cyclically), so that the label stays true and the batch keeps its shape. The
  stand-in depends on the files alone: a resumed run reads what an uninterrupted one does.

:func:`unreadable_images` lists both kinds, DataLoader workers' findings included, for a run's
summary. A class with no readable image, or a class of train/ missing from val/, is one
``DataError``. Images are decoded when a batch needs them, converted to 8-bit RGB by
:func:`to_rgb` (which ``utils.inspection.images`` uses too), and go through the same transforms as
CIFAR (``utils.data.augment.AugmentedImages``), whatever their size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from models.errors import one_line
from utils.data.augment import AugmentedImages
from utils.data.errors import DataError

log = logging.getLogger("vit")

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit grayscale (PNG, TIFF)
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV", "I", "F")
MODES += SIXTEEN_BIT  # what to_rgb converts; LAB and La, which Pillow cannot convert, are refused


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, or ValueError naming its mode (the callers add the file's name).

    Pillow's ``convert("RGB")`` clips what it should scale, so here:

    - 16-bit grayscale (``I;16``, ``I;16B``...) keeps the high byte, ``v >> 8`` (65535 -> 255,
      32768 -> 128), as Pillow reads 48- and 64-bit RGB(A) PNGs; ``I`` (32-bit integers, as some
      TIFFs hold 16-bit data) the same when its values lie in 0..65535, else it is refused.
    - ``F`` (float TIFF): values in [0, 1] become ``round(255 v)``; any other range (or NaN) is
      refused, since floats have no agreed scale.
    - transparency (an alpha band, or a palette's or colour's transparent entry) is composited
      over white, as a viewer shows it: the colours hidden under alpha 0 are arbitrary.
    - the rest (1-bit, L, P, CMYK, YCbCr, HSV) is Pillow's conversion; CMYK without its ICC
      profile. The pixels are taken as stored (no EXIF rotation).
    """
    mode = image.mode
    if mode not in MODES:
        raise ValueError(f"pixel mode {mode} cannot be converted to RGB")
    if mode in (*SIXTEEN_BIT, "I", "F"):
        return Image.fromarray(_to_8bit(np.asarray(image), mode)).convert("RGB")
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) uint8 from the pixels of a 16-bit, ``I`` or ``F`` grayscale image."""
    low, high = values.min(), values.max()
    if mode == "F":
        if not 0 <= low <= high <= 1:  # NaN fails too
            raise ValueError(
                f"pixel mode F (float) with values {low:g}..{high:g}: only 0..1 is read"
            )
        return np.rint(values * 255).astype(np.uint8)
    if mode == "I" and not 0 <= low <= high <= 65535:
        raise ValueError(f"pixel mode I with values {low}..{high}: only 0..65535 is read")
    return (values >> 8).astype(np.uint8)


def decode(path: Path) -> np.ndarray:
    """The file's pixels as (H, W, 3) uint8; any failure (truncated data...) raises."""
    with Image.open(path) as image:
        return np.asarray(to_rgb(image))


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {one_line(error)}"


@dataclass
class FolderSplit:
    paths: list[Path]  # absolute
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[Path, str]]  # at the scan: (file, reason)
    # Files that failed when first read, one flag per path. In shared memory: DataLoader workers
    # (forked, or spawned and handed the tensor) set it, the main process reads it.
    unreadable: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


def _readable(path: Path) -> str | None:
    """None when Pillow can read the file's header and convert its mode, else why not."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            image.verify()
    except Exception as error:
        return _reason(error)
    return None if mode in MODES else f"pixel mode {mode} cannot be converted to RGB"


def scan_split(folder: Path, classes: list[str] | None = None) -> FolderSplit:
    """Every readable image under ``folder/<class>/``, labelled by the sorted class names."""
    folder = Path(folder).absolute()  # warnings name files a worker or a log reader can find
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; expected {folder}/<class name>/<images>")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise DataError(f"{folder} has no class folders; expected {folder}/<class>/<images>")
    elif missing := sorted(set(classes) - set(found)):
        raise DataError(f"{folder} lacks the class folder(s) {', '.join(missing)} that train/ has")
    elif extra := sorted(set(found) - set(classes)):
        raise DataError(f"{folder} has class folder(s) {', '.join(extra)} that train/ lacks")
    split = FolderSplit([], [], classes, [])
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (folder / name).rglob("*") if p.is_file() and not p.name.startswith(".")
        )
        count = 0
        for path in files:
            reason = _readable(path)
            if reason is None:
                split.paths.append(path)
                split.labels.append(label)
                count += 1
            else:
                split.skipped.append((path, reason))
                log.warning("skipping %s: %s", path, reason)
        if count == 0:
            raise DataError(f"class folder {folder / name} has no readable images")
    if split.skipped:
        log.warning("%s: skipped %d unreadable file(s)", folder, len(split.skipped))
    split.unreadable = torch.zeros(len(split.paths), dtype=torch.bool).share_memory_()
    return split


class UnreadableClass(DataError):
    """Every file of a class fails when read. One line even from a DataLoader worker, which
    re-raises ``type(error)(its own header + the worker's traceback)``: the original message is
    the traceback's last line."""

    def __init__(self, message: str) -> None:
        last = message.rstrip().splitlines()[-1] if "\n" in message else message
        super().__init__(last.partition(f"{type(self).__name__}: ")[2] or last)


class ImageFolderDataset(AugmentedImages):
    """The training and evaluation transforms over image files, decoded when needed.

    A file that fails to decode is replaced, each time it is asked for, by the next file of its
    class (in the scan's order, cyclically) that decodes: the same stand-in in every process and
    run. It is warned about once and flagged in ``split.unreadable``, which the sets made from
    one split and their DataLoader workers share. A set that is one side of a hold-out draws its
    stand-ins from its own side first (:meth:`stand_ins_within`).
    """

    def __init__(
        self, split: FolderSplit, img_size: int, train: bool, seed: int = 0, hflip: bool = False
    ) -> None:
        super().__init__(split.labels, split.classes, img_size, train, seed, hflip)
        self.split, self.paths = split, split.paths
        assert len(split.unreadable) == len(self.paths), "make FolderSplits with scan_split"
        self.pool: frozenset[int] | None = None  # where stand-ins come from first; None: anywhere

    def stand_ins_within(self, indices: Sequence[int]) -> None:
        """Take stand-ins from ``indices`` (the training part, or the hold-out, of a
        ``--val_split``) while its class has one there that decodes: no held-out image is
        trained on in an unreadable one's place, nor a training image scored."""
        self.pool = frozenset(indices)

    def load(self, index: int) -> torch.Tensor:
        unreadable = self.split.unreadable
        failed: list[tuple[int, str]] = []
        for j in self._same_class_from(index):
            if unreadable[j]:
                continue  # known to fail: its stand-in is further on
            try:
                array = decode(self.paths[j])  # (H, W, 3) uint8
            except Exception as error:  # truncated data, a refused mode, a vanished file...
                failed.append((j, _reason(error)))
                continue
            for k, reason in failed:  # each has j for stand-in: every file between them failed
                if not unreadable[k]:
                    unreadable[k] = True
                    log.warning(
                        "skipping %s: %s; %s (same class) is read in its place",
                        self.paths[k], reason, self.paths[j],
                    )  # fmt: skip
            return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)
        example = f" (e.g. {self.paths[failed[0][0]]}: {failed[0][1]})" if failed else ""
        raise UnreadableClass(
            f"class {self.classes[self.labels[index]]} has no readable images: every file of it "
            f"fails to decode{example}"
        )

    def _same_class_from(self, index: int) -> Iterator[int]:
        """``index``, then the other images of its class in order, wrapping around, those of
        the pool first (looked up only when ``index`` fails)."""
        yield index
        label = self.labels[index]
        members = [j for j, other in enumerate(self.labels) if other == label]
        at = members.index(index)
        order = members[at + 1 :] + members[:at]
        if self.pool is not None:
            order.sort(key=lambda j: j not in self.pool)  # stable: the pool's first, in order
        yield from order


def unreadable_images(*datasets: Dataset | None) -> list[Path]:
    """The image files skipped in ``datasets`` (subsets and CIFAR sets welcome), sorted: at
    the scan, and at the first read in this process or its DataLoader workers so far."""
    splits = {}
    for dataset in datasets:
        while hasattr(dataset, "dataset"):  # KeyedSubset, torch's Subset
            dataset = dataset.dataset
        if isinstance(dataset, ImageFolderDataset):
            splits[id(dataset.split)] = dataset.split
    found = set()
    for split in splits.values():
        found |= {path for path, _ in split.skipped}
        found |= {split.paths[i] for i in split.unreadable.nonzero().flatten().tolist()}
    return sorted(found)
