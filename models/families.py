"""The model families, ViT (with its hybrids) and MLP-Mixer, built through one call.

The config says the family (``models.configs.is_mixer``), so the scripts never branch on it:
every script and the bench build their model with ``build_model(model_type, overrides, ...)``.

Both families share the interface: ``forward(x) -> (logits, attn_weights)``, ``forward(x,
labels) -> loss``, ``load_from``, ``export_npz``, ``set_grad_checkpointing``,
``checkpointed_block_input``, and the ``config``, ``img_size``, ``num_classes`` attributes.
"""

from __future__ import annotations

import ml_collections

from models.configs import CONFIGS, apply_overrides, is_mixer
from models.errors import UsageError
from models.mixer import MlpMixer
from models.modeling import VisionTransformer, uncovered_pixels


def build_model(
    model_type: str,
    overrides: list[str],
    img_size: int,
    num_classes: int,
    zero_head: bool = False,
    vis: bool = False,
) -> VisionTransformer | MlpMixer:
    """The model of ``--model_type`` with ``--config KEY=VALUE`` overrides at ``img_size``: a
    type, a field or a size that builds no model is a one-line UserError."""
    config = checked_config(model_type, overrides, img_size)
    try:
        return make_model(config, img_size, num_classes, zero_head=zero_head, vis=vis)
    except ValueError as error:
        raise UsageError(f"cannot build {model_type}: {error}") from None


def checked_config(
    model_type: str, overrides: list[str], img_size: int
) -> ml_collections.ConfigDict:
    """The config of ``--model_type`` with its overrides, refused in one line (a UserError) where
    a type, a field or the image size fits no model; what train.py checks before anything runs."""
    if model_type not in CONFIGS:
        known = ", ".join(CONFIGS)
        raise UsageError(f"unknown --model_type {model_type!r}; choose one of: {known}")
    config = apply_overrides(CONFIGS[model_type], overrides)
    if problem := resolution_problem(config, img_size):
        raise UsageError(problem)
    return config


def make_model(
    config: ml_collections.ConfigDict,
    img_size: int,
    num_classes: int,
    zero_head: bool = False,
    vis: bool = False,
) -> VisionTransformer | MlpMixer:
    """The model ``config`` describes: an MlpMixer for a Mixer config, else a VisionTransformer."""
    family = MlpMixer if is_mixer(config) else VisionTransformer
    return family(config, img_size=img_size, num_classes=num_classes, zero_head=zero_head, vis=vis)


def resolution_problem(config: ml_collections.ConfigDict, img_size: int) -> str | None:
    """Why the model of ``config`` cannot run at ``img_size``, in one line, or None.

    A ViT takes any size its patches tile (``uncovered_pixels``); a Mixer only the one its
    token-mixing weights were made for, the config's ``img_size`` (224 px for Google's).
    """
    if not is_mixer(config):
        return uncovered_pixels(config, img_size)
    size, patch = config.img_size, config.patches.size[0]
    if img_size == size:
        return None
    return (
        f"--img_size {img_size}: a Mixer's token-mixing weights are tied to the "
        f"{(size // patch) ** 2} patches of a {size} px image; use --img_size {size}"
    )
