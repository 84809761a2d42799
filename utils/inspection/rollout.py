"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", §3).

Each layer's attention, averaged over heads, is mixed with the identity for the residual connection
(``A = 0.5 W + 0.5 I``, rows renormalised), and the layers are chained by matrix product, the last
layer on the left: ``rollout = A_L ... A_2 A_1``. The class token's row of the product says how
much of each input patch reaches the classifier. ``overlay_heatmap`` draws it over the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.modeling import VisionTransformer


def attention_rollout(attn_weights: list[torch.Tensor], discard_ratio: float = 0.0) -> torch.Tensor:
    """Roll attention out through all layers; returns the class token's row over patches (B, N-1).

    ``attn_weights``: one (B, heads, N, N) tensor per layer, token 0 the class token, as
    ``VisionTransformer(..., vis=True)`` returns them. ``discard_ratio`` zeroes, in each row of each
    head-averaged layer, that fraction of the weakest attention to patches (never the class token)
    before the identity is added: a common way to sharpen the map (0 = the paper's rollout).
    """
    if not attn_weights:
        raise ValueError("no attention weights: build the model with vis=True")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    B, _, N, _ = attn_weights[0].shape
    eye = torch.eye(N, dtype=torch.float64, device=attn_weights[0].device)
    rollout = eye.expand(B, N, N)
    drop = int(discard_ratio * (N - 1))
    for weights in attn_weights:
        a = weights.double().mean(dim=1)  # (B, N, N): heads averaged
        if drop:
            patches = a[..., 1:]  # (B, N, N - 1): attention to patch tokens
            weakest = patches.topk(drop, dim=-1, largest=False).indices
            a = torch.cat((a[..., :1], patches.scatter(-1, weakest, 0.0)), dim=-1)
        a = a + eye  # the residual path
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout  # this layer after the ones below it
    return rollout[:, 0, 1:].float()  # (B, N - 1)


@torch.no_grad()
def rollout_masks(
    model: VisionTransformer, images: torch.Tensor, discard_ratio: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, classes), rollout masks (B, gh, gw)) of a ``vis=True`` model on ``images``."""
    logits, attn_weights = model(images)
    gh, gw = model.transformer.embeddings.grid_size
    mask = attention_rollout(attn_weights, discard_ratio)  # (B, gh * gw)
    return logits, mask.reshape(-1, gh, gw)


def jet(values: np.ndarray) -> np.ndarray:
    """The classic "jet" colour map (blue, cyan, yellow, red) of values in [0, 1], uint8 RGB."""
    x = np.clip(values, 0.0, 1.0)[..., None] * 4.0
    rgb = np.clip(1.5 - np.abs(x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)  # (..., 3)
    return np.round(rgb * 255).astype(np.uint8)


def overlay_heatmap(
    image: Image.Image, mask: torch.Tensor | np.ndarray, alpha: float = 0.5
) -> Image.Image:
    """``mask`` (gh, gw) scaled to [0, 1], upsampled to the image's own size and blended over it
    in the jet colours, at opacity ``alpha`` where attention peaks and about a third of it where
    attention is least.

    The model saw the image squashed to a square, so stretching the token grid back to the
    original width and height puts every cell over the pixels it came from.
    """
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    low, high = mask.min(), mask.max()
    mask = (mask - low) / (high - low) if high > low else torch.zeros_like(mask)
    width, height = image.size
    upsampled = F.interpolate(mask[None, None], size=(height, width), mode="bilinear")
    mask = upsampled[0, 0].clamp(0, 1).numpy()[..., None]  # (H, W, 1)
    heat = jet(mask[..., 0]).astype(np.float32)  # (H, W, 3)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    # Where attention is weak the colour is faint, so the image stays readable under it.
    opacity = alpha * (0.35 + 0.65 * mask)
    blended = (1.0 - opacity) * pixels + opacity * heat
    return Image.fromarray(np.round(blended).astype(np.uint8))
