"""utils/data/device_batches.py on CPU tensors: the device path equals the CifarDataset path.

The device path is checked three ways: per-pixel against CifarDataset for the same keys (up- and
downsampling), crop boxes read back from coordinate images, and crop statistics against
torchvision's own RandomResizedCrop.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

from utils.data.augment import CifarDataset, draw_boxes
from utils.data.cifar import CifarArrays
from utils.data.device_batches import DeviceBatches, resize_weights, use_device_data
from utils.data.errors import DataError
from utils.data.image_folder import ImageFolderDataset
from utils.data.sampling import GlobalBatchSampler, KeyedSubset

CLASSES = list("abcdefghij")


@pytest.fixture(scope="module")
def noise() -> CifarArrays:
    """Uniform noise: every pixel differs from its neighbours, the hardest case for resizing."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    return CifarArrays(images=images, labels=np.arange(40) % 10, classes=CLASSES)


def coordinates(n: int) -> CifarArrays:
    """n copies of an image whose red channel is 8 * column and green channel 8 * row."""
    ramp = np.arange(32, dtype=np.uint8) * 8
    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0], image[..., 1] = ramp[None, :], ramp[:, None]
    return CifarArrays(np.repeat(image[None], n, 0), np.zeros(n, np.int64), CLASSES)


def boxes_from_coordinates(x: torch.Tensor) -> torch.Tensor:
    """(B, 4) [top, left, h, w] of the crops that made upsampled coordinate images x.

    When upsampling, the outermost output pixels take the crop's edge pixels unmixed, so the
    extremes of the coordinate channels are the crop's first and last column and row.
    """
    pixels = ((x[:, :2] + 1) * 127.5 / 8).flatten(2)  # (B, 2, S * S): column, row
    first, last = pixels.amin(-1).round().long(), pixels.amax(-1).round().long()  # (B, 2)
    return torch.stack((first[:, 1], first[:, 0], *(last - first + 1).flip(1).unbind(1)), 1)


def keys_of(n: int, epochs: int = 2) -> list[tuple[int, int]]:
    return [(i, e) for e in range(epochs) for i in range(n)]


@pytest.mark.parametrize("img_size", [224, 40, 32, 16])
def test_train_batch_equals_cifar_dataset(noise: CifarArrays, img_size: int) -> None:
    # 224 and 40 upsample every crop, 16 downsamples most (antialiased), 32 does both
    dataset = CifarDataset(noise, img_size, train=True, seed=7)
    keys = keys_of(len(dataset))
    x, y = DeviceBatches.from_dataset(dataset, "cpu").train_batch(keys)
    assert x.shape == (len(keys), 3, img_size, img_size) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [dataset[k][1] for k in keys]
    expected = torch.stack([dataset[k][0] for k in keys])
    # measured: at most 4.8e-7 (float32 rounding of the same weights, summed in another order)
    torch.testing.assert_close(x, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("img_size", [224, 32, 16])
def test_eval_batch_equals_cifar_dataset(noise: CifarArrays, img_size: int) -> None:
    dataset = CifarDataset(noise, img_size, train=False)
    x, y = DeviceBatches.from_dataset(dataset, "cpu").eval_batch(range(len(dataset)))
    assert x.shape == (len(dataset), 3, img_size, img_size) and y.tolist() == noise.labels.tolist()
    torch.testing.assert_close(x, torch.stack([dataset[i][0] for i in range(len(dataset))]))


def test_values_stay_in_range_and_constants_stay_constant() -> None:
    extremes = CifarArrays(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4), CLASSES)
    extremes.images[:, ::2] = 255  # alternate rows: the largest overshoot a resize can make
    batches = DeviceBatches.from_dataset(CifarDataset(extremes, 24, train=True), "cpu")
    for x in (batches.train_batch(keys_of(4, 8))[0], batches.eval_batch(range(4))[0]):
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    grey = CifarArrays(np.full((4, 32, 32, 3), 200, np.uint8), np.arange(4), CLASSES)
    x, _ = DeviceBatches.from_dataset(CifarDataset(grey, 224, train=True), "cpu").train_batch(
        keys_of(4)
    )
    torch.testing.assert_close(x, torch.full_like(x, 200 / 127.5 - 1))


def test_crop_boxes_are_the_cpu_paths() -> None:
    # the same keys crop the same boxes: read them back from both paths' images
    arrays = coordinates(64)
    dataset = CifarDataset(arrays, img_size=48, train=True, seed=3)
    batches = DeviceBatches.from_dataset(dataset, "cpu")
    keys = keys_of(64, 3)
    boxes = draw_boxes(3, torch.tensor(keys), 32, 32, False)  # (B, 5) [top, left, h, w, flip]
    x, _ = batches.train_batch(keys)
    cpu = torch.stack([dataset[k][0] for k in keys])
    assert torch.equal(boxes_from_coordinates(x), boxes[:, :4])
    assert torch.equal(boxes_from_coordinates(cpu), boxes[:, :4])
    assert len(set(map(tuple, boxes[:, :4].tolist()))) > 150  # and they do vary


def test_crop_statistics_match_torchvision() -> None:
    # boxes read back from 4000 device-made images against 4000 draws of RandomResizedCrop
    n = 4000
    batches = DeviceBatches.from_dataset(CifarDataset(coordinates(n), 32, train=True), "cpu")
    ours = boxes_from_coordinates(batches.train_batch(keys_of(n, 1))[0]).double()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        image = torch.empty(3, 32, 32)
        params = [
            RandomResizedCrop.get_params(image, [0.05, 1.0], [3 / 4, 4 / 3]) for _ in range(n)
        ]
    theirs = torch.tensor(params, dtype=torch.float64)
    for boxes in (ours, theirs):
        assert boxes[:, 2:].min() >= 1 and (boxes[:, :2] + boxes[:, 2:]).max() <= 32

    def stats(b: torch.Tensor) -> torch.Tensor:
        area = b[:, 2] * b[:, 3] / 1024
        log_ratio = torch.log(b[:, 3] / b[:, 2])
        centre = (b[:, :2] + b[:, 2:] / 2) / 32
        return torch.stack(
            (area.mean(), area.std(), log_ratio.mean(), log_ratio.std(), *centre.T.mean(1))
        )

    # standard errors of these means at n = 4000 are below 0.005; 0.025 is about 4 of them apart
    torch.testing.assert_close(stats(ours), stats(theirs), rtol=0, atol=0.025)
    assert abs(stats(ours)[0] - 0.5) < 0.05  # area fraction uniform in [0.05, 1], few fallbacks


def test_deterministic_for_the_same_keys(noise: CifarArrays) -> None:
    batches = DeviceBatches.from_dataset(CifarDataset(noise, 24, train=True, seed=1), "cpu")
    keys = keys_of(8)
    x, _ = batches.train_batch(keys)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(batches.train_batch(keys)[0], x)
    assert torch.equal(batches.train_batch(torch.tensor(keys))[0], x)
    assert torch.equal(batches.train_batch(keys[::-1])[0], x.flip(0))  # a key is its own crop
    assert not torch.equal(batches.train_batch([(i, e + 5) for i, e in keys])[0], x)
    other = DeviceBatches.from_dataset(CifarDataset(noise, 24, train=True, seed=2), "cpu")
    assert not torch.equal(other.train_batch(keys)[0], x)


@pytest.mark.parametrize("hflip", [False, True])
def test_device_keys_follow_the_sampler_and_equal_the_worker_path(
    noise: CifarArrays, hflip: bool
) -> None:
    # how train.py feeds it: GlobalBatchSampler.device_keys -> train_batch, against what
    # DataLoader workers make from the same sampler; also through a subset (--val_split)
    dataset = CifarDataset(noise, 24, train=True, seed=4, hflip=hflip)
    batches = DeviceBatches.from_dataset(dataset, "cpu")
    subset = KeyedSubset(dataset, list(range(3, 40, 2)))
    for data, indices in [(dataset, None), (subset, subset.indices)]:
        sampler = GlobalBatchSampler(len(data), global_batch=8, rank=1, world_size=2, seed=4)
        loader = DataLoader(data, batch_sampler=sampler, num_workers=2)
        device_keys = sampler.device_keys("cpu", indices)
        flips = set()
        for (expected, labels), keys, sampled in itertools.islice(
            zip(loader, device_keys, sampler, strict=False), 12
        ):
            positions = [i for i, _ in sampled]
            base = positions if indices is None else [indices[i] for i in positions]
            assert keys.tolist() == [[i, e] for i, (_, e) in zip(base, sampled, strict=True)]
            flips |= set(draw_boxes(4, keys, 32, 32, hflip)[:, 4].tolist())
            x, y = batches.train_batch(keys)
            torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)  # float rounding
            assert torch.equal(y, labels)
        assert flips == ({0, 1} if hflip else {0})


@pytest.mark.parametrize(("start", "length", "out"), [(0, 32, 32), (5, 9, 224), (3, 27, 8)])
def test_resize_weights_are_a_normalised_filter_inside_the_crop(
    start: int, length: int, out: int
) -> None:
    w = resize_weights(torch.tensor([start]), torch.tensor([length]), 32, out)[0]  # (out, 32)
    assert w.shape == (out, 32) and w.min() >= 0
    torch.testing.assert_close(w.sum(1), torch.ones(out))
    outside = torch.ones(32, dtype=torch.bool)
    outside[start : start + length] = False
    assert w[:, outside].abs().sum() == 0
    if length == out:
        assert torch.equal(w[:, start : start + length], torch.eye(out))
    # along one axis it is the resize that torchvision's resized_crop calls
    row = torch.rand(1, 1, 1, 32) * 255
    crop = row[..., start : start + length]
    expected = F.interpolate(crop, (1, out), mode="bilinear", antialias=True).flatten()
    torch.testing.assert_close(w @ row.flatten(), expected, rtol=0, atol=1e-4)


def test_auto_puts_cifar_on_cuda_when_it_takes_a_quarter_of_free_memory(
    noise: CifarArrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = CifarDataset(noise, img_size=32, train=True)
    sets = [train, train.for_evaluation()]  # one image tensor, counted once
    nbytes = train.images.numel()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for free, expected in [(4 * nbytes, True), (4 * nbytes - 1, False)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 10**12))
        assert use_device_data("auto", sets, cuda) is expected
    assert use_device_data("auto", sets, cpu) is False  # CPU workers by default
    assert use_device_data("on", sets, cpu) is True and use_device_data("off", sets, cuda) is False

    folder = object.__new__(ImageFolderDataset)  # only its type matters here
    assert not isinstance(folder, CifarDataset)
    assert use_device_data("auto", [folder], cuda) is False
    assert use_device_data("off", [folder], cuda) is False
    with pytest.raises(DataError, match="--data_on_device on needs a CIFAR data set"):
        use_device_data("on", [train, folder], cpu)
