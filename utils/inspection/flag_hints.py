"""Which model flags a checkpoint's weights fit: the hint that ends a "does not fit" error.

A bare state_dict (a ``.bin`` without its ``.json``, or the reference's) records no flags, but its
shapes show most of the config; the closest ``--model_type`` plus ``--config`` fixes is the hint.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections
import torch

from models.configs import CONFIGS, flat_fields
from utils.training.run_files import FIELDS_ADDED_LATER

_EMBED = "transformer.embeddings."
_LAYER = re.compile(r"transformer\.encoder\.layer\.(\d+)\.")
_UNIT = re.compile(r"transformer\.embeddings\.hybrid_model\.body\.block(\d+)\.unit(\d+)\.")


def _architecture(state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The flat config fields (and img_size) that a ViT state_dict's shapes reveal; None if it
    is not a ViT. ``transformer.num_heads`` is not among them: it changes no shape."""
    embed = state.get(_EMBED + "patch_embeddings.weight")  # (D, C, ph, pw)
    pos = state.get(_EMBED + "position_embeddings")  # (1, 1 + gh * gw, D)
    fc1 = state.get("transformer.encoder.layer.0.ffn.fc1.weight")  # (mlp_dim, D)
    if embed is None or pos is None or fc1 is None or embed.ndim != 4 or pos.ndim != 3:
        return None
    pre_logits = state.get("pre_logits.weight")  # (representation_size, D)
    fields: dict[str, Any] = {
        "hidden_size": embed.shape[0],
        "patches.size": tuple(embed.shape[2:]),
        "transformer.mlp_dim": fc1.shape[0],
        "transformer.num_layers": len({m.group(1) for k in state if (m := _LAYER.match(k))}),
        "representation_size": None if pre_logits is None else pre_logits.shape[0],
    }
    units: dict[int, int] = {}  # ResNet stage -> its number of units
    for key in state:
        if m := _UNIT.match(key):
            units[int(m.group(1))] = max(units.get(int(m.group(1)), 0), int(m.group(2)))
    scale = 1
    if units:
        root = state.get(_EMBED + "hybrid_model.root.conv.weight")  # (64 * width, 3, 7, 7)
        fields["resnet.num_layers"] = tuple(units[b] for b in sorted(units))
        fields["resnet.width_factor"] = root.shape[0] // 64 if root is not None else 1
        scale = 2 ** (2 + len(units) - 1)  # stem /4, then /2 per further stage
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid == pos.shape[1] - 1:
        fields["img_size"] = grid * fields["patches.size"][0] * scale
    return fields


def format_value(value: object) -> str:
    """A config value as ``--config KEY=VALUE`` spells it."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def fitting_flags(state: dict[str, torch.Tensor]) -> str:
    """The model flags that would fit a state_dict: the closest variant plus ``--config`` fixes."""
    found = _architecture(state)
    if found is None:
        return "its keys are not those of a VisionTransformer"
    img_size = found.pop("img_size", None)
    best, best_diff = None, None
    for name, config in CONFIGS.items():
        fields = flat_fields(config.to_dict())
        if ("resnet.num_layers" in fields) != ("resnet.num_layers" in found):
            continue  # a hybrid only matches a hybrid
        diff = {k: v for k, v in found.items() if fields.get(k) != v}
        if best_diff is None or len(diff) < len(best_diff):
            best, best_diff = name, diff
    if best is None:
        return "no --model_type has its structure"
    flags = [f"--model_type {best}"]
    flags += [f"--config {k}={format_value(v)}" for k, v in best_diff.items()]
    if img_size is not None:
        flags.append(f"--img_size {img_size}")
    heads = " (and transformer.num_heads if it was changed: no shape shows it)" if best_diff else ""
    return f"its weights fit {' '.join(flags)}{heads}"


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """``KEY=VALUE (not OURS)`` for each field (dropout aside) where a recorded config differs."""
    ours = flat_fields(config.to_dict())
    theirs = {**FIELDS_ADDED_LATER, **flat_fields(saved)}  # an older file's config lacks them
    return [
        f"{k}={format_value(theirs.get(k))} (not {format_value(ours.get(k))})"
        for k in sorted(ours.keys() | theirs.keys())
        if "dropout" not in k and ours.get(k) != theirs.get(k)
    ]
