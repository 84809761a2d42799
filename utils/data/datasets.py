"""The three sets a run uses: what it trains on, what picks the best model, and what scores it.

With ``--val_split 0`` (the reference's behaviour) the test set does both of the last two jobs.
With ``--val_split F`` a fixed fraction of the training images, chosen by the seed alone, picks
the best model and the test set is scored once, at the end, as Google's recipe does.

An image folder's ``val/`` is named for the job it does: ``val`` when it picks the best model
(``--val_split 0``), ``test`` when it is scored at the end beside a hold-out named ``val``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from models.errors import UsageError
from utils.data.augment import AugmentedImages, CifarDataset
from utils.data.cifar import CIFAR, load_cifar
from utils.data.errors import DataError
from utils.data.image_folder import ImageFolderDataset, scan_split, unreadable_images
from utils.data.sampling import KeyedSubset, split_indices
from utils.runtime import distributed as dist

DATASETS = (*CIFAR, "imagefolder")


@dataclass(frozen=True)
class SplitRead:
    """What a process read of one split (CIFAR's training files or test file, an image folder's
    ``train/`` or ``val/``): its image count and a digest of its images, labels and class names
    in their order. Nodes that do not share a disk each read their own copy, and a resumed run
    reads the folder again: equal reads are what make them one run (``where`` aside)."""

    images: int
    digest: str
    where: str = field(compare=False)  # the folder it was read from, absolute


@dataclass
class DataSplits:
    """A run's three sets (two where the test set also selects) and their class names."""

    train: Dataset  # augmented, keyed by (index, epoch)
    select: Dataset  # scored every --eval_every steps; the best checkpoint is chosen on it
    test: Dataset | None  # scored once at the end, when ``select`` is a validation split
    classes: list[str]
    select_name: str  # "val" or "test": the selection scores' name in the log and TensorBoard
    read: dict[str, SplitRead] = field(default_factory=dict)  # by split: "train", "test"/"val"

    def unreadable_images(self) -> list[Path]:
        """The image files skipped so far, each named in a warning when it was: at the scan of
        an image folder, or when first read here or in a DataLoader worker (none for CIFAR)."""
        return unreadable_images(self.train, self.select, self.test)

    def recorded(self) -> dict[str, dict[str, list]]:
        """What a run's files keep of ``read`` beside its flags, ``{"data": {split: [images,
        digest]}}``, for a resumed run to check that ``--data_dir`` holds the same images."""
        return {"data": {name: [read.images, read.digest] for name, read in self.read.items()}}


def digest(dataset: AugmentedImages, folder: Path | None = None) -> str:
    """blake2b of a set's class names, labels and images in order: CIFAR's pixels (0.2 s for
    its 150 MB), an image folder's file paths (relative to ``folder``) and sizes, which a copy
    keeps and an edit or a cut changes, without decoding a file."""
    h = hashlib.blake2b(repr((dataset.classes, dataset.labels)).encode(), digest_size=16)
    if isinstance(dataset, ImageFolderDataset):
        for path in dataset.paths:
            try:
                size = path.stat().st_size
            except OSError:  # gone since the scan: its stand-in is read (ImageFolderDataset)
                size = -1
            h.update(f"{path.relative_to(folder)}\0{size}\n".encode())
    else:
        h.update(dataset.images.numpy())  # contiguous uint8
    return h.hexdigest()


def split_read(name: str, root: Path, dataset: AugmentedImages, train: bool) -> SplitRead:
    """The ``SplitRead`` of CIFAR's training or test files, or of an image folder's ``train/``
    or ``val/``, under ``root`` (``--data_dir``)."""
    if name == "imagefolder":
        folder = (root / ("train" if train else "val")).absolute()
        return SplitRead(len(dataset), digest(dataset, folder), str(folder))
    spec = CIFAR[name]
    files = spec.train_files if train else spec.test_files
    folder = (root / spec.folder).absolute()
    if not len(dataset):
        raise DataError(
            f"{folder} holds no {'training' if train else 'test'} images ({', '.join(files)} "
            f"{'is' if len(files) == 1 else 'are'} empty); delete the folder to download "
            f"{spec.title} again, or pass another --data_dir"
        )
    return SplitRead(len(dataset), digest(dataset), str(folder))


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
        if len(train_split.classes) == 1:  # it would learn to say that class: accuracy 1, loss 0
            folder = (root / "train").absolute()
            raise DataError(
                f"{folder} has one class folder, {train_split.classes[0]}: a classifier needs "
                f"two or more; add {folder}/<another class>/<images>"
            )
        train = ImageFolderDataset(train_split, img_size, True, seed, hflip)
        plain = ImageFolderDataset(train_split, img_size, False)
    else:
        train = CifarDataset(load_cifar(name, root, train=True), img_size, True, seed, hflip)
        plain = train.for_evaluation()
    classes = train.classes
    test = load_test_set(name, root, img_size, classes, optional=True)
    read = {"train": split_read(name, root, train, True)}
    if test is not None:
        read["val" if name == "imagefolder" else "test"] = split_read(name, root, test, False)
    if val_split > 0:
        train_idx, val_idx = held_out(len(train), val_split, seed)
        if isinstance(train, ImageFolderDataset):  # an unreadable file's stand-in: its own side
            train.stand_ins_within(train_idx)
            plain.stand_ins_within(val_idx)
        select = KeyedSubset(plain, val_idx)
        return DataSplits(KeyedSubset(train, train_idx), select, test, classes, "val", read)
    if test is None:
        raise DataError(
            f"{root} has no val/ folder to evaluate on: add {root}/val/<class>/<images> "
            "or hold out part of train/ with --val_split 0.1"
        )
    select_name = "val" if name == "imagefolder" else "test"
    return DataSplits(train, test, None, classes, select_name, read)


def build_on_every_process(
    name: str, data_dir: str | Path, img_size: int, seed: int, val_split: float, hflip: bool
) -> DataSplits:
    """``build_datasets`` in every process of the run, which must all read the same images:
    nodes that share no disk each read their own copy of ``--data_dir``, and one that differs
    (other images, another order, a cut file) would train a model on neither copy without a
    word. A ``DataError`` of any process is raised on every one, naming where it happened, so
    that none is left waiting for a peer that has left; then the reads are compared with rank
    0's, and a difference is one line naming the processes, the split and the numbers."""
    data, error = None, None
    try:
        data = build_datasets(name, data_dir, img_size, seed, val_split, hflip)
    except Exception as exc:  # raised below, on every process
        error = exc
    for rank, (where, found) in enumerate(dist.gather_objects((dist.place(), error))):
        if found is not None:
            if rank == 0 or not isinstance(found, DataError):
                raise found
            raise DataError(f"on {where}: {found}")
    assert data is not None
    if differing := dist.unlike_main(data.read):
        raise DataError(_unlike(differing, data_dir))
    return data


def _unlike(differing: list[tuple[str, dict[str, SplitRead]]], data_dir: str | Path) -> str:
    """The words for processes that read other data than rank 0 (``dist.unlike_main``)."""
    (main, ours), (where, theirs), *more = differing
    split = next(s for s in [*ours, *theirs] if ours.get(s) != theirs.get(s))  # train first
    mine, other = ours.get(split), theirs.get(split)
    said = lambda read, what: f"{read.images} {what}from {read.where}" if read else "none"
    same = mine and other and mine.images == other.images
    return (
        f"the nodes' copies of the data differ: {where} read {said(other, f'{split} images ')}, "
        f"{main} {said(mine, '')}"
        + (": as many, but not the same images or not in the same order" if same else "")
        + (f" (and {len(more)} more process(es) differ)" if more else "")
        + f"; give every node the same copy of --data_dir {data_dir}"
    )


def check_global_batch(
    train_images: int, per_process: int, processes: int, micro_batches: int | str
) -> None:
    """A global batch no larger than the training images, or one line with the largest
    ``--train_batch_size`` that fits (a multiple of the micro-batches): a small folder of
    one's own meets the default of 512 first."""
    if per_process * processes <= train_images:
        return
    fits, micro = train_images // processes, micro_batches if isinstance(micro_batches, int) else 1
    if fits >= micro:
        fix = f"pass --train_batch_size {fits // micro * micro} or less"
    elif fits:
        fix = f"pass --train_batch_size {fits} or less, with --gradient_accumulation_steps 1"
    else:
        fix = f"add images, or run fewer than {processes} processes"
    times = f" (--train_batch_size {per_process} x {processes} processes)" if processes > 1 else ""
    raise UsageError(
        f"global batch {per_process * processes}{times} exceeds the {train_images} training "
        f"images: {fix}"
    )
