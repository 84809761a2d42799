"""evaluate.py's --split and top-5 accuracy against what train.py logged and a hand computation;
predict.py's --json probabilities rounded to 6 digits."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
import predict
from tests.test_inspect import MODEL, one_line_error, run_in_process, run_script
from tests.test_own_data import write_image_folder
from tests.test_train import SMALL, SMALL_CONFIG, run_cli
from utils.data.augment import CifarDataset
from utils.data.cifar import load_cifar
from utils.data.class_names import CIFAR10_CLASSES
from utils.data.datasets import build_datasets, load_validation_set
from utils.inspection.images import load_image, preprocess
from utils.inspection.inference import load_checkpoint_model, top_k
from utils.training.run_files import TrainingState

VAL_LINE = r"step (\d+): val accuracy ([\d.]+), loss ([\d.]+) \((\d+) images\)"
BEST_TEST = r"best accuracy ([\d.]+) \(test set, weights of step (\d+)"


@dataclass
class Logged:
    """A run trained with --val_split, and the scores its log gives for its best checkpoint."""

    bin: Path
    last: Path
    val: tuple[str, str, int]  # accuracy, loss (4 decimals, as logged), images
    test_accuracy: str  # the test set scored with the best weights, at the end


def train_with_val_split(tmp: Path, *flags: str) -> Logged:
    result = run_cli(tmp, "--name", "held", "--pretrained_dir", "none", *flags)
    assert result.returncode == 0, result.stderr
    (step, accuracy, loss, images), *later = re.findall(VAL_LINE, result.stderr)
    assert not later, "one evaluation, so the .bin is that step's weights"
    best = re.search(BEST_TEST, result.stdout)  # the summary line
    assert best and best.group(2) == step, result.stdout
    output = tmp / "output"
    return Logged(
        output / "held_checkpoint.bin", output / "held_last.pt", (accuracy, loss, int(images)),
        best.group(1),
    )  # fmt: skip


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> Logged:
    """A small ViT trained for 10 steps on the real subset with 10% held out (seed 42)."""
    return train_with_val_split(
        tmp_path_factory.mktemp("cifar_run"), *MODEL, "--num_workers", "0",
        "--data_dir", str(subset), "--val_split", "0.1", "--train_batch_size", "32",
        "--num_steps", "10", "--eval_every", "10", "--warmup_steps", "2",
    )  # fmt: skip


def evaluated(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[list[str], dict]:
    """evaluate.py's ``main`` in this process: (stdout lines, metrics.json)."""
    assert evaluate.main(argv) == 0
    output = Path(argv[argv.index("--output_dir") + 1])
    return capsys.readouterr().out.splitlines(), json.loads((output / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------
# --split


def test_split_val_rebuilds_the_hold_out_train_py_selected_on(subset: Path) -> None:
    classes, rebuilt = list(CIFAR10_CLASSES), {}
    for seed in (42, 7):
        rebuilt[seed] = load_validation_set("cifar10", subset, 32, classes, 0.1, seed)
        selected = build_datasets("cifar10", subset, 32, seed, 0.1, False).select  # train.py's
        assert rebuilt[seed].indices == selected.indices
        assert torch.equal(rebuilt[seed][0][0], selected[0][0])  # the evaluation transform
    assert rebuilt[42].indices != rebuilt[7].indices
    assert len(rebuilt[42]) == round(0.1 * len(load_cifar("cifar10", subset, True).labels))


def test_split_val_reproduces_the_logged_validation_accuracy(
    cifar_run: Logged, subset: Path, tmp_path: Path
) -> None:
    """The command a user types: no model flags, a .bin whose seed and fraction come from the
    run's _last.pt beside it."""
    result = run_script(
        tmp_path, "evaluate.py", "--checkpoint", str(cifar_run.bin), "--split", "val",
        "--data_dir", str(subset), "--output_dir", str(tmp_path / "eval"), "--num_workers", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    accuracy, loss, images = cifar_run.val
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"accuracy {accuracy} \(top-5 [\d.]+\)", lines[0]), lines[0]
    assert lines[1:3] == [f"loss {loss}", f"images {images}"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["images"] == images


def test_split_val_of_the_training_state_and_split_test(
    cifar_run: Logged, subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The _last.pt records its own seed and fraction; --split test (the default) is the test
    set train.py scored the best weights on at the end."""
    common = ["--data_dir", str(subset), "--num_workers", "0", "--output_dir", str(tmp_path)]
    lines, _ = evaluated(["--checkpoint", str(cifar_run.last), "--split", "val", *common], capsys)
    accuracy, loss, images = cifar_run.val  # the loss tells apart hold-outs of equal accuracy
    assert lines[0].startswith(f"accuracy {accuracy} ")
    assert lines[1:3] == [f"loss {loss}", f"images {images}"]
    lines, metrics = evaluated(["--checkpoint", str(cifar_run.bin), *common], capsys)
    assert lines[0].startswith(f"accuracy {cifar_run.test_accuracy} ")
    assert metrics["split"] == "test" and metrics["images"] == 509


def test_split_val_needs_a_run_with_a_val_split(
    cifar_run: Logged, subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    flags = ["--split", "val", "--data_dir", str(subset), "--output_dir", str(tmp_path / "eval")]
    alone = tmp_path / "alone" / "held_checkpoint.bin"  # a .json of older runs: model flags only
    alone.parent.mkdir()
    shutil.copy(cifar_run.bin, alone)
    record = json.loads(cifar_run.bin.with_suffix(".json").read_text())
    assert record["args"]["val_split"] == 0.1  # what a .json records today
    record["args"] = {k: v for k, v in record["args"].items() if k not in ("seed", "val_split")}
    alone.with_suffix(".json").write_text(json.dumps(record))
    code, err = run_in_process("evaluate.py", ["--checkpoint", str(alone), *flags], capsys)
    line = one_line_error(code, err, "evaluate.py")
    assert "does not record the --val_split and --seed" in line and "--split test" in line

    state = TrainingState.read(cifar_run.last)  # as a run without --val_split writes it
    state.args["val_split"] = 0.0
    state_path = alone.with_name("held_last.pt")
    state.write(state_path)
    for checkpoint in (alone, state_path):
        code, err = run_in_process("evaluate.py", ["--checkpoint", str(checkpoint), *flags], capsys)
        line = one_line_error(code, err, "evaluate.py")
        assert "was trained without --val_split" in line and "--split test" in line
    state.args["dataset"] = "imagefolder"  # its val/ folder selected the weights, logged as val
    state.write(state_path)
    code, err = run_in_process("evaluate.py", ["--checkpoint", str(state_path), *flags], capsys)
    assert "selected on the --data_dir/val folder, which --split test scores" in err


@pytest.mark.slow
def test_image_folder_splits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """test: the folder's val/, train.py's test set; val: the hold-out of its train/."""
    root = write_image_folder(tmp_path / "images")  # 18 readable training images, 6 in val/
    run = train_with_val_split(
        tmp_path, *SMALL, "--dataset", "imagefolder", "--data_dir", str(root),
        "--val_split", "0.25", "--train_batch_size", "6", "--num_steps", "4", "--eval_every", "4",
    )  # fmt: skip
    assert run.val[2] == round(0.25 * 18)
    common = ["--checkpoint", str(run.bin), "--data_dir", str(root), "--num_workers", "0"]
    common += ["--output_dir", str(tmp_path / "eval")]
    lines, metrics = evaluated([*common, "--split", "val"], capsys)
    assert lines[:3] == [f"accuracy {run.val[0]} (top-5 1.0000)", f"loss {run.val[1]}", "images 4"]
    assert metrics["top5_accuracy"] == 1.0  # three classes: the label is always among the top 5
    lines, _ = evaluated(common, capsys)
    assert lines[0].startswith(f"accuracy {run.test_accuracy} ") and lines[2] == "images 6"


# ---------------------------------------------------------------------------------------------
# top-5


def test_top5_accuracy_matches_a_hand_computation(
    cifar_run: Logged, subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A label is in the top 5 when fewer than 5 logits exceed its own."""
    argv = ["--checkpoint", str(cifar_run.bin), "--data_dir", str(subset), "--num_workers", "0"]
    lines, metrics = evaluated([*argv, "--output_dir", str(tmp_path)], capsys)

    model = load_checkpoint_model("testing", SMALL_CONFIG, 32, 10, cifar_run.bin)
    test_set = CifarDataset(load_cifar("cifar10", subset, False), 32, False)
    images = torch.stack([test_set[i][0] for i in range(len(test_set))])  # (N, 3, 32, 32)
    labels = torch.tensor(test_set.labels)  # (N,)
    with torch.no_grad():
        logits = torch.cat([model(batch)[0] for batch in images.split(64)])  # (N, 10)
    above = (logits > logits.gather(1, labels[:, None])).sum(1)  # (N,) logits above the label's
    hand_top5 = (above < 5).double().mean().item()
    hand_top1 = (above == 0).double().mean().item()
    assert metrics["top5_accuracy"] == pytest.approx(hand_top5, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(hand_top1, abs=1e-12)
    assert hand_top1 < hand_top5 < 1  # a check that tells the two apart
    assert lines[0] == f"accuracy {hand_top1:.4f} (top-5 {hand_top5:.4f})"


# ---------------------------------------------------------------------------------------------
# predict.py --json


def test_predict_json_probabilities_have_six_digits(
    cifar_run: Logged, subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pixels = load_cifar("cifar10", subset, False).images  # (N, 32, 32, 3) uint8
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for i, file in enumerate(files):
        Image.fromarray(pixels[i]).save(file)
    argv = ["--checkpoint", str(cifar_run.bin), "--json", "--top_k", "10", *map(str, files)]
    assert predict.main(argv) == 0
    results = json.loads(capsys.readouterr().out, parse_float=Decimal)

    model = load_checkpoint_model("testing", SMALL_CONFIG, 32, 10, cifar_run.bin)
    batch = torch.stack([preprocess(load_image(file), 32) for file in files])
    probs, indices = top_k(model, batch, 10, torch.device("cpu"))  # unrounded float64
    for result, row, idx in zip(results, probs.tolist(), indices.tolist(), strict=True):
        assert [t["index"] for t in result["top"]] == idx
        for entry, exact in zip(result["top"], row, strict=True):
            printed = entry["probability"]
            assert -printed.as_tuple().exponent <= 6, printed
            assert abs(float(printed) - exact) <= 5e-7
