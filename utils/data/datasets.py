"""The three sets a run uses: what it trains on, what picks the best model, and what scores it.

With ``--val_split 0`` (the reference's behaviour) the test set does both of the last two jobs.
With ``--val_split F`` a fixed fraction of the training images, chosen by the seed alone, picks
the best model and the test set is scored once, at the end, as Google's recipe does.

An image folder's ``val/`` is named for the job it does: ``val`` when it picks the best model
(``--val_split 0``), ``test`` when it is scored at the end beside a hold-out named ``val``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from utils.data.augment import CifarDataset
from utils.data.cifar import CIFAR, load_cifar
from utils.data.errors import DataError
from utils.data.image_folder import ImageFolderDataset, scan_split, unreadable_images
from utils.data.sampling import KeyedSubset, split_indices

DATASETS = (*CIFAR, "imagefolder")


@dataclass
class DataSplits:
    """A run's three sets (two where the test set also selects) and their class names."""

    train: Dataset  # augmented, keyed by (index, epoch)
    select: Dataset  # scored every --eval_every steps; the best checkpoint is chosen on it
    test: Dataset | None  # scored once at the end, when ``select`` is a validation split
    classes: list[str]
    select_name: str  # "val" or "test": the selection scores' name in the log and TensorBoard

    def unreadable_images(self) -> list[Path]:
        """The image files skipped so far, each named in a warning when it was: at the scan of
        an image folder, or when first read here or in a DataLoader worker (none for CIFAR)."""
        return unreadable_images(self.train, self.select, self.test)


def load_test_set(
    name: str, root: Path, img_size: int, classes: list[str], optional: bool = False
) -> Dataset | None:
    """The images a run scores as its test set, transformed for evaluation: CIFAR's test batch,
    or an image folder's ``val/`` (None for a missing one when ``optional``)."""
    if name != "imagefolder":
        return CifarDataset(load_cifar(name, root, train=False), img_size, False)
    if optional and not (root / "val").is_dir():
        return None
    return ImageFolderDataset(scan_split(root / "val", classes), img_size, False)


def load_validation_set(
    name: str, root: Path, img_size: int, classes: list[str], val_split: float, seed: int
) -> KeyedSubset:
    """The ``--val_split`` hold-out that a run with this fraction and seed selected its best
    checkpoint on, transformed for evaluation: rebuilt, so that it can be scored again later."""
    if name == "imagefolder":
        split = scan_split(root / "train")
        if split.classes != classes:
            raise DataError(
                f"{root / 'train'} has the classes {', '.join(split.classes)}, the checkpoint "
                f"{', '.join(classes)}; pass the --data_dir it was trained on"
            )
        plain = ImageFolderDataset(split, img_size, False)
    else:
        plain = CifarDataset(load_cifar(name, root, train=True), img_size, False)
    _, val_idx = held_out(len(plain), val_split, seed)
    if isinstance(plain, ImageFolderDataset):
        plain.stand_ins_within(val_idx)  # as in training
    return KeyedSubset(plain, val_idx)


def held_out(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """``split_indices`` of ``n`` training images, its refusal worded for ``--val_split``."""
    try:
        return split_indices(n, val_split, seed)
    except ValueError as error:
        raise DataError(f"--val_split {val_split}: {error}") from None


def build_datasets(
    name: str, data_dir: str | Path, img_size: int, seed: int, val_split: float, hflip: bool
) -> DataSplits:
    root = Path(data_dir)
    if name == "imagefolder":
        train_split = scan_split(root / "train")
        train = ImageFolderDataset(train_split, img_size, True, seed, hflip)
        plain = ImageFolderDataset(train_split, img_size, False)
    else:
        train = CifarDataset(load_cifar(name, root, train=True), img_size, True, seed, hflip)
        plain = train.for_evaluation()
    classes = train.classes
    test = load_test_set(name, root, img_size, classes, optional=True)
    if val_split > 0:
        train_idx, val_idx = held_out(len(train), val_split, seed)
        if isinstance(train, ImageFolderDataset):  # an unreadable file's stand-in: its own side
            train.stand_ins_within(train_idx)
            plain.stand_ins_within(val_idx)
        select = KeyedSubset(plain, val_idx)
        return DataSplits(KeyedSubset(train, train_idx), select, test, classes, "val")
    if test is None:
        raise DataError(
            f"{root} has no val/ folder to evaluate on: add {root}/val/<class>/<images> "
            "or hold out part of train/ with --val_split 0.1"
        )
    return DataSplits(train, test, None, classes, "val" if name == "imagefolder" else "test")
