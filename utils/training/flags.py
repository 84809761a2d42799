"""train.py's command line: its flags, their checks, and the values derived from them.

``parse_flags`` returns the namespace final: nothing changes it afterwards. What is known only
later (``--num_epochs`` in steps, once the images are counted; ``--gradient_accumulation_steps
auto`` as a number, once the step is measured) is derived by the functions below and recorded
beside the flags by ``as_run_used``, which is what the run's files and TensorBoard show.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from models.errors import UsageError
from models.families import checked_config
from utils.cli import Parser, StoreOverriding, add_data_on_device_arg, add_model_args
from utils.data.datasets import DATASETS

log = logging.getLogger("vit")

USAGE = """Fine-tune a Vision Transformer on CIFAR-10/100: one process or many, CPU or CUDA.

python train.py --name cifar10-100_500 --model_type ViT-B_16
torchrun --nproc_per_node=8 train.py --name cifar10-100_500 --model_type ViT-B_16 --fp16"""
DEFAULT_STEPS = 10000  # when neither --num_steps nor --num_epochs is given


class FinalFlags(argparse.Namespace):
    """Parsed and checked flags, which nothing may change: a value derived from them lives
    beside them (``as_run_used``), so that what the user typed stays what the code reads."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the flags are final once parsed; derive {name} instead")


def parse_flags(argv: list[str] | None = None) -> FinalFlags:
    """The flags of ``argv`` (the command line when None), checked: one-line errors, exit 2."""
    args = build_parser().parse_args(argv)
    if args.num_steps is None and args.num_epochs is None:
        args.num_steps = DEFAULT_STEPS
    check_args(args)
    return FinalFlags(**vars(args))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="name of this run: log folder and file names")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="cifar10",
        help="cifar10, cifar100, or imagefolder: your own --data_dir/train/<class>/* and "
        "val/<class>/* (default: cifar10)",
    )
    p.add_argument(
        "--val_split",
        type=float,
        default=0.0,
        help="hold out this fraction of the training images (fixed by --seed) to select the best "
        "checkpoint; the test set is then scored once, at the end. 0 selects on the test set, "
        "as the reference does (default: 0)",
    )
    p.add_argument(
        "--hflip",
        action="store_true",
        help="random horizontal flips, as Google's fine-tuning recipe uses (off in the reference)",
    )
    add_model_args(p)
    p.add_argument(
        "--pretrained_dir",
        default=None,
        help="Google .npz checkpoint to start from, downloaded when missing and official: a "
        "path, any gs://<bucket>/<path>.npz of Google's buckets (to checkpoint/<bucket>/<path>), "
        "or augreg:<NAME> (the AugReg file Google's loader picks from index.csv, e.g. "
        "augreg:B_16); 'none' to start from random weights (default: the model type's ImageNet-21k "
        "file, e.g. checkpoint/ViT-B_16.npz, or for Mixer-B_16 and Mixer-L_16 "
        "gs://mixer_models/imagenet21k/<type>.npz)",
    )
    p.add_argument("--output_dir", default="output", help="checkpoints (default: output)")
    p.add_argument("--data_dir", default="data", help="data sets, downloaded (default: data)")
    p.add_argument("--logdir", default="logs", help="TensorBoard runs (default: logs)")
    p.add_argument(
        "--train_batch_size",
        type=int,
        default=512,
        help="images per optimizer step on one process, split into "
        "--gradient_accumulation_steps micro-batches (default: 512)",
    )
    p.add_argument("--eval_batch_size", type=int, default=64, help="per process (default: 64)")
    p.add_argument(
        "--eval_every", type=int, default=100, help="steps between evaluations (default: 100)"
    )
    p.add_argument("--learning_rate", type=float, default=3e-2, help="peak SGD lr (default: 3e-2)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="SGD weight decay (default: 0)")
    p.add_argument(
        "--num_steps",
        type=int,
        default=None,
        action=StoreOverriding,
        overrides=("num_epochs",),
        help="optimizer steps; or give --num_epochs instead. Of the two, the one typed last "
        "counts: either overrides a recipe's --num_steps (default: 10000)",
    )
    p.add_argument(
        "--num_epochs",
        type=float,
        default=None,
        action=StoreOverriding,
        overrides=("num_steps",),
        help="passes over the training images instead of --num_steps (the later of the two "
        "counts): steps = epochs x training images // global batch, logged; warm-up and "
        "evaluation stay in steps (default: none)",
    )
    p.add_argument(
        "--decay_type",
        choices=["cosine", "linear"],
        default="cosine",
        help="learning-rate decay to zero after the warm-up (default: cosine)",
    )
    p.add_argument("--warmup_steps", type=int, default=500, help="linear warm-up (default: 500)")
    p.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="global-norm clip (default: 1.0)"
    )
    p.add_argument("--local_rank", type=int, default=-1, help="set by launchers (default: -1)")
    p.add_argument(
        "--seed", type=int, default=42, help="data order, augmentation, init (default: 42)"
    )
    p.add_argument(
        "--gradient_accumulation_steps",
        type=accumulation,
        default="auto",
        help="micro-batches per optimizer step; must divide --train_batch_size. 'auto': the "
        "fewest that fit, found before training (on CUDA by trial steps, on the CPU from the "
        "memory estimate; a resumed run keeps its own), with the results a typed count gives "
        "(default: auto)",
    )
    p.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="recompute each encoder block's activations in the backward pass instead of "
        "storing them: about a fifth of the activation memory, for 20-35 %% more step time",
    )
    p.add_argument("--fp16", action="store_true", help="float16 autocast with loss scaling")
    p.add_argument(
        "--fp16_opt_level",
        default="O2",
        help="accepted for compatibility with apex-based scripts and ignored: "
        "mixed precision is torch.amp autocast (default: O2)",
    )
    p.add_argument(
        "--loss_scale",
        type=float,
        default=0,
        help="fp16 loss scale: 0 for dynamic scaling, a positive value for a static one "
        "(default: 0)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="training precision; bf16 needs no loss scaling (default: fp16 if --fp16, else fp32)",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data-loader worker processes per training process (default: min(4, CPU count))",
    )
    add_data_on_device_arg(p)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--log_every", type=int, default=10, help="steps between log lines (default: 10)"
    )
    p.add_argument(
        "--save_every",
        type=int,
        default=None,
        help="steps between writes of <name>_last.pt, to bound the work a crash loses "
        "(default: at each evaluation)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model for training (its first step, compilation included, is "
        "left out of the images/s figures)",
    )
    p.add_argument(
        "--resume",
        default=None,
        help="a <name>_last.pt to continue from, or 'auto' for this run's own, if any; with "
        "a larger --num_steps, a finished run trains further (default: none)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh where --output_dir already holds files of this --name: they are "
        "deleted (with the run's TensorBoard events) once every start-up check has passed; "
        "without it such a run is refused",
    )
    return p


def accumulation(text: str) -> int | str:
    """``--gradient_accumulation_steps``: a count, or ``auto``."""
    return "auto" if text.lower() == "auto" else int(text)


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that would crash later or silently train something else than asked."""
    assert args.num_steps is None or args.num_epochs is None, "the parser keeps the later one"
    positive = (
        "train_batch_size", "eval_batch_size", "num_steps", "num_epochs", "eval_every",
        "img_size", "gradient_accumulation_steps", "log_every", "learning_rate", "max_grad_norm",
        "save_every",
    )  # fmt: skip
    for flag in positive:
        value = getattr(args, flag)
        if value is not None and value != "auto" and value <= 0:
            raise UsageError(f"--{flag} must be positive, got {value}")
    for flag in ("warmup_steps", "num_workers", "weight_decay", "loss_scale", "seed"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.gradient_accumulation_steps != "auto" and (
        args.train_batch_size % args.gradient_accumulation_steps
    ):
        raise UsageError(
            f"--train_batch_size {args.train_batch_size} is not divisible by "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps}"
        )
    if args.num_steps is not None:
        check_warmup(args.warmup_steps, args.num_steps)
    if not 0 <= args.val_split < 1:
        raise UsageError(f"--val_split must be in [0, 1), got {args.val_split}")
    if args.name in ("", ".", "..") or "/" in args.name or "\\" in args.name:
        raise UsageError(
            f"--name {args.name!r} is not a plain file name; it names files in --output_dir "
            "and a folder in --logdir (pick those folders with those flags)"
        )
    checked_config(args.model_type, args.config, args.img_size)  # a typo fails now
    if args.overwrite and args.resume is not None:
        raise UsageError("--overwrite starts afresh and --resume continues; pass one of them")
    if args.fp16 and args.precision not in (None, "fp16"):
        raise UsageError(f"--fp16 contradicts --precision {args.precision}; pass one of them")
    if args.loss_scale > 0 and not (args.fp16 or args.precision == "fp16"):
        raise UsageError("--loss_scale applies to float16 training only; add --fp16")


def check_warmup(warmup_steps: int, num_steps: int) -> None:
    if warmup_steps >= num_steps:
        raise UsageError(
            f"--warmup_steps {warmup_steps} is not below the run's {num_steps} steps: the "
            "learning rate would never reach its peak or decay; lower --warmup_steps"
        )


def steps_of_epochs(epochs: float, images: int, global_batch: int) -> int:
    """``--num_epochs`` in optimizer steps (at least one), logged by the caller."""
    steps = int(epochs * images) // global_batch
    if steps < 1:
        raise UsageError(
            f"--num_epochs {epochs:g} of {images} images is less than one global batch of "
            f"{global_batch}; raise --num_epochs"
        )
    return steps


def total_steps(args: argparse.Namespace, train_images: int, global_batch: int) -> int:
    """The run's length in optimizer steps: ``--num_steps``, or ``--num_epochs`` converted now
    that the number of training images is known (and logged)."""
    if args.num_epochs is None:
        return args.num_steps
    steps = steps_of_epochs(args.num_epochs, train_images, global_batch)
    check_warmup(args.warmup_steps, steps)
    log.info(
        "--num_epochs %g: %d steps of %d images over %d training images",
        args.num_epochs, steps, global_batch, train_images,
    )  # fmt: skip
    return steps


def as_run_used(
    args: argparse.Namespace, num_steps: int, micro_batches: int | str
) -> dict[str, Any]:
    """The flags with the values the run derived from them: what its files record."""
    return {**vars(args), "num_steps": num_steps, "gradient_accumulation_steps": micro_batches}
