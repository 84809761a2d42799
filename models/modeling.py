"""Vision Transformer (Dosovitskiy et al. 2021), in the order of the paper.

Class names, constructor and parameter names are those of the reference PyTorch implementation
("ViT-pytorch"), so its ``*_checkpoint.bin`` state_dicts load unchanged and code written against it
keeps working::

    model = VisionTransformer(CONFIGS["ViT-B_16"], img_size=224, num_classes=10, zero_head=True)
    model.load_from(np.load("checkpoint/ViT-B_16.npz"))
    logits, attn_weights = model(images)  # attn_weights: [] unless vis=True
    loss = model(images, labels)

The numerics are Google's (``vit_jax/models_vit.py``): dropout after attention uses
``dropout_rate``, position embeddings start from a normal of std 0.02, LayerNorm eps 1e-6, and
GELU is Flax's tanh approximation unless the config's ``gelu`` asks for the exact (erf) one, as
the reference's checkpoints need. tests/test_google_parity.py holds the logits to Google's own
code's. One file for the
whole model (about 320 lines), as nanoGPT keeps its: the classes read in the paper's order.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.configs import CONFIGS  # noqa: F401  (re-exported: `from models.modeling import CONFIGS`)
from models.modeling_resnet import ResNetV2, feature_grid, num_downsamples
from models.npz_io import export_npz_weights, load_npz_weights


def uncovered_pixels(config: ml_collections.ConfigDict, img_size: int) -> str | None:
    """Why ``img_size`` leaves part of the image outside the patch grid, or None when it does not.

    The patch embedding is a convolution with stride = patch size, as in Google's code, so pixels
    past the last whole patch are silently ignored; the scripts refuse such sizes.
    """
    patch = config.patches.size[0]
    if config.get("resnet") is None:
        if img_size % patch == 0:
            return None
        lower, upper = img_size // patch * patch, (img_size // patch + 1) * patch
        return (
            f"--img_size {img_size} is not a multiple of the {patch}-pixel patch: the last "
            f"{img_size % patch} rows and columns of pixels would be ignored; use "
            + (f"{lower} or {upper}" if lower else f"{upper}")
        )
    halvings = num_downsamples(tuple(config.resnet.num_layers))
    side = feature_grid(img_size, halvings)
    if side % patch == 0:
        return None
    step = patch * 2**halvings
    return (
        f"--img_size {img_size} gives a {side}x{side} ResNet feature map that {patch}x{patch} "
        f"patches do not tile; use a multiple of {step}"
    )


class Embeddings(nn.Module):
    """Patch embedding (optionally of a ResNet feature map), class token and position embedding."""

    def __init__(self, config: ml_collections.ConfigDict, img_size: int) -> None:
        super().__init__()
        patch = tuple(config.patches.size)
        self.hybrid = config.get("resnet") is not None
        if self.hybrid:
            self.hybrid_model = ResNetV2(
                tuple(config.resnet.num_layers), config.resnet.width_factor
            )
            in_channels = self.hybrid_model.out_channels
            grid = self.hybrid_model.feature_grid(img_size)
        else:
            in_channels, grid = 3, img_size
        if grid < patch[0] or grid < patch[1]:
            raise ValueError(f"img_size {img_size} is smaller than one patch {patch}")
        self.grid_size = (grid // patch[0], grid // patch[1])
        n_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embeddings = nn.Conv2d(in_channels, config.hidden_size, patch, stride=patch)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches + 1, config.hidden_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.dropout = nn.Dropout(config.transformer.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hybrid:
            x = self.hybrid_model(x)
        x = self.patch_embeddings(x)  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.position_embeddings  # (B, N + 1, D)
        return self.dropout(x)


class Attention(nn.Module):
    """Multi-head self-attention.

    ``query``, ``key`` and ``value`` stay separate parameters (the reference's names) but run as one
    matrix product; the attention itself is PyTorch's fused kernel unless ``vis`` asks for the
    weights, which only the explicit softmax path can return.
    """

    def __init__(self, config: ml_collections.ConfigDict, vis: bool) -> None:
        super().__init__()
        self.vis = vis
        self.num_attention_heads = config.transformer.num_heads
        self.attention_head_size = config.hidden_size // self.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        if self.all_head_size != config.hidden_size:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not divisible by "
                f"num_heads {self.num_attention_heads}"
            )
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.out = nn.Linear(self.all_head_size, config.hidden_size)
        self.attn_dropout = nn.Dropout(config.transformer.attention_dropout_rate)
        self.proj_dropout = nn.Dropout(config.transformer.dropout_rate)
        self.softmax = nn.Softmax(dim=-1)

    def _project(self, x: torch.Tensor, *linears: nn.Linear) -> torch.Tensor:
        """``linears`` applied to ``x`` as one matrix product: (len(linears), B, heads, N, d)."""
        if len(linears) == 1:
            y = linears[0](x)
        else:
            weight = torch.cat([linear.weight for linear in linears])
            y = F.linear(x, weight, torch.cat([linear.bias for linear in linears]))
            deltas = [getattr(linear, "delta", None) for linear in linears]
            if any(deltas):  # LoRA's low-rank branches (models/lora.py), each on its own slice
                parts = y.split([linear.out_features for linear in linears], dim=-1)
                pairs = zip(parts, deltas, strict=True)
                y = torch.cat([part + delta(x) if delta else part for part, delta in pairs], dim=-1)
        B, N, _ = x.shape
        y = y.view(B, N, len(linears), self.num_attention_heads, self.attention_head_size)
        return y.permute(2, 0, 3, 1, 4)

    def forward(
        self, hidden_states: torch.Tensor, cls_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from every token, or with ``cls_only`` from the class token alone: (B, 1, D)."""
        if cls_only:
            (q,) = self._project(hidden_states[:, :1], self.query)
            k, v = self._project(hidden_states, self.key, self.value)
        else:
            q, k, v = self._project(hidden_states, self.query, self.key, self.value)
        if self.vis:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.attention_head_size)
            weights = self.softmax(scores)  # (B, heads, N, N)
            context = self.attn_dropout(weights) @ v
        else:
            weights = None
            p = self.attn_dropout.p if self.training else 0.0
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        B, _, n_queries, _ = context.shape
        context = context.transpose(1, 2).reshape(B, n_queries, self.all_head_size)  # (B, N, D)
        return self.proj_dropout(self.out(context)), weights


def gelu_approximation(config: ml_collections.ConfigDict) -> str:
    """``F.gelu``'s ``approximate`` for the config's ``gelu`` field: "none" (erf) or "tanh"."""
    return "tanh" if config.gelu == "tanh" else "none"


class Mlp(nn.Module):
    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.transformer.mlp_dim)
        self.fc2 = nn.Linear(config.transformer.mlp_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.transformer.dropout_rate)
        self.approximate = gelu_approximation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.gelu(self.fc1(x), approximate=self.approximate))
        return self.dropout(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block: attention and MLP, each in a residual branch."""

    def __init__(self, config: ml_collections.ConfigDict, vis: bool) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = Attention(config, vis)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn = Mlp(config)

    def forward(
        self, x: torch.Tensor, cls_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, weights = self.attn(self.attention_norm(x), cls_only)
        x = (x[:, :1] if cls_only else x) + h
        x = x + self.ffn(self.ffn_norm(x))
        return x, weights


class Encoder(nn.Module):
    """The blocks and the final LayerNorm.

    With ``cls_only`` the last block computes the class token's output alone, (B, 1, D), which is
    all the classifier reads: its query, output projection and MLP then cost 1/N of their full
    price, about 7 % of ViT-B/16's training FLOPs at 224 px. The other tokens' keys and values
    are still computed, so the class token's output is the same as in the full pass.

    With ``grad_checkpointing`` each block keeps only its input for the backward pass and runs
    again there to rebuild the rest; checkpoint restores the RNG state, so dropout draws the
    same masks twice.
    """

    def __init__(self, config: ml_collections.ConfigDict, vis: bool) -> None:
        super().__init__()
        self.vis = vis
        self.grad_checkpointing = False
        self.layer = nn.ModuleList(Block(config, vis) for _ in range(config.transformer.num_layers))
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)

    def forward(
        self, x: torch.Tensor, cls_only: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attn_weights = []
        last = len(self.layer) - 1
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.layer):
            args = (x, cls_only and i == last)
            x, weights = (
                checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            )
            if self.vis:
                attn_weights.append(weights)
        return self.encoder_norm(x), attn_weights


class Transformer(nn.Module):
    def __init__(self, config: ml_collections.ConfigDict, img_size: int, vis: bool) -> None:
        super().__init__()
        self.embeddings = Embeddings(config, img_size)
        self.encoder = Encoder(config, vis)

    def forward(
        self, x: torch.Tensor, cls_only: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.encoder(self.embeddings(x), cls_only)


class VisionTransformer(nn.Module):
    """ViT classifier on the class token, with the reference implementation's interface.

    ``forward(x)`` returns ``(logits, attn_weights)``; ``forward(x, labels)`` returns the mean
    cross-entropy loss.
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
        if config.classifier != "token":
            raise ValueError(f"classifier {config.classifier!r} is not supported; use 'token'")
        self.config = config
        self.img_size = img_size
        self.num_classes = num_classes
        self.zero_head = zero_head
        self.classifier = config.classifier
        self.transformer = Transformer(config, img_size, vis)
        rep = config.get("representation_size")
        if rep:
            self.pre_logits = nn.Linear(config.hidden_size, rep)
        self.head = nn.Linear(rep or config.hidden_size, num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Google's initialisation, used when training from scratch."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if name.endswith(("fc1", "fc2")):
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
        embeddings = self.transformer.embeddings
        conv = embeddings.patch_embeddings
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.trunc_normal_(conv.weight, std=1 / math.sqrt(fan_in) / 0.87962566103423978)
        nn.init.zeros_(conv.bias)
        nn.init.normal_(embeddings.position_embeddings, std=0.02)
        if self.zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        # with vis, every layer's full attention matrix is returned, so the last block runs in full
        x, attn_weights = self.transformer(x, cls_only=not self.transformer.encoder.vis)
        x = x[:, 0]  # the class token, (B, D)
        if hasattr(self, "pre_logits"):
            x = torch.tanh(self.pre_logits(x))
        logits = self.head(x)
        if labels is not None:
            return F.cross_entropy(logits.view(-1, self.num_classes), labels.view(-1))
        return logits, attn_weights

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in the backward pass instead of storing its activations
        (timm's name): a fifth or less of the activation memory per image, for one more forward
        pass. The hybrids' ResNet stem stays stored. Call it before ``torch.compile``."""
        self.transformer.encoder.grad_checkpointing = enable

    def checkpointed_block_input(self) -> tuple[nn.Module, tuple[int, int]] | None:
        """With gradient checkpointing on, one recomputed block and the shape of its input for
        one image, (tokens, hidden), for memory estimates; None when it is off."""
        if not self.transformer.encoder.grad_checkpointing:
            return None
        tokens, hidden = self.transformer.embeddings.position_embeddings.shape[1:]
        return self.transformer.encoder.layer[0], (tokens, hidden)

    def load_from(self, weights: object) -> None:
        """Load a Google .npz checkpoint (the result of ``np.load``); see ``models.npz_io``."""
        load_npz_weights(self, weights)

    def export_npz(self, path: str) -> None:
        """Write this model's weights in Google's .npz layout; ``load_from`` reads them back."""
        np.savez(path, **export_npz_weights(self))
