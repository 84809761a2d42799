"""Real image files that the header scan passes but a read fails, and pixel modes that Pillow's
``convert("RGB")`` clips: each made with Pillow (or written byte by byte) in a temporary folder."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import train
from models.errors import UsageError
from tests.test_train import SMALL
from utils.data.datasets import build_datasets
from utils.data.errors import DataError
from utils.data.image_folder import ImageFolderDataset, scan_split, unreadable_images
from utils.inspection.images import load_image

RNG = np.random.default_rng(0)


def noise(h: int = 24, w: int = 20) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: its header is whole, so ``verify`` passes it; its pixels are not."""
    noise(40, 50).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        image.verify()  # what the scan checks: passed
    with pytest.raises(OSError, match="truncated"), Image.open(path) as image:
        image.load()  # a decode: refused
    return path


def png16(path: Path, values: np.ndarray) -> Path:
    """A PNG of 16 bits a sample, written by hand (Pillow writes 16-bit grayscale only):
    (H, W) grayscale, (H, W, 3) RGB (48-bit) or (H, W, 4) RGBA (64-bit)."""
    h, w = values.shape[:2]
    color_type = {1: 0, 3: 2, 4: 6}[1 if values.ndim == 2 else values.shape[2]]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )  # fmt: skip
    return path


def folder(root: Path, files: dict[str, list[str]]) -> Path:
    """``root/<class>/<name>``: ``bad`` in a name makes a truncated JPEG, else a noise PNG."""
    for name, members in files.items():
        (root / name).mkdir(parents=True)
        for member in members:
            path = root / name / member
            truncated_jpeg(path) if "bad" in member else noise().save(path)
    return root


def test_an_image_that_fails_when_read_is_replaced_by_the_next_of_its_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder(
        tmp_path / "data",
        {"a": ["0.png", "1bad.jpg", "2.tif", "3.png"], "b": ["0.png", "9bad.jpg"]},
    )
    Image.fromarray(np.array([[-1.0, 3.0]], dtype=np.float32)).save(tmp_path / "data/a/2.tif")
    monkeypatch.chdir(tmp_path)  # a relative --data_dir: the warnings still name absolute paths
    split = scan_split(Path("data"))
    names = ["0.png", "1bad.jpg", "2.tif", "3.png", "0.png", "9bad.jpg"]  # 2.tif: floats -1..3
    assert [p.name for p in split.paths] == names
    assert split.skipped == [] and unreadable_images(ImageFolderDataset(split, 16, False)) == []

    def items(dataset: ImageFolderDataset, keys: list) -> list[tuple[torch.Tensor, int]]:
        return [dataset[key] for key in keys]

    plain = ImageFolderDataset(split, 16, False)
    first = items(plain, range(6))
    again = items(plain, range(6))  # flagged now: straight to the stand-in
    # 1bad.jpg and 2.tif (floats outside 0..1) read as 3.png, the next of class a that decodes;
    # 9bad.jpg, the last of class b, as its first, 0.png. The labels stay true.
    for bad, stand_in in ((1, 3), (2, 3), (5, 4)):
        assert torch.equal(first[bad][0], first[stand_in][0])
    assert [label for _, label in first] == [0, 0, 0, 0, 1, 1]
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, again, strict=True))
    bad = [tmp_path / "data/a/1bad.jpg", tmp_path / "data/a/2.tif", tmp_path / "data/b/9bad.jpg"]
    assert unreadable_images(plain) == bad
    warnings = [r.getMessage() for r in caplog.records if r.name == "vit"]
    assert len(warnings) == 3, "one warning per file, however often it is read"
    assert f"skipping {bad[0]}: OSError: image file is truncated" in warnings[0]
    assert f"skipping {bad[1]}: ValueError: pixel mode F (float) with values -1..3" in warnings[1]
    assert f"{tmp_path / 'data/a/3.png'} (same class) is read in its place" in warnings[1]

    # Training keys: a fresh split (a resumed run, nothing flagged) crops what the first did.
    keys = [(i, epoch) for i in range(6) for epoch in range(2)]
    trained = items(ImageFolderDataset(split, 16, True, seed=3, hflip=True), keys)
    resumed = items(
        ImageFolderDataset(scan_split(Path("data")), 16, True, seed=3, hflip=True), keys
    )
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(trained, resumed, strict=True))
    assert [label for _, label in trained] == [0] * 8 + [1] * 4


def test_each_side_of_a_hold_out_takes_stand_ins_from_its_own_side(tmp_path: Path) -> None:
    root = folder(tmp_path / "data", {"a": ["0.png", "1bad.jpg", "2.png", "3.png"], "b": ["0.png"]})
    split = scan_split(root)
    pixels = {i: ImageFolderDataset(split, 16, False).load(i) for i in (2, 3)}
    own_side = ImageFolderDataset(split, 16, False)
    own_side.stand_ins_within([0, 1, 3, 4])  # 2.png, the next of class a, is on the other side
    assert torch.equal(own_side.load(1), pixels[3])
    alone = ImageFolderDataset(split, 16, False)
    alone.stand_ins_within([1, 4])  # nothing of class a that decodes on its side: the next one
    assert torch.equal(alone.load(1), pixels[2])
    # build_datasets gives the training part and the hold-out of --val_split their own sides.
    (tmp_path / "data" / "train").mkdir()
    for name in ("a", "b"):
        (tmp_path / "data" / name).rename(tmp_path / "data" / "train" / name)
    data = build_datasets("imagefolder", tmp_path / "data", 16, 0, 0.4, False)
    assert data.train.dataset.pool == set(data.train.indices)
    assert data.select.dataset.pool == set(data.select.indices)
    assert data.train.dataset.split is data.select.dataset.split  # one record of the unreadable
    assert data.unreadable_images() == []
    labels = [data.train[(i, 0)][1] for i in range(len(data.train))]
    labels += [data.select[i][1] for i in range(len(data.select))]
    assert sorted(labels) == [0, 0, 0, 0, 1]
    assert data.unreadable_images() == [tmp_path / "data/train/a/1bad.jpg"]


def test_what_dataloader_workers_find_reaches_the_main_process(tmp_path: Path) -> None:
    root = folder(tmp_path, {"a": ["0.png", "1bad.jpg", "2.png"], "b": ["0bad.jpg", "1.png"]})
    dataset = ImageFolderDataset(scan_split(root), 16, False)
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    labels = torch.cat([labels for _, labels in loader])
    assert labels.tolist() == [0, 0, 0, 1, 1]
    assert unreadable_images(dataset) == [root / "a/1bad.jpg", root / "b/0bad.jpg"]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_class_whose_every_file_fails_to_decode_is_one_line(tmp_path: Path, workers: int) -> None:
    root = folder(tmp_path, {"a": ["0.png"], "b": ["0bad.jpg", "1bad.jpg"]})
    dataset = ImageFolderDataset(scan_split(root), 16, False)
    batches = iter(DataLoader(dataset, batch_size=3, num_workers=workers))
    with pytest.raises(DataError) as info:
        next(batches)
    assert next(batches, None) is None  # drained: its worker stops now, not 5 s into a later test
    message = str(info.value)  # through a worker, DataLoader wraps it in the worker's traceback
    assert message.startswith(
        f"class b has no readable images: every file of it fails to decode (e.g. {root}/b/0bad.jpg:"
        " OSError: image file is truncated"
    )
    assert "\n" not in message, message


def test_the_scan_skips_modes_that_cannot_become_rgb(tmp_path: Path, caplog) -> None:
    folder(tmp_path, {"a": ["0.png"]})
    Image.new("LAB", (4, 4), (50, 0, 0)).save(tmp_path / "a/lab.tif")
    split = scan_split(tmp_path)
    assert [p.name for p in split.paths] == ["0.png"]
    assert split.skipped == [(tmp_path / "a/lab.tif", "pixel mode LAB cannot be converted to RGB")]
    assert unreadable_images(ImageFolderDataset(split, 16, False)) == [tmp_path / "a/lab.tif"]
    assert f"skipping {tmp_path / 'a/lab.tif'}: pixel mode LAB" in caplog.text


SIXTEEN = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
SIXTEEN[0, :4] = [32767, 32768, 255, 256]  # -> 127, 128, 0, 1
LEVELS = np.append(np.arange(0, 252, 4), 255).reshape(8, 8)  # 8-bit levels 0..255
FLOATS = (LEVELS / 255).astype(np.float32)  # 0..1, read as round(255 v): LEVELS


def gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, -1)


def palette_with_transparency(path: Path) -> Path:
    image = Image.new("P", (4, 1))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30])
    image.putdata([0, 1, 2, 3])
    image.save(path, transparency=3)  # entry 3, (10, 20, 30), is transparent
    return path


def la(path: Path) -> Path:
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (100, 0))  # transparent
    image.putpixel((1, 0), (100, 255))
    image.save(path)
    return path


RGB48 = np.stack([SIXTEEN, SIXTEEN[::-1], np.full_like(SIXTEEN, 40000)], -1)
ALPHA = np.where(np.arange(8) % 2, 65535, 0).astype(np.uint16)[None].repeat(8, 0)  # (8, 8)
WHITE = np.full((8, 8, 3), 255, np.uint8)
CMYK = (200, 50, 0, 60)  # Pillow: (255 - c) * (255 - k) / 255 per channel

# (file name, writer, expected (H, W, 3) uint8, tolerance)
MODES = {
    "I;16 png": ("a.png", lambda p: Image.fromarray(SIXTEEN).save(p), gray(SIXTEEN >> 8), 0),
    "I;16 tiff": ("a.tif", lambda p: Image.fromarray(SIXTEEN).save(p), gray(SIXTEEN >> 8), 0),
    "I;16B tiff": (
        "a.tif", lambda p: Image.fromarray(SIXTEEN.astype(">u2")).save(p), gray(SIXTEEN >> 8), 0
    ),
    "I tiff": (
        "a.tif", lambda p: Image.fromarray(SIXTEEN.astype(np.int32)).save(p), gray(SIXTEEN >> 8), 0
    ),
    "F tiff": ("a.tif", lambda p: Image.fromarray(FLOATS).save(p), gray(LEVELS), 0),
    "RGB 48-bit png": ("a.png", lambda p: png16(p, RGB48), RGB48 >> 8, 0),
    "RGBA 64-bit png": (
        "a.png",
        lambda p: png16(p, np.concatenate([RGB48, ALPHA[..., None]], -1)),
        np.where(ALPHA[..., None] > 0, RGB48 >> 8, WHITE),
        0,
    ),
    "P with transparency": (
        "a.png", palette_with_transparency,
        np.array([[[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 255, 255]]]), 0,
    ),
    "LA": ("a.png", la, np.array([[[255] * 3, [100] * 3]]), 0),
    "CMYK jpeg": (
        "a.jpg", lambda p: Image.new("CMYK", (8, 8), CMYK).save(p, quality=95),
        np.full((8, 8, 3), (42, 157, 195)), 3,
    ),
    "1-bit png": (
        "a.png", lambda p: Image.fromarray(np.eye(4, dtype=bool)).save(p), gray(np.eye(4) * 255), 0
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", MODES)
def test_pixel_modes_become_8_bit_rgb_in_training_and_inspection(tmp_path: Path, case: str) -> None:
    name, write, expected, tolerance = MODES[case]
    (tmp_path / "c").mkdir()
    write(tmp_path / "c" / name)
    dataset = ImageFolderDataset(scan_split(tmp_path), 16, False)
    assert unreadable_images(dataset) == []
    trained = dataset.load(0).permute(1, 2, 0).numpy()  # (H, W, 3) uint8
    inspected = np.asarray(load_image(tmp_path / "c" / name))
    assert trained.dtype == inspected.dtype == np.uint8 and np.array_equal(trained, inspected)
    assert trained.shape == expected.shape
    assert np.abs(trained.astype(int) - expected).max() <= tolerance, trained[..., 0]


@pytest.mark.parametrize(
    "values, refusal",
    [
        (np.array([[-1.0, 3.0]], np.float32), "pixel mode F (float) with values -1..3: only 0..1"),
        (np.array([[np.nan, 0.5]], np.float32), "pixel mode F (float) with values nan..nan"),
        (np.array([[-5, 70000]], np.int32), "pixel mode I with values -5..70000: only 0..65535"),
    ],
)
def test_pixels_without_a_known_scale_are_refused_in_one_line(
    tmp_path: Path, values: np.ndarray, refusal: str
) -> None:
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(UsageError) as info:
        load_image(path)
    assert f"image {path} cannot be read ({refusal}" in str(info.value)
    assert "\n" not in str(info.value)


def test_training_goes_on_past_an_image_that_fails_when_read(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "images"
    folder(root / "train", {"cat": ["0.png", "1bad.jpg", "2.png"], "dog": ["0.png", "1.png"]})
    folder(root / "val", {"cat": ["0.png"], "dog": ["0bad.jpg", "1.png"]})
    code = train.main(
        [
            "--name", "cut", *SMALL, "--dataset", "imagefolder", "--data_dir", str(root),
            "--pretrained_dir", "none", "--output_dir", str(tmp_path / "out"),
            "--logdir", str(tmp_path / "logs"), "--train_batch_size", "5", "--num_steps", "1",
            "--eval_every", "1",
        ]
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    for bad in ("train/cat/1bad.jpg", "val/dog/0bad.jpg"):
        assert f"skipping {root / bad}: OSError: image file is truncated" in err
    assert "2 unreadable image(s) skipped, each named in a warning" in err


@pytest.mark.parametrize("case", ["one class", "no class", "an empty val class"])
def test_a_folder_that_cannot_train_a_classifier_is_one_line(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture
) -> None:
    """One class would train to accuracy 1 and loss 0, saying nothing: refused, as are a train/
    without classes and a val/ class without images."""
    from tests.test_train import run_train

    root = tmp_path / "images"
    train = {"one class": {"cat": ["0.png", "1.png"]}, "no class": {},
             "an empty val class": {"cat": ["0.png"], "dog": ["0.png"]}}[case]  # fmt: skip
    (root / "train").mkdir(parents=True)
    folder(root / "train", train)
    val = {"cat": ["0.png"], "dog": []} if case == "an empty val class" else {"cat": ["0.png"]}
    folder(root / "val", val)
    code, err = run_train(
        ["--name", "one", *SMALL, "--dataset", "imagefolder", "--data_dir", str(root),
         "--pretrained_dir", "none", "--output_dir", str(tmp_path / "out"),
         "--logdir", str(tmp_path / "logs"), "--train_batch_size", "2", "--num_steps", "1"],
        capsys,
    )  # fmt: skip
    train = root / "train"
    expected = {
        "one class": f"{train} has one class folder, cat: a classifier needs two or more; add "
        f"{train}/<another class>/<images>",
        "no class": f"{train} has no class folders; expected {train}/<class>/<images>",
        "an empty val class": f"class folder {root / 'val' / 'dog'} has no readable images",
    }[case]
    assert code == 2 and err.strip() == f"train.py: error: {expected}", err
    assert not (tmp_path / "out").exists()


def test_what_a_run_read_of_a_folder_changes_with_its_files_not_its_place(tmp_path: Path) -> None:
    """Paths (relative), sizes and classes: a copy reads the same, a file less or edited not."""
    import shutil

    def read(root: Path):
        return build_datasets("imagefolder", root, 16, 0, 0, False).read

    first = folder(tmp_path / "a", {"cat": ["0.png", "1.png"], "dog": ["0.png"]})
    (tmp_path / "a" / "train").mkdir()
    for name in ("cat", "dog"):
        shutil.copytree(first / name, first / "train" / name)
    shutil.copytree(first / "train", first / "val")
    shutil.copytree(first, tmp_path / "b")
    assert read(first) == read(tmp_path / "b") and read(first)["train"].images == 3
    assert read(first).keys() == {"train", "val"}
    (tmp_path / "b" / "val" / "cat" / "1.png").unlink()
    assert read(first)["val"] != read(tmp_path / "b")["val"]
    assert read(first)["train"] == read(tmp_path / "b")["train"]
    noise(30, 30).save(tmp_path / "b" / "train" / "cat" / "0.png")
    assert read(first)["train"] != read(tmp_path / "b")["train"]
    assert read(first)["train"].images == read(tmp_path / "b")["train"].images
