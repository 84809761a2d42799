"""The model family: shapes, parameter counts, reference names, fused attention, overrides."""

from __future__ import annotations

import pytest
import torch

from models.configs import CONFIGS, ConfigOverrideError, apply_overrides, is_mixer
from models.families import make_model
from models.modeling import VisionTransformer

SMALL_SIZES = {"ViT-H_14": 28, "testing": 16}  # every other ViT config runs at 32 px
VITS = sorted(name for name, config in CONFIGS.items() if not is_mixer(config))
MIXERS = sorted(name for name, config in CONFIGS.items() if is_mixer(config))


def small(name: str, **kwargs) -> VisionTransformer:
    config = apply_overrides(CONFIGS[name], ["transformer.num_layers=1"])
    return VisionTransformer(config, img_size=SMALL_SIZES.get(name, 32), **kwargs)


@pytest.mark.parametrize("name", VITS)
def test_forward_shapes_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    model = small(name, num_classes=7, vis=True).eval()  # no dropout: loss == cross-entropy
    size = SMALL_SIZES.get(name, 32)
    x, labels = torch.randn(2, 3, size, size), torch.tensor([1, 6])
    logits, attn = model(x)
    tokens = model.transformer.embeddings.position_embeddings.shape[1]
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert len(attn) == 1
    assert attn[0].shape == (2, model.config.transformer.num_heads, tokens, tokens)
    torch.testing.assert_close(attn[0].sum(-1), torch.ones(attn[0].shape[:-1]))
    loss = model(x, labels)
    assert loss.shape == () and torch.isclose(
        loss, torch.nn.functional.cross_entropy(logits, labels)
    )
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_forward_shapes_and_gradients(name: str) -> None:
    """One block of each Mixer width, at the 224 px its token mixing is sized for."""
    torch.manual_seed(0)
    config = apply_overrides(CONFIGS[name], ["num_blocks=1"])
    model = make_model(config, 224, num_classes=7, vis=True).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # Google's zero head would pass no gradient back
    x, labels = torch.randn(2, 3, 224, 224), torch.tensor([1, 6])
    logits, attn = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all() and attn == []
    loss = model(x, labels)
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(logits, labels))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(
    "name, millions",
    [
        ("ViT-B_16", 85.81),
        ("ViT-B_32", 87.46),
        ("ViT-L_16", 303.31),
        ("ViT-L_32", 305.52),
        ("ViT-H_14", 630.78),
        ("R50-ViT-B_16", 97.90),
    ],
)
def test_parameter_counts(name: str, millions: float) -> None:
    with torch.device("meta"):
        model = VisionTransformer(CONFIGS[name], img_size=224, num_classes=10)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


def test_sizes_follow_the_paper() -> None:
    expected = {
        "Ti": (192, 768, 3, 12),
        "S": (384, 1536, 6, 12),
        "B": (768, 3072, 12, 12),
        "L": (1024, 4096, 16, 24),
        "H": (1280, 5120, 16, 32),
    }
    for name, config in CONFIGS.items():
        if name == "testing" or is_mixer(config):  # Mixers: tests/test_mixer.py
            continue
        width = name.split("-")[-1].split("_")[0]
        t = config.transformer
        assert (config.hidden_size, t.mlp_dim, t.num_heads, t.num_layers) == expected[width]
        assert (t.dropout_rate, t.attention_dropout_rate, config.classifier) == (0.1, 0.0, "token")
    assert CONFIGS["ViT-H_14"].patches.size == (14, 14)
    assert CONFIGS["R50-ViT-B_16"].patches.size == (1, 1)
    assert tuple(CONFIGS["R50-ViT-B_16"].resnet.num_layers) == (3, 4, 9)


def test_parameter_names_are_the_reference_implementations() -> None:
    """The names its train.py writes into ``*_checkpoint.bin`` (read off its modeling.py)."""
    names = set(small("R50-ViT-B_16", num_classes=10).state_dict())
    per_layer = [
        "attention_norm.weight", "attention_norm.bias", "ffn_norm.weight", "ffn_norm.bias",
        "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
        "attn.query.weight", "attn.query.bias", "attn.key.weight", "attn.key.bias",
        "attn.value.weight", "attn.value.bias", "attn.out.weight", "attn.out.bias",
    ]  # fmt: skip
    expected = {f"transformer.encoder.layer.0.{n}" for n in per_layer} | {
        "transformer.embeddings.position_embeddings",
        "transformer.embeddings.cls_token",
        "transformer.embeddings.patch_embeddings.weight",
        "transformer.embeddings.patch_embeddings.bias",
        "transformer.encoder.encoder_norm.weight",
        "transformer.encoder.encoder_norm.bias",
        "head.weight",
        "head.bias",
        "transformer.embeddings.hybrid_model.root.conv.weight",
        "transformer.embeddings.hybrid_model.root.gn.weight",
        "transformer.embeddings.hybrid_model.body.block1.unit1.downsample.weight",
        "transformer.embeddings.hybrid_model.body.block1.unit1.gn_proj.bias",
        "transformer.embeddings.hybrid_model.body.block3.unit9.conv3.weight",
        "transformer.embeddings.hybrid_model.body.block3.unit9.gn3.weight",
    }
    assert expected <= names
    assert not any("hybrid_model" not in n and n not in expected for n in names)


def test_fused_attention_equals_explicit_softmax() -> None:
    torch.manual_seed(0)
    fused = VisionTransformer(CONFIGS["ViT-B_16"], img_size=64, num_classes=10).eval()
    explicit = VisionTransformer(CONFIGS["ViT-B_16"], img_size=64, num_classes=10, vis=True).eval()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (a, none), (b, weights) = fused(x), explicit(x)
    assert none == [] and len(weights) == 12
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ViT-B_16", "R26+ViT-S_32"])
def test_class_token_only_last_block_equals_the_full_pass(name: str) -> None:
    """The classifier's shortcut (last block on the class token alone) changes no value or
    gradient: compared in float64 with the head applied to the full encoder output."""
    torch.manual_seed(0)
    config = apply_overrides(CONFIGS[name], ["transformer.num_layers=2"])
    model = VisionTransformer(config, img_size=64, num_classes=5).double().eval()
    with torch.no_grad():
        model.head.weight.normal_()  # a zero-initialised head would pass no gradient back
    x, labels = torch.randn(3, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 4, 2])

    def gradients(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    shortcut = model(x)[0]
    full = model.head(model.transformer(x)[0][:, 0])
    assert model.transformer(x, cls_only=True)[0].shape == (3, 1, config.hidden_size)
    torch.testing.assert_close(shortcut, full, rtol=1e-12, atol=1e-12)
    fast = gradients(torch.nn.functional.cross_entropy(shortcut, labels))
    slow = gradients(torch.nn.functional.cross_entropy(full, labels))
    for n in slow:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-10, atol=1e-12, msg=n)
    assert slow["transformer.encoder.layer.1.attn.key.weight"].abs().sum() > 0


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = small("testing", num_classes=3)
    x = torch.randn(4, 3, 16, 16)
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_overrides_are_type_checked_and_copy() -> None:
    base = CONFIGS["ViT-B_16"]
    config = apply_overrides(
        base, ["hidden_size=192", "transformer.num_layers=4", "patches.size=4,4"]
    )
    assert (config.hidden_size, config.transformer.num_layers) == (192, 4)
    assert config.patches.size == (4, 4) and base.hidden_size == 768
    assert apply_overrides(base, ["transformer.dropout_rate=0"]).transformer.dropout_rate == 0.0
    assert apply_overrides(base, ["representation_size=768"]).representation_size == 768
    for bad, word in [
        ("hiden_size=3", "hiden_size"),
        ("transformer.layers=3", "transformer.layers"),
        ("hidden_size=1.5", "hidden_size"),
        ("hidden_size", "KEY=VALUE"),
        ("patches.size=4", "patches.size"),
        ("transformer=2", "transformer"),
    ]:
        with pytest.raises(ConfigOverrideError, match=word):
            apply_overrides(base, [bad])
