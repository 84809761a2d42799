"""MLP-Mixer: timm's logits from Google's layout, the .npz round trip, configs, GELU, image size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GELUTanh

from models.configs import CONFIGS, ConfigOverrideError, apply_overrides, check_config
from models.families import make_model, resolution_problem
from models.mixer import MlpMixer
from models.modeling import Mlp, VisionTransformer
from models.npz_io import CheckpointError, npz_problem

# A Mixer small enough for the CPU: 49 patches of 32 px at 224 px, width 16, one block.
TINY = ["hidden_dim=16", "num_blocks=2", "tokens_mlp_dim=8", "channels_mlp_dim=24"]


def tiny(**kwargs) -> MlpMixer:
    config = apply_overrides(CONFIGS["Mixer-S_32"], [*TINY, *kwargs.pop("overrides", [])])
    return MlpMixer(config, img_size=224, **kwargs)


def google_to_timm(num_blocks: int) -> dict[str, tuple[str, str]]:
    """Google's Mixer key -> (timm's parameter, axis change), written from the two sources
    (``vit_jax/models_mixer.py``, timm's ``mlp_mixer.py``), not from our loader."""
    table = {
        "stem/kernel": ("stem.proj.weight", "conv"),
        "stem/bias": ("stem.proj.bias", ""),
        "pre_head_layer_norm/scale": ("norm.weight", ""),
        "pre_head_layer_norm/bias": ("norm.bias", ""),
        "head/kernel": ("head.weight", "dense"),
        "head/bias": ("head.bias", ""),
    }
    for i in range(num_blocks):
        g, t = f"MixerBlock_{i}/", f"blocks.{i}."
        for flax, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            table[f"{g}{flax}/scale"] = (f"{t}{ours}.weight", "")
            table[f"{g}{flax}/bias"] = (f"{t}{ours}.bias", "")
        for flax, ours in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
            for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                table[f"{g}{flax}/{dense}/kernel"] = (f"{t}{ours}.{fc}.weight", "dense")
                table[f"{g}{flax}/{dense}/bias"] = (f"{t}{ours}.{fc}.bias", "")
    return table


def timm_to_google(model: torch.nn.Module) -> dict[str, np.ndarray]:
    state = model.state_dict()
    out = {}
    for key, (name, kind) in google_to_timm(len(model.blocks)).items():
        a = state[name].numpy()
        out[key] = a.transpose(2, 3, 1, 0) if kind == "conv" else a.T if kind == "dense" else a
    return out


def google_to_timm_state(weights: dict[str, np.ndarray], num_blocks: int) -> dict:
    state = {}
    for key, (name, kind) in google_to_timm(num_blocks).items():
        a = np.asarray(weights[key])
        a = a.transpose(3, 2, 0, 1) if kind == "conv" else a.T if kind == "dense" else a
        state[name] = torch.from_numpy(np.ascontiguousarray(a))
    return state


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norms, biases and head, as a trained checkpoint has."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            if name.startswith("head."):
                p.normal_(0, 0.02)
    return model.eval()


def test_b16_logits_equal_timms_from_googles_layout() -> None:
    torch.manual_seed(0)
    reference = randomise(
        timm.create_model("mixer_b16_224", pretrained=False, num_classes=10, act_layer=GELUTanh)
    )
    model = MlpMixer(CONFIGS["Mixer-B_16"], img_size=224, num_classes=10).eval()
    model.load_from(timm_to_google(reference))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, attn = model(x)
        expected = reference(x)
    assert attn == [] and logits.abs().max() > 0.1
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_export_then_load_is_exact_and_timm_reads_the_export(tmp_path: Path) -> None:
    model = randomise(tiny(num_classes=5))
    model.export_npz(str(tmp_path / "m.npz"))
    weights = np.load(tmp_path / "m.npz")
    assert weights["stem/kernel"].shape == (32, 32, 3, 16)
    assert weights["MixerBlock_1/token_mixing/Dense_0/kernel"].shape == (49, 8)
    assert weights["MixerBlock_1/channel_mixing/Dense_1/kernel"].shape == (24, 16)
    assert npz_problem(tmp_path / "m.npz", thorough=True) is None  # a download of it is kept
    loaded = tiny(num_classes=5).eval()
    loaded.load_from(weights)
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    reference = timm.models.mlp_mixer.MlpMixer(
        num_classes=5,
        patch_size=32,
        num_blocks=2,
        embed_dim=16,
        mlp_ratio=(0.5, 1.5),
        act_layer=GELUTanh,
    ).eval()
    reference.load_state_dict(google_to_timm_state(weights, 2))
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], reference(x), atol=1e-5, rtol=1e-5)


def test_a_head_of_another_class_count_needs_zero_head(tmp_path: Path) -> None:
    randomise(tiny(num_classes=5)).export_npz(str(tmp_path / "m.npz"))
    weights = np.load(tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match=r"head/kernel .* use zero_head=True"):
        tiny(num_classes=3).load_from(weights)
    model = tiny(num_classes=3, zero_head=True)
    model.load_from(weights)
    assert not model.head.weight.any() and not model.head.bias.any()
    stem = torch.from_numpy(weights["stem/kernel"].transpose(3, 2, 0, 1).copy())
    assert torch.equal(model.stem.weight.detach(), stem)
    # a ViT checkpoint, or one of another width, is refused with the model's sizes
    vit = VisionTransformer(CONFIGS["testing"], img_size=32, num_classes=3)
    vit.export_npz(str(tmp_path / "vit.npz"))
    with pytest.raises(CheckpointError, match=r"does not fit the model \(Mixer, hidden size 16"):
        tiny(num_classes=3).load_from(np.load(tmp_path / "vit.npz"))


def test_forward_loss_gradients_and_checkpointing() -> None:
    torch.manual_seed(0)
    model = randomise(tiny(num_classes=4))
    x, labels = torch.randn(2, 3, 224, 224), torch.tensor([0, 3])
    logits, attn = model(x)
    loss = model(x, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in plain.values())
    model.zero_grad()
    assert model.checkpointed_block_input() is None
    model.set_grad_checkpointing(True)
    block, shape = model.checkpointed_block_input()
    assert block is model.blocks[0] and shape == (49, 16)
    model(x, labels).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def test_googles_initialisation() -> None:
    """lecun_normal kernels (std sqrt(1 / fan_in), truncated at 2 std), zero biases and head."""
    torch.manual_seed(0)
    model = MlpMixer(CONFIGS["Mixer-S_32"], img_size=224, num_classes=10)
    w = model.blocks[0].channel_mixing.fc1.weight  # (2048, 512)
    std = (1 / 512) ** 0.5
    assert abs(w.std().item() / std - 1) < 0.01 and w.abs().max() <= 2 * std / 0.8796 + 1e-6
    assert not model.blocks[0].token_mixing.fc2.bias.any()
    assert not model.head.weight.any() and not model.head.bias.any()


def test_configs_follow_the_paper_and_make_model_picks_the_family() -> None:
    sizes = {
        name: (c.hidden_dim, c.num_blocks, c.tokens_mlp_dim, c.channels_mlp_dim, c.patches.size[0])
        for name, c in CONFIGS.items()
        if name.startswith("Mixer")
    }
    assert sizes == {
        "Mixer-S_32": (512, 8, 256, 2048, 32),
        "Mixer-S_16": (512, 8, 256, 2048, 16),
        "Mixer-B_32": (768, 12, 384, 3072, 32),
        "Mixer-B_16": (768, 12, 384, 3072, 16),
        "Mixer-L_16": (1024, 24, 512, 4096, 16),
    }
    names = list(CONFIGS)
    assert names[names.index("testing") + 1 :] == list(sizes)  # after the ViTs, in paper order
    with torch.device("meta"):
        mixer = make_model(CONFIGS["Mixer-B_16"], 224, 1000)
        vit = make_model(CONFIGS["ViT-B_16"], 224, 10, zero_head=True)
    assert isinstance(mixer, MlpMixer) and isinstance(vit, VisionTransformer) and vit.zero_head
    assert round(sum(p.numel() for p in mixer.parameters()) / 1e6, 2) == 59.88  # timm: 59.88M


def test_check_config_refuses_a_mixer_that_builds_no_model() -> None:
    for config in CONFIGS.values():
        check_config(config)
    for item, message in [
        ("tokens_mlp_dim=0", "tokens_mlp_dim=0: must be a positive integer"),
        ("channels_mlp_dim=-1", "channels_mlp_dim=-1: must be a positive integer"),
        ("img_size=200", "img_size 200 is not a multiple of the 16-pixel patch"),
        ("gelu=erf", "gelu=erf: must be one of: tanh, exact"),
    ]:
        with pytest.raises(ConfigOverrideError, match=message):
            apply_overrides(CONFIGS["Mixer-B_16"], [item])


def test_a_mixer_runs_only_at_its_resolution() -> None:
    config = CONFIGS["Mixer-B_16"]
    assert resolution_problem(config, 224) is None
    assert resolution_problem(config, 192) == (
        "--img_size 192: a Mixer's token-mixing weights are tied to the 196 patches of a "
        "224 px image; use --img_size 224"
    )
    assert resolution_problem(CONFIGS["ViT-B_16"], 200).startswith("--img_size 200 is not a")
    assert resolution_problem(CONFIGS["ViT-B_16"], 192) is None


def test_config_gelu_tanh_is_flaxs_approximation() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16) * 3
    for name, kind in (("exact", "none"), ("tanh", "tanh")):
        config = apply_overrides(CONFIGS["testing"], [f"gelu={name}"])
        mlp = Mlp(config).eval()
        with torch.no_grad():
            expected = mlp.fc2(F.gelu(mlp.fc1(x), approximate=kind))
            assert torch.equal(mlp(x), expected), name
        mixer = tiny(overrides=[f"gelu={name}"]).blocks[0].channel_mixing
        with torch.no_grad():
            expected = mixer.fc2(F.gelu(mixer.fc1(x), approximate=kind))
            assert torch.equal(mixer(x), expected), name
    assert {config.gelu for config in CONFIGS.values()} == {"tanh"}  # Google's
    with torch.no_grad():
        assert not torch.equal(F.gelu(x), F.gelu(x, approximate="tanh"))
