"""The whole GPU check in one call: model steps, memory, and train.py end to end, in one table.

python -m bench.gpu_check --data_dir ../shared/cifar10-subset --json gpu_check.json
python -m bench.gpu_check --toy --data_dir ../shared/cifar10-subset   # CPU, toy sizes (CI)

Each part is a subprocess with its own time limit, run in order of importance while the overall
--budget lasts (a part that would not fit in what is left is reported as skipped). The parts:

* bench, eager and compiled: ``bench.throughput`` model train steps of --peers, at batch 256;
  ours at dropout 0 and at its config's dropout (what train.py runs);
* memory: the step-time cost of checkpointing, and the largest micro-batch per GPU size with
  --grad_checkpointing (B/16 and L/16 at 224 px) and without (H/14, the row not yet measured;
  the full tables take a call of their own: ``python -m bench.throughput --memory_table``);
* finetune_modes: ``bench.finetune_modes``, the step time and peak memory of --finetune full,
  head and lora for B/16 and L/16 at 224 px (bf16, batch 64), with the estimate's largest
  micro-batch in 24 GB;
* train.py end to end on the real CIFAR subset, --pretrained_dir none: eager and compiled at
  the config's dropout and at dropout 0, the DataLoader-worker path, and torchrun with one
  process. Its images/s is the summary line's (steps after the first, evaluation excluded), set
  beside the bench's model step at the same dropout and compilation.

With --toy every size shrinks to what a CPU runs in seconds and compiled parts are skipped:
it checks that the check itself works.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.errors import UsageError
from utils.cli import Parser, run_main

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"\| ([\d.]+) images/s \|")  # train.py's summary line
CONFIG_DROPOUT = "ours (config dropout"


@dataclass
class Part:
    name: str
    command: list[str]
    limit_s: int
    bench_row: str | None = None  # the bench row (peer name) a train.py speed is compared with
    status: str = "skipped"
    seconds: float = 0.0
    images_per_second: float | None = None
    output: dict = field(default_factory=dict)
    tail: str = ""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data_dir",
        required=True,
        help="CIFAR-10 in its pickle layout (the real subset is enough)",
    )
    p.add_argument("--toy", action="store_true", help="CPU, toy sizes, no compilation (for CI)")
    p.add_argument(
        "--budget", type=int, default=360, help="seconds for all parts together (default: 360)"
    )
    p.add_argument(
        "--peers",
        default="ours,ours-dropout,timm",
        help="bench.throughput --peers of the bench parts (default: ours,ours-dropout,timm)",
    )
    p.add_argument(
        "--output_dir",
        default="output/gpu_check",
        help="where the parts write their JSON, logs and checkpoints (default: output/gpu_check)",
    )
    p.add_argument(
        "--parts",
        default=None,
        help="comma-separated part names to run, e.g. memory_checkpointed for a second call "
        "(default: all, most important first)",
    )
    p.add_argument("--json", default=None, help="write the table here too (default: none)")
    return p


def plan(args: argparse.Namespace, out: Path) -> list[Part]:
    """The parts, most important first."""
    python = [sys.executable]
    if args.toy:
        size = ["--device", "cpu", "--model_type", "ViT-Ti_16", "--img_size", "32"]
        bench = [*size, "--batch_size", "4", "--steps", "1", "--warmup", "1", "--repeats", "1"]
        memory_rows = ["--memory_rows", "ViT-Ti_16@32"]
        train = [
            "--model_type", "testing", "--img_size", "32", "--train_batch_size", "8",
            "--num_steps", "4", "--eval_every", "4", "--warmup_steps", "1", "--device", "cpu",
            "--eval_batch_size", "512",
        ]  # fmt: skip
        workers = ["--data_on_device", "off", "--num_workers", "1"]
        precision, fp16 = ["--precision", "fp32"], ["--precision", "fp32"]  # fp16: CUDA only
        modes = ["--device", "cpu", "--models", "testing", "--modes", "lora", "--img_size", "32",
                 "--batch_size", "4", "--steps", "1"]  # fmt: skip
    else:
        bench = ["--device", "cuda:0", "--repeats", "2"]
        memory_rows = []
        train = [
            "--model_type", "ViT-B_16", "--img_size", "224", "--train_batch_size", "512",
            "--num_steps", "30", "--eval_every", "30", "--warmup_steps", "5",
        ]  # fmt: skip
        workers = ["--data_on_device", "off", "--num_workers", str(min(12, os.cpu_count() or 1))]
        precision, fp16 = ["--precision", "bf16"], ["--fp16"]
        modes = ["--device", "cuda:0"]  # B/16 and L/16 at 224 px, bf16, batch 64
    peers = ["--peers", args.peers]

    def bench_part(name: str, *flags: str, limit: int) -> Part:
        json_path = out / f"{name}.json"
        command = [*python, "-m", "bench.throughput", *flags, "--json", str(json_path)]
        return Part(name, command, limit)

    def train_part(name: str, *flags: str, limit: int, row: str, launcher=None) -> Part:
        common = [
            "--name", name, "--pretrained_dir", "none", "--data_dir", args.data_dir,
            "--output_dir", str(out / "output"), "--logdir", str(out / "logs"), *train,
        ]  # fmt: skip
        launch = launcher or [*python, str(REPO / "train.py")]
        return Part(name, [*launch, *common, *flags], limit, bench_row=row)

    no_dropout = ["--config", "transformer.dropout_rate=0"]
    torchrun = [*python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    torchrun.append(str(REPO / "train.py"))
    compiled_bench = [*bench[:2], "--peers", "ours,ours-dropout", "--repeats", "1"]
    if args.toy:
        compiled_bench = [*bench, "--peers", "ours,ours-dropout"]
    parts = [
        bench_part("bench_eager", *bench, *peers, limit=90),
        train_part("train_eager", *precision, limit=60, row=CONFIG_DROPOUT),
        train_part("train_eager_dropout0", *precision, *no_dropout, limit=60, row="ours"),
        train_part("train_compiled", *precision, "--compile", limit=120, row=CONFIG_DROPOUT),
        bench_part("bench_compiled", *compiled_bench, "--compile", limit=150),
        train_part("train_workers", *precision, *workers, limit=60, row=CONFIG_DROPOUT),
        train_part("train_torchrun", *fp16, limit=60, row=None, launcher=torchrun),
        bench_part(
            "bench_checkpointed", *bench, "--peers", "ours", "--grad_checkpointing", limit=60
        ),  # fmt: skip
        bench_part(
            "memory_checkpointed",
            *bench[:2],
            "--memory_table",
            "--grad_checkpointing",
            *(memory_rows or ["--memory_rows", "ViT-B_16@224,ViT-L_16@224"]),
            limit=120,
        ),  # fmt: skip
        bench_part(
            "memory",
            *bench[:2],
            "--memory_table",
            *(memory_rows or ["--memory_rows", "ViT-H_14@224"]),
            limit=90,
        ),  # fmt: skip
        Part(
            "finetune_modes",
            [
                *python,
                "-m",
                "bench.finetune_modes",
                *modes,
                "--json",
                str(out / "finetune_modes.json"),
            ],
            240,
        ),  # fmt: skip
        train_part(
            "train_compiled_dropout0", *precision, *no_dropout, "--compile", limit=120, row="ours"
        ),
    ]
    if args.toy:  # compiling is minutes on a CPU; the toy check is about the check itself
        parts = [p for p in parts if "compiled" not in p.name]
    if args.parts:
        wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
        if unknown := sorted(set(wanted) - {p.name for p in parts}):
            known = ", ".join(p.name for p in parts)
            raise UsageError(f"--parts: unknown {', '.join(unknown)}; choose from {known}")
        parts = [p for p in parts if p.name in wanted]
    return parts


def run_part(part: Part, limit: float, out: Path) -> None:
    start = time.perf_counter()
    try:
        done = subprocess.run(
            part.command, cwd=REPO, capture_output=True, text=True, timeout=limit,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        part.status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        log = done.stdout + done.stderr
    except subprocess.TimeoutExpired as stopped:
        part.status = f"timed out at {limit:.0f} s"
        log = "".join(
            s.decode(errors="replace") if isinstance(s, bytes) else (s or "")
            for s in (stopped.stdout, stopped.stderr)
        )
    part.seconds = time.perf_counter() - start
    (out / f"{part.name}.log").write_text(" ".join(part.command) + "\n\n" + log)
    part.tail = "\n".join(log.strip().splitlines()[-3:])
    if found := SUMMARY.findall(log):
        part.images_per_second = float(found[-1])
    json_path = out / f"{part.name}.json"
    if json_path.is_file():
        part.output = json.loads(json_path.read_text())


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def bench_speed(parts: list[Part], compiled: bool, row: str) -> float | None:
    """The median model train step of the bench peer ``row``; ``CONFIG_DROPOUT`` stands for
    "ours (config dropout X)", whatever X the model type has."""
    source = next(p for p in parts if p.name == ("bench_compiled" if compiled else "bench_eager"))
    for name, figures in source.output.get("results", {}).items():
        if name == row or (row == CONFIG_DROPOUT and name.startswith(CONFIG_DROPOUT)):
            return median(figures["train"]) if figures.get("train") else None
    return None


def report(parts: list[Part]) -> list[dict]:
    rows = []
    print(f"\n{'part':<26}{'status':<22}{'s':>6}{'images/s':>11}  against the bench")
    for part in parts:
        cells = {"part": part.name, "status": part.status, "seconds": round(part.seconds, 1)}
        speed, against = part.images_per_second, ""
        if part.name.startswith("bench_") and part.output.get("results"):
            figures = {k: v.get("train") for k, v in part.output["results"].items()}
            against = ", ".join(f"{k} {median(v):.0f}" for k, v in figures.items() if v)
            plain = bench_speed(parts, compiled=False, row="ours")
            if part.name == "bench_checkpointed" and plain and figures.get("ours"):
                cost = 1 - median(figures["ours"]) / plain
                cells["checkpointing_cost"] = round(cost, 3)
                against += f" ({cost:.0%} slower than without --grad_checkpointing)"
            speed = None
        elif part.bench_row and speed:
            step = bench_speed(parts, "compiled" in part.name, part.bench_row)
            if step:
                cells["fraction_of_bench_step"] = round(speed / step, 3)
                against = f"{speed / step:.0%} of the model step ({step:.0f})"
        elif part.name == "finetune_modes" and isinstance(part.output, list):
            against = "; ".join(
                f"{r['model']} {r['mode']} {r['images_per_s']:.0f}/s {r['peak_gib']:.1f} GiB"
                for r in part.output
            )
        elif part.name.startswith("memory") and part.output.get("memory_table"):
            table = part.output["memory_table"]["table"]
            against = "; ".join(
                f"{k} " + "/".join(str(b) for b in v.values()) for k, v in table.items()
            )
        cells |= {"images_per_second": speed, "against": against}
        rows.append(cells)
        shown = f"{speed:.1f}" if speed else "-"
        print(f"{part.name:<26}{part.status:<22}{part.seconds:>6.0f}{shown:>11}  {against}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.data_dir, "cifar-10-batches-py").is_dir():
        raise UsageError(f"--data_dir {args.data_dir} has no cifar-10-batches-py/ folder")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = plan(args, out)
    deadline = time.perf_counter() + args.budget
    for part in parts:
        left = deadline - time.perf_counter()
        if left < min(part.limit_s, 30):
            part.status = "skipped (budget)"
            continue
        print(f"{part.name}: {' '.join(part.command[1:])}", flush=True)
        run_part(part, min(part.limit_s, left), out)
        print(f"  {part.status} in {part.seconds:.0f} s", flush=True)
    rows = report(parts)
    if args.json:
        document = {"toy": args.toy, "rows": rows, "parts": [asdict(p) for p in parts]}
        Path(args.json).write_text(json.dumps(document, indent=2, default=str) + "\n")
    return 0 if all(p.status == "ok" for p in parts) else 1


if __name__ == "__main__":
    run_main(main, "bench/gpu_check.py")
