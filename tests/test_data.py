"""utils/data/cifar.py and utils/data/download.py: reading, downloading, transforms, sampling.

Network tests talk only to an HTTP server on 127.0.0.1 started here; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

from tests.helpers import SPEC, listing, make_archive, md5_of, write_cifar10, write_pickle
from utils.data.augment import TRIES, CifarDataset, draw_boxes, keyed_uniform
from utils.data.cifar import CifarArrays, ensure_cifar, load_cifar
from utils.data.download import DownloadError, download_file
from utils.data.errors import DataError
from utils.data.sampling import GlobalBatchSampler, shard_indices

SCALE, RATIO = (0.05, 1.0), (3 / 4, 4 / 3)


# ---------------------------------------------------------------------------------------------
# Reading


def test_real_subset_loads(subset: Path) -> None:
    train = load_cifar("cifar10", subset, train=True)
    test = load_cifar("cifar10", subset, train=False)
    assert train.images.shape == (5085, 32, 32, 3) and len(train) == 5085
    assert test.images.shape == (509, 32, 32, 3) and len(test) == 509
    for split in (train, test):
        assert split.images.dtype == np.uint8 and split.images.flags.c_contiguous
        assert split.labels.dtype == np.int64
        assert set(split.labels.tolist()) == set(range(10))
        assert len(split.classes) == 10 and split.classes[0] == "airplane"
    # HWC from channel-major rows: the first 1024 values of a row are the red plane
    with open(subset / SPEC.folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(test.images[0, :, :, 0], raw[b"data"][0, :1024].reshape(32, 32))
    np.testing.assert_array_equal(test.images[7, :, :, 2], raw[b"data"][7, 2048:].reshape(32, 32))
    assert test.labels.tolist() == raw[b"labels"]


def test_ensure_cifar_accepts_existing_subset(subset: Path) -> None:
    # wrong MD5s on purpose: an existing complete folder is used as is, no download attempted
    assert ensure_cifar("cifar10", subset, url="http://127.0.0.1:1/never") == subset / SPEC.folder


def test_unknown_dataset_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar10, cifar100"):
        load_cifar("mnist", tmp_path, train=True)


def _break(folder: Path, how: str) -> str:
    """Damage the synthetic folder in one way; return the file that should be named."""
    path = folder / "data_batch_3"
    batch = {b"labels": [1, 2, 3, 4], b"data": np.zeros((4, 3072), np.uint8)}
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"this is not a pickle at all")
    elif how == "not_dict":
        write_pickle(path, [1, 2, 3])
    elif how == "no_labels":
        write_pickle(path, {b"data": batch[b"data"]})
    elif how == "wrong_columns":
        write_pickle(path, {**batch, b"data": np.zeros((4, 3000), np.uint8)})
    elif how == "wrong_dtype":
        write_pickle(path, {**batch, b"data": np.zeros((4, 3072), np.float32)})
    elif how == "label_count":
        write_pickle(path, {**batch, b"labels": [1, 2, 3]})
    elif how == "label_too_big":
        write_pickle(path, {**batch, b"labels": [1, 2, 10, 4]})
    elif how == "label_negative":
        write_pickle(path, {**batch, b"labels": [1, -1, 3, 4]})
    elif how == "code_in_pickle":
        # a pickle that would call a function on load must be refused, not executed
        path.write_bytes(b"cbuiltins\nprint\n(S'pwned'\ntR.")
    elif how == "bad_meta":
        path = folder / SPEC.meta_file
        write_pickle(path, {b"label_names": [b"a", b"b"]})
    return path.name


@pytest.mark.parametrize(
    "how",
    [
        "missing",
        "truncated",
        "garbage",
        "not_dict",
        "no_labels",
        "wrong_columns",
        "wrong_dtype",
        "label_count",
        "label_too_big",
        "label_negative",
        "code_in_pickle",
        "bad_meta",
    ],
)
def test_broken_files_raise_data_error_naming_the_file(
    tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_cifar10(tmp_path)
    assert len(load_cifar("cifar10", tmp_path, train=True)) == 20  # intact before breaking it
    name = _break(folder, how)
    with pytest.raises(DataError) as info:
        load_cifar("cifar10", tmp_path, train=True)
    message = str(info.value)
    assert str(folder / name) in message and "\n" not in message
    assert "pwned" not in capsys.readouterr().out


ROWS = np.zeros((4, 3072), np.uint8)
MALFORMED = {  # what a file holds -> what the error says
    "ragged": ("data_batch_3", {b"data": ROWS, b"labels": [1, [2, 3], 3, 4]}, "found a ragged"),
    "labels_2d": ("data_batch_3", {b"data": ROWS, b"labels": np.ones((4, 1), int)}, "shape (4, 1)"),
    "mixed_keys": ("data_batch_3", {1: 2, "x": 3}, "no 'data' entry (found 1, b'x')"),
    "int_names": (SPEC.meta_file, {b"label_names": list(range(10))}, "name 0 is 0, not a"),
    "none_names": (SPEC.meta_file, {b"label_names": [None] * 10}, "name 0 is None"),
    "nested_names": (SPEC.meta_file, {b"label_names": [[b"cat"]] * 10}, "name 0 is [b'cat']"),
    "not_utf8": (SPEC.meta_file, {b"label_names": [b"\xff"] * 10}, "b'\\xff', is not UTF-8"),
    "blank_name": (SPEC.meta_file, {b"label_names": [b" "] * 10}, "name 0 is b' ', not a"),
    "repeated": (SPEC.meta_file, {b"label_names": [b"cat"] * 10}, "but 'cat' repeat"),
    "three_names": (SPEC.meta_file, {b"label_names": [b"cat"] * 3}, "'label_names', found 3"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_fields_are_one_line_naming_file_and_field(tmp_path: Path, case: str) -> None:
    file, content, message = MALFORMED[case]
    folder = write_cifar10(tmp_path)
    write_pickle(folder / file, content)
    with pytest.raises(DataError) as info:
        load_cifar("cifar10", tmp_path, train=True)
    assert str(folder / file) in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_batch_pickled_again_with_text_keys_loads(tmp_path: Path) -> None:
    """Python 3 writes str keys where the official files (Python 2) have bytes."""
    folder = write_cifar10(tmp_path)
    with open(folder / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    write_pickle(folder / "data_batch_2", {key.decode(): value for key, value in batch.items()})
    assert load_cifar("cifar10", tmp_path, train=True).labels[4:8].tolist() == batch[b"labels"]


# ---------------------------------------------------------------------------------------------
# Downloading


def test_download_file_writes_atomically_and_checks_md5(
    tmp_path: Path, server: tuple[str, dict[str, bytes]]
) -> None:
    base, files = server
    body = os.urandom(3 * (1 << 20) + 123)  # several chunks
    files["/blob.bin"] = body
    dest = tmp_path / "sub" / "dir" / "blob.bin"  # parents are created
    md5 = hashlib.md5(body).hexdigest()
    assert download_file(f"{base}/blob.bin", dest, md5=md5) == dest
    assert dest.read_bytes() == body and md5_of(dest) == md5
    assert listing(tmp_path) == ["sub", "sub/dir", "sub/dir/blob.bin"]

    dest2 = tmp_path / "other.bin"
    with pytest.raises(DownloadError, match="MD5 mismatch") as info:
        download_file(f"{base}/blob.bin", dest2, md5="0" * 32)
    assert f"{base}/blob.bin" in str(info.value) and str(dest2) in str(info.value)
    assert listing(tmp_path) == ["sub", "sub/dir", "sub/dir/blob.bin"]  # no temporary file left


@pytest.mark.parametrize("path", ["/missing", "/truncated", "/slow"])
def test_download_file_failures_leave_nothing(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], path: str
) -> None:
    base, files = server
    files["/slow"] = b"late"
    dest = tmp_path / "file.bin"
    with pytest.raises(DownloadError) as info:
        download_file(base + path, dest, timeout=0.3)
    message = str(info.value)
    assert base + path in message and str(dest) in message and "by hand" in message
    assert "\n" not in message
    assert listing(tmp_path) == []


def test_download_file_unreachable(tmp_path: Path, closed_url: str) -> None:
    dest = tmp_path / "x.tar.gz"
    with pytest.raises(DownloadError, match="by hand") as info:
        download_file(closed_url, dest)
    assert closed_url in str(info.value) and isinstance(info.value.__cause__, OSError)
    assert listing(tmp_path) == []


@pytest.fixture
def archive(tmp_path: Path) -> tuple[bytes, str]:
    """(bytes, md5) of a small CIFAR-10 .tar.gz in the official layout."""
    src = write_cifar10(tmp_path / "src", per_batch=6)
    md5 = make_archive(src, tmp_path / "archive.tar.gz", extra={"readme.html": b"<p>hi</p>"})
    return (tmp_path / "archive.tar.gz").read_bytes(), md5


def test_ensure_cifar_downloads_and_extracts(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], archive: tuple[bytes, str]
) -> None:
    base, files = server
    files["/cifar-10-python.tar.gz"], md5 = archive
    root = tmp_path / "data"
    folder = ensure_cifar("cifar10", root, url=f"{base}/cifar-10-python.tar.gz", md5=md5)
    assert folder == root / SPEC.folder
    assert listing(root) == [SPEC.folder] + [f"{SPEC.folder}/{f}" for f in sorted(SPEC.files)]
    assert len(load_cifar("cifar10", root, train=True)) == 30
    assert len(load_cifar("cifar10", root, train=False)) == 6
    # complete now: a second call does not download (the server no longer has the file)
    files.clear()
    assert ensure_cifar("cifar10", root, url=f"{base}/cifar-10-python.tar.gz") == folder


def test_ensure_cifar_completes_a_partial_folder(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], archive: tuple[bytes, str]
) -> None:
    base, files = server
    files["/c.tar.gz"], md5 = archive
    root = tmp_path / "data"
    (root / SPEC.folder).mkdir(parents=True)
    (root / SPEC.folder / "test_batch").write_bytes(b"kept as is")
    ensure_cifar("cifar10", root, url=f"{base}/c.tar.gz", md5=md5)
    assert (root / SPEC.folder / "test_batch").read_bytes() == b"kept as is"
    assert len(load_cifar("cifar10", root, train=True)) == 30


def _assert_one_line_with(message: str, *parts: str) -> None:
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_ensure_cifar_wrong_md5(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], archive: tuple[bytes, str]
) -> None:
    base, files = server
    files["/cifar-10-python.tar.gz"], _ = archive
    root = tmp_path / "data"
    url = f"{base}/cifar-10-python.tar.gz"
    with pytest.raises(DataError) as info:
        ensure_cifar("cifar10", root, url=url, md5="0" * 32)
    _assert_one_line_with(
        str(info.value), str(root / SPEC.folder), url, "data_batch_1", "batches.meta", "MD5"
    )
    assert isinstance(info.value.__cause__, DownloadError)
    assert listing(root) == []
    # without an md5 argument the official checksum applies, which this archive does not match
    with pytest.raises(DataError, match=SPEC.md5):
        ensure_cifar("cifar10", root, url=url)
    assert listing(root) == []


def test_ensure_cifar_unreachable(tmp_path: Path, closed_url: str) -> None:
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        ensure_cifar("cifar10", root, url=closed_url)
    _assert_one_line_with(str(info.value), str(root / SPEC.folder), closed_url, "by hand")
    assert not root.exists() or listing(root) == []


@pytest.mark.parametrize("member", ["../escape.txt", "/tmp/absolute.txt", "incomplete", "not_tar"])
def test_ensure_cifar_rejects_bad_archives(
    tmp_path: Path, server: tuple[str, dict[str, bytes]], member: str
) -> None:
    base, files = server
    src = write_cifar10(tmp_path / "src")
    if member == "incomplete":
        (src / "test_batch").unlink()
        extra = {}
    else:
        extra = {member: b"should never be written"}
    md5 = make_archive(src, tmp_path / "a.tar.gz", extra=extra)
    files["/a.tar.gz"] = (tmp_path / "a.tar.gz").read_bytes()
    if member == "not_tar":
        files["/a.tar.gz"] = b"not a tar archive"
        md5 = hashlib.md5(files["/a.tar.gz"]).hexdigest()
    root = tmp_path / "out" / "data"
    with pytest.raises(DataError, match="unsafe archive member|lacks|cannot extract") as info:
        ensure_cifar("cifar10", root, url=f"{base}/a.tar.gz", md5=md5)
    _assert_one_line_with(str(info.value), f"{base}/a.tar.gz", "by hand")
    assert listing(root) == []
    assert not (tmp_path / "out" / "escape.txt").exists()


# ---------------------------------------------------------------------------------------------
# Transforms


@pytest.fixture(scope="module")
def tiny() -> CifarArrays:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    return CifarArrays(images=images, labels=np.arange(16) % 10, classes=list("abcdefghij"))


def test_train_transform_is_a_function_of_seed_epoch_index(tiny: CifarArrays) -> None:
    ds = CifarDataset(tiny, img_size=48, train=True, seed=3)
    x, y = ds[(5, 2)]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y == 5
    assert x.min() >= -1 and x.max() <= 1
    torch.manual_seed(123)  # global RNG must not matter, nor a fresh instance
    assert torch.equal(CifarDataset(tiny, 48, train=True, seed=3)[(5, 2)][0], x)
    assert not torch.equal(ds[(5, 3)][0], x)  # a new epoch, a new crop
    epoch0 = [ds[(i, 0)][0] for i in range(8)]
    other_seed = CifarDataset(tiny, 48, train=True, seed=4)
    assert any(not torch.equal(a, other_seed[(i, 0)][0]) for i, a in enumerate(epoch0))
    with pytest.raises(TypeError, match="index, epoch"):
        ds[5]


def test_train_batches_do_not_depend_on_workers(tiny: CifarArrays) -> None:
    ds = CifarDataset(tiny, img_size=24, train=True, seed=0)
    sampler = GlobalBatchSampler(len(ds), global_batch=4, rank=0, world_size=1, seed=0)

    def batches(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        return [x for x, _ in itertools.islice(loader, 6)]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a, b)


def test_test_transform_of_constant_image(tiny: CifarArrays) -> None:
    value = 200
    arrays = CifarArrays(np.full((2, 32, 32, 3), value, np.uint8), np.array([3, 4]), tiny.classes)
    for size in (16, 32, 224):
        x, y = CifarDataset(arrays, img_size=size, train=False)[1]
        assert x.shape == (3, size, size) and y == 4
        torch.testing.assert_close(x, torch.full_like(x, value / 127.5 - 1))
    extremes = CifarArrays(np.zeros((1, 32, 32, 3), np.uint8), np.array([0]), tiny.classes)
    extremes.images[0, ::2] = 255
    x, _ = CifarDataset(extremes, img_size=40, train=False)[0]
    assert x.min() >= -1 and x.max() <= 1


class _TorchFeedingUniforms:
    """``torch`` as torchvision's transforms module sees it, except that ``empty(1).uniform_``
    and ``randint`` return the given uniforms: torchvision's own ``get_params`` then runs on our
    draws (the area and ratio of try t, then the top and left of the last try)."""

    def __init__(self, u: list[float]) -> None:
        self.u, self.calls = u, 0

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def empty(self, *size, **kwargs):
        feeder = self

        class Draw:
            def uniform_(self, lo, hi):
                t, which = divmod(feeder.calls, 2)
                feeder.calls += 1
                value = feeder.u[which * TRIES + t]
                return torch.tensor(
                    float(lo) + (float(hi) - float(lo)) * value, dtype=torch.float64
                )

        return Draw()

    def randint(self, low: int, high: int, size) -> torch.Tensor:
        t = self.calls // 2 - 1  # the try that fitted
        column = 2 * TRIES if not hasattr(self, "top") else 3 * TRIES
        self.top = True
        return torch.tensor([low + math.floor(self.u[column + t] * (high - low))])


def test_draw_boxes_run_torchvisions_rule_on_their_uniforms(monkeypatch) -> None:
    # the tries, the first fit, the fallback: torchvision's code, fed our counter-based uniforms
    import torchvision.transforms.transforms as tv

    keys = torch.tensor([(i, e) for i in range(300) for e in range(2)])
    for h, w in [(32, 32), (20, 50), (48, 17)]:
        ours = draw_boxes(9, keys, h, w, hflip=False)
        uniforms = keyed_uniform(9, keys, 4 * TRIES + 1).tolist()
        for box, u in zip(ours.tolist(), uniforms, strict=True):
            monkeypatch.setattr(tv, "torch", _TorchFeedingUniforms(u))
            theirs = RandomResizedCrop.get_params(torch.empty(3, h, w), list(SCALE), list(RATIO))
            assert tuple(box[:4]) == theirs
        monkeypatch.undo()


def test_keyed_uniforms_are_uniform_and_batch_free() -> None:
    keys = torch.tensor([(i, e) for i in range(2000) for e in range(3)])
    u = keyed_uniform(5, keys, 41)  # (6000, 41)
    assert u.min() >= 0 and u.max() < 1 and u.unique().numel() > 0.999 * u.numel()
    for column in (u[:, 0], u[:, 40], u.flatten()):
        # Kolmogorov-Smirnov distance to U(0, 1); the 0.1 % critical value at n = 6000 is 0.025
        ranked = column.sort().values
        n = len(ranked)
        grid = torch.arange(1, n + 1, dtype=torch.float64) / n
        assert (grid - ranked).abs().max() < 1.95 / math.sqrt(n)
    assert abs(torch.corrcoef(u[:, :2].T)[0, 1]) < 0.05  # draws of one key are not correlated
    # a key's draws do not depend on the batch it comes in, nor on its place there
    assert torch.equal(keyed_uniform(5, keys[[7, 3, 7]], 41), u[[7, 3, 7]])
    assert not torch.equal(keyed_uniform(6, keys[:5], 41), u[:5])  # the seed matters


def test_mul32_is_multiplication_mod_2_32() -> None:
    from utils.data.augment import _mul32

    x = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF, 123456789])
    for c in (0x7FEB352D, 0x846CA68B, 0x9E3779B9, 0xFFFFFFFF):
        assert _mul32(x, c).tolist() == [(v * c) % 2**32 for v in x.tolist()]


def test_draw_box_statistics_match_torchvision() -> None:
    n, height, width = 3000, 32, 32
    ours = draw_boxes(0, torch.tensor([(i, 0) for i in range(n)]), height, width, False).tolist()
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        img = torch.empty(3, height, width)
        theirs = [RandomResizedCrop.get_params(img, list(SCALE), list(RATIO)) for _ in range(n)]

    def stats(boxes: list) -> tuple[float, float]:
        area = np.mean([h * w / (height * width) for _, _, h, w, *_ in boxes])
        log_ratio = np.mean([math.log(w / h) for _, _, h, w, *_ in boxes])
        return float(area), float(log_ratio)

    for top, left, h, w, _ in ours:
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
        assert 0.04 <= h * w / (height * width) <= 1  # scale, up to rounding to whole pixels
        assert 0.7 <= w / h <= 1.45  # ratio, up to rounding
    # tries that do not fit are redrawn, so the mean area is below 0.525 for both
    area, log_ratio = stats(ours)
    area_tv, log_ratio_tv = stats(theirs)
    assert abs(area - area_tv) < 0.03 and 0.4 < area < 0.525
    assert abs(log_ratio - log_ratio_tv) < 0.03 and abs(log_ratio) < 0.03


def test_draw_box_fallback_is_central(monkeypatch) -> None:
    import utils.data.augment as augment

    monkeypatch.setattr(augment, "SCALE", (2.0, 3.0))  # larger than the image: all tries fail
    key = torch.tensor([[0, 0]])
    assert draw_boxes(0, key, 32, 32, False)[0, :4].tolist() == [0, 0, 32, 32]
    assert draw_boxes(0, key, 20, 40, False)[0, :4].tolist() == [0, 6, 20, 27]
    assert draw_boxes(0, key, 40, 20, False)[0, :4].tolist() == [6, 0, 27, 20]


# ---------------------------------------------------------------------------------------------
# Sampling


def take(sampler: GlobalBatchSampler, n: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(sampler, n))


def test_rank_slices_form_the_global_batch() -> None:
    n, gb, steps = 50, 8, 20  # 6 steps per epoch: crosses three epochs
    reference = take(GlobalBatchSampler(n, gb, rank=0, world_size=1, seed=7), steps)
    assert GlobalBatchSampler(n, gb, 0, 1, 7).steps_per_epoch == 6
    for world_size in (2, 4):
        per_rank = [
            take(GlobalBatchSampler(n, gb, rank=r, world_size=world_size, seed=7), steps)
            for r in range(world_size)
        ]
        for k in range(steps):
            assert all(len(per_rank[r][k]) == gb // world_size for r in range(world_size))
            assert sum((per_rank[r][k] for r in range(world_size)), []) == reference[k]


def test_epochs_are_permutations_and_reshuffle() -> None:
    n, gb = 50, 8
    batches = take(GlobalBatchSampler(n, gb, 0, 1, seed=0), 12)
    epochs = [[key for batch in batches[e * 6 : (e + 1) * 6] for key in batch] for e in (0, 1)]
    for e, keys in enumerate(epochs):
        indices = [i for i, _ in keys]
        assert {ep for _, ep in keys} == {e}
        assert len(indices) == 48 and len(set(indices)) == 48 and set(indices) <= set(range(n))
    assert [i for i, _ in epochs[0]] != [i for i, _ in epochs[1]]
    other_seed = take(GlobalBatchSampler(n, gb, 0, 1, seed=1), 6)
    assert other_seed != batches[:6]


@pytest.mark.parametrize("start", [1, 5, 6, 13])
def test_start_step_resumes_the_same_stream(start: int) -> None:
    for rank in (0, 1):
        full = take(GlobalBatchSampler(50, 8, rank, 2, seed=0), start + 8)
        resumed = take(GlobalBatchSampler(50, 8, rank, 2, seed=0, start_step=start), 8)
        assert resumed == full[start:]


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(50, 6, 0, 4, seed=0)
    with pytest.raises(ValueError, match="global batch"):
        GlobalBatchSampler(5, 8, 0, 1, seed=0)
    with pytest.raises(ValueError, match="rank"):
        GlobalBatchSampler(50, 8, 2, 2, seed=0)


@pytest.mark.parametrize("n", [509, 2, 0])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_indices_cover_each_index_once(n: int, world_size: int) -> None:
    shards = [shard_indices(n, r, world_size) for r in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_subset_trains_through_a_loader(subset: Path) -> None:
    arrays = load_cifar("cifar10", subset, train=True)
    ds = CifarDataset(arrays, img_size=32, train=True, seed=0)
    loader = DataLoader(ds, batch_sampler=GlobalBatchSampler(len(ds), 64, 1, 2, seed=0))
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 32, 32) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("size", [16, 32, 77, 224])
def test_resize_is_torchvisions_for_float_images(size: int) -> None:
    """Our resize (no torchvision import at start) computes what torchvision's does."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    from utils.data.augment import resize

    generator = torch.Generator().manual_seed(size)
    image = torch.randint(0, 256, (3, 32, 48), generator=generator).float()
    crop = image[:, 3:30, 5:41]
    expected = TF.resized_crop(
        image, 3, 5, 27, 36, [size, size], InterpolationMode.BILINEAR, antialias=True
    )
    torch.testing.assert_close(resize(crop, size), expected, rtol=0, atol=1e-4)
    expected = TF.resize(image, [size, size], InterpolationMode.BILINEAR, antialias=True)
    torch.testing.assert_close(resize(image, size), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# What a run read: every split, and the same data in every process and on resume


def shuffled(folder: Path) -> None:
    """A CIFAR folder's images and labels in another order, in each file."""
    for path in folder.glob("*_batch*"):
        batch = pickle.loads(path.read_bytes(), encoding="bytes")
        order = np.random.default_rng(0).permutation(len(batch[b"labels"]))
        batch[b"data"] = np.ascontiguousarray(batch[b"data"][order])
        batch[b"labels"] = [batch[b"labels"][i] for i in order]
        write_pickle(path, batch)


def cut(folder: Path, keep: int, *names: str) -> None:
    """The CIFAR files ``names`` cut to their first ``keep`` images, as a copy cut short."""
    for name in names:
        batch = pickle.loads((folder / name).read_bytes(), encoding="bytes")
        batch[b"data"] = np.ascontiguousarray(batch[b"data"][:keep])
        batch[b"labels"] = list(batch[b"labels"][:keep])
        write_pickle(folder / name, batch)


def train_on(root: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    """train.py in this process on the CIFAR under ``root``: (exit code, its error lines)."""
    from tests.test_train import SMALL, run_train

    code, err = run_train(
        ["--name", "r", *SMALL, "--pretrained_dir", "none", "--data_dir", str(root),
         "--output_dir", str(root / "out"), "--logdir", str(root / "logs"),
         "--train_batch_size", "2", "--num_steps", "1", "--eval_every", "1", *extra],
        capsys,
    )  # fmt: skip
    return code, [line for line in err.splitlines() if "error" in line or "Traceback" in line]


SPLITS = {  # (files cut, images kept, flags): CIFAR of 4 images a file
    "train empty": (SPEC.train_files, 0, []),
    "train of one image": (SPEC.train_files[1:], 0, ["--train_batch_size", "1"]),
    "test empty": (SPEC.test_files, 0, []),
    "test of one image": (SPEC.test_files, 1, []),
    "validation empty": ((), 0, ["--val_split", "0.01"]),
    "validation of one image": ((), 0, ["--val_split", "0.05"]),
}


@pytest.mark.parametrize("case", SPLITS)
def test_a_split_empty_or_of_one_image_is_one_line_or_trains(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture
) -> None:
    """An empty split is refused in one line naming it; one of a single image trains. (An empty
    batch file, as Python 3 writes one, was once refused as corrupt.)"""
    names, keep, flags = SPLITS[case]
    folder = write_cifar10(tmp_path)
    cut(folder, keep, *names)
    if case == "train of one image":
        cut(folder, 1, "data_batch_1")
    code, lines = train_on(tmp_path, capsys, *flags)
    refusal = {
        "train empty": f"{folder} holds no training images (data_batch_1, data_batch_2, "
        "data_batch_3, data_batch_4, data_batch_5 are empty); delete the folder to download "
        "CIFAR-10 again, or pass another --data_dir",
        "test empty": f"{folder} holds no test images (test_batch is empty)",
        "validation empty": "--val_split 0.01: a validation fraction of 0.01 of 20 images "
        "leaves a split empty",
    }.get(case)
    if refusal is None:
        assert code == 0 and lines == [], lines
    else:
        assert code == 2 and len(lines) == 1 and refusal in lines[0], lines


def test_a_resume_on_other_data_is_refused_naming_the_numbers(
    tmp_path: Path, subset: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run's state records what it read; a resume whose --data_dir now holds fewer images,
    or the same in another order, is refused in one line; a state written before runs recorded
    their data resumes as it did."""
    data = tmp_path / "data"
    folder = data / SPEC.folder
    shutil.copytree(subset / SPEC.folder, folder)
    kept = tmp_path / "kept"
    shutil.copytree(folder, kept)
    assert train_on(data, capsys) == (0, [])
    state = data / "out" / "r_last.pt"
    assert torch.load(state, weights_only=True)["args"]["data"].keys() == {"train", "test"}
    resume = ["--resume", "auto", "--num_steps", "2"]
    cut(folder, 300, "data_batch_1", "test_batch")
    code, lines = train_on(data, capsys, *resume)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (
        f"train.py: error: --resume {state} was trained on 5085 train / 509 test images, and "
        f"--data_dir {data} now holds 4368 train / 300 test: a resume trains on what the run "
        "began with; pass the --data_dir it was trained on, or start a new run (another --name, "
        "or --overwrite)"
    )
    shutil.rmtree(folder)
    shutil.copytree(kept, folder)
    shuffled(folder)
    code, lines = train_on(data, capsys, *resume)
    assert code == 2 and len(lines) == 1, lines
    assert (
        f"was trained on other images: --data_dir {data} holds as many (5085 train / 509 test), "
        "but not the same train and test images, or not in the same order"
    ) in lines[0]
    older = torch.load(state, weights_only=True)
    del older["args"]["data"]  # as every file before this check had it
    torch.save(older, state)
    assert train_on(data, capsys, *resume) == (0, [])
    assert torch.load(state, weights_only=True)["step"] == 2


@pytest.mark.parametrize(
    "images, per_process, processes, micro, fix",
    [
        (72, 512, 1, 1, "global batch 512 exceeds the 72 training images: pass "
         "--train_batch_size 72 or less"),
        (72, 512, 1, 8, "pass --train_batch_size 72 or less"),
        (72, 512, 1, 16, "pass --train_batch_size 64 or less"),
        (300, 256, 2, "auto", "global batch 512 (--train_batch_size 256 x 2 processes) exceeds "
         "the 300 training images: pass --train_batch_size 150 or less"),
        (5, 4, 2, 4, "pass --train_batch_size 2 or less, with --gradient_accumulation_steps 1"),
        (3, 1, 4, 1, "exceeds the 3 training images: add images, or run fewer than 4 processes"),
    ],
)  # fmt: skip
def test_a_batch_larger_than_the_data_names_the_largest_that_fits(
    images: int, per_process: int, processes: int, micro: int | str, fix: str
) -> None:
    from models.errors import UsageError
    from utils.data.datasets import check_global_batch

    with pytest.raises(UsageError, match=re.escape(fix)):
        check_global_batch(images, per_process, processes, micro)
    check_global_batch(images, images // processes, processes, 1)  # the advice fits


def test_the_batch_advice_followed_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_cifar10(tmp_path)
    code, lines = train_on(tmp_path, capsys, "--train_batch_size", "512")
    assert code == 2 and lines == [
        "train.py: error: global batch 512 exceeds the 20 training images: pass "
        "--train_batch_size 20 or less"
    ]
    assert train_on(tmp_path, capsys, "--train_batch_size", "20") == (0, [])


CYCLE_KEEPS_THE_LOADER = """
import sys, torch
from utils.data.loader import make_loader

loader = make_loader(torch.arange(8.0), 1, torch.device("cpu"), batch_size=4)
next(iter(loader))  # its worker runs, ignoring SIGTERM and SIGINT
keeper = [loader]
keeper.append(keeper)  # a reference cycle: only the cyclic collector would free the loader
if sys.argv[1] == "close":
    loader.close()
"""


def test_closed_loader_workers_let_the_interpreter_exit(tmp_path: Path) -> None:
    """Workers that ignore the stop signals outlive a loader kept to the interpreter's exit,
    where multiprocessing terminates them with SIGTERM and joins them: ``close`` ends them
    first. Without it the process is still there 8 s later (for ever, in fact)."""
    script = tmp_path / "cycle.py"
    script.write_text(CYCLE_KEEPS_THE_LOADER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    closed = subprocess.run([sys.executable, str(script), "close"], env=env, timeout=120)
    assert closed.returncode == 0
    left = subprocess.Popen([sys.executable, str(script), "leave"], env=env)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            left.wait(timeout=8)
    finally:
        left.kill()
        left.wait()
