"""``--finetune full|head|lora`` and ``--freeze_blocks``: which parameters train.

A frozen parameter has no gradient, no optimizer state and no place in ``_last.pt``: autograd
stops below the lowest one that trains (a linear probe runs no backward pass through the
backbone), the memory estimate counts only what trains, and a training state holds only the
trained weights, beside a digest of the frozen ones that a resume checks after reloading them from
the starting weights. The best weights (``<name>_checkpoint.bin``) are always the whole model, LoRA
merged in, in the format every script reads.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import ml_collections
import torch

from models.errors import UsageError
from models.lora import add_lora, is_lora
from utils.training.optimizer import layer_of, top_layer

FINETUNE_MODES = ("full", "head", "lora")
_HEAD = re.compile(r"head\.")


@dataclass(frozen=True)
class WhatTrains:
    """The parameters a run trains, from its flags."""

    mode: str = "full"
    freeze_blocks: int = 0  # --finetune full: the embeddings and the first N blocks stay frozen
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "attn"

    @property
    def partial(self) -> bool:
        """Whether some of the starting weights stay frozen."""
        return self.mode != "full" or self.freeze_blocks > 0

    def apply(self, model: torch.nn.Module) -> str:
        """Add the adapters (``lora``) and freeze what does not train; words for the set-up log."""
        if self.mode == "lora":
            add_lora(model, self.lora_rank, self.lora_alpha, self.lora_targets)
        depth = top_layer(model)
        for name, param in model.named_parameters():
            param.requires_grad_(self.trains(name, depth))
        total = sum(p.numel() for n, p in model.named_parameters() if not is_lora(n))
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        how = {
            "full": "every layer" if not self.freeze_blocks
            else f"all but the embeddings and the first {self.freeze_blocks} block(s)",
            "head": "the head alone (a linear probe)",
            "lora": f"LoRA adapters of rank {self.lora_rank} (alpha {self.lora_alpha:g}) on "
            f"{self.lora_targets} and the head",
        }[self.mode]  # fmt: skip
        return (
            f"--finetune {self.mode}: training {how}, {trained:,} parameters "
            f"({100 * trained / total:.2f} % of the model's {total:,})"
        )

    def trains(self, name: str, depth: int) -> bool:
        """Whether parameter ``name`` (of a bare model) trains."""
        if self.mode == "head":
            return bool(_HEAD.match(name))
        if self.mode == "lora":
            return is_lora(name) or bool(_HEAD.match(name))
        return not self.freeze_blocks or layer_of(name, depth) > self.freeze_blocks

    def saved_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What a training state keeps of the model: all of it, or only what trains."""
        weights = model.state_dict()
        if not self.partial:
            return weights
        return {name: weights[name] for name in trained_names(model)}

    def load_saved(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """``saved_weights`` back into ``model``, whose frozen weights are already in place."""
        if not self.partial:
            model.load_state_dict(weights)
            return
        expected = set(trained_names(model))
        if set(weights) != expected:
            missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise RuntimeError(f"trained weights missing {missing[:3]}, unexpected {extra[:3]}")
        model.load_state_dict(weights, strict=False)

    def load_whole(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Whole weights in the plain format (``merged_state_dict``) into ``model``; under LoRA its
        adapters are zeroed, since the weights hold them merged."""
        if self.mode != "lora":
            model.load_state_dict(weights)
            return
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or not all(is_lora(name) for name in missing):
            raise RuntimeError(f"not this model's weights: {unexpected[:3]} {missing[:3]}")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_lora(name) and name.endswith("lora_B"):
                    param.zero_()

    def frozen_digest(self, model: torch.nn.Module) -> str | None:
        """A digest of the frozen weights (None when nothing is frozen), for a resume to check
        that it reloaded the very weights the run trained on."""
        if not self.partial:
            return None
        digest = hashlib.blake2b(digest_size=16)
        for name, param in model.named_parameters():
            if not param.requires_grad:
                digest.update(name.encode())
                digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy())
        return digest.hexdigest()


def trained_names(model: torch.nn.Module) -> list[str]:
    """The names of the parameters that train, in the model's order."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def check_what_trains(trains: WhatTrains, config: ml_collections.ConfigDict) -> None:
    """One-line errors for flags that train nothing sensible on the model of ``config``, before
    anything is built (``add_lora`` checks each layer again)."""
    vit = "transformer" in config
    blocks = config.transformer.num_layers if vit else config.num_blocks
    width = config.hidden_size if vit else config.hidden_dim
    if trains.freeze_blocks < 0:
        raise UsageError(f"--freeze_blocks must be >= 0, got {trains.freeze_blocks}")
    if trains.freeze_blocks and trains.mode != "full":
        raise UsageError(
            f"--freeze_blocks applies to --finetune full; --finetune {trains.mode} already "
            "freezes every block"
        )
    if trains.freeze_blocks > blocks:
        raise UsageError(
            f"--freeze_blocks {trains.freeze_blocks} exceeds the model's {blocks} blocks: pass "
            f"--freeze_blocks {blocks} or less"
        )
    if trains.lora_rank < 1:
        raise UsageError(f"--lora_rank must be at least 1, got {trains.lora_rank}")
    if trains.lora_rank > width:
        raise UsageError(
            f"--lora_rank {trains.lora_rank} exceeds the model's width {width}: pass "
            f"--lora_rank {width} or less (8 to 64 is usual)"
        )
    if not trains.lora_alpha > 0:
        raise UsageError(f"--lora_alpha must be positive, got {trains.lora_alpha}")
    if trains.mode == "lora" and not vit and "attn" in trains.lora_targets:
        raise UsageError("a Mixer has no attention: pass --lora_targets mlp")
