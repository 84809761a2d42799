"""Using a trained checkpoint: load it into the right model, read images as training did, score.

Shared by ``evaluate.py``, ``predict.py`` and ``visualize_attention.py``:

* ``open_checkpoint`` reads either file that ``train.py`` writes (``utils.training.run_files``): a
  ``<name>_checkpoint.bin`` state_dict (the reference's format) with the ``.json`` of model flags
  and class names beside it, or a ``<name>_last.pt`` training state;
* ``resolve_flags`` / ``class_names`` complete the command line from what the checkpoint records;
* ``load_checkpoint_model`` builds the model from the flags and loads strictly. A checkpoint that
  does not fit raises one :class:`UsageError` line that names the first mismatched keys with their
  shapes and the flags to pass instead (as recorded, or, for a bare state_dict, inferred from
  its shapes by ``utils.inspection.flag_hints``);
* ``top_k`` scores a batch of images exactly as training evaluates.
"""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.configs import CONFIGS, ConfigOverrideError, apply_overrides, with_gelu
from models.errors import UsageError
from models.families import build_model
from models.npz_io import CheckpointError, describe_keys
from models.resize import load_resized
from utils.data.class_names import CLASS_NAMES
from utils.inspection.flag_hints import config_differences, fitting_flags
from utils.runtime.device import resolve_device
from utils.training.run_files import learned_gelu, read_weights

_HEAD = "head.weight"


# ---------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class Checkpoint:
    """The weights of a trained model and what train.py recorded about how it was trained."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    # "args" (at least model_type, config, img_size, dataset) and "classes", from a training state
    # or the <name>_checkpoint.json beside a .bin; a training state adds the model "config".
    meta: dict[str, Any]

    @property
    def args(self) -> dict[str, Any]:
        args = self.meta.get("args")
        return args if isinstance(args, dict) else {}

    @property
    def classes(self) -> list[str] | None:
        classes = self.meta.get("classes")
        return [str(c) for c in classes] if isinstance(classes, list | tuple) else None

    @property
    def num_classes(self) -> int:
        head = self.state_dict.get(_HEAD)
        if head is None or head.ndim != 2:
            raise UsageError(
                f"--checkpoint {self.path} has no classifier head ({_HEAD}); it is not a "
                "VisionTransformer checkpoint written by train.py"
            )
        return head.shape[0]

    def trained_with(self) -> str | None:
        """The model flags of the run that wrote it, as a command-line fragment, if recorded."""
        args = self.args
        if "model_type" not in args:
            return None
        return str(
            ModelFlags(args["model_type"], list(args.get("config") or []), args.get("img_size"))
        )

    @property
    def gelu(self) -> str:
        """The GELU its weights learned with (exact where nothing says: the reference's)."""
        return learned_gelu(self.meta)

    def trained_config(self) -> dict[str, Any] | None:
        """The model config it was trained with, as ``ConfigDict.to_dict()``, if recorded."""
        if isinstance(self.meta.get("config"), dict):
            return self.meta["config"]
        if self.args.get("model_type") not in CONFIGS:
            return None
        overrides = with_gelu(self.args.get("config") or [], self.gelu)
        try:
            config = apply_overrides(CONFIGS[self.args["model_type"]], overrides)
        except (ConfigOverrideError, TypeError):
            return None
        return config.to_dict()


@dataclass(frozen=True)
class ModelFlags:
    model_type: str
    config: list[str]
    img_size: int

    def __str__(self) -> str:
        parts = [f"--model_type {self.model_type}", *(f"--config {c}" for c in self.config)]
        return " ".join([*parts, f"--img_size {self.img_size}"])


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read a ``*_checkpoint.bin`` (and the ``.json`` beside it) or a ``*_last.pt``."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--checkpoint {path}: no such file")
    try:
        state_dict, meta = read_weights(path)
    except CheckpointError:
        if zipfile.is_zipfile(path):
            raise
        raise UsageError(
            f"--checkpoint {path} is not a readable PyTorch checkpoint (truncated or not from "
            "torch.save); pass the <name>_checkpoint.bin or <name>_last.pt that train.py wrote"
        ) from None
    return Checkpoint(path, dict(state_dict), meta if isinstance(meta, dict) else {})


def resolve_flags(
    checkpoint: Checkpoint, model_type: str | None, config: list[str], img_size: int | None
) -> ModelFlags:
    """Each model flag not given on the command line is the checkpoint's, else train.py's default.

    The checkpoint's ``--config`` overrides apply only to its own model type; its GELU, unless
    ``config`` names one, to any.
    """
    trained = checkpoint.args
    model_type = model_type or trained.get("model_type") or "ViT-B_16"
    if not config and model_type == trained.get("model_type"):
        config = list(trained.get("config") or [])
    config = with_gelu(config, checkpoint.gelu)
    return ModelFlags(model_type, config, img_size or trained.get("img_size") or 224)


def class_names(checkpoint: Checkpoint, dataset: str) -> list[str]:
    """The checkpoint's own class names, or else those of ``dataset``; UsageError if they cannot
    be known or their number is not the checkpoint's."""
    n = checkpoint.num_classes
    names = checkpoint.classes
    if names is not None and len(names) != n:
        raise UsageError(
            f"--checkpoint {checkpoint.path} has {n} classes but its metadata names {len(names)}"
        )
    known = CLASS_NAMES.get(dataset)
    if known is not None and len(known) != n:
        trained = checkpoint.args.get("dataset")
        hint = f"it was trained on --dataset {trained}" if trained else "pass its data set"
        raise UsageError(
            f"--checkpoint {checkpoint.path} has {n} classes, --dataset {dataset} has "
            f"{len(known)}; {hint}"
        )
    if names is None and known is None:
        raise UsageError(
            f"--checkpoint {checkpoint.path} has {n} classes and no class names: --dataset "
            f"{dataset} takes them from the {checkpoint.path.stem}.json that train.py writes "
            "beside a .bin, or from a <name>_last.pt"
        )
    return list(names if names is not None else known)


def load_checkpoint_model(
    model_type: str,
    config_overrides: Iterable[str],
    img_size: int,
    num_classes: int,
    checkpoint: str | Path | Checkpoint,
    vis: bool = False,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Build the model the flags describe and load the checkpoint into it strictly, in eval mode;
    with the checkpoint's GELU unless ``config_overrides`` choose one.

    Raises UsageError (one line) when the checkpoint cannot be read or does not fit: a shape, a
    key, or (where the checkpoint records it) a config field such as the head count that no shape
    shows.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    flags = ModelFlags(model_type, with_gelu(config_overrides, ckpt.gelu), img_size)
    model = build_model(model_type, flags.config, img_size, num_classes, vis=vis)
    trained = ckpt.trained_with()
    hint = (
        f"it was trained with {trained} (leave the model flags out to use those)"
        if trained
        else fitting_flags(ckpt.state_dict)
    )
    try:
        load_resized(model, ckpt.state_dict)  # the position embedding follows --img_size
    except CheckpointError as error:
        problems = str(error).removeprefix("checkpoint does not fit the model: ")
        raise UsageError(
            f"--checkpoint {ckpt.path} does not fit {flags}: {problems}; {hint}"
        ) from None
    saved = ckpt.trained_config()
    if saved is not None and (differences := config_differences(saved, model.config)):
        raise UsageError(
            f"--checkpoint {ckpt.path} was trained with {describe_keys(differences, 3)}; {hint}"
        )
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def top_k(
    model: torch.nn.Module, images: torch.Tensor, k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (float64, descending) and class indices, each (B, k)."""
    logits = model(images.to(device))[0].double()
    probs = logits.softmax(-1)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return values.cpu(), indices.cpu()


@dataclass
class Loaded:
    model: torch.nn.Module  # a VisionTransformer or an MlpMixer
    classes: list[str]
    device: torch.device
    dataset: str
    flags: ModelFlags
    checkpoint: Checkpoint  # what it was loaded from, with what its run recorded


def load_from_args(args: argparse.Namespace, vis: bool = False) -> Loaded:
    """The model, class names, device and data set that the flags of ``add_model_args`` and
    ``add_checkpoint_args`` name, completed from what the checkpoint records."""
    device = resolve_device(args.device)
    checkpoint = open_checkpoint(args.checkpoint)
    dataset = args.dataset or checkpoint.args.get("dataset") or "cifar10"
    classes = class_names(checkpoint, dataset)
    flags = resolve_flags(checkpoint, args.model_type, args.config, args.img_size)
    model = load_checkpoint_model(
        flags.model_type, flags.config, flags.img_size, len(classes), checkpoint, vis, device
    )
    return Loaded(model, classes, device, dataset, flags, checkpoint)
