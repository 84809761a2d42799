"""The files of a training run, written and read here only.

``<name>_checkpoint.bin``  the best weights: a bare ``state_dict``, the reference's format
``<name>_checkpoint.json`` what rebuilds that model: its flags and class names
``<name>_last.pt``         the whole training state, written at each evaluation and on a stop

train.py writes all three through :class:`RunFiles`; it and the inspection scripts read them
through :func:`read_weights` and :meth:`TrainingState.read`. The formats are those of every
earlier version, which still load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from models.errors import UsageError, one_line
from models.npz_io import CheckpointError
from utils.files import atomic_write
from utils.training.checkpoint import atomic_save

# The flags a .bin's model is rebuilt from, and those a resumed run must repeat.
MODEL_FLAGS = ("model_type", "config", "img_size", "dataset")
DATA_FLAGS = ("seed", "val_split")  # which images were held out to select the best weights
RESUME_FLAGS = (*MODEL_FLAGS, *DATA_FLAGS)


@dataclass
class TrainingState:
    """Everything a run needs to go on exactly where it stopped."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    step: int
    global_batch: int
    best_acc: float
    best_step: int
    rng: list[dict[str, Any]]  # every process's, in rank order
    args: dict[str, Any]
    config: dict[str, Any]
    classes: list[str]
    start: str | None = None  # what the run began from; absent in files of older versions

    def write(self, path: Path) -> None:
        atomic_save(asdict(self), path)

    @classmethod
    def read(cls, path: Path) -> TrainingState:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UsageError(
                f"--resume {path} is not a readable training state ({one_line(error)})"
            ) from None
        names = {f.name for f in fields(cls)}
        if not isinstance(saved, dict) or "optimizer" not in saved:
            raise UsageError(f"--resume {path} is not a <name>_last.pt training state")
        return cls(**{k: v for k, v in saved.items() if k in names})

    def refusal(self, args: Mapping[str, Any], global_batch: int) -> str | None:
        """Why this state cannot continue the run that ``args`` describe, or None."""
        if self.global_batch != global_batch:
            return (
                f"was written with a global batch of {self.global_batch}, not {global_batch}; "
                "set --train_batch_size x processes to match"
            )
        for key in RESUME_FLAGS:
            if self.args.get(key) != args[key]:
                return (
                    f"was written with --{key} {self.args.get(key)}, not {args[key]}; pass the "
                    "same flags as the interrupted run"
                )
        if args["num_steps"] <= self.step:
            return (
                f"is already at step {self.step}, and --num_steps is {args['num_steps']}: "
                "nothing is left to train; raise --num_steps to go on"
            )
        return None


@dataclass(frozen=True)
class RunFiles:
    """Where one run's files live: ``output`` and the run's ``name``."""

    output: Path
    name: str

    @property
    def last(self) -> Path:
        return self.output / f"{self.name}_last.pt"

    @property
    def best(self) -> Path:
        return self.output / f"{self.name}_checkpoint.bin"

    def save_best(self, weights: dict[str, torch.Tensor], args: Mapping, classes: list[str]):
        """The best weights, and beside them what evaluate.py, predict.py and export.py need
        to rebuild their model."""
        atomic_save(weights, self.best)
        record = {"args": {k: args[k] for k in (*MODEL_FLAGS, *DATA_FLAGS)}, "classes": classes}
        meta = json.dumps(record).encode()
        atomic_write(self.best.with_suffix(".json"), lambda f: f.write(meta))

    def resume_from(self, choice: str | None) -> Path | None:
        """``--resume``: None, ``auto`` (this run's own state, if any), or a path."""
        if choice is None:
            return None
        if choice == "auto":
            return self.last if self.last.exists() else None
        path = Path(choice)
        if not path.is_file():
            raise UsageError(
                f"--resume {path}: no such file (use 'auto' to resume {self.last} if present)"
            )
        return path


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from a ``.bin`` or a ``_last.pt``.

    The metadata (model flags under ``args``, ``config``, ``classes``) comes from the training
    state, or from the ``.json`` beside a ``.bin``; it is empty when there is neither (a
    reference checkpoint).
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file ({one_line(error)})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        meta = {k: obj[k] for k in ("args", "config", "classes") if k in obj}
        return obj["model"], meta
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no model state_dict")
    sidecar = path.with_suffix(".json")
    return obj, json.loads(sidecar.read_text()) if sidecar.is_file() else {}
