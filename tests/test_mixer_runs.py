"""An MLP-Mixer through every script, as a user runs them: train.py trains it,
evaluate.py reproduces its accuracy, predict.py ranks an image, export.py writes the .npz that
load_from reads back to the same logits, and visualize_attention.py says there is nothing to draw.
A narrow Mixer-S/32 (its real 224 px and 49 patches, 2 blocks of width 32) keeps it fast."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import export
import predict
import train
import visualize_attention
from models.configs import CONFIGS, apply_overrides
from models.errors import UsageError
from models.families import make_model
from models.npz_io import CheckpointError, export_npz_weights
from utils.training import flags as train_flags
from utils.training.run_files import TrainingState, read_weights

NARROW = ["hidden_dim=32", "num_blocks=2", "tokens_mlp_dim=16", "channels_mlp_dim=64"]
CONFIG = [word for item in NARROW for word in ("--config", item)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> Path:
    folder = tmp_path_factory.mktemp("mixer")
    argv = [
        "--name", "mix", "--model_type", "Mixer-S_32", *CONFIG, "--pretrained_dir", "none",
        "--data_dir", str(subset), "--output_dir", str(folder), "--logdir", str(folder / "logs"),
        "--train_batch_size", "8", "--eval_batch_size", "128", "--num_steps", "2",
        "--eval_every", "2", "--warmup_steps", "0", "--num_workers", "0", "--device", "cpu",
    ]  # fmt: skip
    assert train.main(argv) == 0
    return folder


def test_train_refuses_a_mixer_at_another_resolution_naming_224() -> None:
    args = train_flags.build_parser().parse_args(["--name", "m", "--model_type", "Mixer-B_16",
                                            "--img_size", "384"])  # fmt: skip
    with pytest.raises(UsageError, match=r"--img_size 384: a Mixer's .* use --img_size 224"):
        train_flags.check_args(args)


def test_evaluate_reproduces_the_mixers_logged_accuracy(
    trained: Path, subset: Path, capsys: pytest.CaptureFixture
) -> None:
    weights, meta = read_weights(trained / "mix_checkpoint.bin")
    assert meta["args"]["model_type"] == "Mixer-S_32" and "head.weight" in weights
    argv = ["--checkpoint", str(trained / "mix_checkpoint.bin"), "--data_dir", str(subset),
            "--output_dir", str(trained / "eval"), "--device", "cpu",
            "--num_workers", "0"]  # fmt: skip
    assert evaluate.main(argv) == 0
    accuracy = float(re.search(r"accuracy ([\d.]+)", capsys.readouterr().out)[1])
    assert accuracy == pytest.approx(TrainingState.read(trained / "mix_last.pt").best_acc, abs=1e-4)


def test_predict_export_and_visualize_with_a_mixer(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)).save(image)
    ckpt = str(trained / "mix_checkpoint.bin")
    assert predict.main(["--checkpoint", ckpt, "--device", "cpu", "--top_k", "3", str(image)]) == 0
    assert "cat.png" in capsys.readouterr().out

    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "mix.npz")]) == 0
    config = apply_overrides(CONFIGS["Mixer-S_32"], NARROW)
    ours = make_model(config, 224, 10).eval()
    ours.load_state_dict(read_weights(ckpt)[0])
    again = make_model(config, 224, 10).eval()
    again.load_from(np.load(tmp_path / "mix.npz"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x)[0], again(x)[0])

    with pytest.raises(UsageError, match="is an MLP-Mixer .* has no attention to draw"):
        visualize_attention.main(["--checkpoint", ckpt, "--device", "cpu", str(image),
                                  "--output", str(tmp_path / "a.png")])  # fmt: skip


@pytest.mark.parametrize(
    ("written", "loaded"), [("Mixer-S_32", "ViT-S_32"), ("ViT-S_16", "ViT-S_32")]
)
def test_a_file_of_another_model_type_names_the_right_one(written: str, loaded: str) -> None:
    """A Mixer file for a ViT type, or an S/16 file for S/32: one line naming --model_type."""
    weights = export_npz_weights(make_model(CONFIGS[written], 224, 10))
    model = make_model(CONFIGS[loaded], 224, 10, zero_head=True)
    with pytest.raises(CheckpointError, match=f"it is a checkpoint of --model_type {written}$"):
        model.load_from(weights)
