"""Step time and memory of each ``--finetune`` mode: full, head (a linear probe) and LoRA.

python -m bench.finetune_modes --device cpu      # docs/PERFORMANCE.md's rows: batch 8, 2 steps
python -m bench.finetune_modes --json modes.json  # on a GPU: bf16, batch 64, 10 steps

Each row is one model and mode in a fresh subprocess, so that its peak memory is its own: CUDA's
``max_memory_allocated``, or on the CPU the process's peak resident set (which includes some
0.4 GB of Python and PyTorch). The step is train.py's own (``update.train_step`` with the
optimizer of ``build_optimizer``, SGD as the default recipe), on a random batch, warm-up step
not timed. "largest micro-batch in 24 GB" is computed by train.py's memory estimate
(``memory.measure_step``, with the weights themselves taken from the 24 GB), not run: it is
marked as an estimate.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from models.errors import UsageError
from models.families import build_model
from utils.cli import Parser, run_main
from utils.runtime.device import resolve_device
from utils.training.finetune import FINETUNE_MODES, WhatTrains
from utils.training.memory import GIB, measure_step
from utils.training.optimizer import build_optimizer
from utils.training.precision import Precision
from utils.training.update import train_step

CARD = 24e9  # the GPU size of the estimate's column


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--models", default="ViT-B_16,ViT-L_16", help="comma-separated model types")
    p.add_argument("--modes", default=",".join(FINETUNE_MODES), help="comma-separated modes")
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=None, help="(default: 64 CUDA, 8 CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 CUDA, 2 CPU)")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # MODEL:MODE, in a subprocess
    return p


def one_row(args: argparse.Namespace, model_type: str, mode: str) -> dict:
    """Time ``--steps`` training steps of one model in one mode; its memory; the estimate."""
    device = resolve_device(args.device)
    precision = Precision("bf16" if device.type == "cuda" else "fp32", device, 0)
    torch.manual_seed(0)
    model = build_model(model_type, [], args.img_size, 10, zero_head=False)
    trains = WhatTrains(mode, lora_rank=args.lora_rank)
    words = trains.apply(model)
    model.to(device).train()
    estimate = measure_step(model, args.img_size, device, precision.autocast)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # already in place
    optimizer = build_optimizer(model, 0.0, fp16=False)
    scaler = precision.scaler()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.steps + 1):
        started = time.perf_counter()
        loss, _ = train_step(model, (x, y), optimizer, scaler, precision, 1, 1.0)
        loss.item()  # waits for the device
        if i:  # the first step allocates the optimizer's state: warm-up, not timed
            times.append(time.perf_counter() - started)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "model": model_type,
        "mode": mode,
        "trains": words.split("training ", 1)[1],
        "device": str(device),
        "batch": args.batch_size,
        "step_s": statistics.median(times),
        "images_per_s": args.batch_size / statistics.median(times),
        "peak_gib": peak / GIB,
        "estimated_largest_micro_batch_24gb": estimate.largest_micro_batch(int(CARD) - weights),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    args.batch_size = args.batch_size or (64 if cuda else 8)
    args.steps = args.steps or (10 if cuda else 2)
    if args.row:
        print(json.dumps(one_row(args, *args.row.split(":"))))
        return 0
    rows = []
    for model_type in args.models.split(","):
        for mode in args.modes.split(","):
            if mode not in FINETUNE_MODES:
                raise UsageError(f"--modes: {mode!r} is none of {', '.join(FINETUNE_MODES)}")
            command = [sys.executable, "-m", "bench.finetune_modes", "--row",
                       f"{model_type}:{mode}", *(argv or sys.argv[1:])]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise UsageError(f"{model_type} {mode}: {done.stderr.strip().splitlines()[-1]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(
                f"{row['model']:<9} {row['mode']:<5} {row['step_s']:8.3f} s/step "
                f"{row['images_per_s']:8.1f} img/s  peak {row['peak_gib']:5.2f} GiB  "
                f"largest micro-batch in 24 GB (estimate) "
                f"{row['estimated_largest_micro_batch_24gb']:4d}"
                f"  {row['trains']}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    run_main(main, "bench.finetune_modes")
