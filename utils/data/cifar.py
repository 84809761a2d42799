"""CIFAR-10/100: finding or downloading the data, reading it, and reproducible training batches.

Three concerns, kept independent of the model and of the training script:

* ``ensure_cifar`` / ``load_cifar``: our own reader for the "python version" pickles. It accepts any
  number of images per batch file (the test subset is smaller than the official files and does not
  match their MD5s) and turns every problem into a one-line :class:`DataError` naming the file.
* ``CifarDataset``: the reference ViT-pytorch transforms on uint8 tensors. The training crop is
  drawn from a generator seeded by ``(seed, epoch, index)``, so an image's augmentation depends
  neither on the number of processes or data-loader workers nor on anything using global RNG.
* ``GlobalBatchSampler`` / ``shard_indices``: every rank walks the same stream of global batches and
  takes its own slice, so a run on 1, 2 or 4 GPUs, or one resumed at step ``s``, sees the same data.
"""

from __future__ import annotations

import copy
import hashlib
import math
import operator
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from models.errors import UserError, one_line
from utils.data.download import DownloadError, download_file
from utils.training.checkpoint import share_as_usual


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR variant comes from and how its "python version" files are laid out."""

    title: str
    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes
    num_classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


# Krizhevsky, "Learning Multiple Layers of Features from Tiny Images" (2009);
# https://www.cs.toronto.edu/~kriz/cifar.html lists the archives and their MD5 sums.
CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        title="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        meta_file="batches.meta",
        names_key=b"label_names",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        title="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        meta_file="meta",
        names_key=b"fine_label_names",
        num_classes=100,
    ),
}

# An internal mirror of the archives (same file names), for clusters without internet access, and
# the MD5 of the archive it serves when that is not the official file (tests serve their own).
MIRROR_VARIABLE = "VIT_CIFAR_MIRROR"
MD5_VARIABLE = "VIT_CIFAR_MD5"


def archive_source(spec: CifarSpec) -> tuple[str, str]:
    """(URL, MD5) of a CIFAR archive: the official ones unless the environment names a mirror."""
    mirror = os.environ.get(MIRROR_VARIABLE, "").rstrip("/")
    url = f"{mirror}/{spec.url.rsplit('/', 1)[-1]}" if mirror else spec.url
    return url, os.environ.get(MD5_VARIABLE) or spec.md5


IMAGE_SHAPE = (3, 32, 32)  # CHW, as stored in each row of the pickles
MEAN, STD = 0.5, 0.5  # per channel, on [0, 1] pixels, as the reference ViT-pytorch


class DataError(UserError):
    """The data set is missing or malformed; the message is one line a user can act on."""


@dataclass
class CifarArrays:
    """One split in memory: ``images`` uint8 (N, 32, 32, 3) HWC, ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def get_spec(name: str) -> CifarSpec:
    """Look up a data set by name, failing with the list of known names."""
    try:
        return CIFAR[name]
    except KeyError:
        raise DataError(f"Unknown dataset {name!r}; choose one of: {', '.join(CIFAR)}") from None


# ---------------------------------------------------------------------------------------------
# Reading the pickles


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickle only what CIFAR files contain (dicts, lists, bytes and numpy arrays).

    A pickle can run arbitrary code when loaded; the data directory may come from anywhere, so
    any other global is refused instead of imported.
    """

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
        *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
        *((f"numpy.{core}.multiarray", "scalar") for core in ("core", "_core")),
        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """Read one CIFAR pickle into a dict with bytes keys."""
    if not path.is_file():
        raise DataError(f"{path}: file is missing")
    try:
        with open(path, "rb") as f:
            content = _NumpyUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise DataError(
            f"{path}: cannot be read as a CIFAR pickle ({type(err).__name__}: {one_line(err)}); "
            "the file is corrupt or truncated, delete it and download again"
        ) from err
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a dict, found {type(content).__name__}")
    return content


def _read_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one batch file; return (uint8 N x 3072 rows, int64 labels)."""
    content = _unpickle(path)
    for key in (b"data", spec.label_key):
        if key not in content:
            raise DataError(f"{path}: no {key.decode()!r} entry (found {sorted(content)})")
    data, labels = content[b"data"], content[spec.label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array, found {kind}")
    if data.ndim != 2 or data.shape[1] != math.prod(IMAGE_SHAPE):
        raise DataError(f"{path}: 'data' must have shape (N, 3072), found {data.shape}")
    labels = np.asarray(labels)
    if labels.size == 0:
        labels = labels.astype(np.int64)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be a list of integers, found {labels.dtype}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    bad = (labels < 0) | (labels >= spec.num_classes)
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(
            f"{path}: label {labels[first]} at position {first} is outside "
            f"[0, {spec.num_classes}) ({int(bad.sum())} bad labels)"
        )
    return data, labels.astype(np.int64)


def _read_classes(path: Path, spec: CifarSpec) -> list[str]:
    """Read the class names from the meta file."""
    content = _unpickle(path)
    names = content.get(spec.names_key)
    if not isinstance(names, list | tuple) or len(names) != spec.num_classes:
        raise DataError(
            f"{path}: expected {spec.num_classes} names under {spec.names_key.decode()!r}"
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(name: str, root: str | Path, train: bool) -> CifarArrays:
    """Load one split of ``root/<folder>`` into memory, checking every file.

    ``root`` is the directory that contains ``cifar-10-batches-py`` or ``cifar-100-python``.
    """
    spec = get_spec(name)
    folder = Path(root) / spec.folder
    files = spec.train_files if train else spec.test_files
    batches = [_read_batch(folder / f, spec) for f in files]
    data = np.concatenate([d for d, _ in batches])
    labels = np.concatenate([lab for _, lab in batches])
    images = data.reshape(-1, *IMAGE_SHAPE).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return CifarArrays(
        images=np.ascontiguousarray(images),
        labels=labels,
        classes=_read_classes(folder / spec.meta_file, spec),
    )


# ---------------------------------------------------------------------------------------------
# Finding or downloading the data


def _missing_files(folder: Path, spec: CifarSpec) -> list[str]:
    return [f for f in spec.files if not (folder / f).is_file()]


def _safe_extract(archive: Path, into: Path) -> None:
    """Extract a tar archive, refusing links, devices and members that would land outside it."""
    into = into.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            target = (into / member.name).resolve()
            if not target.is_relative_to(into) or not (member.isfile() or member.isdir()):
                raise tarfile.TarError(f"unsafe archive member {member.name!r}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
            tar.extractall(into, members=members, filter="data")
        else:
            tar.extractall(into, members=members)  # members checked above


def ensure_cifar(
    name: str,
    root: str | Path,
    url: str | None = None,
    md5: str | None = None,
    timeout: float = 60,
) -> Path:
    """Return ``root/<folder>``, downloading and extracting the archive first if it is incomplete.

    ``url`` and ``md5`` override the official archive and its checksum (for mirrors and tests);
    the official MD5 is checked unless ``md5`` is given. The archive is extracted into a temporary
    folder beside the destination and moved into place once it holds every expected file, so an
    interrupted run leaves no partial folder; the archive is deleted afterwards. In distributed
    runs call this on one process and let the others wait at a barrier.
    """
    spec = get_spec(name)
    root = Path(root)
    folder = root / spec.folder
    if not _missing_files(folder, spec):
        return folder

    source_url, source_md5 = archive_source(spec)
    url, md5 = url or source_url, md5 or source_md5
    archive = root / url.rstrip("/").rsplit("/", 1)[-1]
    expected = ", ".join(spec.files)
    by_hand = f"download and extract it into {root}/ by hand or pass --data_dir"
    try:
        download_file(url, archive, md5=md5, desc=spec.title, timeout=timeout)
    except DownloadError as err:
        raise DataError(
            f"{spec.title} not found in {folder} (expected {expected}) and the download from "
            f"{url} failed ({err.reason}); {by_hand}, or set {MIRROR_VARIABLE} to a mirror"
        ) from err

    tmp_dir = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.folder}.", suffix=".extract"))
    try:
        try:
            _safe_extract(archive, tmp_dir)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(
                f"cannot extract the archive downloaded from {url} ({one_line(err)}); {by_hand}"
            ) from err
        extracted = tmp_dir / spec.folder
        if missing := _missing_files(extracted, spec):
            raise DataError(
                f"the archive from {url} lacks {spec.folder}/{missing[0]} "
                f"(expected {expected}); {by_hand}"
            )
        if not folder.exists():
            share_as_usual(extracted, directory=True)  # from tar, not mkdtemp's 0700
            os.replace(extracted, folder)
        else:  # an incomplete folder from an earlier attempt: add what it lacks, overwrite nothing
            for f in _missing_files(folder, spec):
                os.replace(extracted / f, folder / f)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        archive.unlink(missing_ok=True)
    return folder


# ---------------------------------------------------------------------------------------------
# Transforms and the dataset


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
            generator = torch.Generator().manual_seed(mix_seed("crop", self.seed, epoch, index))
            top, left, h, w = sample_crop_box(*image.shape[-2:], self.SCALE, self.RATIO, generator)
            image = resize(image[:, top : top + h, left : left + w], self.img_size)
            # Drawn after the box, so that the crops are the same with and without --hflip.
            if self.hflip and torch.rand(1, generator=generator).item() < 0.5:
                image = image.flip(-1)
        else:
            image = resize(image, self.img_size)
        return normalize(image), self.labels[index]


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
        if isinstance(key, tuple):
            return self.dataset[(self.indices[key[0]], key[1])]
        return self.dataset[self.indices[key]]


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


# ---------------------------------------------------------------------------------------------
# Which samples each process sees


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

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        while True:
            step_epoch, k = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch, order = step_epoch, self.permutation(step_epoch)
            start = k * self.global_batch + self.rank * self.local_batch
            yield [(i, epoch) for i in order[start : start + self.local_batch].tolist()]
            step += 1


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
