"""MLP-Mixer (Tolstikhin et al. 2021) in the order of the paper, with VisionTransformer's interface.

Patches are embedded by a strided convolution (the "stem"); each block then mixes information
across patches with an MLP applied to every channel (token mixing) and across channels with an
MLP applied to every patch (channel mixing); the classifier reads the mean over patches. There is
no class token, no position embedding, no attention and no dropout::

    model = MlpMixer(CONFIGS["Mixer-B_16"], img_size=224, num_classes=10, zero_head=True)
    model.load_from(np.load("checkpoint/Mixer-B_16.npz"))
    logits, attn_weights = model(images)  # attn_weights: always []
    loss = model(images, labels)

The numerics and the initialisation are Google's (``vit_jax/models_mixer.py``): LayerNorm eps
1e-6, Flax's tanh GELU (the config's ``gelu``), Flax's default lecun_normal kernels and zero
biases, a zero head. The token-mixing MLP maps
the N patches to ``tokens_mlp_dim`` and back, so its weights fix N, and with it the image size.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.modeling import gelu_approximation
from models.npz_io import export_npz_weights, load_npz_weights


class MlpBlock(nn.Module):
    """Dense, GELU, Dense back to the input width (Flax's ``Dense_0`` and ``Dense_1``)."""

    def __init__(self, dim: int, mlp_dim: int, approximate: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class MixerBlock(nn.Module):
    """Token mixing, then channel mixing, each pre-normed in a residual branch."""

    def __init__(self, config: ml_collections.ConfigDict, n_patches: int) -> None:
        super().__init__()
        approximate = gelu_approximation(config)
        self.token_norm = nn.LayerNorm(config.hidden_dim, eps=1e-6)
        self.token_mixing = MlpBlock(n_patches, config.tokens_mlp_dim, approximate)
        self.channel_norm = nn.LayerNorm(config.hidden_dim, eps=1e-6)
        self.channel_mixing = MlpBlock(config.hidden_dim, config.channels_mlp_dim, approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.token_mixing(self.token_norm(x).transpose(1, 2))  # (B, D, N): mixes the patches
        x = x + y.transpose(1, 2)  # (B, N, D)
        return x + self.channel_mixing(self.channel_norm(x))


def _lecun_normal_(weight: torch.Tensor) -> None:
    """Flax's default kernel init: a normal truncated at two standard deviations, rescaled so
    that the variance is 1 / fan_in (the constant is the std of the truncated unit normal)."""
    fan_in = weight[0].numel()  # (out, in) or (out, in, kh, kw)
    std = 1 / math.sqrt(fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class MlpMixer(nn.Module):
    """Mixer classifier on the mean of the patch tokens, with VisionTransformer's interface.

    ``forward(x)`` returns ``(logits, [])``; ``forward(x, labels)`` returns the mean cross-entropy
    loss. ``vis`` is accepted for the common interface; a Mixer has no attention to return.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        img_size: int = 224,
        num_classes: int = 21843,
        zero_head: bool = False,
        vis: bool = False,
    ) -> None:
        super().__init__()
        patch = tuple(config.patches.size)
        if img_size < patch[0]:
            raise ValueError(f"img_size {img_size} is smaller than one patch {patch}")
        self.config = config
        self.img_size = img_size
        self.num_classes = num_classes
        self.zero_head = zero_head
        self.grad_checkpointing = False
        self.grid_size = (img_size // patch[0], img_size // patch[1])
        self.n_patches = self.grid_size[0] * self.grid_size[1]
        self.stem = nn.Conv2d(3, config.hidden_dim, patch, stride=patch)
        self.blocks = nn.ModuleList(
            MixerBlock(config, self.n_patches) for _ in range(config.num_blocks)
        )
        self.pre_head_layer_norm = nn.LayerNorm(config.hidden_dim, eps=1e-6)
        self.head = nn.Linear(config.hidden_dim, num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Google's initialisation, used when training from scratch: lecun_normal kernels and
        zero biases (Flax's nn.Dense and nn.Conv defaults), LayerNorms at one and zero, and a
        zero head as ``models_mixer.py`` asks, with or without ``zero_head``."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                _lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.head.weight)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stem(x)  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        x = self.pre_head_layer_norm(x).mean(dim=1)  # (B, D)
        logits = self.head(x)
        if labels is not None:
            return F.cross_entropy(logits.view(-1, self.num_classes), labels.view(-1))
        return logits, []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each Mixer block in the backward pass instead of storing its activations;
        the stem, the final LayerNorm and the head stay stored. Call it before ``torch.compile``."""
        self.grad_checkpointing = enable

    def checkpointed_block_input(self) -> tuple[nn.Module, tuple[int, int]] | None:
        """With gradient checkpointing on, one recomputed block and the shape of its input for
        one image, (patches, hidden_dim), for memory estimates; None when it is off."""
        if not self.grad_checkpointing:
            return None
        return self.blocks[0], (self.n_patches, self.config.hidden_dim)

    def load_from(self, weights: object) -> None:
        """Load a Google .npz checkpoint (the result of ``np.load``); see ``models.npz_io``."""
        load_npz_weights(self, weights)

    def export_npz(self, path: str) -> None:
        """Write this model's weights in Google's .npz layout; ``load_from`` reads them back."""
        np.savez(path, **export_npz_weights(self))
