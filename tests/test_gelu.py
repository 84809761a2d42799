"""Each model computes with the GELU its weights learned with (docs/models.md, "GELU"): Google's
tanh for a Google .npz, exact for a reference .bin and for files written before ours recorded it,
the recorded one for ours; in training, in a resume and in every script that loads a checkpoint.
(That the default then computes Google's own logits is tests/test_google_parity.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from models.configs import CONFIGS, with_gelu
from models.errors import UsageError
from models.modeling import VisionTransformer
from utils.inspection.inference import load_checkpoint_model, open_checkpoint, resolve_flags
from utils.training.run_files import TrainingState, learned_gelu

OLD = Path(__file__).parent / "fixtures" / "main-223a0ec"  # files from before the record
FLAGS = ["--model_type", "testing", "--img_size", "16", "--train_batch_size", "8",
         "--num_steps", "2", "--eval_every", "2", "--warmup_steps", "0", "--num_workers", "0",
         "--eval_batch_size", "512"]  # fmt: skip


def trained_gelu(tmp_path: Path, subset: Path, name: str, *extra: str) -> tuple[str, str | None]:
    """Train; the GELU that the training state and the best checkpoint's .json record (None: the
    run wrote no best checkpoint)."""
    out = tmp_path / "out"
    argv = ["--name", name, *FLAGS, "--data_dir", str(subset), "--output_dir", str(out),
            "--logdir", str(tmp_path / "logs"), *extra]  # fmt: skip
    assert train.main(argv) == 0
    state = TrainingState.read(out / f"{name}_last.pt")
    meta = out / f"{name}_checkpoint.json"
    recorded = json.loads(meta.read_text())["config"]["gelu"] if meta.exists() else None
    return state.config["gelu"], recorded


def loaded_gelu(path: Path, *config: str) -> str:
    """The GELU of the model that evaluate.py, predict.py and export.py build for ``path``."""
    checkpoint = open_checkpoint(path)
    flags = resolve_flags(checkpoint, "testing", list(config), 16)
    model = load_checkpoint_model(
        flags.model_type, flags.config, flags.img_size, checkpoint.num_classes, checkpoint
    )
    return model.config.gelu


def test_a_google_npz_trains_with_tanh_unless_told(tmp_path: Path, subset: Path) -> None:
    npz = tmp_path / "google.npz"
    VisionTransformer(CONFIGS["testing"], img_size=16, num_classes=21843).export_npz(str(npz))
    assert trained_gelu(tmp_path, subset, "g", "--pretrained_dir", str(npz)) == ("tanh", "tanh")
    assert loaded_gelu(tmp_path / "out" / "g_checkpoint.bin") == "tanh"

    told = ("--pretrained_dir", str(npz), "--config", "gelu=exact")
    assert trained_gelu(tmp_path, subset, "e", *told) == ("exact", "exact")
    assert loaded_gelu(tmp_path / "out" / "e_checkpoint.bin") == "exact"
    assert loaded_gelu(tmp_path / "out" / "e_last.pt") == "exact"
    with pytest.raises(UsageError, match=r"was trained with gelu=exact \(not tanh\)"):
        loaded_gelu(tmp_path / "out" / "e_last.pt", "gelu=tanh")

    # fine-tuning further from one of ours keeps the GELU it records
    ours = ("--pretrained_dir", str(tmp_path / "out" / "e_checkpoint.bin"))
    assert trained_gelu(tmp_path, subset, "again", *ours) == ("exact", "exact")


def test_a_reference_bin_and_our_older_files_run_exact(tmp_path: Path, subset: Path) -> None:
    reference = tmp_path / "ref" / "ViT-testing_checkpoint.bin"  # the reference's: nothing beside
    reference.parent.mkdir()
    torch.save(VisionTransformer(CONFIGS["testing"], img_size=16).state_dict(), reference)
    assert loaded_gelu(reference) == "exact"
    assert loaded_gelu(reference, "gelu=tanh") == "tanh"  # the user may say otherwise
    pretrained = ("--pretrained_dir", str(reference))
    assert trained_gelu(tmp_path, subset, "ref", *pretrained) == ("exact", "exact")

    assert loaded_gelu(OLD / "old_checkpoint.bin") == loaded_gelu(OLD / "old_last.pt") == "exact"
    older = ("--pretrained_dir", str(OLD / "old_checkpoint.bin"))
    assert trained_gelu(tmp_path, subset, "old-bin", *older) == ("exact", "exact")

    (tmp_path / "out").mkdir(exist_ok=True)
    shutil.copy(OLD / "old_last.pt", tmp_path / "out" / "old_last.pt")
    resumed = ("--pretrained_dir", "none", "--resume", "auto", "--num_steps", "4")
    assert trained_gelu(tmp_path, subset, "old", *resumed)[0] == "exact"


def test_with_gelu_adds_the_learned_one_unless_chosen() -> None:
    assert with_gelu(["hidden_size=8"], "exact") == ["hidden_size=8", "gelu=exact"]
    assert with_gelu(["gelu=tanh"], "exact") == ["gelu=tanh"]
    assert with_gelu([], "tanh") == with_gelu([], None) == []  # the default needs no flag


def test_learned_gelu_reads_what_each_version_recorded() -> None:
    assert learned_gelu({}) == "exact"  # the reference's .bin
    assert learned_gelu({"args": {"config": []}, "config": {"hidden_size": 16}}) == "exact"
    assert learned_gelu({"args": {"config": ["gelu=tanh"]}}) == "tanh"  # a .json before "config"
    assert learned_gelu({"args": {"config": []}, "config": {"gelu": "tanh"}}) == "tanh"
