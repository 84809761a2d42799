"""Fine-tune a Vision Transformer on CIFAR-10/100: one process or many, CPU or CUDA.

python train.py --name cifar10-100_500 --model_type ViT-B_16
torchrun --nproc_per_node=8 train.py --name cifar10-100_500 --model_type ViT-B_16 --fp16

Why one file of this length: it is the application a user reads first, top-down. Its parser
(about a third: every flag with its help and default, the reference's names kept) and the
argument checks come first, then the named steps that train() calls, then train(); the pieces
that have a concept of their own live in utils/.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from models.checkpoint import load_resized
from models.configs import apply_overrides
from models.errors import UsageError, one_line
from models.families import make_model, resolution_problem
from models.modeling import CONFIGS
from models.npz_io import check_downloaded_npz, npz_problem, read_npz
from models.pretrained import (
    AUGREG_INDEX,
    AUGREG_INDEX_PATH,
    AUGREG_PREFIX,
    BUCKET,
    GCS,
    GCS_MIRROR_VARIABLE,
    MIRROR_VARIABLE,
    MIXER_I21K,
    bucket_file,
    check_augreg_index,
    choose_augreg,
    default_filename,
    default_source,
    describe,
    load_augreg_index,
    official_url,
)
from utils.cli import Parser, StoreOverriding, add_data_on_device_arg, add_model_args, run_main
from utils.data.cifar import CIFAR, ensure_cifar
from utils.data.datasets import DATASETS, RunData, build_datasets
from utils.data.device_batches import DeviceBatches, DeviceCopies, use_device_data
from utils.data.download import DownloadError, download_file
from utils.data.loader import evaluation_batches
from utils.data.loader import make_loader as worker_loader
from utils.data.sampling import GlobalBatchSampler, shard_indices, unwrap_subset
from utils.files import FoldersMade
from utils.inspection.figures import log_eval_images
from utils.training import distributed as dist
from utils.training.engine import evaluate, train_step
from utils.training.logger import Meter, Reporter, remove_events, setup_logging
from utils.training.memory import (
    GIB,
    StepMemory,
    available_bytes,
    fewest_micro_batches_that_run,
    measure_step,
    trial_step_fits,
)
from utils.training.precision import Precision
from utils.training.rng import rng_state, set_rng_state
from utils.training.run_files import (
    RunFiles,
    TrainingState,
    all_finite,
    precision_of,
    read_weights,
    write_error,
)
from utils.training.scheduler import build_scheduler, next_lr_from_schedule
from utils.training.signals import StopRequest

log = logging.getLogger("vit")
# A step that the fp16 scaler skips makes PyTorch think the scheduler ran first; it did not.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")


def build_parser() -> argparse.ArgumentParser:
    usage = __doc__.partition("\n\nWhy one file")[0]  # not the note to developers
    p = Parser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    if args.num_steps is None and args.num_epochs is None:
        args.num_steps = 10000
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
    config = apply_overrides(CONFIGS[args.model_type], args.config)  # a typo fails now
    if problem := resolution_problem(config, args.img_size):
        raise UsageError(problem)
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


def claim_run(files: RunFiles, args: argparse.Namespace) -> None:
    """Fail now, not after hours of training, where the run could not write its files or would
    replace finished ones; then hold its name against a second run (rank 0, which writes)."""
    files.check_writable("--output_dir", files.output)
    files.check_writable("--logdir", Path(args.logdir) / args.name)
    files.claim(args.resume, args.overwrite)


def check_inputs(args: argparse.Namespace, files: RunFiles) -> None:
    """Every missing input named in one line, before anything slow (data set scan, memory
    estimate, download) runs."""
    problems = []
    weights, _ = starting_point(args)
    remote = bucket_file(args.pretrained_dir) is not None  # gs:// or augreg:, downloaded
    if args.pretrained_dir and args.pretrained_dir.startswith(AUGREG_PREFIX):
        model = args.pretrained_dir.removeprefix(AUGREG_PREFIX)
        log.info("%s", choose_augreg(load_augreg_index(), model).summary())
    if (
        weights is not None
        and not weights.exists()
        and official_url(weights.name) is None
        and not remote
    ):
        problems.append(missing_checkpoint(weights, args))
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        problems.append(
            f"--resume {Path(args.resume).absolute()}: no such file (use 'auto' to resume "
            f"{files.last} if present)"
        )
    if args.dataset == "imagefolder" and not (Path(args.data_dir) / "train").is_dir():
        folder = Path(args.data_dir).absolute()
        problems.append(
            f"--data_dir {folder} has no train/ folder; expected {folder}/train/<class>/<images>"
        )
    if problems:
        raise UsageError("; and ".join(problems))


def starting_point(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The weights a run starts from (None: random), and the words every report uses for them."""
    if args.pretrained_dir is not None and args.pretrained_dir.lower() == "none":
        return None, "training from random weights (--pretrained_dir none)"
    spec = args.pretrained_dir or default_source(args.model_type)
    if spec is not None and spec.startswith(AUGREG_PREFIX) and not AUGREG_INDEX_PATH.exists():
        url = AUGREG_INDEX.url()
        log.info("downloading %s to %s", url, AUGREG_INDEX_PATH)
        try:
            download_file(url, AUGREG_INDEX_PATH, verify=check_augreg_index)
        except DownloadError as error:
            raise UsageError(
                f"{error}, or set {GCS_MIRROR_VARIABLE} to a mirror of {GCS} "
                "(<mirror>/vit_models/augreg/index.csv)"
            ) from None
    if (remote := bucket_file(spec)) is not None:  # gs://<bucket>/<path>.npz or augreg:<NAME>
        chosen = f", chosen for {spec}" if spec.startswith(AUGREG_PREFIX) else ""
        return remote.local, f"fine-tuning from {remote.local} ({remote.describe()}{chosen})"
    if args.pretrained_dir is None:
        path = Path("checkpoint") / default_filename(args.model_type)
    else:
        path = Path(args.pretrained_dir)
    if path.suffix in (".bin", ".pt"):
        kind = "a checkpoint of this project"
    else:
        kind = describe(path.name) or "a .npz in Google's layout"
    return path, f"fine-tuning from {path} ({kind})"


def missing_checkpoint(path: Path, args: argparse.Namespace) -> str:
    """The words for a ``--pretrained_dir`` (given, or the default) that is not there."""
    given = (
        f"--pretrained_dir {path.absolute()}"
        if args.pretrained_dir
        else f"the default --pretrained_dir of --model_type {args.model_type}, {path.absolute()},"
    )
    if args.pretrained_dir is None and args.model_type.startswith("Mixer-"):
        return (
            f"{given} does not exist, and Google published no ImageNet-21k file of "
            f"{args.model_type} (only of {' and '.join(MIXER_I21K)}): pass a file of its bucket, "
            f"e.g. --pretrained_dir gs://mixer_models/gsam/{args.model_type}.npz, or "
            "--pretrained_dir none for random weights"
        )
    return (
        f"{given} does not exist and is not the name of an official checkpoint (e.g. "
        "ViT-B_16.npz); pass an existing file, or --pretrained_dir none for random weights"
    )


def fetch_pretrained(path: Path, args: argparse.Namespace) -> Path:
    """The checkpoint at ``path``, downloaded from Google's bucket first when it is official; an
    official file there or arriving that is not a readable .npz is refused, the download kept
    only when complete."""
    remote = bucket_file(args.pretrained_dir)  # gs:// or augreg:, whatever its file name
    url = remote.url() if remote is not None else official_url(path.name)
    if path.exists():
        if url is not None and (problem := npz_problem(path)):
            where = path.absolute()
            raise UsageError(
                f"{where} is not a readable .npz ({problem}); delete it "
                f"(rm {shlex.quote(str(where))}) and run again to download it anew"
            )
        return path
    if url is None:
        raise UsageError(missing_checkpoint(path, args))
    log.info("downloading %s to %s", url, path)
    try:
        return download_file(url, path, desc=path.name, verify=check_downloaded_npz)
    except DownloadError as error:
        if remote is not None:
            raise UsageError(
                f"{error}, or set {GCS_MIRROR_VARIABLE} to a mirror of {GCS} "
                f"(<mirror>/{remote.bucket}/{remote.path})"
            ) from None
        raise UsageError(
            f"{error}, or set {MIRROR_VARIABLE} to a mirror of {BUCKET} (the same layout)"
        ) from None


def check_memory(
    step: StepMemory,
    args,
    ctx: dist.Context,
    precision: Precision,
    auto: bool = False,
    model: torch.nn.Module | None = None,
) -> str:
    """The advice an out-of-memory error in a step will give. Refuse the step now only where no
    trial step can say (off CUDA, where running out of memory kills the process) and only when
    even the least it needs, ``StepMemory.least``, exceeds the free memory; on CUDA what runs
    decides, and an estimate that says no is a warning."""
    available = available_bytes(ctx.device)
    batch, accum = args.train_batch_size, args.gradient_accumulation_steps
    micro = batch // accum
    needed = step.needed(micro)
    fewest = step.fewest_micro_batches(batch, available)
    fixes, n = [], fewest
    if n is not None and n <= accum:  # for an OOM the estimate missed
        n = next((d for d in range(accum + 1, batch + 1) if batch % d == 0), None)
    if n is not None:
        fixes.append(
            f"--gradient_accumulation_steps {n} (micro-batches of {batch // n}, about "
            f"{step.needed(batch // n) / GIB:.1f} GiB; the same global batch)"
        )
    if not auto:
        fixes.append("--gradient_accumulation_steps auto")
    if fewest is None and model is not None:  # not even one image at a time fits
        fixes += switches_that_fit(model, args, ctx, precision, available)
    advice = (
        f"a step of {micro} images of {args.img_size} px ({args.model_type}, {precision.name}) "
        f"needs about {needed / GIB:.1f} GiB, and {available / GIB:.1f} GiB of "
        f"{ctx.device.type} memory are free; use " + ", or ".join(fixes)
    )
    cannot = ctx.device.type != "cuda" and step.least(micro) > available
    if dist.any_rank(cannot):
        raise UsageError(advice)
    if needed > available:
        log.warning("the memory estimate says this may not fit (%s); trying it", advice)
    return advice


def switches_that_fit(model: torch.nn.Module, args, ctx: dist.Context, precision: Precision,
                      available: int) -> list[str]:  # fmt: skip
    """Where no micro-batch fits: ``--grad_checkpointing`` and/or ``--precision bf16``, each
    with the micro-batches it needs, measured as the run's own step was; only those that fit."""
    batch, found = args.train_batch_size, []
    names = {precision.name, "bf16" if precision.name == "fp32" else precision.name}
    options = [(c, p) for c in {args.grad_checkpointing, True} for p in names]
    for checkpointing, name in sorted(options):
        if (checkpointing, name) == (args.grad_checkpointing, precision.name):
            continue
        model.set_grad_checkpointing(checkpointing)
        autocast = Precision(name, ctx.device, 0).autocast
        step = measure_step(model, args.img_size, ctx.device, autocast)
        if n := step.fewest_micro_batches(batch, available):
            switches = " ".join(
                ([] if checkpointing == args.grad_checkpointing else ["--grad_checkpointing"])
                + ([] if name == precision.name else [f"--precision {name}"])
            )
            found.append(
                f"{switches} --gradient_accumulation_steps {n} (micro-batches of {batch // n}, "
                f"about {step.needed(batch // n) / GIB:.1f} GiB)"
            )
    model.set_grad_checkpointing(args.grad_checkpointing)
    if not found:
        found.append(
            "a smaller --img_size or --model_type: no flag of this run makes one image fit"
        )
    return found


def choose_accumulation(
    model, step: StepMemory, args, ctx: dist.Context, precision: Precision, resumed: int | None
) -> int:
    """``--gradient_accumulation_steps auto``: the fewest micro-batches that fit, by trial steps
    on CUDA and from the memory estimate ``step`` elsewhere; a resumed run's own count while it
    fits (the same sums in the same order). Every process takes the largest count any of them
    needs, so that all run the same micro-batches."""
    batch, started = args.train_batch_size, time.perf_counter()
    if ctx.device.type == "cuda":
        how = f"whose trial forward and backward passes ran on {ctx.device}"

        def fits(micro: int) -> bool:
            return trial_step_fits(model, micro, args.img_size, ctx.device, precision.autocast)
    else:
        available = available_bytes(ctx.device)
        how = f"that fit in the {available / GIB:.1f} GiB free, from the memory estimate"

        def fits(micro: int) -> bool:
            return step.needed(micro) <= available

    if resumed is not None and batch % resumed == 0 and fits(batch // resumed):
        n, why = resumed, "the resumed run's own"
    else:
        n = fewest_micro_batches_that_run(batch, fits)
        why = f"the fewest {how}" if n else f"none fits ({how}): one image at a time"
    n = max(dist.gather_objects(n or batch))
    log.info(
        "--gradient_accumulation_steps auto: %d micro-batch%s of %d images, %s; a step of %d "
        "needs about %.1f GiB by the estimate (%.1f s)",
        n, "es" if n > 1 else "", batch // n, why, batch // n, step.needed(batch // n) / GIB,
        time.perf_counter() - started,
    )  # fmt: skip
    return n


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    config = apply_overrides(CONFIGS[args.model_type], args.config)
    try:
        model = make_model(config, args.img_size, num_classes, zero_head=True)
    except ValueError as error:
        raise UsageError(f"cannot build {args.model_type}: {error}") from None
    model.set_grad_checkpointing(args.grad_checkpointing)  # before torch.compile sees it
    return model


def restore_state(files: RunFiles, args: argparse.Namespace, global_batch: int):
    """The training state ``--resume`` names, checked to continue this very run; or None."""
    path = files.resume_from(args.resume)
    if path is None:
        return None
    state = TrainingState.read(path)
    if reason := state.refusal(vars(args), global_batch):
        raise UsageError(f"--resume {path} {reason}")
    if not all_finite(state.model):
        raise UsageError(
            f"--resume {path} holds non-finite weights (NaN or infinity): an earlier version "
            "saved them after the loss diverged; start again with a lower --learning_rate and "
            "--overwrite"
        )
    end = state.ends[-1]
    if args.num_steps > end:
        log.info(
            "resumed from %s at step %d; %s, then steps %d to %d warm up again over %d steps "
            "and decay (%s) to zero at step %d",
            path, state.step,
            f"its run of {end} steps was finished" if state.step == end
            else f"its schedule ends at step {end}",
            end + 1, args.num_steps, args.warmup_steps, args.decay_type, args.num_steps,
        )  # fmt: skip
    else:
        log.info("resumed from %s at step %d", path, state.step)
    return state


def schedule_ends(state: TrainingState | None, num_steps: int) -> list[int]:
    """The last step of each learning-rate schedule of the run (see ``build_scheduler``)."""
    if state is None:
        return [num_steps]
    ends = state.ends
    return ends if num_steps == ends[-1] else [*ends, num_steps]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    ctx = dist.setup(args.local_rank, args.device)
    setup_logging(ctx.is_main)
    stop = StopRequest()
    try:
        code = train(args, ctx, stop)
        # No process tears its links down while another still uses them (gloo aborts a peer
        # mid-exchange: "terminate called without an active exception", seen once in CI)
        dist.barrier()
        return code
    finally:
        stop.restore()
        dist.cleanup()


def build_data(args: argparse.Namespace, ctx: dist.Context) -> RunData:
    if args.dataset in CIFAR:  # downloaded once per disk, while the other processes wait
        dist.each_node_first(lambda: ensure_cifar(args.dataset, args.data_dir), ctx)
    data = build_datasets(
        args.dataset, args.data_dir, args.img_size, args.seed, args.val_split, args.hflip
    )
    global_batch = args.train_batch_size * ctx.world_size
    if global_batch > len(data.train):
        raise UsageError(
            f"global batch {global_batch} exceeds the {len(data.train)} training images"
        )
    return data


def load_initial_weights(path: Path, args: argparse.Namespace, ctx: dist.Context, model) -> None:
    """Google's .npz (downloaded when official and missing), or one of our own checkpoints:
    read by rank 0, whose weights then reach the other processes (the file is on its disk)."""

    def on_main() -> dict[str, torch.Tensor]:
        if path.suffix in (".bin", ".pt"):
            load_resized(model, read_weights(path)[0], keep_head=False)
        else:
            model.load_from(read_npz(fetch_pretrained(path, args)))
        return model.state_dict()

    weights = dist.from_main(on_main, ctx)
    if not ctx.is_main:
        model.load_state_dict(weights)


class DataPath:
    """The run's batches: training batches in the global order from ``step`` on, and the
    evaluation batches of the selection set (and, at the end, of the test set), made on the
    device (``--data_on_device``) or by DataLoader workers."""

    def __init__(
        self,
        data: RunData,
        ctx: dist.Context,
        global_batch: int,
        step: int,
        *,
        seed: int,
        data_on_device: str,
        num_workers: int,
        eval_batch_size: int,
    ) -> None:
        self.ctx, self.seed, self.num_workers = ctx, seed, num_workers
        self.eval_batch_size, self.test_set = eval_batch_size, data.test
        sets = [unwrap_subset(d)[0] for d in (data.train, data.select, data.test) if d]
        on_device = use_device_data(data_on_device, sets, ctx.device)
        # the device copies of the run's images, shared by sets that share them; None: workers
        self.copies = DeviceCopies(ctx.device) if on_device else None
        sampler = GlobalBatchSampler(
            len(data.train), global_batch, ctx.rank, ctx.world_size, seed, step
        )
        self.next_batch = self.training_batches(data.train, sampler)
        self.select = self.eval_batches(data.select)

    def training_batches(self, train_set, sampler: GlobalBatchSampler):
        """A function returning the next (images, labels) on the device. On the device path a
        batch is made there from its keys alone (``utils.data.device_batches``): no workers, no
        host work per image; otherwise workers decode and transform every image."""
        device = self.ctx.device
        if self.copies is None:
            loader = worker_loader(
                train_set, self.num_workers, device, self.seed, batch_sampler=sampler
            )
            batches = iter(loader)

            def next_batch():
                x, y = next(batches)
                return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

            return next_batch
        base, indices = unwrap_subset(train_set)
        device_data = DeviceBatches.from_dataset(base, device, self.copies)
        keys = sampler.device_keys(device, indices)
        log.info("data on %s: %d images, batches made there", device, len(device_data))
        return lambda: device_data.train_batch(next(keys))

    def eval_batches(self, dataset):
        """This process's share of ``dataset``: every image is scored exactly once in all."""
        share = shard_indices(len(dataset), self.ctx.rank, self.ctx.world_size)
        return evaluation_batches(
            dataset, share, self.eval_batch_size, self.num_workers, self.ctx.device, self.copies
        )

    def test(self):
        """The test set's batches, or None when the selection set is the test set."""
        return self.test_set and self.eval_batches(self.test_set)


def log_setup(args, ctx: dist.Context, data: RunData, global_batch: int, precision: Precision):
    log.info(
        "%s on %s: %d process(es), global batch %d (%d per process in %d micro-batch%s of %d), "
        "%s, %d steps, %d train / %d %s images%s",
        args.model_type, ctx.device.type, ctx.world_size, global_batch, args.train_batch_size,
        args.gradient_accumulation_steps, "es" if args.gradient_accumulation_steps > 1 else "",
        args.train_batch_size // args.gradient_accumulation_steps, precision.name,
        args.num_steps, len(data.train), len(data.select), data.select_name,
        f" / {len(data.test)} test images" if data.test is not None else "",
    )  # fmt: skip


@dataclass
class Run:
    """What the loop advances and a training state restores."""

    model: torch.nn.Module  # a ViT or a Mixer; ``stepper`` is it compiled and/or under DDP
    stepper: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ends: list[int]  # the last step of each learning-rate schedule
    step: int = 0
    best_acc: float = 0.0
    best_step: int = 0
    last_acc: float = float("nan")

    def restore(self, state: TrainingState, ctx: dist.Context, seed: int) -> None:
        try:
            self.model.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            self.scaler.load_state_dict(state.scaler)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise UsageError(
                f"the training state does not fit the model it records ({one_line(error)}); "
                "resume from another file, or start again with --overwrite"
            ) from None
        next_lr_from_schedule(self.scheduler)  # a run trained further: its new schedule's
        self.step, self.best_acc, self.best_step = state.step, state.best_acc, state.best_step
        if len(state.rng) == ctx.world_size:
            set_rng_state(state.rng[ctx.rank])
        else:  # the data stream depends on the global batch alone; dropout on each process
            torch.manual_seed(seed + ctx.rank + 1_000_003 * state.step)
            if ctx.is_main:
                log.warning(
                    "resumed on %d process(es), saved on %d: the data order and augmentation "
                    "go on exactly as saved; each process's dropout draws start afresh (from "
                    "--seed and the step), so the steps differ from an uninterrupted run's",
                    ctx.world_size, len(state.rng),
                )  # fmt: skip

    def state(self, rngs: list, args: dict, classes: list[str], start: str) -> TrainingState:
        return TrainingState(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            step=self.step,
            global_batch=args["train_batch_size"] * len(rngs),
            best_acc=self.best_acc,
            best_step=self.best_step,
            rng=rngs,
            args=args,
            config=self.model.config.to_dict(),
            classes=classes,
            start=start,
            schedule=self.ends,
        )


def build_run(model, args: argparse.Namespace, ctx: dist.Context, precision: Precision,
              ends: list[int]) -> Run:  # fmt: skip
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=args.learning_rate,
        momentum=0.9,
        weight_decay=args.weight_decay,
        # One kernel for all parameters, except under fp16: a fused SGD whose first step the
        # loss scaler skips keeps uninitialised momentum buffers (torch 2.14, CPU and CUDA).
        fused=precision.name != "fp16",
    )
    scheduler = build_scheduler(optimizer, args.decay_type, args.warmup_steps, ends)
    stepper = model
    if ctx.distributed:
        stepper = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if args.compile:  # DDP inside, so that its all-reduce overlaps the compiled backward
        stepper = torch.compile(stepper)
    return Run(model, stepper, optimizer, scheduler, precision.scaler(), ends)


def optimize_one_step(run: Run, batch, meter: Meter, precision: Precision, accumulation: int,
                      max_norm: float, memory: str, stop_now) -> bool:  # fmt: skip
    """One optimizer step; False when a stop request abandoned it between micro-batches (the
    RNG is then put back as the last whole step left it, for the state to be saved)."""
    lr = run.scheduler.get_last_lr()[0]
    rng = rng_state() if accumulation > 1 else None  # dropout draws before an abandon
    try:
        done = train_step(
            run.stepper, batch, run.optimizer, run.scaler, precision, accumulation, max_norm,
            stop_now,
        )  # fmt: skip
    except torch.OutOfMemoryError:
        raise UsageError(f"out of memory in step {run.step + 1}: {memory}") from None
    if done is None:
        if rng is not None:
            set_rng_state(rng)
        return False
    run.scheduler.step()
    run.step += 1
    meter.add(run.step, *done, lr)
    return True


def check_loss(meter: Meter, precision: Precision, saver: Saver) -> None:
    """Stop a diverging run (outside fp16, whose scaler skips such steps), keeping the last
    good state; run after every read of the losses."""
    if precision.name != "fp16" and meter.nonfinite is not None:
        step, loss = meter.nonfinite
        raise saver.diverged(f"the loss became {loss} at step {step}")


def stop_asker(stop: StopRequest):
    """The question asked before every micro-batch: has a signal asked this run to stop? Under
    DDP every process gets the same answer at the same point (a host all-reduce: it waits for
    no device), so that all stop at the same micro-batch; in one process it is the flag."""
    return lambda: dist.any_rank(stop.signum is not None)


def stop_saved(run: Run, meter: Meter, reporter: Reporter, saver: Saver, signum: int,
               abandoned: bool) -> int:  # fmt: skip
    """Save the state of a run stopped by a signal (the last whole step: one stopped inside is
    dropped); the exit code a shell gives a signal."""
    meter.flush(reporter)
    check_loss(meter, saver.precision, saver)
    if abandoned:
        when = f"during step {run.step + 1}, which was dropped"
    else:
        when = f"before step {run.step + 1}" if run.step == 0 else f"at step {run.step}"
    if run.step == 0:
        if saver.is_main:
            log.warning("stopped by signal %s: nothing was trained yet, so nothing was saved; "
                        "run the same command to start again", when)  # fmt: skip
    else:
        saver.last(run)
        if saver.is_main:
            saved = "state" if not abandoned else f"the state of step {run.step}"
            log.warning("stopped by signal %s; %s saved to %s. Resume with the same command "
                        "and --resume auto", when, saved, saver.files.last)  # fmt: skip
    reporter.close()
    return 128 + signum


@dataclass
class Saver:
    """Writes the run's files, each only after checking that the weights are finite; holds what
    every save records besides the run itself, and where the last good state is."""

    files: RunFiles
    args: dict  # the command line, ``vars(args)``
    classes: list[str]
    start: str  # the words for the weights the run began from
    ctx: dist.Context
    precision: Precision
    kept: tuple[Path, int] | None = None  # the last good state on disk: (file, step)
    checked_step: int | None = None  # the step whose weights were last found finite

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def last(self, run: Run) -> None:
        """``<name>_last.pt``: every process's RNG state, written by rank 0."""
        self.check_weights(run)
        rngs = dist.gather_objects(rng_state())
        state = run.state(rngs, self.args, self.classes, self.start) if self.is_main else None
        dist.from_main(lambda: state.write(self.files.last), self.ctx)
        self.kept = (self.files.last, run.step)

    def best(self, run: Run) -> None:
        """The best weights, written by rank 0 (the only process that reads them back)."""
        self.check_weights(run)
        weights = run.model.state_dict()
        dist.from_main(lambda: self.files.save_best(weights, self.args, self.classes), self.ctx)

    def check_weights(self, run: Run) -> None:
        """Once per step: an evaluation writes the best weights and then the state."""
        if self.checked_step == run.step:
            return
        if not all_finite(run.model.state_dict()):
            raise self.diverged(
                f"the weights became NaN or infinite in step {run.step}, whose loss was finite"
            )
        self.checked_step = run.step

    def diverged(self, what: str) -> UsageError:
        """The error that stops a diverging run, with where the last good state is."""
        if self.kept is None:
            return UsageError(
                f"{what}; stopping, with nothing saved: run the same command with a lower "
                "--learning_rate"
            )
        path, step = self.kept
        return UsageError(
            f"{what}; stopping without saving it. The last good state is {path} (step {step}), "
            "trained at the learning rate that diverged: start again with a lower "
            "--learning_rate and --overwrite, or under another --name"
        )

    def write_failed(self, error: OSError) -> UsageError | None:
        """The error for a write that failed during training (disk full, quota, permissions),
        or None for an OSError that is not one."""
        if (words := write_error(error)) is None:
            return None
        if self.kept is None:
            return UsageError(f"{words}; nothing was saved yet: make room, then run again")
        path, step = self.kept
        return UsageError(
            f"{words}; the last good state, step {step}, is intact in {path}: make room (or "
            "fix the permissions), then run the same command with --resume "
            f"{'auto' if path == self.files.last else path}"
        )


def evaluate_and_save(run: Run, batches, data: RunData, precision: Precision, ctx, reporter,
                      saver: Saver) -> None:  # fmt: skip
    """Score the selection set; keep the weights as the best ones when they are."""
    scores = evaluate(run.model, batches, ctx.device, precision, len(data.classes))
    name, step = data.select_name, run.step
    if reporter.writer is not None:
        log_eval_images(
            reporter.writer, step, *scores.samples, scores.confusion, data.classes, name
        )
    reporter.scalars({f"{name}/accuracy": scores.accuracy, f"{name}/loss": scores.loss}, step)
    log.info(
        "step %d: %s accuracy %.4f, loss %.4f (%d images)",
        step, name, scores.accuracy, scores.loss, scores.count,
    )  # fmt: skip
    run.last_acc = scores.accuracy
    if scores.accuracy > run.best_acc or run.best_step == 0:
        run.best_acc, run.best_step = scores.accuracy, step
        saver.best(run)
    saver.last(run)


def final_verdict(run: Run, data: RunData, test_batches, files: RunFiles, precision, ctx,
                  reporter) -> tuple[str, dict[str, float]]:  # fmt: skip
    """The summary's words and the HParams metrics; with a validation split, the test set is
    scored here, once with the final weights and once with the best ones."""
    metrics = {"best_accuracy": run.best_acc, "final_accuracy": run.last_acc}
    best = f"best accuracy {run.best_acc:.4f} at step {run.best_step}"
    if data.select_name == "test":
        return (
            f"{best} (test set, which also selected it, as the reference does: an optimistic "
            f"figure) | final accuracy {run.last_acc:.4f}"
        ), metrics
    if data.test is None:
        return (
            f"{best} (val set, which also selected it: an optimistic figure; no test set) | "
            f"final accuracy {run.last_acc:.4f} (val set)"
        ), metrics
    final = evaluate(run.model, test_batches, ctx.device, precision, len(data.classes))
    # rank 0 wrote them; the other processes, maybe on other disks, get them from it
    run.model.load_state_dict(dist.from_main(lambda: read_weights(files.best)[0], ctx))
    best_test = evaluate(run.model, test_batches, ctx.device, precision, len(data.classes))
    reporter.scalars(
        {"test/accuracy_final": final.accuracy, "test/loss_final": final.loss,
         "test/accuracy_best": best_test.accuracy, "test/loss_best": best_test.loss},
        run.step,
    )  # fmt: skip
    metrics |= {"test_accuracy_final": final.accuracy, "test_accuracy_best": best_test.accuracy}
    return (
        f"final accuracy {final.accuracy:.4f} (test set, final weights) | best accuracy "
        f"{best_test.accuracy:.4f} (test set, weights of step {run.best_step}, selected on "
        f"validation accuracy {run.best_acc:.4f}; the test set played no part in selection)"
    ), metrics


def set_length(args: argparse.Namespace, train_images: int, global_batch: int) -> None:
    """``--num_epochs`` becomes ``--num_steps``, now that the number of images is known."""
    if args.num_epochs is not None:
        args.num_steps = steps_of_epochs(args.num_epochs, train_images, global_batch)
        check_warmup(args.warmup_steps, args.num_steps)
        log.info(
            "--num_epochs %g: %d steps of %d images over %d training images",
            args.num_epochs, args.num_steps, global_batch, train_images,
        )  # fmt: skip


def open_reporter(args: argparse.Namespace, is_main: bool, start: str, step: int) -> Reporter:
    """TensorBoard (rank 0), with the command line as the run's first text."""
    reporter = Reporter(Path(args.logdir) / args.name if is_main else None, args.num_steps, step)
    flags = [f"{k}: {v}" for k, v in sorted(vars(args).items())]
    reporter.text("args", "  \n".join([start, *flags]))
    return reporter


def finish(run: Run, data: RunData, data_path: DataPath, precision: Precision, ctx, reporter,
           saver: Saver, meter: Meter, args: argparse.Namespace) -> None:  # fmt: skip
    """Score the test set where a validation split selected the weights; one summary line."""
    wall = time.perf_counter() - meter.start
    if meter.skipped:
        log.warning("%d steps skipped by the fp16 loss scaler (inf/NaN gradients)", meter.skipped)
    verdict, metrics = final_verdict(
        run, data, data_path.test(), saver.files, precision, ctx, reporter
    )
    skipped = set().union(*dist.gather_objects(data.unreadable_images()))  # every rank's finds
    if ctx.is_main and skipped:
        log.warning("%d unreadable image(s) skipped, each named in a warning", len(skipped))
    reporter.hparams({**vars(args), "config": " ".join(args.config)}, metrics, run.step)
    reporter.close()
    if ctx.is_main:
        print(f"summary: {verdict} | {run.step} steps | wall time {wall:.1f} s | "
              f"{meter.images_per_second:.1f} images/s | {saver.start}")  # fmt: skip


def train(args: argparse.Namespace, ctx: dist.Context, stop: StopRequest) -> int:
    files = RunFiles(Path(args.output_dir), args.name)
    weights, start = starting_point(args)
    # what a start that fails removes again, when empty: the folders it made
    made = FoldersMade(files.output, Path(args.logdir) / args.name, Path(args.data_dir),
                       *([weights.parent] if weights is not None else []))  # fmt: skip
    try:
        # Rank 0 writes every file of the run (and reads them back): only its disk needs the
        # folders; its verdict reaches every rank, so none is left waiting for one that exited.
        dist.from_main(lambda: check_inputs(args, files), ctx)
        dist.from_main(lambda: claim_run(files, args), ctx)
        return train_claimed(args, ctx, stop, files, weights, start, made)
    finally:
        files.release()


def train_claimed(args: argparse.Namespace, ctx: dist.Context, stop: StopRequest,
                  files: RunFiles, weights: Path | None, start: str,
                  made: FoldersMade) -> int:  # fmt: skip
    try:
        global_batch = args.train_batch_size * ctx.world_size
        data = build_data(args, ctx)
        set_length(args, len(data.train), global_batch)
        state = dist.from_main(lambda: restore_state(files, args, global_batch), ctx)
        start = (state.start or start) if state is not None else start
        log.info(start if state is None else f"resuming a run that began {start}")

        torch.manual_seed(args.seed)  # the same initial weights on every process
        model = build_model(args, len(data.classes)).to(ctx.device)
        precision = Precision(precision_of(vars(args)), ctx.device, args.loss_scale)
        footprint = measure_step(model, args.img_size, ctx.device, precision.autocast)
        auto = args.gradient_accumulation_steps == "auto"
        if auto:  # from here on, a number
            saved = state.args.get("gradient_accumulation_steps") if state is not None else None
            args.gradient_accumulation_steps = choose_accumulation(
                model, footprint, args, ctx, precision, saved if isinstance(saved, int) else None
            )
        # before a download that might be wasted
        memory = check_memory(footprint, args, ctx, precision, auto, model)
        if state is None and weights is not None:
            load_initial_weights(weights, args, ctx, model)
        torch.manual_seed(args.seed + ctx.rank)  # dropout differs across processes
        run = build_run(model, args, ctx, precision, schedule_ends(state, args.num_steps))
        if state is not None:
            run.restore(state, ctx, args.seed)
        if args.overwrite:  # every check has passed: the earlier run's files go now
            dist.from_main(lambda: remove_earlier_run(files, Path(args.logdir) / args.name), ctx)

        data_path = DataPath(
            data, ctx, global_batch, run.step, seed=args.seed,
            data_on_device=args.data_on_device, num_workers=args.num_workers,
            eval_batch_size=args.eval_batch_size,
        )  # fmt: skip
        log_setup(args, ctx, data, global_batch, precision)
        reporter = open_reporter(args, ctx.is_main, start, run.step)
    except BaseException:
        if ctx.is_main:
            files.release()
            made.remove_empty()
        raise
    saver = Saver(files, vars(args), data.classes, start, ctx, precision)
    if state is not None:
        saver.kept = (files.resume_from(args.resume), state.step)
    try:
        return train_loop(run, args, ctx, stop, data, data_path, precision, reporter, saver,
                          memory, global_batch)  # fmt: skip
    except OSError as error:
        if (failed := saver.write_failed(error)) is None:
            raise
        raise failed from None


def train_loop(run: Run, args: argparse.Namespace, ctx: dist.Context, stop: StopRequest,
               data: RunData, data_path: DataPath, precision: Precision, reporter: Reporter,
               saver: Saver, memory: str, global_batch: int) -> int:  # fmt: skip
    meter, first_step = Meter(global_batch, ctx.world_size), run.step + 1
    accumulation, max_norm = args.gradient_accumulation_steps, args.max_grad_norm
    stop_now = stop_asker(stop)
    run.model.train()
    while run.step < args.num_steps:
        batch = data_path.next_batch()
        if stop_now():  # asked during the last step, its evaluation or save, or this batch
            return stop_saved(run, meter, reporter, saver, stop.signum or signal.SIGTERM, False)
        if not optimize_one_step(  # asked between micro-batches: the step is dropped
            run, batch, meter, precision, accumulation, max_norm, memory, stop_now
        ):
            return stop_saved(run, meter, reporter, saver, stop.signum or signal.SIGTERM, True)
        evaluate_now = run.step % args.eval_every == 0 or run.step == args.num_steps
        save_now = not evaluate_now and args.save_every and run.step % args.save_every == 0
        if run.step == first_step and not evaluate_now:
            meter.flush(reporter, timed=False)  # warm-up (and compilation) is not throughput
        elif run.step % args.log_every == 0 or evaluate_now or save_now:
            meter.flush(reporter)
        check_loss(meter, precision, saver)  # the first step's, and before any save
        if evaluate_now:
            evaluate_and_save(run, data_path.select, data, precision, ctx, reporter, saver)
            meter.restart_clock()
        elif save_now:
            saver.last(run)
            meter.restart_clock()
    finish(run, data, data_path, precision, ctx, reporter, saver, meter, args)
    return 0


def remove_earlier_run(files: RunFiles, events: Path) -> None:
    """``--overwrite``: the earlier run's files and TensorBoard events, deleted and logged."""
    removed = [*files.remove(), *remove_events(events)]
    if removed:
        log.warning("--overwrite: deleted %s", ", ".join(str(p) for p in removed))


if __name__ == "__main__":
    run_main(main, "train.py")
