"""A STAND-IN for the reference ViT-pytorch model, for benchmarks only.

Reconstructed from the reference implementation's published architecture (``models/modeling.py``
of the public "ViT-pytorch" repository, last commit 2020-11-29) and written in our style: the same
modules, parameter names and operations in the same order, so that its speed is the reference's
and its ``state_dict`` has the reference's keys. What makes it slower than ours and timm's:

* three separate ``nn.Linear`` for query, key and value (three matrix products);
* explicit attention: ``softmax(q @ k^T / sqrt(d)) @ v`` materialises the (B, heads, N, N) scores
  and probabilities and keeps them for backward (no fused ``scaled_dot_product_attention``);
* ``transpose_for_scores`` permutes and the context is made contiguous before the output Linear.

Only the plain ViT is reconstructed (no ResNet hybrid, no ``load_from``). ``bench.throughput``
uses it when ``--reference_path`` is not given and labels it "reference (stand-in)".
"""

from __future__ import annotations

import math

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, config: ml_collections.ConfigDict, vis: bool) -> None:
        super().__init__()
        self.vis = vis
        self.num_attention_heads = config.transformer.num_heads
        self.attention_head_size = config.hidden_size // self.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        # the reference uses attention_dropout_rate for both (a defect, kept for fidelity)
        self.attn_dropout = nn.Dropout(config.transformer.attention_dropout_rate)
        self.proj_dropout = nn.Dropout(config.transformer.attention_dropout_rate)
        self.softmax = nn.Softmax(dim=-1)

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size)
        return x.permute(0, 2, 1, 3)  # (B, heads, N, head_dim)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = self.transpose_for_scores(self.query(hidden_states))
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = self.softmax(scores)  # (B, heads, N, N)
        weights = probs if self.vis else None
        context = torch.matmul(self.attn_dropout(probs), value)  # (B, heads, N, head_dim)
        context = context.permute(0, 2, 1, 3).contiguous()
        context = context.view(*context.shape[:-2], self.all_head_size)  # (B, N, D)
        return self.proj_dropout(self.out(context)), weights


class Mlp(nn.Module):
    def __init__(self, config: ml_collections.ConfigDict) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.transformer.mlp_dim)
        self.fc2 = nn.Linear(config.transformer.mlp_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.transformer.dropout_rate)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.xavier_uniform_(self.fc2.weight)
        nn.init.normal_(self.fc1.bias, std=1e-6)
        nn.init.normal_(self.fc2.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.gelu(self.fc1(x)))
        return self.dropout(self.fc2(x))


class Embeddings(nn.Module):
    def __init__(self, config: ml_collections.ConfigDict, img_size: int) -> None:
        super().__init__()
        patch = tuple(config.patches.size)
        n_patches = (img_size // patch[0]) * (img_size // patch[1])
        self.patch_embeddings = nn.Conv2d(3, config.hidden_size, patch, stride=patch)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches + 1, config.hidden_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.dropout = nn.Dropout(config.transformer.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.patch_embeddings(x).flatten(2).transpose(-1, -2)  # (B, N, D)
        x = torch.cat((cls_tokens, x), dim=1)
        return self.dropout(x + self.position_embeddings)


class Block(nn.Module):
    def __init__(self, config: ml_collections.ConfigDict, vis: bool) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.ffn = Mlp(config)
        self.attn = Attention(config, vis)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, weights = self.attn(self.attention_norm(x))
        x = x + h
        x = x + self.ffn(self.ffn_norm(x))
        return x, weights


class Encoder(nn.Module):
    def __init__(self, config: ml_collections.ConfigDict, vis: bool) -> None:
        super().__init__()
        self.vis = vis
        self.layer = nn.ModuleList(Block(config, vis) for _ in range(config.transformer.num_layers))
        self.encoder_norm = nn.LayerNorm(config.hidden_size, eps=1e-6)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attn_weights = []
        for layer_block in self.layer:
            hidden_states, weights = layer_block(hidden_states)
            if self.vis:
                attn_weights.append(weights)
        return self.encoder_norm(hidden_states), attn_weights


class Transformer(nn.Module):
    def __init__(self, config: ml_collections.ConfigDict, img_size: int, vis: bool) -> None:
        super().__init__()
        self.embeddings = Embeddings(config, img_size)
        self.encoder = Encoder(config, vis)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.encoder(self.embeddings(x))


class VisionTransformer(nn.Module):
    """The reference's interface: ``(logits, attn_weights)``, or the loss when given labels.

    (Later versions of the reference return ``(loss, attn_weights)`` with labels; the benchmark
    computes the loss from the logits for every model, so it does not depend on this.)
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
        self.num_classes = num_classes
        self.zero_head = zero_head
        self.classifier = config.classifier
        self.transformer = Transformer(config, img_size, vis)
        self.head = nn.Linear(config.hidden_size, num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        x, attn_weights = self.transformer(x)
        logits = self.head(x[:, 0])
        if labels is not None:
            return F.cross_entropy(logits.view(-1, self.num_classes), labels.view(-1))
        return logits, attn_weights
