"""Your own images, the validation protocol, flips, and checkpoints that travel across sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from models.configs import CONFIGS, apply_overrides
from models.modeling import VisionTransformer
from models.npz_io import CheckpointError
from models.resize import load_resized
from tests.test_tensorboard import hparams_tab, tag_groups_in_order, tags
from tests.test_train import SMALL, SMALL_CONFIG, event_scalars, run_cli
from utils.data.augment import CifarDataset
from utils.data.cifar import CifarArrays
from utils.data.datasets import build_datasets
from utils.data.errors import DataError
from utils.data.image_folder import scan_split
from utils.data.sampling import GlobalBatchSampler, split_indices
from utils.training.run_files import read_weights


def write_image_folder(root: Path, classes=("cat", "dog", "fish"), per_class: int = 6) -> Path:
    """PNG and JPEG files of assorted sizes and modes, and one corrupt file, in train/ and val/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a class signal a small model can pick up
                image = Image.fromarray(pixels)
                if i % 3 == 2:
                    image.convert("L").save(folder / f"{i}.png")
                elif i % 2:
                    image.save(folder / f"{i}.jpg", quality=90)
                else:
                    image.save(folder / f"{i}.png")
    (root / "train" / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def test_image_folder_scan_reports_and_skips_unreadable_files(tmp_path: Path, caplog) -> None:
    root = write_image_folder(tmp_path)
    split = scan_split(root / "train")
    assert split.classes == ["cat", "dog", "fish"]
    assert len(split.paths) == 18 and sorted(set(split.labels)) == [0, 1, 2]
    assert [p.name for p, _ in split.skipped] == ["broken.jpg"]
    assert "broken.jpg" in caplog.text and "skipped 1 unreadable file" in caplog.text


def test_image_folder_problems_are_clear_errors(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path)
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no readable images"):
        scan_split(root / "train")
    (root / "train" / "empty").rmdir()
    for f in (root / "val" / "fish").iterdir():
        f.unlink()
    (root / "val" / "fish").rmdir()
    with pytest.raises(DataError, match="lacks the class folder.* fish"):
        build_datasets("imagefolder", root, 32, 0, 0.0, False)
    with pytest.raises(DataError, match="is not a folder"):
        scan_split(tmp_path / "nowhere")


@pytest.mark.slow
def test_trains_on_an_image_folder(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images")
    result = run_cli(
        tmp_path, "--name", "folder", *SMALL, "--dataset", "imagefolder",
        "--data_dir", str(root), "--pretrained_dir", "none", "--train_batch_size", "6",
        "--num_steps", "6", "--eval_every", "3", "--hflip",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipping" in result.stderr and "broken.jpg" in result.stderr
    # val/ (3 classes x 2) selects the best checkpoint: it is named val, as evaluate.py's
    # --split val names a hold-out that does the same job.
    assert re.search(r"18 train / 6 val images$", result.stderr, re.M), result.stderr
    evaluations = re.findall(
        r"step (\d+): val accuracy [\d.]+, loss [\d.]+ \(6 images", result.stderr
    )
    assert evaluations == ["3", "6"] and "test accuracy" not in result.stderr
    assert "(val set, which also selected it: an optimistic figure; no test set)" in result.stdout
    logs = tmp_path / "logs" / "folder"
    scalars = event_scalars(logs)
    assert [s for s, _ in scalars["val/accuracy"]] == [3, 6] and "val/loss" in scalars
    assert not [tag for tag in scalars if tag.startswith("test")]
    assert {"val/confusion_matrix", "val/predictions"} <= tags(logs, "images")
    accuracies = [a for _, a in scalars["val/accuracy"]]
    flags, results = hparams_tab(logs)[1]["."]
    assert flags["dataset"] == "imagefolder" and results == {
        "verdict/best_accuracy": pytest.approx(max(accuracies)),
        "verdict/final_accuracy": pytest.approx(accuracies[-1]),
    }
    assert tag_groups_in_order(logs) == ["train", "val", "verdict"]
    meta = json.loads((tmp_path / "output" / "folder_checkpoint.json").read_text())
    assert meta["classes"] == ["cat", "dog", "fish"]
    state, meta_pt = read_weights(tmp_path / "output" / "folder_last.pt")
    assert meta_pt["classes"] == ["cat", "dog", "fish"] and state["head.weight"].shape[0] == 3
    # The class names travel with the checkpoint: no --dataset or model flags needed.
    image = next((root / "val" / "dog").iterdir())
    checkpoint = str(tmp_path / "output" / "folder_checkpoint.bin")
    predicted = run_cli(tmp_path, "--checkpoint", checkpoint, str(image), script="predict.py")
    assert predicted.returncode == 0, predicted.stderr
    assert {"cat", "dog", "fish"} <= set(predicted.stdout.split())
    evaluated = run_cli(
        tmp_path, "--checkpoint", checkpoint, "--data_dir", str(root),
        "--output_dir", str(tmp_path / "eval"), "--num_workers", "0", script="evaluate.py",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    assert "images 6" in evaluated.stdout and "fish" in evaluated.stdout
    refused = run_cli(
        tmp_path, "--checkpoint", checkpoint, "--data_dir", str(root), "--data_on_device", "on",
        script="evaluate.py",
    )  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--data_on_device on needs a CIFAR data set" in refused.stderr


@pytest.mark.slow
def test_image_folder_hold_out_is_val_and_its_val_folder_test(tmp_path: Path) -> None:
    """With --val_split, a hold-out of train/ selects (val) and val/ is scored at the end (test)."""
    root = write_image_folder(tmp_path / "images")
    result = run_cli(
        tmp_path, "--name", "held", *SMALL, "--dataset", "imagefolder", "--data_dir", str(root),
        "--pretrained_dir", "none", "--val_split", "0.25", "--train_batch_size", "6",
        "--num_steps", "4", "--eval_every", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"14 train / 4 val images / 6 test images$", result.stderr, re.M)
    held_out = re.findall(r"val accuracy [\d.]+, loss [\d.]+ \((\d+) images", result.stderr)
    assert held_out == ["4", "4"]
    assert re.search(r"final accuracy [\d.]+ \(test set, final weights\)", result.stdout)
    logs = tmp_path / "logs" / "held"
    scalars = event_scalars(logs)
    assert [s for s, _ in scalars["val/accuracy"]] == [2, 4]
    ends = ("accuracy_final", "loss_final", "accuracy_best", "loss_best")
    assert {tag for tag in scalars if tag.startswith("test")} == {f"test/{end}" for end in ends}
    results = hparams_tab(logs)[1]["."][1]
    for end in ("final", "best"):
        [(step, accuracy)] = scalars[f"test/accuracy_{end}"]
        assert step == 4 and results[f"verdict/test_accuracy_{end}"] == pytest.approx(accuracy)
    assert tag_groups_in_order(logs) == ["test", "train", "val", "verdict"]


def test_validation_split_is_disjoint_fixed_and_world_size_free() -> None:
    train_a, val_a = split_indices(5085, 0.1, seed=42)
    train_b, val_b = split_indices(5085, 0.1, seed=42)
    assert (train_a, val_a) == (train_b, val_b)
    assert not set(train_a) & set(val_a) and len(train_a) + len(val_a) == 5085
    assert len(val_a) == 508 and split_indices(5085, 0.1, seed=1)[1] != val_a
    # Every process draws its slice of the same global batches over the training part only.
    for world in (1, 2, 3):
        seen = set()
        for rank in range(world):
            sampler = iter(GlobalBatchSampler(len(train_a), 24, rank, world, seed=42))
            for _ in range(len(train_a) // 24):
                seen |= {train_a[i] for i, _ in next(sampler)}
        assert seen <= set(train_a) and len(seen) == len(train_a) // 24 * 24


@pytest.mark.slow
def test_val_split_selects_on_validation_and_scores_test_once(tmp_path: Path, subset: Path) -> None:
    result = run_cli(
        tmp_path, "--name", "honest", *SMALL, "--pretrained_dir", "none",
        "--data_dir", str(subset), "--train_batch_size", "32", "--num_steps", "8",
        "--eval_every", "4", "--val_split", "0.1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.findall(r"val accuracy [\d.]+, loss [\d.]+ \((\d+) images", result.stderr) == [
        "508",
        "508",
    ]
    assert "test accuracy" not in result.stderr
    assert re.search(
        r"final accuracy [\d.]+ \(test set, final weights\) \| best accuracy", result.stdout
    )
    scalars = event_scalars(tmp_path / "logs" / "honest")
    assert [s for s, _ in scalars["val/accuracy"]] == [4, 8]
    assert "test/accuracy" not in scalars
    assert len(scalars["test/accuracy_final"]) == len(scalars["test/accuracy_best"]) == 1


def test_hflip_mirrors_the_same_crop() -> None:
    rng = np.random.default_rng(0)
    arrays = CifarArrays(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.arange(4), ["a"])
    plain = CifarDataset(arrays, 32, train=True, seed=3)
    flipped = CifarDataset(arrays, 32, train=True, seed=3, hflip=True)
    outcomes = set()
    for index in range(4):
        for epoch in range(8):
            a, b = plain[(index, epoch)][0], flipped[(index, epoch)][0]
            outcomes.add(torch.equal(a, b))
            assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    assert outcomes == {True, False}, "about half the draws should flip"


def test_own_checkpoints_load_at_another_resolution(tmp_path: Path) -> None:
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    small = VisionTransformer(config, img_size=32, num_classes=10).eval()
    torch.save(small.state_dict(), tmp_path / "m_checkpoint.bin")
    state, meta = read_weights(tmp_path / "m_checkpoint.bin")
    assert meta == {}
    large = VisionTransformer(config, img_size=48, num_classes=10).eval()
    load_resized(large, state)
    assert large.transformer.embeddings.position_embeddings.shape == (1, 145, 64)
    torch.testing.assert_close(large.head.weight, small.head.weight)
    same = VisionTransformer(config, img_size=32, num_classes=10).eval()
    load_resized(same, state)  # no resize: identical outputs
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(same(x)[0], small(x)[0])
    with pytest.raises(CheckpointError, match="head.weight"):
        load_resized(VisionTransformer(config, img_size=32, num_classes=4), state)
    fresh = VisionTransformer(config, img_size=32, num_classes=4, zero_head=True)
    load_resized(fresh, state, keep_head=False)
    assert not fresh.head.weight.any()
    with pytest.raises(CheckpointError, match="mismatched: transformer.embeddings"):
        load_resized(VisionTransformer(CONFIGS["testing"], img_size=32), state)


@pytest.mark.parametrize("size", [32, 224, 384, 448])
def test_hybrid_builds_and_runs_at_every_size(size: int) -> None:
    """The reference's hybrid derived its patch size from img_size and broke at <224 and >=448."""
    config = apply_overrides(CONFIGS["R50-ViT-B_16"], ["transformer.num_layers=1"])
    model = VisionTransformer(config, img_size=size, num_classes=10).eval()
    grid = -(-size // 16)
    assert model.transformer.embeddings.grid_size == (grid, grid)
    with torch.no_grad():
        logits, _ = model(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 10)


def test_fine_tuning_from_a_bin_at_another_size(tmp_path: Path, subset: Path) -> None:
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    torch.save(VisionTransformer(config, 16, num_classes=7).state_dict(), tmp_path / "a.bin")
    code = train.main(
        [
            "--name", "ft", *SMALL, "--pretrained_dir", str(tmp_path / "a.bin"),
            "--data_dir", str(subset), "--output_dir", str(tmp_path / "out"),
            "--logdir", str(tmp_path / "logs"), "--train_batch_size", "8", "--num_steps", "1",
            "--eval_every", "1", "--eval_batch_size", "256",
        ]
    )  # fmt: skip
    assert code == 0
