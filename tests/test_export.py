"""export.py: our checkpoints back into Google's .npz layout, read by load_from and by timm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.configs import CONFIGS, apply_overrides
from models.modeling import VisionTransformer
from models.resize import load_resized
from tests.test_npz_io import randomise
from tests.test_train import SMALL_CONFIG, run_cli


def save_like_train(
    model: VisionTransformer, path: Path, model_type: str, config: list[str]
) -> Path:
    """A ``<name>_checkpoint.bin`` and its ``.json``, as train.py writes them."""
    torch.save(model.state_dict(), path)
    meta = {"model_type": model_type, "config": config, "img_size": model.img_size}
    meta |= {"dataset": "cifar10"}
    classes = [f"class{i}" for i in range(model.num_classes)]
    record = {"args": meta, "config": model.config.to_dict(), "classes": classes}
    path.with_suffix(".json").write_text(json.dumps(record))
    return path


def test_export_then_load_reproduces_the_logits(tmp_path: Path) -> None:
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    model = randomise(VisionTransformer(config, img_size=32, num_classes=10))
    ckpt = save_like_train(model, tmp_path / "m_checkpoint.bin", "testing", SMALL_CONFIG)
    result = run_cli(tmp_path, "--checkpoint", str(ckpt), "--output", str(tmp_path / "m.npz"),
                     script="export.py")  # fmt: skip
    assert result.returncode == 0, result.stderr
    again = VisionTransformer(config, img_size=32, num_classes=10).eval()
    again.load_from(np.load(tmp_path / "m.npz"))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(again(x)[0], model(x)[0])

    # At another resolution the position embedding is resized on the way out.
    result = run_cli(tmp_path, "--checkpoint", str(ckpt), "--output", str(tmp_path / "m48.npz"),
                     "--img_size", "48", script="export.py")  # fmt: skip
    assert result.returncode == 0, result.stderr
    exported = VisionTransformer(config, img_size=48, num_classes=10).eval()
    exported.load_from(np.load(tmp_path / "m48.npz"))
    direct = VisionTransformer(config, img_size=48, num_classes=10).eval()
    load_resized(direct, torch.load(ckpt, weights_only=True))
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(exported(x)[0], direct(x)[0])


def test_timm_reads_an_exported_b16(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import GELUTanh
    from timm.models.vision_transformer import _load_weights

    model = randomise(VisionTransformer(CONFIGS["ViT-B_16"], img_size=224, num_classes=10))
    ckpt = save_like_train(model, tmp_path / "b16_checkpoint.bin", "ViT-B_16", [])
    result = run_cli(tmp_path, "--checkpoint", str(ckpt), "--output", str(tmp_path / "b16.npz"),
                     script="export.py")  # fmt: skip
    assert result.returncode == 0, result.stderr
    theirs = timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=10, act_layer=GELUTanh
    ).eval()
    _load_weights(theirs, str(tmp_path / "b16.npz"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x)[0], atol=1e-4, rtol=0)


def test_export_errors_are_one_line(tmp_path: Path) -> None:
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    model = VisionTransformer(config, img_size=32, num_classes=10)
    ckpt = save_like_train(model, tmp_path / "m_checkpoint.bin", "testing", SMALL_CONFIG)
    for args, message in [
        (["--checkpoint", str(ckpt), "--output", str(tmp_path / "m.txt")], "should end in .npz"),
        (["--checkpoint", str(tmp_path / "none.bin"), "--output", str(tmp_path / "m.npz")],
         "no such file"),
    ]:  # fmt: skip
        result = run_cli(tmp_path, *args, script="export.py")
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
