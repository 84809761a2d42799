"""Gradient checkpointing: the same loss and gradients as storing everything, for less memory."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

from models.configs import CONFIGS, apply_overrides
from models.modeling import VisionTransformer
from utils.training.memory import activation_bytes

DROPOUT = ["transformer.dropout_rate=0.1", "transformer.attention_dropout_rate=0.1"]


def loss_and_gradients(
    model: VisionTransformer,
    x: torch.Tensor,
    labels: torch.Tensor,
    seed: int = 0,
    forward: Callable | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Loss, every parameter's gradient and the attention weights of one step of ``forward``
    (the model, or it compiled)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    logits, attn_weights = (model if forward is None else forward)(x)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, [w.detach() for w in attn_weights]


@contextlib.contextmanager
def saved_bytes(model: torch.nn.Module) -> Iterator[dict[int, int]]:
    """Storage address -> bytes of every tensor autograd saves inside, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


@pytest.mark.parametrize(
    "name, img_size, vis",
    [("testing", 16, False), ("testing", 16, True), ("R+ViT-Ti_16", 64, False)],
)
def test_loss_and_gradients_equal_the_stored_run(name: str, img_size: int, vis: bool) -> None:
    """In float64, with dropout in the embeddings, attention and MLP, the recomputed blocks
    draw the same masks, so nothing differs but rounding. The hybrid's ResNet stem stays
    stored; ``vis`` keeps the attention weights."""
    config = apply_overrides(CONFIGS[name], ["transformer.num_layers=3", *DROPOUT])
    torch.manual_seed(0)
    model = VisionTransformer(config, img_size=img_size, num_classes=5, vis=vis).double()
    x = torch.randn(4, 3, img_size, img_size, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 1])

    stored = loss_and_gradients(model, x, labels)
    other_masks = loss_and_gradients(model, x, labels, seed=1)
    model.set_grad_checkpointing(True)
    recomputed = loss_and_gradients(model, x, labels)

    assert not torch.isclose(other_masks[0], stored[0], rtol=0, atol=1e-6)  # dropout is on
    torch.testing.assert_close(recomputed[0], stored[0], rtol=0, atol=1e-12)
    assert stored[1].keys() == recomputed[1].keys()
    for n, grad in stored[1].items():
        assert grad.abs().sum() > 0, n  # every parameter takes part
        torch.testing.assert_close(recomputed[1][n], grad, rtol=1e-10, atol=1e-12, msg=n)
    assert len(recomputed[2]) == (3 if vis else 0)
    for a, b in zip(recomputed[2], stored[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_evaluation_without_grad_does_not_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad there is no backward pass to recompute for: the blocks run as usual."""
    model = VisionTransformer(CONFIGS["testing"], img_size=16, num_classes=5).eval()
    model.set_grad_checkpointing(True)
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(args[0])
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr("models.modeling.checkpoint", counted)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert calls == []
    model(torch.randn(2, 3, 16, 16))
    assert calls == list(model.transformer.encoder.layer)


def test_vit_b16_keeps_a_third_or_less_per_image() -> None:
    """ViT-B/16 at 224 px in float32 on the CPU. With checkpointing autograd keeps each
    block's input and the embedding dropout's mask (float32 here), B x 197 x 768 x 4 bytes
    each, and the image that the patch convolution reads; the backward pass rebuilds one block
    at a time on top, whose count is a two-layer model's minus a one-layer one's."""
    cpu, fp32 = torch.device("cpu"), contextlib.nullcontext

    def vit_b16(layers: int) -> VisionTransformer:
        config = apply_overrides(CONFIGS["ViT-B_16"], [f"transformer.num_layers={layers}"])
        return VisionTransformer(config, img_size=224, num_classes=10)

    model = vit_b16(12)
    stored = activation_bytes(model, 224, cpu, fp32)[0]
    model.set_grad_checkpointing(True)
    recomputed = activation_bytes(model, 224, cpu, fp32)[0]
    one_block = activation_bytes(vit_b16(2), 224, cpu, fp32)[0]
    one_block -= activation_bytes(vit_b16(1), 224, cpu, fp32)[0]
    kept = (12 + 1) * 197 * 768 * 4 + 3 * 224 * 224 * 4
    head = 2 * 768 * 4 + 2 * 4  # the class token into the final LayerNorm (and its statistics)
    assert recomputed == kept + head + one_block
    assert recomputed <= stored / 3


def test_compiled_checkpointed_model_matches_eager() -> None:
    """torch.compile traces the checkpointed blocks into one graph (inductor: half a minute here
    on a cold cache), its gradients are eager's, and it too keeps under a third of what the
    stored run keeps. Dropout is off: compiled code draws other random numbers."""
    config = apply_overrides(CONFIGS["testing"], ["transformer.dropout_rate=0"])
    torch.manual_seed(0)
    model = VisionTransformer(config, img_size=16, num_classes=5)
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 4, 2, 1])
    with saved_bytes(model) as stored:
        loss_and_gradients(model, x, labels)
    model.set_grad_checkpointing(True)
    eager = loss_and_gradients(model, x, labels)
    torch._dynamo.reset()
    with saved_bytes(model) as kept:
        forward = torch.compile(model, fullgraph=True)
        compiled = loss_and_gradients(model, x, labels, forward=forward)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for n, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][n], grad, rtol=1e-5, atol=1e-5, msg=n)
    assert 0 < sum(kept.values()) <= sum(stored.values()) / 3
