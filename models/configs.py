"""Model configurations: the ViT and MLP-Mixer variants of the papers as plain, locked data.

ViT sizes follow Dosovitskiy et al. 2021, table 1 (Ti and S from Steiner et al. 2021, "How to train
your ViT"); Mixer sizes Tolstikhin et al. 2021, table 1, with the field names of Google's Mixer
configs (``hidden_dim``, ``num_blocks``, ``tokens_mlp_dim``, ``channels_mlp_dim``). Every config
is an ``ml_collections.ConfigDict`` so that code written for the reference implementation
(``CONFIGS["ViT-B_16"].hidden_size``) keeps working; ``apply_overrides`` changes a copy from
``KEY=VALUE`` strings and refuses keys that do not exist, values of the wrong type, and
(``check_config``) values that build no model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_collections

from models.errors import UserError

# GELU as the MLPs compute it: "tanh" (the approximation that Flax's nn.gelu computes, with which
# Google trained every checkpoint: the default) or "exact" (erf: what the reference and timm
# compute, and what checkpoints of the reference and of this project before 2026-12 learned
# with); see docs/models.md.
GELU_KINDS = ("tanh", "exact")
DEFAULT_GELU = "tanh"  # every config's

# name: (hidden_size, mlp_dim, num_heads, num_layers)
_WIDTHS = {
    "Ti": (192, 768, 3, 12),
    "S": (384, 1536, 6, 12),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
    "H": (1280, 5120, 16, 32),
}


def _vit(width: str, patch: int) -> ml_collections.ConfigDict:
    hidden, mlp_dim, heads, layers = _WIDTHS[width]
    config = ml_collections.ConfigDict()
    config.patches = ml_collections.ConfigDict({"size": (patch, patch)})
    config.hidden_size = hidden
    config.transformer = ml_collections.ConfigDict()
    config.transformer.mlp_dim = mlp_dim
    config.transformer.num_heads = heads
    config.transformer.num_layers = layers
    config.transformer.attention_dropout_rate = 0.0
    config.transformer.dropout_rate = 0.1
    config.classifier = "token"
    # Set to an int to keep the tanh pre-logits layer that ImageNet-21k pre-training uses.
    config.representation_size = ml_collections.FieldReference(None, field_type=int)
    config.gelu = DEFAULT_GELU
    return config


def _hybrid(
    width: str, num_layers: tuple[int, ...], width_factor: int = 1
) -> ml_collections.ConfigDict:
    """A BiT ResNet stem whose feature map is embedded with 1x1 patches, as in Google's code."""
    config = _vit(width, 1)
    config.resnet = ml_collections.ConfigDict()
    config.resnet.num_layers = num_layers
    config.resnet.width_factor = width_factor
    return config


def get_testing() -> ml_collections.ConfigDict:
    """A tiny model for tests: two layers of width 16 on 4x4 patches."""
    config = _vit("Ti", 4)
    config.hidden_size = 16
    config.transformer.mlp_dim = 32
    config.transformer.num_heads = 2
    config.transformer.num_layers = 2
    return config


def get_ti16_config() -> ml_collections.ConfigDict:
    return _vit("Ti", 16)


def get_s16_config() -> ml_collections.ConfigDict:
    return _vit("S", 16)


def get_b16_config() -> ml_collections.ConfigDict:
    return _vit("B", 16)


def get_b32_config() -> ml_collections.ConfigDict:
    return _vit("B", 32)


def get_l16_config() -> ml_collections.ConfigDict:
    return _vit("L", 16)


def get_l32_config() -> ml_collections.ConfigDict:
    return _vit("L", 32)


def get_h14_config() -> ml_collections.ConfigDict:
    return _vit("H", 14)


def get_r50_b16_config() -> ml_collections.ConfigDict:
    """R50+ViT-B/16: ResNet-50 stages (3, 4, 9), stride 16, so 14x14 tokens at 224 px."""
    return _hybrid("B", (3, 4, 9))


def get_r_ti16_config() -> ml_collections.ConfigDict:
    """R+ViT-Ti/16 (AugReg): the ResNet stem alone (stride 4), then 8x8 patches."""
    config = _hybrid("Ti", ())
    config.patches.size = (8, 8)
    return config


def get_r26_s32_config() -> ml_collections.ConfigDict:
    """R26+ViT-S/32 (AugReg): ResNet-26 stages (2, 2, 2, 2), stride 32."""
    return _hybrid("S", (2, 2, 2, 2))


def get_r26_b32_config() -> ml_collections.ConfigDict:
    return _hybrid("B", (2, 2, 2, 2))


def get_r50_l32_config() -> ml_collections.ConfigDict:
    """R50+ViT-L/32: ResNet-50 stages (3, 4, 6, 3), stride 32."""
    return _hybrid("L", (3, 4, 6, 3))


# Mixer name: (hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim), the paper's table 1.
_MIXER_WIDTHS = {
    "S": (512, 8, 256, 2048),
    "B": (768, 12, 384, 3072),
    "L": (1024, 24, 512, 4096),
}


def _mixer(width: str, patch: int) -> ml_collections.ConfigDict:
    """An MLP-Mixer: no class token, no position embedding, no dropout (as Google's)."""
    hidden, blocks, tokens_mlp, channels_mlp = _MIXER_WIDTHS[width]
    config = ml_collections.ConfigDict()
    config.patches = ml_collections.ConfigDict({"size": (patch, patch)})
    config.hidden_dim = hidden
    config.num_blocks = blocks
    config.tokens_mlp_dim = tokens_mlp
    config.channels_mlp_dim = channels_mlp
    # The token-mixing weights have one row per patch, so they fix the image size: 224 px, the
    # pre-training resolution of Google's checkpoints (see models.families.resolution_problem).
    config.img_size = 224
    config.gelu = DEFAULT_GELU
    return config


def is_mixer(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` describes an MLP-Mixer (else a ViT, possibly hybrid)."""
    return "tokens_mlp_dim" in config


CONFIGS: dict[str, ml_collections.ConfigDict] = {
    "ViT-Ti_16": get_ti16_config(),
    "ViT-S_16": get_s16_config(),
    "ViT-S_32": _vit("S", 32),
    "ViT-B_8": _vit("B", 8),
    "ViT-B_16": get_b16_config(),
    "ViT-B_32": get_b32_config(),
    "ViT-L_16": get_l16_config(),
    "ViT-L_32": get_l32_config(),
    "ViT-H_14": get_h14_config(),
    "R50-ViT-B_16": get_r50_b16_config(),
    "R+ViT-Ti_16": get_r_ti16_config(),
    "R26+ViT-S_32": get_r26_s32_config(),
    "R26+ViT-B_32": get_r26_b32_config(),
    "R50+ViT-L_32": get_r50_l32_config(),
    "testing": get_testing(),
    "Mixer-S_32": _mixer("S", 32),
    "Mixer-S_16": _mixer("S", 16),
    "Mixer-B_32": _mixer("B", 32),
    "Mixer-B_16": _mixer("B", 16),
    "Mixer-L_16": _mixer("L", 16),
}
for _config in CONFIGS.values():
    _config.lock()


class ConfigOverrideError(UserError, ValueError):
    """A ``KEY=VALUE`` override that names no field, gives a value of the wrong type, or makes a
    config that builds no model."""


def flat_fields(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A config's ``to_dict()`` as dotted keys, e.g. ``{"transformer.num_heads": 12, ...}``;
    sequences become tuples, so that a config read back from JSON compares equal."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= {f"{key}.{k}": v for k, v in flat_fields(value).items()}
        else:
            flat[key] = tuple(value) if isinstance(value, list | tuple) else value
    return flat


def _parse_scalar(text: str, like: object, key: str, field_type: type | None) -> object:
    kind = field_type if like is None and field_type is not None else type(like)
    if like is None and text.lower() == "none":
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind in (int, float, str):
            return kind(text)
    except ValueError:
        raise ConfigOverrideError(
            f"--config {key}={text}: expected a value of type {kind.__name__}"
        ) from None
    raise ConfigOverrideError(f"--config {key}: fields of type {kind.__name__} cannot be set")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: object) -> str | None:
    return None if _is_int(value) and value >= 1 else "must be a positive integer"


def _rate(value: object) -> str | None:
    ok = isinstance(value, float | int) and math.isfinite(value) and 0 <= value < 1
    return None if ok else "must be a rate in [0, 1)"


def _patch_size(value: object) -> str | None:
    if not all(_is_int(side) and side >= 1 for side in value):
        return "must be positive integers"
    # the --img_size check and the position-embedding resize work on square grids
    return None if len(set(value)) == 1 else "must be square, e.g. 16,16"


def _classifier(value: object) -> str | None:
    return None if value == "token" else "only 'token' (the class token) is supported"


def _representation_size(value: object) -> str | None:
    if value is None or (_is_int(value) and value >= 1):
        return None
    return "must be a positive integer, or none for no pre-logits layer"


def _gelu(value: object) -> str | None:
    return None if value in GELU_KINDS else "must be one of: " + ", ".join(GELU_KINDS)


def _stages(value: object) -> str | None:
    if all(_is_int(units) and units >= 1 for units in value):
        return None
    return "must be positive unit counts, one per stage (resnet.num_layers= for the stem alone)"


# What each field of a config may hold; check_config asks every field, so a field added to the
# configs above needs its rule here.
_RULES: dict[str, Callable[[object], str | None]] = {
    "patches.size": _patch_size,
    "hidden_size": _positive,
    "transformer.mlp_dim": _positive,
    "transformer.num_heads": _positive,
    "transformer.num_layers": _positive,
    "transformer.attention_dropout_rate": _rate,
    "transformer.dropout_rate": _rate,
    "classifier": _classifier,
    "representation_size": _representation_size,
    "resnet.num_layers": _stages,
    "resnet.width_factor": _positive,
    "gelu": _gelu,
    "hidden_dim": _positive,
    "num_blocks": _positive,
    "tokens_mlp_dim": _positive,
    "channels_mlp_dim": _positive,
    "img_size": _positive,
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse a config that builds no model, or one other than asked: sizes below 1, dropout
    rates outside [0, 1) (NaN included), a head count that does not divide the width, a
    classifier the model lacks. Raises ConfigOverrideError naming the field."""
    fields = flat_fields(config.to_dict())
    for key, value in fields.items():
        assert key in _RULES, f"config field {key} has no rule in models/configs.py"
        if problem := _RULES[key](value):
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise ConfigOverrideError(f"--config {key}={shown}: {problem}")
    if is_mixer(config):
        size, patch = fields["img_size"], fields["patches.size"][0]
        if size % patch:
            raise ConfigOverrideError(
                f"--config: img_size {size} is not a multiple of the {patch}-pixel patch"
            )
        return
    hidden, heads = fields["hidden_size"], fields["transformer.num_heads"]
    if hidden % heads:
        divisors = [n for n in range(1, min(hidden, 64) + 1) if hidden % n == 0]
        raise ConfigOverrideError(
            f"--config: hidden_size {hidden} is not divisible by transformer.num_heads {heads}; "
            f"a head count that divides it: {', '.join(map(str, divisors))}"
        )


# Tuples whose length may change (the number of ResNet stages); others keep theirs.
_VARIABLE_LENGTH = {"resnet.num_layers"}


def _parse_value(text: str, current: object, key: str, field_type: type | None) -> object:
    if isinstance(current, tuple):
        parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
        if key in _VARIABLE_LENGTH:
            try:
                return tuple(int(p) for p in parts)
            except ValueError:
                raise ConfigOverrideError(f"--config {key}={text}: expected integers") from None
        if len(parts) != len(current):
            raise ConfigOverrideError(
                f"--config {key}={text}: expected {len(current)} comma-separated values "
                f"like {','.join(map(str, current))}"
            )
        return tuple(
            _parse_scalar(p.strip(), c, key, None) for p, c in zip(parts, current, strict=True)
        )
    return _parse_scalar(text, current, key, field_type)


def with_gelu(overrides: Iterable[str], gelu: str | None) -> list[str]:
    """``overrides`` that compute the GELU some weights learned with (None: the default), unless
    they choose one themselves; ``gelu=...`` is added only where it is not the default."""
    overrides = list(overrides)
    chosen = any(item.partition("=")[0].strip() == "gelu" for item in overrides)
    if chosen or gelu in (None, DEFAULT_GELU):
        return overrides
    return [*overrides, f"gelu={gelu}"]


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Iterable[str]
) -> ml_collections.ConfigDict:
    """Return a copy of ``config`` with ``KEY=VALUE`` overrides applied, each type-checked,
    the result checked by ``check_config``.

    Keys are dotted paths of existing fields (``transformer.num_layers=4``); tuples are written
    comma-separated (``patches.size=4,4``); fields that hold None take ``none`` or a value of their
    declared type.
    """
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigOverrideError(
                f"--config {item!r}: expected KEY=VALUE, e.g. hidden_size=128"
            )
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigOverrideError(
                f"--config {key}: unknown key; known keys: "
                + ", ".join(flat_fields(config.to_dict()))
            )
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigOverrideError(f"--config {key}: is a group; set one of its fields")
        field_type = node.get_ref(leaf).get_type() if current is None else None
        with node.unlocked():
            node[leaf] = _parse_value(text, current, key, field_type)
    check_config(config)
    return config
