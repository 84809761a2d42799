"""Evaluate a trained checkpoint on the test set: accuracy, loss, per-class table, figure.

python evaluate.py --checkpoint output/cifar10-100_500_checkpoint.bin --data_dir data

The model flags and data set default to those recorded beside the checkpoint. The accuracy is the
one train.py logged for that checkpoint on the test set: the same images, transform, batch size
and precision (pass --precision to match a run trained with fp16 or bf16). For --dataset
imagefolder the test set is --data_dir/val, as in training.
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
from utils.data.datasets import load_test_set
from utils.data.device_batches import DeviceCopies, use_device_data
from utils.data.loader import evaluation_batches
from utils.inspection.figures import confusion_matrix_image, save_png
from utils.inspection.inference import load_from_args
from utils.training.engine import evaluate
from utils.training.precision import Precision


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, from_checkpoint=True)
    add_checkpoint_args(p)
    p.add_argument("--data_dir", default="data", help="data sets, downloaded (default: data)")
    p.add_argument(
        "--output_dir",
        default="eval",
        help="where confusion_matrix.png and metrics.json go (default: eval)",
    )
    p.add_argument("--eval_batch_size", type=int, default=64, help="(default: 64, as train.py)")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    add_data_on_device_arg(p)
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="autocast precision; the training run's reproduces its logged accuracy (fp32)",
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.eval_batch_size <= 0 or args.num_workers < 0:
        raise UsageError("--eval_batch_size must be positive and --num_workers >= 0")
    loaded = load_from_args(args)
    classes, device = loaded.classes, loaded.device
    if loaded.dataset in CIFAR:
        ensure_cifar(loaded.dataset, args.data_dir)
    images = load_test_set(loaded.dataset, Path(args.data_dir), loaded.flags.img_size, classes)
    on_device = use_device_data(args.data_on_device, [images], device)
    copies = DeviceCopies(device) if on_device else None
    loader = evaluation_batches(
        images, range(len(images)), args.eval_batch_size, args.num_workers, device, copies
    )
    # The very function training scores with: the same accuracy to the last digit.
    precision = Precision(args.precision, device, loss_scale=0)
    result = evaluate(loaded.model, loader, device, precision, len(classes))
    cm = result.confusion

    print(f"accuracy {result.accuracy:.4f}")
    print(f"loss {result.loss:.4f}")
    print(f"images {result.count}")
    print(class_table(cm, classes))
    output = Path(args.output_dir)
    figure = save_png(confusion_matrix_image(cm, classes), output / "confusion_matrix.png")
    metrics = {
        "checkpoint": str(args.checkpoint),
        "dataset": loaded.dataset,
        "model": str(loaded.flags),
        "accuracy": result.accuracy,
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
