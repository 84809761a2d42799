"""Where each of Google's official checkpoints can be downloaded.

All live in the public Google Cloud Storage bucket ``vit_models``: the paper's models under
``imagenet21k/`` (pre-trained, zeroed heads, with a pre-logits layer) and
``imagenet21k+imagenet2012/`` (then fine-tuned on ImageNet-1k), the AugReg models of Steiner et al.
2021 ("How to train your ViT") under ``augreg/`` by their published file names.
"""

from __future__ import annotations

import os
from pathlib import Path

BUCKET = "https://storage.googleapis.com/vit_models"
# An internal mirror of the bucket (same layout), for clusters without internet access.
MIRROR_VARIABLE = "VIT_CHECKPOINT_MIRROR"

# The paper's checkpoints, by model name; the hybrid's file name in the bucket uses "+".
IMAGENET21K = ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "R50+ViT-B_16")
IMAGENET21K_IMAGENET2012 = (
    "ViT-B_16", "ViT-B_16-224", "ViT-B_32", "ViT-L_16", "ViT-L_16-224", "ViT-L_32",
    "R50+ViT-B_16",
)  # fmt: skip
# The reference implementation named the hybrid "R50-ViT-B_16"; the bucket calls it "R50+ViT-B_16".
_ALIASES = {"R50-ViT-B_16": "R50+ViT-B_16"}

AUGREG = (
    "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0.npz",
    "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz",
    "R26_S_32-i21k-300ep-lr_0.001-aug_light0-wd_0.03-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0.npz",
    "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz",
    "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
)


def official_url(filename: str) -> str | None:
    """The download URL of an official checkpoint file name, or None when it is not one.

    ``ViT-B_16.npz`` is the ImageNet-21k model (the reference's convention);
    ``imagenet21k+imagenet2012_ViT-B_16.npz`` the one fine-tuned on ImageNet-1k; AugReg files go by
    their published names.
    """
    folder = _bucket_path(Path(filename).name)
    if folder is None:
        return None
    base = os.environ.get(MIRROR_VARIABLE, "").rstrip("/") or BUCKET
    return f"{base}/{folder}"


def _bucket_path(name: str) -> str | None:
    """Where an official file lies in the bucket, e.g. ``imagenet21k/ViT-B_16.npz``."""
    if not name.endswith(".npz"):
        return None
    stem = name[: -len(".npz")]
    if name in AUGREG:
        return f"augreg/{name}"
    if stem.startswith("imagenet21k+imagenet2012_"):
        model = stem[len("imagenet21k+imagenet2012_") :]
        model = _ALIASES.get(model, model)
        known = model in IMAGENET21K_IMAGENET2012
        return f"imagenet21k+imagenet2012/{model}.npz" if known else None
    model = _ALIASES.get(stem, stem)
    return f"imagenet21k/{model}.npz" if model in IMAGENET21K else None


def describe(filename: str) -> str | None:
    """What an official file holds, e.g. "ImageNet-21k, paper release"; None for other files."""
    folder = _bucket_path(Path(filename).name)
    if folder is None:
        return None
    release, name = folder.split("/")
    if release == "augreg":
        if "-i1k-" in name:
            return "ImageNet-1k, AugReg release"
        then = " then ImageNet-1k" if "--imagenet2012-" in name else ""
        return f"ImageNet-21k{then}, AugReg release"
    then = " then ImageNet-1k" if release == "imagenet21k+imagenet2012" else ""
    return f"ImageNet-21k{then}, paper release"


# Model types whose ImageNet-21k weights exist only as AugReg files: their pre-training checkpoint.
_AUGREG_I21K = {
    "ViT-Ti_16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "ViT-S_16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "ViT-S_32": "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "ViT-B_8": "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "R+ViT-Ti_16": "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "R26+ViT-S_32": "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0.npz",
    "R50+ViT-L_32": "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz",
}


def default_filename(model_type: str) -> str:
    """The ImageNet-21k checkpoint file that ``--model_type`` fine-tunes from by default."""
    return _AUGREG_I21K.get(model_type) or f"{_ALIASES.get(model_type, model_type)}.npz"
