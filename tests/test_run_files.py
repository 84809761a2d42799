"""The files of a run: written and read through utils.training.run_files, the old ones included.

``tests/fixtures/main-223a0ec/`` holds the three files that main at commit 223a0ec wrote for
``train.py --name old --model_type testing --pretrained_dir none --img_size 16
--train_batch_size 8 --num_steps 2 --eval_every 2 --warmup_steps 0 --num_workers 0`` on the
CIFAR-10 subset: they must keep loading.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import evaluate
import train
from models.errors import UsageError
from utils.training.run_files import RunFiles, TrainingState, read_weights

OLD = Path(__file__).parent / "fixtures" / "main-223a0ec"
FLAGS = ["--model_type", "testing", "--pretrained_dir", "none", "--img_size", "16",
         "--train_batch_size", "8", "--eval_every", "2", "--warmup_steps", "0",
         "--num_workers", "0", "--eval_batch_size", "512"]  # fmt: skip


def test_a_training_state_of_the_previous_version_reads_and_resumes(
    tmp_path: Path, subset: Path
) -> None:
    state = TrainingState.read(OLD / "old_last.pt")
    assert state.step == 2 and state.start is None and len(state.classes) == 10
    args = {**state.args, "num_steps": 4}
    assert state.refusal(args, 8) is None
    assert "global batch 8 (now 16" in state.refusal(args, 16)
    assert "--img_size 16 (now 32)" in state.refusal({**args, "img_size": 32}, 8)
    assert "nothing is left to train" in state.refusal({**args, "num_steps": 2}, 8)
    assert "keeps its schedule" in state.refusal({**args, "num_steps": 1}, 8)

    (tmp_path / "out").mkdir()
    shutil.copy(OLD / "old_last.pt", tmp_path / "out" / "old_last.pt")
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
    common = ["--name", "old", *FLAGS, "--data_dir", str(subset), "--output_dir", out,
              "--logdir", logs]  # fmt: skip
    assert train.main([*common, "--num_steps", "4", "--resume", "auto"]) == 0
    resumed = TrainingState.read(tmp_path / "out" / "old_last.pt")
    assert resumed.step == 4 and resumed.start == (
        "training from random weights (--pretrained_dir none)"
    )


def test_a_best_checkpoint_of_the_previous_version_evaluates(
    tmp_path: Path, subset: Path, capsys: pytest.CaptureFixture
) -> None:
    weights, meta = read_weights(OLD / "old_checkpoint.bin")
    assert meta["args"]["model_type"] == "testing" and len(meta["classes"]) == 10
    assert weights.keys() == read_weights(OLD / "old_last.pt")[0].keys()
    argv = ["--checkpoint", str(OLD / "old_checkpoint.bin"), "--data_dir", str(subset),
            "--output_dir", str(tmp_path), "--device", "cpu", "--num_workers", "0"]  # fmt: skip
    assert evaluate.main(argv) == 0
    assert "images 509" in capsys.readouterr().out


def test_run_files_round_trip(tmp_path: Path) -> None:
    files = RunFiles(tmp_path, "r")
    weights = {"w": torch.arange(3.0)}
    files.save_best(weights, {"model_type": "testing", "config": [], "img_size": 16,
                              "dataset": "cifar10", "seed": 1, "val_split": 0.1, "lr": 3},
                     {"gelu": "tanh"}, ["a", "b"])  # fmt: skip
    read, meta = read_weights(files.best)
    assert torch.equal(read["w"], weights["w"])
    assert meta == {"args": {"model_type": "testing", "config": [], "img_size": 16,
                             "dataset": "cifar10", "seed": 1, "val_split": 0.1},
                    "config": {"gelu": "tanh"}, "classes": ["a", "b"]}  # fmt: skip
    state = TrainingState.read(OLD / "old_last.pt")
    state.write(files.last)
    again = TrainingState.read(files.last)
    assert again.step == state.step and again.args == state.args
    assert files.resume_from("auto") == files.last and files.resume_from(None) is None
    with pytest.raises(UsageError, match="no such file"):
        files.resume_from(str(tmp_path / "missing.pt"))
    with pytest.raises(UsageError, match="not a <name>_last.pt training state"):
        TrainingState.read(files.best)


def test_a_training_state_of_the_previous_version_loads_for_inspection() -> None:
    """Its recorded config predates the ``gelu`` field: it trained with the exact GELU."""
    from utils.inspection.inference import load_checkpoint_model

    model = load_checkpoint_model("testing", [], 16, 10, OLD / "old_last.pt")
    assert type(model).__name__ == "VisionTransformer" and model.config.gelu == "exact"
