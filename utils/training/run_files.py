"""The files of one training run, ``<output_dir>/<name>_*``: written, read, checked, locked and
removed here only.

``<name>_checkpoint.bin``  the best weights: a bare ``state_dict``, the reference's format
``<name>_checkpoint.json`` what rebuilds that model: its flags, config and class names
``<name>_last.pt``         the whole training state: at each evaluation, each ``--save_every``
                           steps and on a stop
``<name>.lock``            locked (``flock``) by the run using the name, removed when it ends;
                           the kernel lets go of it however the process ends (``kill -9``
                           included: the file then stays, unlocked, and the next run takes it)

Each file is written whole or not at all (a temporary ``.<file>.XXXXXXXX.tmp`` beside it, renamed
into place), so a kill during a save leaves the previous file; the next run of the name removes
such leftovers. train.py, evaluate.py and the inspection scripts read the files through
:func:`read_weights` and :meth:`TrainingState.read`, which accept the formats of every earlier
version and refuse, in one line, a file that is damaged in any field.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from models.errors import UsageError, one_line
from models.npz_io import CheckpointError
from utils.files import WRITE_ERRNOS, atomic_write

log = logging.getLogger("vit")

# The flags a .bin's model is rebuilt from, and the data a run selected its best weights on.
MODEL_FLAGS = ("model_type", "config", "img_size", "dataset")
DATA_FLAGS = ("seed", "val_split")
# What else a resumed run must repeat: every flag of the optimisation or of the data stream.
# (The global batch and the precision are compared as the run used them, not as typed.)
OPTIMIZATION_FLAGS = (
    "learning_rate", "weight_decay", "decay_type", "warmup_steps", "max_grad_norm", "hflip",
    "loss_scale", "optimizer", "layer_decay", "label_smoothing", "ema_decay", "mixup", "cutmix",
    "mixup_switch_prob", "finetune", "freeze_blocks", "lora_rank", "lora_alpha", "lora_targets",
)  # fmt: skip
RESUME_FLAGS = (*MODEL_FLAGS, *DATA_FLAGS, *OPTIMIZATION_FLAGS)
# Model-config fields added after files had been written, with the value those files used.
FIELDS_ADDED_LATER = {"gelu": "exact"}
# mkstemp's random part: the longest name a save writes is ".<name>_checkpoint.json.XXXXXXXX.tmp"
TEMPORARY = ".{}.XXXXXXXX.tmp"


def precision_of(args: Mapping[str, Any]) -> str:
    """The precision a run trains in, from its flags (``--fp16`` or ``--precision``)."""
    return args.get("precision") or ("fp16" if args.get("fp16") else "fp32")


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
    # The last step of each learning-rate schedule: one, and one more for each time a finished
    # run was trained further (absent in older files: the one of args["num_steps"]).
    schedule: list[int] | None = None
    # --ema_decay's averaged weights (``averaging.WeightAverage``), and whether the best weights
    # were the average's; absent in files of runs without an average
    average: dict[str, torch.Tensor] | None = None
    best_averaged: bool = False
    # a digest of the weights --finetune head|lora or --freeze_blocks kept frozen, which the
    # state leaves out: a resume reloads them from the starting weights and checks them
    frozen: str | None = None

    def write(self, path: Path) -> None:
        atomic_write(path, lambda f: torch.save(asdict(self), f))

    @classmethod
    def read(cls, path: Path) -> TrainingState:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UsageError(
                f"--resume {path} is not a readable training state ({one_line(error)}); "
                "resume from another file, or start again with --overwrite"
            ) from None
        if not isinstance(saved, dict) or "optimizer" not in saved:
            raise UsageError(f"--resume {path} is not a <name>_last.pt training state")
        if problem := _state_problem(saved):
            raise UsageError(
                f"--resume {path} is damaged: {problem}; resume from another file, or start "
                "again with --overwrite"
            )
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    @property
    def gelu(self) -> str:
        """The GELU the saved model computes (``learned_gelu``)."""
        return learned_gelu({"args": self.args, "config": self.config})

    @property
    def ends(self) -> list[int]:
        return list(self.schedule or [self.args["num_steps"]])

    def differences(self, args: Mapping[str, Any], global_batch: int) -> list[str]:
        """Each flag of ``args`` that would change the optimisation or the data stream of the
        saved run, as ``--flag saved (now new)``; a flag an older file did not record passes."""
        found = []
        if self.global_batch != global_batch:
            found.append(
                f"global batch {self.global_batch} (now {global_batch}: --train_batch_size x "
                "processes)"
            )
        for key in RESUME_FLAGS:
            if key in self.args and self.args[key] != args[key]:
                found.append(f"--{key} {_shown(self.args[key])} (now {_shown(args[key])})")
        if "fp16" in self.args and precision_of(self.args) != precision_of(args):
            found.append(f"--precision {precision_of(self.args)} (now {precision_of(args)})")
        return found

    def refusal(self, args: Mapping[str, Any], global_batch: int) -> str | None:
        """Why this state cannot continue the run that ``args`` describe, or None."""
        if found := self.differences(args, global_batch):
            return (
                f"was written with other flags: {', '.join(found)}. A resume trains on as the "
                "run began: pass the saved values, or start a new run (another --name, or "
                "--overwrite)"
            )
        if other_data := self.other_data(args):
            return (
                f"{other_data}: a resume trains on what the run began with; pass the --data_dir "
                "it was trained on, or start a new run (another --name, or --overwrite)"
            )
        end, steps = self.ends[-1], args["num_steps"]
        if steps < end:
            return (
                f"belongs to a run of {end} steps, and --num_steps is {steps}: a resume keeps "
                f"its schedule; pass --num_steps {end}, or more to train it further"
            )
        if steps == end and self.step >= end:
            return (
                f"is already at step {self.step}, and --num_steps is {steps}: nothing is left "
                "to train; raise --num_steps to train it further"
            )
        if steps > end and args["warmup_steps"] >= steps - end:
            return (
                f"would be trained {steps - end} steps further, which its --warmup_steps "
                f"{args['warmup_steps']} does not fit: raise --num_steps"
            )
        return None

    def other_data(self, args: Mapping[str, Any]) -> str | None:
        """How the images ``args["data_dir"]`` holds now differ from those the run trained on
        (``{split: [images, digest]}`` under ``args["data"]``), or None; a file written before
        runs recorded them passes."""
        saved, now = self.args.get("data"), args.get("data")
        if saved is None or now is None or saved == now:
            return None
        counts = lambda data: " / ".join(f"{data[split][0]} {split}" for split in data)
        folder = Path(str(args.get("data_dir"))).absolute()
        if {k: v[0] for k, v in saved.items()} != {k: v[0] for k, v in now.items()}:
            return (
                f"was trained on {counts(saved)} images, and --data_dir {folder} now holds "
                f"{counts(now)}"
            )
        changed = [split for split in saved if saved[split] != now[split]]
        return (
            f"was trained on other images: --data_dir {folder} holds as many ({counts(now)}), "
            f"but not the same {' and '.join(changed)} images, or not in the same order"
        )


def _shown(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else str(value)


def all_finite(weights: Mapping[str, torch.Tensor]) -> bool:
    """No NaN or infinity in any floating-point tensor of ``weights``."""
    floats = [t for t in weights.values() if t.is_floating_point()]
    if not floats:
        return True
    # one reduction per tensor, read back once: a GPU waits once, not once per tensor
    return bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())


def _state_problem(saved: dict) -> str | None:
    """What is wrong with the fields of a loaded ``_last.pt``, or None."""
    checks = {
        "model": lambda v: _is_weights(v) and len(v) > 0,
        "optimizer": lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("state"), dict)
            and isinstance(v.get("param_groups"), list)
        ),
        "scheduler": lambda v: isinstance(v, dict) and _is_count(v.get("last_epoch")),
        "scaler": lambda v: isinstance(v, dict),
        "step": _is_count,
        "global_batch": lambda v: _is_count(v) and v > 0,
        "best_acc": lambda v: isinstance(v, int | float) and 0 <= v <= 1,
        "best_step": _is_count,
        "rng": lambda v: (
            isinstance(v, list)
            and len(v) > 0
            and all(isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor) for r in v)
        ),
        "args": lambda v: isinstance(v, dict) and _is_count(v.get("num_steps")),
        "config": lambda v: isinstance(v, dict),
        "classes": lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v),
    }
    for key, ok in checks.items():
        if key not in saved:
            return f"it has no {key!r} field"
        if not ok(saved[key]):
            return f"its {key!r} field is malformed"
    if saved["best_step"] > saved["step"]:
        return f"its best step {saved['best_step']} is after its step {saved['step']}"
    if saved["scheduler"]["last_epoch"] != saved["step"]:
        return "its learning-rate schedule is not at its step"
    data = saved["args"].get("data")  # {split: [images, digest]}, in files since runs record it
    if data is not None and not (
        isinstance(data, dict)
        and all(isinstance(v, list) and len(v) == 2 and _is_count(v[0]) for v in data.values())
        and all(isinstance(v[1], str) for v in data.values())
    ):
        return "its recorded data (under 'args') are malformed"
    schedule = saved.get("schedule")
    if schedule is not None and not (
        isinstance(schedule, list)
        and schedule
        and all(_is_count(e) for e in schedule)
        and schedule == sorted(set(schedule))
    ):
        return "its 'schedule' field is malformed"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_weights(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


class RunFiles:
    """One run's files: those of ``name`` in the folder ``output``."""

    SUFFIXES = ("_checkpoint.bin", "_checkpoint.json", "_last.pt")

    def __init__(self, output: Path, name: str) -> None:
        self.output, self.name = Path(output).absolute(), name
        self._lock_fd: int | None = None

    @property
    def last(self) -> Path:
        return self.output / f"{self.name}_last.pt"

    @property
    def best(self) -> Path:
        return self.output / f"{self.name}_checkpoint.bin"

    @property
    def meta(self) -> Path:
        return self.best.with_suffix(".json")

    @property
    def lock_path(self) -> Path:
        return self.output / f"{self.name}.lock"

    def existing(self) -> list[Path]:
        return [p for p in (self.best, self.meta, self.last) if p.exists()]

    def temporaries(self) -> list[Path]:
        """Leftovers of saves that a kill interrupted."""
        if not self.output.is_dir():
            return []
        names = [f".{p.name}." for p in (self.best, self.meta, self.last)]
        return [
            p
            for p in self.output.iterdir()
            if p.name.endswith(".tmp") and any(p.name.startswith(n) for n in names)
        ]

    # -- before training --------------------------------------------------------------------

    def check_writable(self, flag: str, folder: Path) -> None:
        """Fail now, not after hours of training, where ``folder`` (made later if missing) cannot
        hold this run's files: no permission, a file in the way, a read-only disk, or a name
        longer than the file system allows. Writes a probe file and removes it; makes nothing."""
        folder = Path(folder).absolute()
        existing = folder
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(
                f"{flag} {folder} cannot be made: {existing} is a file, not a folder; choose "
                "another folder"
            )
        longest = TEMPORARY.format(f"{self.name}_checkpoint.json")
        probe = existing / longest.replace("XXXXXXXX", f"{os.getpid():08d}"[-8:])
        try:
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as error:
            if error.errno == errno.ENAMETOOLONG:
                raise UsageError(
                    f"--name {self.name} is too long: the run's file {longest} has "
                    f"{len(longest)} characters, more than {existing} allows; use a shorter "
                    "--name"
                ) from None
            raise UsageError(
                f"{flag} {folder} cannot be written ({error.strerror} in {existing}); choose "
                "another folder"
            ) from None

    def claim(self, resume: str | None, overwrite: bool) -> None:
        """Take the name for this process, or refuse: it is in use, or it has finished files
        that a new run would replace without ``--resume`` or ``--overwrite``. Then remove the
        temporary files of a killed save. Makes ``output``."""
        if (found := self.existing()) and resume is None and not overwrite:
            listed = ", ".join(p.name for p in found)
            raise UsageError(
                f"--name {self.name} has run files in {self.output} ({listed}): continue that "
                "run with --resume auto, pick another --name, or replace it with --overwrite"
            )
        if resume == "auto" and found and not self.last.exists():
            raise UsageError(
                f"--resume auto: {self.output} holds {self.best.name} but no {self.last.name} "
                "to continue from; pick another --name, or replace the run with --overwrite"
            )
        self.output.mkdir(parents=True, exist_ok=True)
        self._lock()
        for leftover in self.temporaries():
            leftover.unlink(missing_ok=True)

    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            if not self._locked(fd):
                return
            try:  # the file is still the one at the path: not removed by a run that just ended
                if os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        self._lock_fd = fd

    def _locked(self, fd: int) -> bool:
        """Lock ``fd``; False where the file system has no locks (some cluster mounts)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(
                f"--name {self.name} is in use in {self.output}: {holder} is running it; wait "
                "for that run to end, or pick another --name"
            ) from None
        except OSError as error:
            os.close(fd)
            log.warning(
                "cannot lock %s (%s): a second run of --name %s at once would not be stopped",
                self.lock_path, error.strerror, self.name,
            )  # fmt: skip
            return False
        return True

    def release(self) -> None:
        """Let go of the name: the lock file is removed while still locked, so that a run that
        opened it meanwhile finds it gone and takes a new one (``_lock``)."""
        if self._lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> list[Path]:
        """``--overwrite``: delete the earlier run's files; the paths removed."""
        found = self.existing()
        for path in found:
            path.unlink()
        return found

    # -- during training ----------------------------------------------------------------------

    def save_best(
        self,
        weights: dict[str, torch.Tensor],
        args: Mapping,
        config: dict[str, Any],
        classes: list[str],
    ) -> None:
        """The best weights, and beside them what evaluate.py, predict.py and export.py need
        to rebuild their model: its flags and its whole config (``ConfigDict.to_dict()``), which
        holds what the flags leave to a default (the GELU)."""
        atomic_write(self.best, lambda f: torch.save(weights, f))
        flags = {k: args[k] for k in (*MODEL_FLAGS, *DATA_FLAGS)}
        record = {"args": flags, "config": config, "classes": classes}
        meta = json.dumps(record).encode()
        atomic_write(self.meta, lambda f: f.write(meta))

    def resume_from(self, choice: str | None) -> Path | None:
        """``--resume``: None, ``auto`` (this run's own state, if any), or a path."""
        if choice is None:
            return None
        if choice == "auto":
            return self.last if self.last.exists() else None
        if problem := self.resume_problem(choice):
            raise UsageError(problem)
        return Path(choice).absolute()

    def resume_problem(self, choice: str | None) -> str | None:
        """Why ``--resume`` names no file to continue from, or None."""
        if choice in (None, "auto") or Path(choice).is_file():
            return None
        path = Path(choice).absolute()
        return f"--resume {path}: no such file (use 'auto' to resume {self.last} if present)"


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) from a ``.bin`` or a ``_last.pt``.

    The metadata (model flags under ``args``, ``config``, ``classes``) comes from the training
    state, or from the ``.json`` beside a ``.bin``; it is empty when there is neither (a
    reference checkpoint).
    """
    path = Path(path).absolute()
    weights, meta = _weights_and_meta(_load(path), path)
    if not _is_weights(weights) or not weights:
        raise CheckpointError(f"checkpoint {path} holds no model state_dict")
    if not all_finite(weights):
        raise CheckpointError(
            f"checkpoint {path} holds non-finite weights (NaN or infinity): a run that diverged "
            "wrote it; use an earlier checkpoint"
        )
    if problem := _meta_problem(meta):
        raise CheckpointError(f"checkpoint {path}: {problem}")
    return weights, meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """``read_weights``' metadata alone: the weights are memory-mapped, not read (a training
    state may hold gigabytes)."""
    path = Path(path).absolute()
    try:
        obj = _load(path, mmap=True)
    except CheckpointError:  # torch's legacy format cannot be mapped
        obj = _load(path)
    meta = _weights_and_meta(obj, path)[1]
    if problem := _meta_problem(meta):
        raise CheckpointError(f"checkpoint {path}: {problem}")
    return meta


def learned_gelu(meta: Mapping[str, Any]) -> str:
    """The GELU that the weights of a file with this metadata (``read_weights``) learned with:
    the one its model config records; in a file written before configs recorded it, the one its
    ``--config`` chose, else exact, as in every such file and in the reference's ``.bin``."""
    config = meta.get("config")
    if isinstance(config, Mapping) and "gelu" in config:
        return str(config["gelu"])
    args = meta.get("args")
    for item in (args.get("config") or []) if isinstance(args, Mapping) else []:
        key, _, value = str(item).partition("=")
        if key.strip() == "gelu":
            return value.strip()
    return FIELDS_ADDED_LATER["gelu"]


def _load(path: Path, mmap: bool = False) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file ({one_line(error)})"
        ) from None


def _weights_and_meta(obj: object, path: Path) -> tuple[Any, dict[str, Any]]:
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        if obj.get("frozen") is not None:  # a state of a run that froze weights holds the rest
            best = path.with_name(path.name.replace("_last.pt", "_checkpoint.bin"))
            raise CheckpointError(
                f"checkpoint {path} holds only the weights its run trained (--finetune "
                f"{obj['args'].get('finetune')}), for --resume; the whole model is in {best}"
            )
        return obj["model"], {k: obj[k] for k in ("args", "config", "classes") if k in obj}
    if _is_weights(obj) and obj:
        return obj, _read_meta(path.with_suffix(".json"))
    raise CheckpointError(f"checkpoint {path} holds no model state_dict")


def _read_meta(sidecar: Path) -> dict[str, Any]:
    if not sidecar.is_file():
        return {}
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{sidecar} is not valid JSON ({one_line(error)}); fix it, or delete it to use the "
            "weights with explicit --model_type, --img_size and --dataset flags"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{sidecar} does not hold a JSON object; delete it or rewrite it")
    return meta


def _meta_problem(meta: Mapping[str, Any]) -> str | None:
    """What is wrong with the recorded flags and class names, or None."""
    args, classes = meta.get("args", {}), meta.get("classes")
    if not isinstance(args, dict):
        return "its recorded 'args' are not a mapping of flags"
    if classes is not None and not (
        isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
    ):
        return "its recorded 'classes' are not a list of class names"
    if not isinstance(meta.get("config", {}), dict):
        return "its recorded 'config' is not a mapping of model-config fields"
    expected = {"model_type": str, "img_size": int, "dataset": str, "config": list}
    for key, kind in expected.items():
        if key in args and not isinstance(args[key], kind):
            return f"its recorded --{key} {args[key]!r} is not a {kind.__name__}"
    if isinstance(args.get("img_size"), int) and args["img_size"] <= 0:
        return f"its recorded --img_size {args['img_size']} is not positive"
    if isinstance(args.get("val_split"), int | float) and not 0 <= args["val_split"] < 1:
        return f"its recorded --val_split {args['val_split']} is outside [0, 1)"
    return None


def write_error(error: OSError) -> str | None:
    """The words for a write that failed during training, or None for other OSErrors."""
    if error.errno not in WRITE_ERRNOS:
        return None
    where = f" {error.filename}" if error.filename else ""
    return f"cannot write{where} ({error.strerror})"
