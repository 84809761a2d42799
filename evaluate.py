"""Evaluate a trained checkpoint: top-1 and top-5 accuracy, loss, per-class table, figure.

python evaluate.py --checkpoint output/cifar10-100_500_checkpoint.bin --data_dir data

The model flags and data set default to those recorded beside the checkpoint. --split names the
images as train.py's log does, and the accuracy is the one train.py logged for that checkpoint
under that name: the same images, transform, batch size and precision (pass --precision to match
a run trained with fp16 or bf16).

  test  CIFAR's test batch; for --dataset imagefolder, --data_dir/val, which train.py logs as
        test beside a --val_split hold-out, and as val without one (it then selected the
        checkpoint itself)
  val   the --val_split hold-out of the training images (CIFAR's, or --data_dir/train), rebuilt
        from the fraction and seed the checkpoint records (a .bin written before they were
        recorded in its .json: from the <name>_last.pt of the same run beside it)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from models.errors import UsageError
from utils.cli import (
    Parser,
    add_checkpoint_args,
    add_data_on_device_arg,
    add_model_args,
    run_main,
)
from utils.data.cifar import CIFAR, ensure_cifar
from utils.data.datasets import load_test_set, load_validation_set
from utils.data.device_batches import DeviceCopies, use_device_data
from utils.data.loader import evaluation_batches
from utils.data.sampling import unwrap_subset
from utils.inspection.figures import confusion_matrix_image, save_png
from utils.inspection.inference import Checkpoint, load_from_args
from utils.training.evaluation import evaluate
from utils.training.precision import Precision
from utils.training.run_files import RunFiles, read_weights


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, from_checkpoint=True)
    add_checkpoint_args(p)
    p.add_argument("--data_dir", default="data", help="data sets, downloaded (default: data)")
    p.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="the images train.py logged under that name: test is CIFAR's test batch or an image "
        "folder's val/ (logged as val by a run without --val_split); val is the --val_split "
        "hold-out of the training images, rebuilt from the fraction and seed the checkpoint's "
        "run recorded (default: test)",
    )
    p.add_argument(
        "--output_dir",
        default="eval",
        help="where confusion_matrix.png and metrics.json go (default: eval)",
    )
    p.add_argument(
        "--eval_batch_size",
        type=int,
        default=64,
        help="images per forward pass, as train.py's (default: 64)",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data-loader worker processes (default: min(4, CPU count))",
    )
    add_data_on_device_arg(p)
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="autocast precision; the training run's reproduces its logged accuracy "
        "(default: fp32)",
    )
    return p


def class_table(cm, classes: list[str]) -> str:
    """Per-class correct / total / accuracy, one row per class."""
    width = max(len("class"), *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  correct  total  accuracy"]
    for i, name in enumerate(classes):
        total = int(cm[i].sum())
        accuracy = f"{cm[i, i] / total:.4f}" if total else "-"
        lines.append(f"{name:<{width}}  {int(cm[i, i]):7d}  {total:5d}  {accuracy:>8}")
    return "\n".join(lines)


def trained_split(checkpoint: Checkpoint) -> tuple[float, int]:
    """The --val_split and --seed of the run that wrote ``checkpoint``, which fix its hold-out.

    A _last.pt records them, and so does a .bin's .json since 2026-11-30; for an older .bin they
    come from the _last.pt that the same run wrote beside it.
    """
    recorded = checkpoint.args
    run = RunFiles(checkpoint.path.parent, checkpoint.path.stem.removesuffix("_checkpoint"))
    if "val_split" not in recorded and run.last != checkpoint.path and run.last.is_file():
        recorded = read_weights(run.last)[1].get("args", {})
    if "val_split" not in recorded or "seed" not in recorded:
        raise UsageError(
            f"--split val: {checkpoint.path} does not record the --val_split and --seed it was "
            "trained with; keep the <name>_last.pt of its run beside it, or use --split test"
        )
    if not recorded["val_split"] > 0:
        selected_on = (
            "the --data_dir/val folder, which --split test scores"
            if recorded.get("dataset") == "imagefolder"
            else "the test set: use --split test"
        )
        raise UsageError(
            f"--split val: {checkpoint.path} was trained without --val_split, so it has no "
            f"hold-out (it was selected on {selected_on}); train with --val_split 0.1 to hold "
            "some out"
        )
    return float(recorded["val_split"]), int(recorded["seed"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.eval_batch_size <= 0 or args.num_workers < 0:
        raise UsageError("--eval_batch_size must be positive and --num_workers >= 0")
    loaded = load_from_args(args)
    held_out = trained_split(loaded.checkpoint) if args.split == "val" else None
    classes, device, img_size = loaded.classes, loaded.device, loaded.flags.img_size
    if loaded.dataset in CIFAR:
        ensure_cifar(loaded.dataset, args.data_dir)
    root = Path(args.data_dir)
    if held_out is None:
        images = load_test_set(loaded.dataset, root, img_size, classes)
    else:
        images = load_validation_set(loaded.dataset, root, img_size, classes, *held_out)
    on_device = use_device_data(args.data_on_device, [unwrap_subset(images)[0]], device)
    copies = DeviceCopies(device) if on_device else None
    loader = evaluation_batches(
        images, range(len(images)), args.eval_batch_size, args.num_workers, device, copies
    )
    # The very function training scores with: the same accuracy to the last digit.
    precision = Precision(args.precision, device, loss_scale=0)
    result = evaluate(loaded.model, loader, device, precision, len(classes))
    cm = result.confusion

    print(f"accuracy {result.accuracy:.4f} (top-5 {result.top5_accuracy:.4f})")
    print(f"loss {result.loss:.4f}")
    print(f"images {result.count}")
    print(class_table(cm, classes))
    output = Path(args.output_dir)
    figure = save_png(confusion_matrix_image(cm, classes), output / "confusion_matrix.png")
    metrics = {
        "checkpoint": str(args.checkpoint),
        "dataset": loaded.dataset,
        "split": args.split,
        "model": str(loaded.flags),
        "accuracy": result.accuracy,
        "top5_accuracy": result.top5_accuracy,
        "loss": result.loss,
        "images": result.count,
        "classes": classes,
        "confusion_matrix": cm.tolist(),  # rows: true class, columns: predicted class
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"wrote {figure} and {output / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    run_main(main, "evaluate.py")
