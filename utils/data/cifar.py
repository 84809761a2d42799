"""CIFAR-10/100: finding or downloading the data, and reading it.

``ensure_cifar`` / ``load_cifar`` are our own reader for the "python version" pickles. It accepts
any number of images per batch file (the test subset is smaller than the official files and does
not match their MD5s) and turns every problem into a one-line :class:`DataError` naming the file.
The transforms are in ``utils.data.augment``, the order of the images in ``utils.data.sampling``.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import one_line
from utils.data.download import ChecksumError, DownloadError, download_file, unreachable
from utils.data.errors import DataError
from utils.files import share_as_usual


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
        # ... and empty bytes (an empty batch's data), as bytes()
        *((builtins, "bytes") for builtins in ("builtins", "__builtin__")),
        *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
        *((f"numpy.{core}.multiarray", "scalar") for core in ("core", "_core")),
        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """Read one CIFAR pickle into a dict with bytes keys (``str`` keys, as a file pickled again by
    Python 3 has them, are encoded)."""
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
    return {key.encode() if isinstance(key, str) else key: value for key, value in content.items()}


def _as_labels(path: Path, labels: object) -> np.ndarray:
    """A batch's labels as a 1-d integer array, or a DataError saying what they are instead."""
    try:
        array = np.asarray(labels)
    except (ValueError, TypeError):  # ragged lists
        raise DataError(f"{path}: labels must be a list of integers, found a ragged list") from None
    if array.size == 0:
        array = array.astype(np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        found = f"{type(labels).__name__} of dtype {array.dtype} and shape {array.shape}"
        raise DataError(f"{path}: labels must be a list of integers, found {found}")
    return array


def _read_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one batch file; return (uint8 N x 3072 rows, int64 labels)."""
    content = _unpickle(path)
    for key in (b"data", spec.label_key):
        if key not in content:
            found = ", ".join(sorted(map(repr, content)))
            raise DataError(f"{path}: no {key.decode()!r} entry (found {found})")
    data, labels = content[b"data"], content[spec.label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = type(data).__name__
        if isinstance(data, np.ndarray | np.generic):
            kind += f" of dtype {data.dtype}"
        raise DataError(f"{path}: 'data' must be a uint8 array, found {kind}")
    if data.ndim != 2 or data.shape[1] != math.prod(IMAGE_SHAPE):
        raise DataError(f"{path}: 'data' must have shape (N, 3072), found {data.shape}")
    labels = _as_labels(path, labels)
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
    where = f"{path}: expected {spec.num_classes} names under {spec.names_key.decode()!r}"
    if not isinstance(names, list | tuple) or len(names) != spec.num_classes:
        found = f"{len(names)} names" if isinstance(names, list | tuple) else type(names).__name__
        raise DataError(f"{where}, found {found}")
    classes = []
    for i, name in enumerate(names):
        try:
            text = name.decode() if isinstance(name, bytes) else name
        except UnicodeDecodeError:
            raise DataError(f"{where}; name {i}, {name!r}, is not UTF-8") from None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}; name {i} is {name!r}, not a non-empty text")
        classes.append(text)
    if len(set(classes)) != len(classes):
        twice = sorted({c for c in classes if classes.count(c) > 1})
        raise DataError(f"{where}; each once, but {', '.join(map(repr, twice))} repeat")
    return classes


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


def download_problem(name: str, root: str | Path) -> str | None:
    """Why ``ensure_cifar`` would fail because the data set is neither in ``root`` nor
    downloadable now, in its words, or None (asks the server for the archive's headers only)."""
    spec = get_spec(name)
    folder = Path(root) / spec.folder
    if not _missing_files(folder, spec):
        return None
    url = archive_source(spec)[0]
    reason = unreachable(url)
    return None if reason is None else _not_found(spec, Path(root), url, reason)


def _by_hand(root: Path) -> str:
    return f"download and extract it into {root}/ by hand or pass --data_dir"


def _not_found(spec: CifarSpec, root: Path, url: str, reason: str, fix: str | None = None) -> str:
    return (
        f"{spec.title} not found in {(root / spec.folder).absolute()} (expected "
        f"{', '.join(spec.files)}) and the download from {url} failed ({reason}); "
        f"{fix or f'{_by_hand(root)}, or set {MIRROR_VARIABLE} to a mirror'}"
    )


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
    by_hand = _by_hand(root)
    try:
        download_file(url, archive, md5=md5, desc=spec.title, timeout=timeout)
    except DownloadError as err:
        fix = None
        if isinstance(err, ChecksumError) and url != spec.url:
            fix = (
                f"if that mirror serves an archive of its own, set {MD5_VARIABLE} to its MD5 "
                f"({err.actual} is what arrived); else {by_hand}"
            )
        raise DataError(_not_found(spec, root, url, err.reason, fix)) from err

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
