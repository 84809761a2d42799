"""evaluate.py, predict.py and visualize_attention.py on a model trained here on the real subset;
attention rollout against a hand computation; the figures and their TensorBoard summaries."""

from __future__ import annotations

import importlib
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from models.configs import CONFIGS, apply_overrides
from models.errors import UsageError, UserError
from models.modeling import VisionTransformer
from tests.helpers import confusion_matrix
from tests.test_train import SMALL_CONFIG, run_cli
from utils.cli import run_main
from utils.data.augment import CifarDataset
from utils.data.cifar import load_cifar
from utils.data.class_names import CIFAR10_CLASSES, CIFAR100_CLASSES
from utils.inspection.figures import (
    BLACK,
    GREEN,
    RED,
    attention_figure,
    attention_title,
    confusion_matrix_image,
    figure_grid,
    log_eval_images,
    prediction_grid,
)
from utils.inspection.images import preprocess
from utils.inspection.inference import class_names, load_checkpoint_model, open_checkpoint
from utils.inspection.rollout import attention_rollout, overlay_heatmap
from utils.training.evaluation import evaluate
from utils.training.precision import Precision

MODEL = ["--model_type", "testing", "--img_size", "32"]
for _item in SMALL_CONFIG:
    MODEL += ["--config", _item]
# A hybrid small enough for CPU: one bottleneck unit per ResNet stage, two transformer layers.
R50_CONFIG = [
    "resnet.num_layers=1,1,1",
    "hidden_size=64",
    "transformer.mlp_dim=128",
    "transformer.num_heads=4",
    "transformer.num_layers=2",
]


def run_script(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run one of the scripts with no network (proxies on a closed port)."""
    return run_cli(tmp_path, *args, script=script)


@dataclass
class Trained:
    bin: Path
    last: Path
    logdir: Path
    accuracy: str  # as train.py logged it, 4 decimals
    loss: str
    images: int


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> Trained:
    """A small ViT trained for 30 steps on the real subset, evaluated once, at step 30."""
    tmp = tmp_path_factory.mktemp("trained")
    result = run_cli(
        tmp, "--name", "tiny", *MODEL, "--num_workers", "0", "--pretrained_dir", "none",
        "--data_dir", str(subset), "--train_batch_size", "32", "--num_steps", "30",
        "--eval_every", "30", "--warmup_steps", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    logged = re.search(
        r"step 30: test accuracy ([\d.]+), loss ([\d.]+) \((\d+) images\)", result.stderr
    )
    assert logged, result.stderr
    accuracy, loss, images = logged.groups()
    assert float(accuracy) > 0, "the .bin is written only when the accuracy improves on 0"
    return Trained(
        tmp / "output" / "tiny_checkpoint.bin",
        tmp / "output" / "tiny_last.pt",
        tmp / "logs" / "tiny",
        accuracy,
        loss,
        int(images),
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> dict[str, Path]:
    """Image files of several sizes, modes and formats made from CIFAR test images."""
    tmp = tmp_path_factory.mktemp("images")
    pixels = load_cifar("cifar10", subset, False).images  # (N, 32, 32, 3) uint8
    files = {
        "cifar.png": Image.fromarray(pixels[0]),
        "wide.jpg": Image.fromarray(pixels[1]).resize((50, 30), Image.BICUBIC),
        "gray.png": Image.fromarray(pixels[2]).convert("L").resize((64, 64)),
        "alpha.png": Image.fromarray(pixels[3]).convert("RGBA").resize((40, 48)),
    }
    for name, picture in files.items():
        picture.save(tmp / name)
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return {name: tmp / name for name in (*files, "corrupt.png")}


def one_line_error(code: int, stderr: str, script: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), stderr
    return lines[0]


def run_in_process(script: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """A script's ``main`` under ``run_main``, as its ``__main__`` block runs it: (code, stderr)."""
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: module.main(argv), script)
    return exited.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_reproduces_the_logged_accuracy(
    trained: Trained, subset: Path, tmp_path: Path
) -> None:
    """No model flags: they come from the .json that train.py wrote beside the .bin."""
    result = run_script(
        tmp_path, "evaluate.py", "--checkpoint", str(trained.bin),
        "--data_dir", str(subset), "--output_dir", str(tmp_path / "eval"), "--num_workers", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"accuracy {trained.accuracy} (top-5 ")
    assert lines[1] == f"loss {trained.loss}"
    assert lines[2] == f"images {trained.images}"
    table = {line.split()[0]: line.split()[1:] for line in lines[4:14]}
    assert list(table) == list(CIFAR10_CLASSES)

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    configs = " ".join(f"--config {c}" for c in SMALL_CONFIG)
    assert metrics["model"] == f"--model_type testing {configs} --img_size 32"
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 509 == trained.images
    assert f"{np.trace(cm) / cm.sum():.4f}" == trained.accuracy
    for i, name in enumerate(CIFAR10_CLASSES):  # the table is the matrix's diagonal and rows
        assert table[name][:2] == [str(cm[i, i]), str(cm[i].sum())]
    with Image.open(tmp_path / "eval" / "confusion_matrix.png") as figure:
        assert figure.format == "PNG" and figure.width > 300 and figure.height > 300

    on_device = run_script(
        tmp_path, "evaluate.py", "--checkpoint", str(trained.bin), "--data_on_device", "on",
        "--data_dir", str(subset), "--output_dir", str(tmp_path / "eval_on_device"),
    )  # fmt: skip
    assert on_device.returncode == 0, on_device.stderr
    assert on_device.stdout.splitlines()[:14] == lines[:14]  # what CUDA runs use by default


def test_training_state_scores_like_the_bin(trained: Trained, subset: Path) -> None:
    """The *_last.pt of the same step holds the same weights, and its own class names."""
    checkpoint = open_checkpoint(trained.last)
    assert checkpoint.args["model_type"] == "testing" and "config" in checkpoint.meta
    classes = class_names(checkpoint, "cifar10")
    assert classes == list(CIFAR10_CLASSES)
    model = load_checkpoint_model("testing", SMALL_CONFIG, 32, len(classes), checkpoint)
    test_set = CifarDataset(load_cifar("cifar10", subset, False), 32, False)
    loader = torch.utils.data.DataLoader(test_set, batch_size=64)
    cpu = torch.device("cpu")
    result = evaluate(model, loader, cpu, Precision("fp32", cpu, 0), len(classes))
    assert f"{result.accuracy:.4f}" == trained.accuracy
    assert f"{result.loss:.4f}" == trained.loss


# ---------------------------------------------------------------------------------------------
# predict.py and the preprocessing it shares


def test_predict_lists_sorted_probabilities(
    trained: Trained, images: dict[str, Path], tmp_path: Path
) -> None:
    files = [str(images[n]) for n in ("cifar.png", "wide.jpg", "gray.png", "alpha.png")]
    flags = [*MODEL, "--checkpoint", str(trained.bin), *files]
    as_json = run_script(tmp_path, "predict.py", *flags, "--json")
    assert as_json.returncode == 0, as_json.stderr
    results = json.loads(as_json.stdout)
    assert [r["image"] for r in results] == files
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-9
        assert all(CIFAR10_CLASSES[t["index"]] == t["class"] for t in r["top"])

    as_text = run_script(tmp_path, "predict.py", *flags)
    assert as_text.returncode == 0, as_text.stderr
    rows = re.findall(r"^ +(\d)\. (\S+) +([\d.]+)$", as_text.stdout, re.MULTILINE)
    assert len(rows) == 20
    expected = [(str(i + 1), t["class"]) for r in results for i, t in enumerate(r["top"])]
    assert [row[:2] for row in rows] == expected
    assert [float(row[2]) for row in rows] == pytest.approx(
        [t["probability"] for r in results for t in r["top"]], abs=5e-5
    )


def test_predict_reads_folders_recursively_in_sorted_order(
    trained: Trained, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A folder stands for every readable image inside it; other files are noted and skipped."""
    import predict

    folder = tmp_path / "photos"
    (folder / "b" / "inner").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    shutil.copy(images["wide.jpg"], folder / "b" / "inner" / "z.jpg")
    shutil.copy(images["cifar.png"], folder / "b" / "a.png")
    shutil.copy(images["gray.png"], folder / "c.png")
    shutil.copy(images["gray.png"], folder / ".hidden" / "h.png")
    (folder / "notes.txt").write_text("not an image")
    flags = [*MODEL, "--checkpoint", str(trained.bin), "--json", "--device", "cpu"]
    assert predict.main([*flags, str(folder)]) == 0
    out = capsys.readouterr()
    listed = json.loads(out.out)
    expected = [folder / "b" / "a.png", folder / "b" / "inner" / "z.jpg", folder / "c.png"]
    assert [r["image"] for r in listed] == [str(p) for p in expected]
    assert "skipping" in out.err and "notes.txt" in out.err
    assert predict.main([*flags, *map(str, expected)]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {**r, "image": str(p)} for r, p in zip(listed, expected, strict=True)
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no image that Pillow can read"):
        predict.main([*flags, str(tmp_path / "empty")])


@pytest.mark.parametrize("img_size", [32, 48])
def test_preprocess_is_the_test_transform(subset: Path, img_size: int) -> None:
    arrays = load_cifar("cifar10", subset, False)
    test_set = CifarDataset(arrays, img_size, False)
    for i in range(3):
        ours = preprocess(Image.fromarray(arrays.images[i]), img_size)
        assert torch.equal(ours, test_set[i][0])


# ---------------------------------------------------------------------------------------------
# visualize_attention.py and the rollout


def find(figure: np.ndarray, panel: np.ndarray) -> list[tuple[int, int]]:
    """Every (y, x) at which ``panel`` appears, pixel for pixel, inside ``figure``."""
    h, w = panel.shape[:2]
    corner = np.all(figure[: figure.shape[0] - h + 1, : figure.shape[1] - w + 1] == panel[0, 0], -1)
    return [
        (int(y), int(x))
        for y, x in zip(*np.nonzero(corner), strict=True)
        if np.array_equal(figure[y : y + h, x : x + w], panel)
    ]


def blocks(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel as a ``factor`` x ``factor`` square: nearest-neighbour enlargement by hand."""
    return pixels.repeat(factor, axis=0).repeat(factor, axis=1)


@pytest.mark.parametrize("size", [(32, 32), (50, 30), (20, 300)], ids=["cifar", "wide", "tall"])
def test_attention_figure_shows_the_image_in_whole_pixel_blocks(size: tuple[int, int]) -> None:
    """A small image appears enlarged by the least whole factor reaching 384 px on its short side
    (a panorama stopping at 2048 px on its long side), its rollout overlay of the same size to its
    right."""
    width, height = size
    factor = min(math.ceil(384 / min(size)), 2048 // max(size))
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    figure = attention_figure(Image.fromarray(pixels), mask, "predicted: cat (0.5000)")
    assert figure.dtype == np.uint8 and figure.shape[2] == 3
    assert tuple(figure[0, 0]) == (255, 255, 255)  # a white background

    shown = blocks(pixels, factor)
    (where,) = find(figure, shown)  # exactly once
    overlay = np.asarray(overlay_heatmap(Image.fromarray(shown), mask))
    (beside,) = find(figure, overlay)
    assert beside[0] == where[0] and beside[1] >= where[1] + shown.shape[1]
    if size != (20, 300):
        assert min(shown.shape[:2]) >= 384


def test_attention_figure_of_a_large_photo_is_shrunk_to_512_px() -> None:
    """Four flat quadrants of 600 x 400 px: each stays a flat rectangle of (512 / 800) its size."""
    colours = [(201, 13, 77), (13, 201, 77), (77, 13, 201), (240, 240, 20)]
    pixels = np.zeros((800, 1200, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        pixels[(i // 2) * 400 : (i // 2 + 1) * 400, (i % 2) * 600 : (i % 2 + 1) * 600] = colour
    figure = attention_figure(Image.fromarray(pixels), torch.rand(8, 8), "predicted: ship (0.9)")
    boxes = []
    for colour in colours:
        ys, xs = np.nonzero(np.all(figure == colour, axis=-1))
        boxes.append((ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
    top, left = boxes[0][:2]
    for i, (y, x, h, w) in enumerate(boxes):  # 384 x 256 each, less Lanczos's ringing at edges
        assert 250 <= h <= 256 and 378 <= w <= 384, boxes
        assert abs(y - top - (i // 2) * 256) <= 4 and abs(x - left - (i % 2) * 384) <= 4, boxes
    assert figure.shape[1] >= 2 * 768


def test_attention_title_names_the_prediction_and_the_truth() -> None:
    assert attention_title("cat", 0.97314, "cat") == "predicted: cat (0.9731) · true: cat"
    assert attention_title("ship", 0.5) == "predicted: ship (0.5000)"


def test_figure_grid_places_each_figure_in_its_row_and_column() -> None:
    """Five figures: three columns, two rows; a column as wide as its widest figure, a row as
    tall as its tallest."""
    sizes = [(10, 20), (30, 5), (8, 8), (12, 7), (4, 40)]  # (height, width)
    figures = [np.full((*s, 3), i, dtype=np.uint8) for i, s in enumerate(sizes)]
    grid = figure_grid(figures)
    tops, lefts = [0, 30], [0, 20, 60]  # rows 30 and 12 tall; columns 20, 40 and 8 wide
    assert grid.shape == (30 + 12, 20 + 40 + 8, 3)
    for i, figure in enumerate(figures):
        y, x = tops[i // 3], lefts[i % 3]
        assert np.array_equal(grid[y : y + figure.shape[0], x : x + figure.shape[1]], figure)
    assert grid.sum(dtype=np.int64) == sum(f.sum(dtype=np.int64) for f in figures) + 255 * 3 * (
        grid.shape[0] * grid.shape[1] - sum(h * w for h, w in sizes)
    )  # white elsewhere


def test_attention_figure_of_a_cifar_image_in_a_class_folder(
    trained: Trained, subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The command a user types (no --output): attention/<stem>_attention.png, the CIFAR image
    in 12 x 12 blocks, titled with predict.py's top class and probability and the folder's class."""
    import predict

    pixels = load_cifar("cifar10", subset, False).images[0]  # a cat
    image = tmp_path / "cat" / "test0.png"
    image.parent.mkdir()
    Image.fromarray(pixels).save(image)
    result = run_script(
        tmp_path, "visualize_attention.py", "--checkpoint", str(trained.bin), str(image)
    )
    assert result.returncode == 0, result.stderr
    output = tmp_path / "attention" / "test0_attention.png"
    with Image.open(output) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        figure = np.asarray(png)
    ((y, x),) = find(figure, blocks(pixels, 12))
    assert figure.shape[1] >= x + 2 * 384

    assert (
        predict.main(["--checkpoint", str(trained.bin), "--json", "--device", "cpu", str(image)])
        == 0
    )
    top = json.loads(capsys.readouterr().out)[0]["top"][0]
    line = result.stdout.strip()
    match = re.fullmatch(
        r"(\S+): predicted: (\S+) \(([\d.]+)\) · true: cat; attention figure written to (\S+)", line
    )
    assert match, line
    assert (
        match[1] == str(image)
        and match[2] == top["class"]
        and match[4] == "attention/test0_attention.png"
    )
    assert float(match[3]) == pytest.approx(top["probability"], abs=1.5e-4)  # fused attention there


def test_several_images_give_a_figure_each_or_one_grid(
    trained: Trained, images: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A folder's layout is mirrored under --output; --grid puts the same figures in one PNG."""
    import visualize_attention

    photos = tmp_path / "photos"
    (photos / "ship").mkdir(parents=True)
    shutil.copy(images["cifar.png"], photos / "ship" / "a.png")
    shutil.copy(images["gray.png"], photos / "b.png")
    given = [str(photos), str(images["wide.jpg"])]
    flags = ["--checkpoint", str(trained.bin), "--device", "cpu"]
    assert visualize_attention.main([*flags, *given, "--output", str(tmp_path / "maps")]) == 0
    lines = capsys.readouterr().out.splitlines()
    written = [
        tmp_path / "maps" / "b_attention.png",
        tmp_path / "maps" / "ship" / "a_attention.png",
    ]
    written.append(tmp_path / "maps" / "wide_attention.png")
    assert sorted(p for p in (tmp_path / "maps").rglob("*") if p.is_file()) == sorted(written)
    assert [line.split(": predicted: ")[0] for line in lines] == [
        str(photos / "b.png"),
        str(photos / "ship" / "a.png"),
        str(images["wide.jpg"]),
    ]
    assert [("· true: " in line) for line in lines] == [False, True, False]  # only ship/ names one
    assert all(line.endswith(f"written to {p}") for line, p in zip(lines, written, strict=True))

    grid_png = tmp_path / "all.png"
    assert visualize_attention.main([*flags, *given, "--grid", "--output", str(grid_png)]) == 0
    grid_lines = capsys.readouterr().out.splitlines()
    assert [line.split(";")[0] for line in grid_lines] == [line.split(";")[0] for line in lines]
    figures = [np.asarray(Image.open(p)) for p in written]
    with Image.open(grid_png) as png:
        grid = np.asarray(png)
    np.testing.assert_array_equal(grid, figure_grid(figures))


@pytest.mark.parametrize(
    "case, expected",
    [
        (
            "png_for_two",
            "is one PNG for 2 images; pass a folder for one figure each, or add --grid",
        ),
        ("label_for_two", "--label names the class of a single image, 2 given"),
        ("unknown_label", "--label kangaroo is not a class of the checkpoint (airplane, "),
        ("same_name", "would both be drawn to"),
        ("grid_too_large", "--grid draws at most 64 images, 65 given"),
        ("output_is_a_file", "taken is a file, not a folder; pass a folder or a .png path"),
    ],
)
def test_visualize_attention_refuses_bad_combinations_in_one_line(
    trained: Trained,
    images: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    case: str,
    expected: str,
) -> None:
    one, two = str(images["cifar.png"]), str(images["gray.png"])
    argv = {
        "png_for_two": [one, two, "--output", str(tmp_path / "x.png")],
        "label_for_two": [one, two, "--label", "cat"],
        "unknown_label": [one, "--label", "kangaroo"],
        "same_name": [one, str(tmp_path / "b" / "cifar.png")],
        "grid_too_large": [str(tmp_path / "many"), "--grid"],
        "output_is_a_file": [one, "--output", str(tmp_path / "taken")],
    }[case]
    (tmp_path / "b").mkdir()
    shutil.copy(one, tmp_path / "b" / "cifar.png")
    (tmp_path / "many").mkdir()
    for i in range(65):
        shutil.copy(one, tmp_path / "many" / f"{i:02}.png")
    (tmp_path / "taken").write_text("a file, not a folder")
    argv += ["--checkpoint", str(trained.bin), "--device", "cpu"]
    code, stderr = run_in_process("visualize_attention.py", argv, capsys)
    assert expected in one_line_error(code, stderr, "visualize_attention.py")


def test_attention_figure_of_an_r50_hybrid(images: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = apply_overrides(CONFIGS["R50-ViT-B_16"], R50_CONFIG)
    model = VisionTransformer(config, img_size=64, num_classes=10)
    assert model.transformer.embeddings.grid_size == (4, 4)
    torch.save(model.state_dict(), tmp_path / "r50_checkpoint.bin")
    flags = ["--model_type", "R50-ViT-B_16", "--img_size", "64"]
    for item in R50_CONFIG:
        flags += ["--config", item]
    output = tmp_path / "gray_attention.png"
    result = run_script(
        tmp_path, "visualize_attention.py", *flags, "--checkpoint",
        str(tmp_path / "r50_checkpoint.bin"), str(images["alpha.png"]), "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f"attention figure written to {output}\n")
    with Image.open(output) as png, Image.open(images["alpha.png"]) as original:
        assert png.mode == "RGB"
        pixels = np.asarray(original.convert("RGB"))  # 40 x 48: blocks of 10 reach 400 x 480
        assert len(find(np.asarray(png), blocks(pixels, 10))) == 1


def test_rollout_matches_a_hand_computed_two_layer_example() -> None:
    """N = 3 tokens (class token and two patches), two heads per layer.

    Layer 1: heads [[1,0,0],[0,1,0],[0,0,1]] and [[0,1,0],[0,1,0],[0,0,1]] average to
    W1 = [[.5,.5,0],[0,1,0],[0,0,1]]; (W1 + I) with rows renormalised is
    A1 = [[.75,.25,0],[0,1,0],[0,0,1]]. Layer 2: both heads [[0,0,1],[0,1,0],[0,0,1]] give
    A2 = [[.5,0,.5],[0,1,0],[0,0,1]]. Rollout A2 @ A1 has class row [.375, .125, .5], so the
    patch map is [.125, .5]. (The wrong order, A1 @ A2, would give [.25, .375].)
    """
    eye = torch.eye(3)
    layer1 = torch.stack((eye, torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 0, 1]])))[None]
    layer2 = torch.tensor([[0.0, 0, 1], [0, 1, 0], [0, 0, 1]]).expand(1, 2, 3, 3)
    mask = attention_rollout([layer1, layer2])
    assert mask.shape == (1, 2)
    torch.testing.assert_close(mask, torch.tensor([[0.125, 0.5]]))


def test_rollout_discard_ratio_drops_the_weakest_patch() -> None:
    """Class row [.2, .5, .3]; with the identity, renormalised: [.6, .25, .15]. Discarding half
    of the 2 patch weights zeroes the .3: ([.2, .5, 0] + [1, 0, 0]) / 1.7, map [.5 / 1.7, 0]."""
    weights = torch.tensor([[0.2, 0.5, 0.3], [0, 1, 0], [0, 0, 1]])[None, None]  # (1, 1, 3, 3)
    torch.testing.assert_close(attention_rollout([weights]), torch.tensor([[0.25, 0.15]]))
    torch.testing.assert_close(
        attention_rollout([weights], discard_ratio=0.5), torch.tensor([[0.5 / 1.7, 0.0]])
    )
    with pytest.raises(ValueError, match="vis=True"):
        attention_rollout([])


def test_overlay_is_hottest_where_the_mask_peaks() -> None:
    image = Image.new("RGB", (50, 30), (128, 128, 128))
    mask = torch.zeros(4, 4)
    mask[0, 3] = 1.0  # top-right cell
    overlay = np.asarray(overlay_heatmap(image, mask, alpha=0.8)).astype(int)
    assert overlay.shape == (30, 50, 3)
    top_right, bottom_left = overlay[2, 47], overlay[27, 2]
    assert top_right[0] > top_right[2]  # red over blue where attention peaks
    assert bottom_left[2] > bottom_left[0]  # blue over red where there is none


# ---------------------------------------------------------------------------------------------
# Figures and TensorBoard


def test_evaluation_counts_the_confusion_matrix_image_by_image() -> None:
    """evaluation.evaluate's device-side count (scatter_add over batches) against counting each
    prediction of the same model by hand."""
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    torch.manual_seed(0)
    model = VisionTransformer(config, img_size=32, num_classes=10)
    images, labels = torch.randn(40, 3, 32, 32), torch.arange(40) % 10
    batches = list(zip(images.split(16), labels.split(16), strict=True))  # 16 + 16 + 8
    cpu = torch.device("cpu")
    scores = evaluate(model, batches, cpu, Precision("fp32", cpu, 0), num_classes=10)
    with torch.no_grad():
        preds = model.eval()(images)[0].argmax(-1)
    expected = confusion_matrix(preds.numpy(), labels.numpy(), 10)
    np.testing.assert_array_equal(scores.confusion, expected)
    assert len(np.unique(preds)) > 1 and scores.confusion.sum() == 40  # not one column


@pytest.mark.parametrize("names", [CIFAR10_CLASSES, CIFAR100_CLASSES], ids=["10", "100"])
def test_confusion_matrix_image_is_an_rgb_array(names: tuple[str, ...]) -> None:
    k = len(names)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, k, 1000)
    preds = np.where(rng.random(1000) < 0.5, labels, rng.integers(0, k, 1000))
    figure = confusion_matrix_image(confusion_matrix(preds, labels, k), names)
    assert figure.dtype == np.uint8 and figure.ndim == 3 and figure.shape[2] == 3
    assert 300 < figure.shape[0] < 1200 and 300 < figure.shape[1] < 1200


def ink_bands(rows: np.ndarray) -> list[tuple[int, int]]:
    """The runs (first, last) of consecutive row indices in ``rows`` (sorted)."""
    bands: list[tuple[int, int]] = []
    for r in rows.tolist():
        if bands and r == bands[-1][1] + 1:
            bands[-1] = (bands[-1][0], r)
        else:
            bands.append((r, r))
    return bands


def crop(ink: np.ndarray) -> np.ndarray:
    """The inked pixels (any channel below 235) of an (H, W, 3) or (H, W) array, cut to their
    bounding box."""
    mask = ink.any(axis=2) if ink.ndim == 3 else ink
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_confusion_matrix_shows_its_title_whole_above_the_recall_heading(k: int) -> None:
    """A 3-class figure was once 238 px wide, its title cut to "...accur..." with the "recall"
    heading over it. The title's width as Pillow's renderer measures it fits the figure, and the
    title is drawn whole (its ink spans that width); above the grid's frame, the "recall"
    heading (up to 30 classes) has rows of its own, apart from the title's."""
    names = CIFAR10_CLASSES[:k] if k <= 10 else CIFAR100_CLASSES
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, 509)
    preds = np.where(rng.random(509) < 0.5, labels, rng.integers(0, k, 509))
    cm = confusion_matrix(preds, labels, k)
    figure = confusion_matrix_image(cm, names)
    title = f"Confusion matrix: 509 images, accuracy {np.trace(cm) / 509:.4f}"
    font = ImageFont.load_default(size=13)  # the figure's font for its title
    x0, _, x1, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), title, font=font)
    assert figure.shape[1] >= x1 - x0 + 16

    inked = (figure < 235).any(axis=2)
    # The grid's frame: the first row with a line of ink longer than any text's
    runs = [max(map(len, "".join("x" if v else " " for v in row).split()), default=0)
            for row in inked]  # fmt: skip
    frame = next(r for r, run in enumerate(runs) if run >= 80)
    bands = ink_bands(np.flatnonzero(inked[:frame].any(axis=1)))
    assert len(bands) == (2 if k <= 30 else 1), bands  # the title, then "recall"
    # drawn whole, no ellipsis: the title's ink is that of the title drawn alone
    alone = Image.new("RGB", (x1 - x0 + 16, 40), "white")
    ImageDraw.Draw(alone).text((8, 8), title, fill=BLACK, font=font)
    assert np.array_equal(crop(inked[: bands[0][1] + 1]), crop(np.asarray(alone) < 235))


def test_prediction_grid_frames_right_green_and_wrong_red() -> None:
    images = torch.rand(20, 3, 32, 32) * 2 - 1
    labels = torch.arange(20) % 10
    preds = labels.clone()
    preds[1] = (labels[1] + 1) % 10
    grid = prediction_grid(images, preds, labels, CIFAR10_CLASSES, max_images=16)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    tile_w = grid.shape[1] // 4  # 16 images: 4 x 4
    assert grid.shape[0] == 4 * (grid.shape[0] // 4)
    assert tuple(grid[8, 8]) == GREEN  # the frame of tile 0, right
    assert tuple(grid[8, tile_w + 8]) == RED  # the frame of tile 1, wrong


def test_log_eval_images_writes_image_summaries(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    labels = torch.arange(8) % 10
    cm = confusion_matrix(labels, labels, 10)
    log_eval_images(writer, 30, torch.zeros(8, 3, 32, 32), labels, labels, cm, CIFAR10_CLASSES)
    writer.close()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"test/confusion_matrix", "test/predictions"}
    (event,) = acc.Images("test/confusion_matrix")
    figure = confusion_matrix_image(cm, CIFAR10_CLASSES)
    assert event.step == 30 and (event.height, event.width) == figure.shape[:2]


def test_training_logs_eval_images_and_hparams(trained: Trained) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set[str]] = {"images": set(), "tensors": set(), "scalars": set()}
    for events in trained.logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
        acc.Reload()
        for kind, found in tags.items():
            found.update(acc.Tags()[kind])
    assert {"test/confusion_matrix", "test/predictions"} <= tags["images"]
    assert {"verdict/best_accuracy", "verdict/final_accuracy"} <= tags["scalars"]  # HParams tab


# ---------------------------------------------------------------------------------------------
# User errors: one line, exit code 2


def test_a_checkpoint_that_does_not_fit_names_keys_shapes_and_flags(
    trained: Trained, tmp_path: Path
) -> None:
    configs = " ".join(f"--config {c}" for c in SMALL_CONFIG)
    with pytest.raises(UsageError) as recorded:
        load_checkpoint_model("testing", [], 32, 10, trained.bin)
    message = str(recorded.value)
    assert "\n" not in message and "does not fit --model_type testing --img_size 32" in message
    assert "position_embeddings (1, 65, 64) != expected (1, 65, 16)" in message
    assert f"it was trained with --model_type testing {configs} --img_size 32" in message

    # A bare state_dict (no .json beside it): the flags are inferred from the shapes.
    bare = tmp_path / "bare_checkpoint.bin"
    bare.write_bytes(trained.bin.read_bytes())
    with pytest.raises(UsageError) as inferred:
        load_checkpoint_model("ViT-Ti_16", [], 32, 10, bare)
    assert (
        "its weights fit --model_type testing --config hidden_size=64 "
        "--config transformer.mlp_dim=128 --img_size 32" in str(inferred.value)
    )

    # Recorded flags catch what no shape shows: here the head count.
    without_heads = [c for c in SMALL_CONFIG if "num_heads" not in c]
    for path in (trained.bin, trained.last):
        with pytest.raises(UsageError, match=r"trained with transformer\.num_heads=4 \(not 2\)"):
            load_checkpoint_model("testing", without_heads, 32, 10, path)
    load_checkpoint_model("testing", without_heads, 32, 10, bare)  # nothing to tell


def test_class_names_come_from_the_checkpoint_or_the_data_set(
    trained: Trained, tmp_path: Path
) -> None:
    assert class_names(open_checkpoint(trained.bin), "imagefolder") == list(CIFAR10_CLASSES)
    bare = tmp_path / "bare_checkpoint.bin"
    bare.write_bytes(trained.bin.read_bytes())
    assert class_names(open_checkpoint(bare), "cifar10") == list(CIFAR10_CLASSES)
    with pytest.raises(UsageError, match="has 10 classes and no class names"):
        class_names(open_checkpoint(bare), "imagefolder")
    bare.with_suffix(".json").write_text("{not json")
    with pytest.raises(UserError, match=r"bare_checkpoint\.json is not valid JSON"):
        open_checkpoint(bare)


@pytest.mark.parametrize(
    "script, case, expected",
    [
        ("predict.py", "wrong_model", "does not fit --model_type ViT-Ti_16"),
        ("predict.py", "missing_image", "missing.png: no such file"),
        ("visualize_attention.py", "corrupt_image", "corrupt.png cannot be read"),
        ("evaluate.py", "class_count", "has 10 classes, --dataset cifar100 has 100"),
        ("predict.py", "not_a_checkpoint", "is not a readable PyTorch checkpoint"),
        ("predict.py", "no_class_names", "has 10 classes and no class names"),
    ],
)
def test_user_errors_exit_2_in_one_line(
    trained: Trained,
    images: dict[str, Path],
    subset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    script: str,
    case: str,
    expected: str,
) -> None:
    checkpoint, flags, image = str(trained.bin), list(MODEL), [str(images["cifar.png"])]
    if case == "wrong_model":
        flags = ["--model_type", "ViT-Ti_16", "--img_size", "32"]
    elif case == "missing_image":
        image = [str(tmp_path / "missing.png")]
    elif case == "corrupt_image":
        image = [str(images["corrupt.png"]), "--output", str(tmp_path / "x.png")]
    elif case == "class_count":
        flags += ["--dataset", "cifar100", "--data_dir", str(subset)]
        image = []
    elif case == "not_a_checkpoint":
        checkpoint = str(images["wide.jpg"])
    elif case == "no_class_names":  # a bare state_dict, without the .json beside it
        checkpoint = str(tmp_path / "bare_checkpoint.bin")
        Path(checkpoint).write_bytes(trained.bin.read_bytes())
        flags += ["--dataset", "imagefolder"]
    argv = [*flags, "--checkpoint", checkpoint, *image]
    if case == "missing_image":  # one of them in a real process, exit code and all
        result = run_script(tmp_path, script, *argv)
        code, stderr = result.returncode, result.stderr
    else:
        code, stderr = run_in_process(script, argv, capsys)
    assert expected in one_line_error(code, stderr, script)
