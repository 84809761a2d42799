"""Your own images: ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``, any format Pillow reads.

Files Pillow cannot identify are reported (path and reason) and skipped when the folder is
scanned; a class with no readable image, or a class of train/ missing from val/, is one clear
``DataError``. Images are decoded when a batch needs them and go through the same transforms as
CIFAR (``utils.data.augment.AugmentedImages``), whatever their size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.data.augment import AugmentedImages
from utils.data.cifar import DataError

log = logging.getLogger("vit")


@dataclass
class FolderSplit:
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[Path, str]]


def _readable(path: Path) -> str | None:
    """None when Pillow can read the file's header, else the reason it cannot."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def scan_split(folder: Path, classes: list[str] | None = None) -> FolderSplit:
    """Every readable image under ``folder/<class>/``, labelled by the sorted class names."""
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
    return split


class ImageFolderDataset(AugmentedImages):
    """The training and evaluation transforms over image files, decoded when needed."""

    def __init__(
        self, split: FolderSplit, img_size: int, train: bool, seed: int = 0, hflip: bool = False
    ) -> None:
        super().__init__(split.labels, split.classes, img_size, train, seed, hflip)
        self.paths = split.paths

    def load(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        except Exception as error:
            raise DataError(f"cannot decode {path}: {error}") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)
