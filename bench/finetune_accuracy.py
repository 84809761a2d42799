"""Which fine-tuning mode and optimizer reach which held-out accuracy in the same number of steps,
from the same starting weights, on real CIFAR-10 images. CPU, about 12 minutes on 2 cores:

python -m bench.finetune_accuracy --subset ../shared/cifar10-subset --out /tmp/ft-accuracy

No pretrained checkpoint can be fetched here, so the starting weights are made the way Google's
are, at toy scale: a small ViT (4 blocks of width 128, 4 px patches at 32 px) trained by train.py
from random weights on six classes (airplane ... dog). Each mode then fine-tunes a copy on the
other four (frog, horse, ship, truck), which it has never seen, with train.py as a user runs it:
--finetune head / lora / full, each with --optimizer sgd and adamw, the same steps, batch and
schedule. Its score is the final accuracy on those classes' held-out test images (val/ here:
selected by nothing, since the final weights are scored). Both stages are image folders written
from the subset's pickles.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from models.errors import UsageError
from utils.cli import Parser, run_main
from utils.data.cifar import load_cifar
from utils.data.class_names import CIFAR10_CLASSES

REPO = Path(__file__).resolve().parents[1]
MODEL = ["--model_type", "testing", "--img_size", "32", "--config", "patches.size=4,4",
         "--config", "hidden_size=128", "--config", "transformer.mlp_dim=256",
         "--config", "transformer.num_heads=4", "--config", "transformer.num_layers=4"]  # fmt: skip
SOURCE, TARGET = range(6), range(6, 10)  # pretraining classes, fine-tuning classes
RATES = {"sgd": "0.03", "adamw": "0.001"}  # Google's fine-tuning rate; AdamW's usual one
FINAL = re.compile(r"final accuracy ([\d.]+)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", default=str(REPO.parent / "shared" / "cifar10-subset"))
    p.add_argument("--out", required=True, help="folder for the image folders and the runs")
    p.add_argument("--pretrain_steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps of every mode")
    p.add_argument("--batch", type=int, default=64)
    return p


def write_folders(subset: Path, out: Path, classes: range) -> Path:
    """``out/train/<class>/*.png`` and ``out/val/<class>/*.png`` of ``classes``."""
    for split, train in (("train", True), ("val", False)):
        arrays = load_cifar("cifar10", subset, train=train)
        for i, (image, label) in enumerate(zip(arrays.images, arrays.labels, strict=True)):
            if label in classes:
                folder = out / split / CIFAR10_CLASSES[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(image)).save(folder / f"{i}.png")
    return out


def train(out: Path, name: str, data: Path, *flags: str) -> str:
    """train.py in a subprocess, as a user runs it; its output."""
    command = [sys.executable, str(REPO / "train.py"), "--name", name, *MODEL, "--dataset",
               "imagefolder", "--data_dir", str(data), "--output_dir", str(out / "output"),
               "--logdir", str(out / "logs"), "--num_workers", "2", "--overwrite",
               *flags]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise UsageError(f"{name}: {done.stderr.strip().splitlines()[-1]}")
    return done.stdout + done.stderr


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, subset = Path(args.out).absolute(), Path(args.subset)
    source = write_folders(subset, out / "source", SOURCE)
    target = write_folders(subset, out / "target", TARGET)
    train(out, "pretrained", source, "--pretrained_dir", "none", "--num_steps",
          str(args.pretrain_steps), "--eval_every", str(args.pretrain_steps), "--train_batch_size",
          "128", "--learning_rate", "0.1", "--warmup_steps", "50")  # fmt: skip
    start = out / "output" / "pretrained_checkpoint.bin"
    print(f"| mode | {' | '.join(RATES)} |\n| --- | --- | --- |")
    for mode in ("head", "lora", "full"):
        scores = []
        for optimizer, lr in RATES.items():
            log = train(out, f"{mode}-{optimizer}", target, "--pretrained_dir", str(start),
                        "--finetune", mode, "--optimizer", optimizer, "--learning_rate", lr,
                        "--num_steps", str(args.steps), "--eval_every", str(args.steps),
                        "--warmup_steps", str(args.steps // 10), "--train_batch_size",
                        str(args.batch))  # fmt: skip
            scores.append(FINAL.findall(log)[-1])
        print(f"| {mode} | {' | '.join(scores)} |", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main, "bench.finetune_accuracy")
