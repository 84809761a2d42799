"""train.py's command line: its flags, their checks, and the values derived from them.

``parse_flags`` returns the namespace final: nothing changes it afterwards. What is known only
later (``--num_epochs`` in steps, once the images are counted; ``--gradient_accumulation_steps
auto`` as a number, once the step is measured) is derived by the functions below and recorded
beside the flags by ``as_run_used``, which is what the run's files and TensorBoard show.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

import ml_collections

from models.errors import UsageError
from models.families import checked_config
from models.lora import LORA_TARGETS
from models.modeling_resnet import feature_grid, num_downsamples
from utils.cli import (
    Help,
    Parser,
    StoreOverriding,
    add_data_on_device_arg,
    add_model_args,
    int64,
)
from utils.data.datasets import DATASETS
from utils.data.mixing import BatchMixing
from utils.runtime.distributed import elastic_restarts
from utils.training.finetune import FINETUNE_MODES, WhatTrains, check_what_trains
from utils.training.optimizer import OPTIMIZERS

log = logging.getLogger("vit")

USAGE = """Fine-tune a Vision Transformer on CIFAR-10/100: one process or many, CPU or CUDA.

python train.py --name cifar10-100_500 --model_type ViT-B_16
torchrun --nproc_per_node=8 train.py --name cifar10-100_500 --model_type ViT-B_16 --fp16"""
DEFAULT_STEPS = 10000  # when neither --num_steps nor --num_epochs is given
MAX_PATCHES = 64 * 64  # the largest patch grid --img_size may make (``size_problem``)


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
    if elastic_restarts():  # torchrun --max-restarts started this worker again: go on
        args.resume, args.overwrite = args.resume or "auto", False
    check_args(args)
    return FinalFlags(**vars(args))


def build_parser() -> argparse.ArgumentParser:
    """The flags in groups, in the order a run needs them, for ``--help`` and docs/flags.md."""
    p = Parser(
        usage="%(prog)s --name NAME [FLAG ...] [@FILE ...]",
        description=USAGE,
        formatter_class=Help,
    )
    run = p.add_argument_group("run files and resume")
    run.add_argument("--name", required=True, help="name of this run: log folder and file names")
    run.add_argument(
        "--output_dir", metavar="DIR", default="output", help="checkpoints (default: output)"
    )
    run.add_argument(
        "--resume",
        metavar="PATH",
        default=None,
        help="a <name>_last.pt to continue from, or 'auto' for this run's own, if any; with "
        "a larger --num_steps, a finished run trains further (default: none)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh where --output_dir already holds files of this --name: they are "
        "deleted (with the run's TensorBoard events) once every start-up check has passed; "
        "without it such a run is refused",
    )
    run.add_argument(
        "--save_every",
        metavar="N",
        type=int,
        default=None,
        help="steps between writes of <name>_last.pt, to bound the work a crash loses "
        "(default: at each evaluation)",
    )

    model = p.add_argument_group("model")
    add_model_args(model)
    model.add_argument(
        "--pretrained_dir",
        metavar="PATH",
        default=None,
        help="Google .npz checkpoint to start from, downloaded when missing and official: a "
        "path, any gs://<bucket>/<path>.npz of Google's buckets (to checkpoint/<bucket>/<path>), "
        "or augreg:<NAME> (the AugReg file Google's loader picks from index.csv, e.g. "
        "augreg:B_16); 'none' to start from random weights (default: the model type's ImageNet-21k "
        "file, e.g. checkpoint/ViT-B_16.npz, or for Mixer-B_16 and Mixer-L_16 "
        "gs://mixer_models/imagenet21k/<type>.npz)",
    )

    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=DATASETS,
        metavar="NAME",
        default="cifar10",
        help="cifar10, cifar100, or imagefolder: your own --data_dir/train/<class>/* and "
        "val/<class>/* (default: cifar10)",
    )
    data.add_argument(
        "--data_dir", metavar="DIR", default="data", help="data sets, downloaded (default: data)"
    )
    data.add_argument(
        "--val_split",
        metavar="FRACTION",
        type=float,
        default=0.0,
        help="hold out this fraction of the training images (fixed by --seed) to select the best "
        "checkpoint; the test set is then scored once, at the end. 0 selects on the test set, "
        "as the reference does (default: 0)",
    )
    data.add_argument(
        "--hflip",
        action="store_true",
        help="random horizontal flips, as Google's fine-tuning recipe uses (off in the reference)",
    )
    data.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=42,
        help="data order, augmentation, init (default: 42)",
    )
    data.add_argument(
        "--num_workers",
        metavar="N",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data-loader worker processes per training process (default: min(4, CPU count))",
    )
    add_data_on_device_arg(data)

    optimisation = p.add_argument_group("optimisation")
    optimisation.add_argument(
        "--train_batch_size",
        metavar="N",
        type=int,
        default=512,
        help="images per optimizer step on one process, split into "
        "--gradient_accumulation_steps micro-batches (default: 512)",
    )
    optimisation.add_argument(
        "--gradient_accumulation_steps",
        metavar="N",
        type=accumulation,
        default="auto",
        help="micro-batches per optimizer step; must divide --train_batch_size. 'auto': the "
        "fewest that fit, found before training (on CUDA by trial steps, on the CPU from the "
        "memory estimate; a resumed run keeps its own), with the results a typed count gives "
        "(default: auto)",
    )
    optimisation.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd",
        help="sgd: momentum 0.9, Google's fine-tuning recipe; adamw: decoupled weight decay, none "
        "on biases, norms, the position embedding and the class token (default: sgd)",
    )
    optimisation.add_argument(
        "--learning_rate",
        metavar="LR",
        type=float,
        default=3e-2,
        help="peak lr, of the head's layer under --layer_decay (default: 3e-2; AdamW wants "
        "about 1e-4 to 1e-3)",
    )
    optimisation.add_argument(
        "--layer_decay",
        metavar="D",
        type=float,
        default=None,
        help="scale each layer's lr by D^(depth - layer): the head 1, each block below D times "
        "the one above, the embeddings lowest, as BEiT and timm's --layer-decay (default: off)",
    )
    optimisation.add_argument(
        "--weight_decay",
        metavar="WD",
        type=float,
        default=0.0,
        help="weight decay: L2 on every weight for sgd, decoupled for adamw (default: 0)",
    )
    optimisation.add_argument(
        "--max_grad_norm",
        metavar="NORM",
        type=float,
        default=1.0,
        help="global-norm clip (default: 1.0)",
    )
    regularisation = p.add_argument_group("regularisation and weight averaging")
    regularisation.add_argument(
        "--label_smoothing",
        metavar="E",
        type=float,
        default=0.0,
        help="train on targets 1 - E for the label and E spread over all classes (cross_entropy's "
        "own label_smoothing); evaluation losses stay plain (default: 0)",
    )
    regularisation.add_argument(
        "--mixup",
        metavar="A",
        type=float,
        default=0.0,
        help="mix pairs of images and their targets, lam ~ Beta(A, A); DeiT: 0.8 (default: off)",
    )
    regularisation.add_argument(
        "--cutmix",
        metavar="A",
        type=float,
        default=0.0,
        help="paste a box of each pair's partner, Beta(A, A) sized; DeiT: 1.0 (default: off)",
    )
    regularisation.add_argument(
        "--mixup_switch_prob",
        metavar="P",
        type=float,
        default=0.5,
        help="with both, the share of pairs cut-mixed (default: 0.5)",
    )
    regularisation.add_argument(
        "--ema_decay",
        metavar="D",
        type=float,
        default=None,
        help="also score an exponential moving average of the weights (default: off)",
    )

    tuning = p.add_argument_group("what trains")
    tuning.add_argument(
        "--finetune",
        choices=FINETUNE_MODES,
        default="full",
        help="full: every weight; head: the head alone; lora: adapters and the head, merged "
        "when saved (default: full)",
    )
    tuning.add_argument(
        "--freeze_blocks",
        metavar="N",
        type=int,
        default=0,
        help="with full: freeze the embeddings and N blocks (default: 0)",
    )
    tuning.add_argument(
        "--lora_rank", metavar="R", type=int, default=8, help="LoRA's rank (default: 8)"
    )
    tuning.add_argument(
        "--lora_alpha",
        metavar="A",
        type=float,
        default=16.0,
        help="LoRA's scale is A / rank (default: 16)",
    )
    tuning.add_argument(
        "--lora_targets",
        choices=LORA_TARGETS,
        default="attn",
        help="layers with adapters, attn: query, key, value, out (default: attn)",
    )

    schedule = p.add_argument_group("schedule")
    schedule.add_argument(
        "--num_steps",
        metavar="N",
        type=int,
        default=None,
        action=StoreOverriding,
        overrides=("num_epochs",),
        help="optimizer steps; or give --num_epochs instead. Of the two, the one typed last "
        "counts: either overrides a recipe's --num_steps (default: 10000)",
    )
    schedule.add_argument(
        "--num_epochs",
        metavar="EPOCHS",
        type=float,
        default=None,
        action=StoreOverriding,
        overrides=("num_steps",),
        help="passes over the training images instead of --num_steps (the later of the two "
        "counts): steps = epochs x training images // global batch, logged; warm-up and "
        "evaluation stay in steps (default: none)",
    )
    schedule.add_argument(
        "--warmup_steps", metavar="N", type=int, default=500, help="linear warm-up (default: 500)"
    )
    schedule.add_argument(
        "--decay_type",
        choices=["cosine", "linear"],
        default="cosine",
        help="learning-rate decay to zero after the warm-up (default: cosine)",
    )

    reports = p.add_argument_group("evaluation and logging")
    reports.add_argument(
        "--eval_every",
        metavar="N",
        type=int,
        default=100,
        help="steps between evaluations (default: 100)",
    )
    reports.add_argument(
        "--eval_batch_size", metavar="N", type=int, default=64, help="per process (default: 64)"
    )
    reports.add_argument(
        "--log_every",
        metavar="N",
        type=int,
        default=10,
        help="steps between log lines (default: 10)",
    )
    reports.add_argument(
        "--logdir", metavar="DIR", default="logs", help="TensorBoard runs (default: logs)"
    )

    speed = p.add_argument_group("precision, memory and speed")
    speed.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="training precision; bf16 needs no loss scaling (default: fp16 if --fp16, else fp32)",
    )
    speed.add_argument("--fp16", action="store_true", help="float16 autocast with loss scaling")
    speed.add_argument(
        "--fp16_opt_level",
        metavar="LEVEL",
        default="O2",
        help="accepted for compatibility with apex-based scripts and ignored: "
        "mixed precision is torch.amp autocast (default: O2)",
    )
    speed.add_argument(
        "--loss_scale",
        metavar="SCALE",
        type=float,
        default=0,
        help="fp16 loss scale: 0 for dynamic scaling, a positive value for a static one "
        "(default: 0)",
    )
    speed.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="recompute each encoder block's activations in the backward pass instead of "
        "storing them: about a fifth of the activation memory, for 20-35 %% more step time",
    )
    speed.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model for training (its first step, compilation included, is "
        "left out of the images/s figures)",
    )
    speed.add_argument(
        "--device",
        metavar="DEVICE",
        default=None,
        help="cuda or cpu (default: cuda when available)",
    )

    launch = p.add_argument_group("distributed")
    launch.add_argument(
        "--local_rank",
        metavar="N",
        type=int,
        default=-1,
        help="set by launchers: torchrun, torch.distributed.launch (default: -1)",
    )
    return p


def accumulation(text: str) -> int | str:
    """``--gradient_accumulation_steps``: a count, or ``auto``."""
    if text.lower() == "auto":
        return "auto"
    try:
        return int64(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor auto") from None


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
    check_regularisation(args)
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise UsageError(
            f"--layer_decay must be in (0, 1], got {args.layer_decay} (e.g. 0.75 for ViT-B/16)"
        )
    if args.name in ("", ".", "..") or "/" in args.name or "\\" in args.name:
        raise UsageError(
            f"--name {args.name!r} is not a plain file name; it names files in --output_dir "
            "and a folder in --logdir (pick those folders with those flags)"
        )
    config = checked_config(args.model_type, args.config, args.img_size)  # a typo fails now
    if problem := size_problem(config, args.img_size):
        raise UsageError(problem)
    check_what_trains(what_trains(args), config)
    if args.local_rank < -1:
        raise UsageError(f"--local_rank must be >= -1 (-1: not launched), got {args.local_rank}")
    if args.local_rank >= 0 and "RANK" not in os.environ:
        raise UsageError(
            f"--local_rank {args.local_rank} is for launchers (torchrun, "
            "torch.distributed.launch), which also set RANK and WORLD_SIZE; leave it out"
        )
    if args.overwrite and args.resume is not None:
        raise UsageError("--overwrite starts afresh and --resume continues; pass one of them")
    if args.fp16 and args.precision not in (None, "fp16"):
        raise UsageError(f"--fp16 contradicts --precision {args.precision}; pass one of them")
    if args.loss_scale > 0 and not (args.fp16 or args.precision == "fp16"):
        raise UsageError("--loss_scale applies to float16 training only; add --fp16")


def check_regularisation(args: argparse.Namespace) -> None:
    """Mixing, label smoothing and the weight average: values that mean something."""
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    for flag in ("mixup", "cutmix"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0 (0: off), got {getattr(args, flag)}")
    if not 0 <= args.mixup_switch_prob <= 1:
        raise UsageError(f"--mixup_switch_prob must be in [0, 1], got {args.mixup_switch_prob}")
    if (args.mixup or args.cutmix) and args.train_batch_size % 2:
        raise UsageError(
            f"--mixup and --cutmix mix the images of a batch in pairs: pass an even "
            f"--train_batch_size (got {args.train_batch_size})"
        )
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        raise UsageError(
            f"--ema_decay must be in [0, 1), got {args.ema_decay} (e.g. 0.999 for a few "
            "thousand steps)"
        )


def batch_mixing(args: argparse.Namespace, num_classes: int) -> BatchMixing:
    """``--mixup`` and ``--cutmix`` of the training batches (``mixing.BatchMixing``)."""
    return BatchMixing(num_classes, args.seed, args.mixup, args.cutmix, args.mixup_switch_prob)


def what_trains(args: argparse.Namespace) -> WhatTrains:
    """The parameters the run trains (``finetune.WhatTrains``), from its flags."""
    return WhatTrains(
        args.finetune, args.freeze_blocks, args.lora_rank, args.lora_alpha, args.lora_targets
    )


def size_problem(config: ml_collections.ConfigDict, img_size: int) -> str | None:
    """Why ``--img_size`` is too large to train at, or None. Attention's time and memory grow
    with the square of the patches, the fourth power of the size: 4096 px makes 65536 patches of
    16 px, whose start-up memory measurement alone runs for minutes. The bound, a 64x64 grid,
    is twice the side of Google's largest fine-tuning (512 px: 32x32 patches of 16 px)."""
    side, patch = img_size, config.patches.size[0]
    if config.get("resnet") is not None:  # a hybrid's patches tile the ResNet's feature map
        halvings = num_downsamples(tuple(config.resnet.num_layers))
        side, patch = feature_grid(img_size, halvings), patch * 2**halvings
    if (patches := (side // config.patches.size[0]) ** 2) <= MAX_PATCHES:
        return None
    largest = math.isqrt(MAX_PATCHES) * patch
    return (
        f"--img_size {img_size} makes {patches} patches of {patch} px, more than the "
        f"{MAX_PATCHES} (a 64x64 grid) that training allows: attention memory grows with the "
        f"square of the patches; Google fine-tunes at up to 512 px. Use --img_size {largest} "
        "or less"
    )


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
