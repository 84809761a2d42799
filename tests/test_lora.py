"""LoRA adapters (models/lora.py): a no-op at first, merged weights that compute what the adapters
do, gradients only where they belong, in the fused attention path and the plain one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UsageError
from models.families import build_model
from models.lora import LORA_TARGETS, LoRALinear, add_lora, is_lora, merged_state_dict
from tests.test_inspect import R50_CONFIG
from tests.test_train import SMALL_CONFIG

NO_DROPOUT = [*SMALL_CONFIG, "transformer.dropout_rate=0"]


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("testing", NO_DROPOUT, 32, 10).eval()


def hybrid(seed: int = 0) -> nn.Module:
    """One bottleneck unit per ResNet stage: a 2x2 feature map at 32 px, about a second a pass."""
    torch.manual_seed(seed)
    return build_model("R50-ViT-B_16", [*R50_CONFIG, "transformer.dropout_rate=0"], 32, 10).eval()


def mixer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    overrides = ["img_size=32", "patches.size=8,8", "hidden_dim=32", "num_blocks=2"]
    overrides += ["tokens_mlp_dim=16", "channels_mlp_dim=64"]
    model = build_model("Mixer-B_16", overrides, 32, 10).eval()
    nn.init.normal_(model.head.weight, std=0.1)  # a Mixer's head starts at zero
    return model


def randomise_adapters(model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)


def gradients(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one backward pass of the loss; None where none came."""
    model.zero_grad(set_to_none=True)
    model(x, labels).backward()
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize(
    "build, targets, count",
    [
        (vit, "attn", 8),
        (vit, "mlp", 4),
        (vit, "attn+mlp", 12),
        (hybrid, "attn+mlp", 12),
        (mixer, "mlp", 8),
    ],
    ids=["vit-attn", "vit-mlp", "vit-both", "hybrid-both", "mixer-mlp"],
)
def test_adapters_start_as_a_no_op_and_merge_into_the_plain_format(build, targets, count) -> None:
    x = torch.randn(2, 3, 32, 32)
    plain = build()
    before = plain(x)[0]
    adapted = build()
    assert add_lora(adapted, 4, 8.0, targets) == count
    assert torch.equal(adapted(x)[0], before)  # B = 0: bit for bit the model it was
    randomise_adapters(adapted)
    merged = merged_state_dict(adapted)
    assert list(merged) == list(plain.state_dict())  # the same keys, in the same order
    assert not any(t.requires_grad for t in merged.values())
    plain.load_state_dict(merged)
    after = adapted(x)[0]
    torch.testing.assert_close(plain(x)[0], after, atol=1e-5, rtol=0)
    assert not torch.allclose(after, before)  # the adapters did change it


def test_the_fused_attention_adds_each_adapter_to_its_own_projection() -> None:
    model = vit()
    add_lora(model, 2, 4.0, "attn")
    randomise_adapters(model)
    attention = model.transformer.encoder.layer[0].attn
    h = torch.randn(2, 65, 64)
    qkv = (attention.query, attention.key, attention.value)
    fused = attention._project(h, *qkv)
    each = [attention._project(h, linear) for linear in qkv]  # each LoRALinear called alone
    torch.testing.assert_close(fused, torch.cat(each), atol=1e-6, rtol=1e-5)
    # an adapter on some of the fused layers only: each slice still gets its own
    attention.key = nn.Linear(64, 64)
    fused = attention._project(h, *qkv[:1], attention.key, *qkv[2:])
    each[1] = attention._project(h, attention.key)
    torch.testing.assert_close(fused, torch.cat(each), atol=1e-6, rtol=1e-5)


def test_a_plain_attention_projects_as_it_did_before_adapters_existed() -> None:
    attention = vit().transformer.encoder.layer[0].attn
    h = torch.randn(2, 65, 64)
    qkv = (attention.query, attention.key, attention.value)
    fused = attention._project(h, *qkv)
    # the projection as it was written before models/lora.py: one product, bit for bit
    weight, bias = torch.cat([q.weight for q in qkv]), torch.cat([q.bias for q in qkv])
    before = F.linear(h, weight, bias).view(2, 65, 3, 4, 16).permute(2, 0, 3, 1, 4)
    assert torch.equal(fused, before)
    each = torch.stack([linear(h).view(2, 65, 4, 16).transpose(1, 2) for linear in qkv])
    torch.testing.assert_close(fused, each, atol=1e-6, rtol=0)


def test_gradients_reach_the_adapters_and_not_the_frozen_weights() -> None:
    model = vit().train()
    add_lora(model, 2, 4.0, "attn")
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora(name))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    grads = gradients(model, x, y)
    assert all(grads[n] is None for n in grads if not is_lora(n))
    # B = 0: A's gradient is zero (it flows through B), B's is not
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith("lora_B"))
    assert all(grads[n].abs().sum() == 0 for n in grads if n.endswith("lora_A"))
    randomise_adapters(model)
    grads = gradients(model, x, y)
    assert all(grads[n].abs().sum() > 0 for n in grads if is_lora(n))
    assert all(grads[n] is None for n in grads if not is_lora(n))


@pytest.mark.parametrize(
    "build, targets", [(vit, "attn+mlp"), (mixer, "mlp")], ids=["vit", "mixer"]
)
def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(
    build: Callable[[], nn.Module], targets: str
) -> None:
    model = build().train()
    add_lora(model, 2, 4.0, targets)
    randomise_adapters(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    stored = gradients(model, x, y)
    model.set_grad_checkpointing(True)
    recomputed = gradients(model, x, y)
    assert stored.keys() == recomputed.keys()
    for name in stored:
        torch.testing.assert_close(recomputed[name], stored[name], atol=1e-6, rtol=1e-5)


def test_an_adapter_keeps_the_layers_parameters_and_names() -> None:
    linear = nn.Linear(6, 4, dtype=torch.float64)
    adapted = LoRALinear(linear, 2, 2.0)
    assert adapted.weight is linear.weight and adapted.bias is linear.bias
    assert sorted(adapted.state_dict()) == ["bias", "lora_A", "lora_B", "weight"]
    assert adapted.lora_A.dtype == adapted.lora_B.dtype == torch.float64
    assert adapted.scaling == 1.0 and not adapted.lora_B.any() and adapted.lora_A.any()
    assert torch.equal(adapted.merged_weight(), linear.weight)
    assert is_lora("a.b.lora_A") and is_lora("lora_B") and not is_lora("a.lora_Ax")


@pytest.mark.parametrize(
    "build, rank, alpha, targets, message",
    [
        (vit, 0, 1.0, "attn", "--lora_rank must be at least 1, got 0"),
        (vit, 65, 1.0, "attn", "--lora_rank 65 exceeds the 64 features .* --lora_rank 64 or less"),
        (vit, 4, 0.0, "attn", "--lora_alpha must be positive"),
        (vit, 4, 1.0, "ffn", "--lora_targets 'ffn' is none of attn, mlp, attn\\+mlp"),
        (mixer, 4, 1.0, "attn", "a Mixer has no attention: pass --lora_targets mlp"),
        (mixer, 4, 1.0, "attn+mlp", "a Mixer has no attention: pass --lora_targets mlp"),
        (mixer, 17, 1.0, "mlp", "--lora_rank 17 exceeds the 16 features"),  # (32 / 8)^2 tokens
    ],
)
def test_nonsense_is_a_one_line_usage_error(build, rank, alpha, targets, message) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        add_lora(build(), rank, alpha, targets)
    assert "\n" not in str(caught.value)


def test_adapters_go_on_once() -> None:
    model = vit()
    add_lora(model, 2, 4.0, LORA_TARGETS[0])
    with pytest.raises(UsageError, match="adapters already"):
        add_lora(model, 2, 4.0, "mlp")
