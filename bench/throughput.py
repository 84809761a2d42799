"""Training and evaluation throughput of our ViT beside the models a user would otherwise pick.

python -m bench.throughput --device cpu --batch_size 8 --steps 3 --warmup 1 --repeats 3
python -m bench.throughput --compile --json bench.json          # on a GPU: bf16, batch 256
python -m bench.throughput --reference_path ~/src/ViT-pytorch   # the reference's own code
python -m bench.throughput --memory_table                       # largest batches that fit

Peers (--peers), with a 10-class head and dropout 0 (timm's and torchvision's defaults; ours via
transformer.dropout_rate=0): ours, timm's ViT, torchvision's ViT and the reference ViT-pytorch model
(its source from --reference_path, else a stand-in rebuilt from its architecture); and "ours
(config dropout)", ours at its config's dropout, the work train.py does by default. Each is timed on
the same pre-made on-device batch for a "model train step" (forward, cross-entropy, backward,
gradient clipping, SGD with momentum) and an "eval step" (no_grad forward). Ours is also timed
for a "full train step", the batch made by utils.data.device_batches from the uint8 data set, and
the data path alone. Warm-up steps are not timed; the device is synchronised before each clock
reading; the models take turns for --repeats rounds and the median of each figure is reported.

One file (about 630 lines) because it is one program a user runs on a GPU machine: its peers,
clocks, report and memory table are read together when a figure is questioned.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.machinery
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.configs import is_mixer
from models.errors import UsageError
from models.families import build_model
from models.modeling import CONFIGS
from utils.cli import Parser, run_main
from utils.data.augment import CifarDataset, draw_boxes
from utils.data.cifar import CifarArrays
from utils.data.device_batches import DeviceBatches
from utils.data.sampling import GlobalBatchSampler
from utils.runtime.device import resolve_device
from utils.training.memory import (
    BACKWARD,
    GIB,
    fits_in_memory,
    largest_that_runs,
    measure_step,
)
from utils.training.optimizer import build_optimizer, set_learning_rate
from utils.training.precision import Precision

NO_DROPOUT = ["transformer.dropout_rate=0", "transformer.attention_dropout_rate=0"]
TIMM_NAMES = {
    "ViT-Ti_16": "vit_tiny_patch16_224",
    "ViT-S_16": "vit_small_patch16_224",
    "ViT-B_16": "vit_base_patch16_224",
    "ViT-B_32": "vit_base_patch32_224",
    "ViT-L_16": "vit_large_patch16_224",
    "ViT-L_32": "vit_large_patch32_224",
    "ViT-H_14": "vit_huge_patch14_224",
    "Mixer-S_32": "mixer_s32_224",
    "Mixer-S_16": "mixer_s16_224",
    "Mixer-B_32": "mixer_b32_224",
    "Mixer-B_16": "mixer_b16_224",
    "Mixer-L_16": "mixer_l16_224",
}
TORCHVISION_NAMES = {
    f"ViT-{k}": f"vit_{k.lower()}" for k in ("B_16", "B_32", "L_16", "L_32", "H_14")
}
PEERS = ("ours", "ours-dropout", "timm", "torchvision", "reference")
MEMORY_ROWS = ("ViT-B_16@224", "ViT-B_16@384", "ViT-L_16@224", "ViT-L_16@384", "ViT-H_14@224")


def build_parser() -> argparse.ArgumentParser:
    usage = __doc__.partition("\n\nOne file (")[0]  # not the note to developers
    p = Parser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="autocast dtype, fp32 = none (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="images per step (default: 256 on CUDA, 8 on CPU)",
    )
    p.add_argument(
        "--img_size", type=int, default=224, help="input resolution in pixels (default: 224)"
    )
    p.add_argument(
        "--model_type",
        choices=list(TIMM_NAMES),
        default="ViT-B_16",
        help="the variant timed, ours and its peers (default: ViT-B_16)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 CUDA, 3 CPU)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps (default: 5 CUDA, 1 CPU)"
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated models to time; ours is always timed (default: "
        + ",".join(PEERS)
        + ")",
    )
    p.add_argument(
        "--grad_checkpointing",
        action="store_true",
        help="recompute each block's activations in the backward pass, in ours and timm's, and "
        "in the memory table",
    )
    p.add_argument(
        "--memory_rows",
        default=",".join(MEMORY_ROWS),
        help="the MODEL@PIXELS rows of --memory_table (default: " + ",".join(MEMORY_ROWS) + ")",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument(
        "--reference_path",
        default=None,
        help="checkout of the reference ViT-pytorch repository, whose models/modeling.py is "
        "imported (default: bench/reference_standin.py, reported as 'reference (stand-in)')",
    )
    p.add_argument(
        "--json", default=None, help="also write every figure to this JSON file (default: none)"
    )
    p.add_argument(
        "--memory_table",
        action="store_true",
        help="instead: largest batch of B/16 and L/16 at 224 and 384 px per GPU size "
        "(measured on CUDA, computed on CPU)",
    )
    return p


# ---------------------------------------------------------------------------------------------
# The models


@dataclass
class Peer:
    name: str
    model: nn.Module
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    results: dict[str, list[float]] = field(default_factory=dict)

    def record(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)


def first_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)[0]  # ours and the reference return (logits, attention weights)


def load_reference(path: str) -> tuple[type[nn.Module], dict]:
    """The reference's VisionTransformer and CONFIGS from a checkout at ``path``.

    Its modeling.py imports ``models.configs`` and ``.modeling_resnet``, names that our own
    ``models`` package also has: the reference's folder is bound to ``models`` while it loads,
    and ours is put back afterwards (the loaded modules keep their references).
    """
    folder = Path(path).expanduser() / "models"
    if not (folder / "modeling.py").is_file():
        raise UsageError(f"--reference_path {path}: no models/modeling.py there; pass a checkout")
    ours = {k: v for k, v in sys.modules.items() if k == "models" or k.startswith("models.")}
    spec = importlib.machinery.ModuleSpec("models", None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    for name in ours:
        del sys.modules[name]
    try:
        sys.modules["models"] = importlib.util.module_from_spec(spec)
        modeling = importlib.import_module("models.modeling")
    except ImportError as error:
        raise UsageError(f"--reference_path {path}: cannot import it ({error})") from None
    finally:
        for name in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            del sys.modules[name]
        sys.modules.update(ours)
    return modeling.VisionTransformer, modeling.CONFIGS


def build_peers(args: argparse.Namespace, device: torch.device) -> list[Peer]:
    """The models of --peers, ours first; a peer that lacks --model_type is left out, with a
    note."""
    import timm
    import torchvision

    num_classes, size, wanted = 10, args.img_size, args.peers
    mixer = is_mixer(CONFIGS[args.model_type])  # no dropout; only timm has one to compare
    if mixer:
        wanted = [p for p in wanted if p in ("ours", "timm")]

    def ours(overrides: list[str]) -> nn.Module:
        model = build_model(args.model_type, overrides, size, num_classes, zero_head=True)
        model.set_grad_checkpointing(args.grad_checkpointing)
        return model

    # ours first: the data path's timings need it
    peers = [Peer("ours", ours([] if mixer else NO_DROPOUT), first_output)]
    ours_config = peers[0].model.config
    if "ours-dropout" in wanted:
        dropout = f"dropout {CONFIGS[args.model_type].transformer.dropout_rate:g}"
        peers.append(Peer(f"ours (config {dropout})", ours([]), first_output))
    timm_name = TIMM_NAMES[args.model_type]
    if "timm" in wanted:
        timm_model = timm.create_model(timm_name, num_classes=num_classes, img_size=size)
        timm_model.set_grad_checkpointing(args.grad_checkpointing)
        peers.append(Peer(f"timm {timm_name}", timm_model, lambda m, x: m(x)))
    tv_name = TORCHVISION_NAMES.get(args.model_type)
    if "torchvision" in wanted and tv_name:
        tv_model = getattr(torchvision.models, tv_name)(num_classes=num_classes, image_size=size)
        peers.append(Peer(f"torchvision {tv_name}", tv_model, lambda m, x: m(x)))
    elif "torchvision" in wanted:
        print(f"note: torchvision has no {args.model_type}; left out")
    if "reference" in wanted:
        if args.reference_path:
            ref_class, ref_configs = load_reference(args.reference_path)
            name = "reference"
            ref_config = ref_configs.get(args.model_type)
            if ref_config is not None:
                ref_config = ref_config.copy_and_resolve_references()
                ref_config.transformer.dropout_rate = 0.0
                ref_config.transformer.attention_dropout_rate = 0.0
        else:
            from bench.reference_standin import VisionTransformer as ref_class

            ref_config, name = ours_config, "reference (stand-in)"
        if ref_config is None:
            known = ", ".join(ref_configs)
            print(f"note: the reference has no {args.model_type} (it has {known}); left out")
        else:
            ref_model = ref_class(ref_config, size, zero_head=True, num_classes=num_classes)
            peers.append(Peer(name, ref_model, first_output))
    for peer in peers:
        peer.model.to(device).train()
        if args.compile:
            peer.model = torch.compile(peer.model)
    return peers


# ---------------------------------------------------------------------------------------------
# Steps and clocks


@dataclass
class Setup:
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    batch_size: int
    steps: int
    warmup: int

    @property
    def amp(self) -> Precision:
        return Precision(self.precision, self.device, loss_scale=0)

    @property
    def dtype(self) -> torch.dtype | None:
        return self.amp.dtype

    def autocast(self):
        return self.amp.autocast()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class TrainStep:
    """One optimizer update as train.py makes it: autocast forward, scaled backward, clip, SGD."""

    def __init__(
        self, peer: Peer, setup: Setup, next_batch: Callable[[], tuple], batch_bytes: int = 0
    ) -> None:
        self.peer, self.setup, self.next_batch = peer, setup, next_batch
        self.batch_bytes = batch_bytes  # of input data kept on the device between steps
        # train.py's own optimizer (fused SGD with momentum, not fused under fp16)
        self.optimizer = build_optimizer(peer.model, 0.0, fp16=setup.precision == "fp16")
        set_learning_rate(self.optimizer, 1e-3)
        self.scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.dtype == torch.float16)

    def __call__(self) -> None:
        x, y = self.next_batch()
        with self.setup.autocast():
            loss = F.cross_entropy(self.peer.logits(self.peer.model, x).float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.peer.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def resident_bytes(self) -> int:
        """Parameters, optimizer state and input data: allocated before a step, kept after it."""
        tensors = list(self.peer.model.parameters())
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors) + self.batch_bytes


def make_eval_step(peer: Peer, setup: Setup, batch: tuple) -> Callable:
    @torch.no_grad()
    def step() -> None:
        with setup.autocast():
            peer.logits(peer.model, batch[0])

    return step


@dataclass
class Timing:
    per_second: float  # images per second of wall-clock time
    per_cpu_second: float  # images per second of this process's CPU time (all its threads)
    peak_bytes: int


def measure(step: Callable, setup: Setup, resident: Callable[[], int] = lambda: 0) -> Timing:
    """Time setup.steps calls of ``step`` after setup.warmup untimed ones.

    The peak (CUDA only, else 0) is the allocator's high-water mark during the timed steps above
    what was allocated before them, plus ``resident()`` after warm-up: the bytes of this model's
    parameters, optimizer state and batch, allocated before the timed steps (as were the other
    models', which do not count).
    """
    for _ in range(setup.warmup):
        step()
    setup.sync()
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
        base = torch.cuda.memory_allocated(setup.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(setup.steps):
        step()
    setup.sync()
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    peak = torch.cuda.max_memory_allocated(setup.device) - base + resident() if cuda else 0
    images = setup.batch_size * setup.steps
    return Timing(images / elapsed, images / elapsed_cpu, peak)


def synthetic_cifar(n: int, img_size: int) -> CifarDataset:
    """A CIFAR-sized training set of n random 32-px images, the same for every call."""
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    arrays = CifarArrays(images, np.arange(n) % 10, [str(c) for c in range(10)])
    return CifarDataset(arrays, img_size, train=True, seed=0)


def time_data_path(
    host: CifarDataset, data: DeviceBatches, keys: Iterator, setup: Setup
) -> dict[str, float]:
    """Images/s of the device data path (keys to batch), of its crop draws alone, and of one
    DataLoader worker making the same batch on the CPU (the path of image folders and of
    ``--data_on_device off``)."""
    height, width = data.images.shape[-2:]
    batch = next(keys)
    cpu_keys = [tuple(k) for k in batch.tolist()]
    worker = Setup(torch.device("cpu"), "fp32", setup.batch_size, max(1, setup.steps // 4), 1)
    return {
        "data_path": measure(lambda: data.train_batch(next(keys)), setup).per_second,
        "draws": measure(
            lambda: draw_boxes(data.seed, batch, height, width, data.hflip), setup
        ).per_second,
        "worker_path": measure(lambda: host.__getitems__(cpu_keys), worker).per_second,
    }


def benchmark(args: argparse.Namespace, setup: Setup) -> dict:
    torch.manual_seed(0)
    peers = build_peers(args, setup.device)
    B, S = setup.batch_size, args.img_size
    ideal = (  # the pre-made batch every model step is fed
        torch.randn(B, 3, S, S, device=setup.device).clamp_(-1, 1),
        torch.randint(0, 10, (B,), device=setup.device),
    )
    ideal_bytes = sum(t.numel() * t.element_size() for t in ideal)
    train_steps = [TrainStep(p, setup, lambda: ideal, ideal_bytes) for p in peers]
    host = synthetic_cifar(50_000, S)
    data = DeviceBatches.from_dataset(host, setup.device)
    keys = GlobalBatchSampler(len(data), B, rank=0, world_size=1, seed=0).device_keys(setup.device)
    ours = peers[0]
    full_step = TrainStep(ours, setup, lambda: data.train_batch(next(keys)), data.images.numel())

    for round_ in range(args.repeats):
        for peer, step in zip(peers, train_steps, strict=True):
            train = measure(step, setup, step.resident_bytes)
            peer.model.eval()
            eval_ = measure(make_eval_step(peer, setup, ideal), setup)
            peer.model.train()
            peer.record("train", train.per_second)
            peer.record("train_cpu", train.per_cpu_second)
            peer.record("train_peak_bytes", train.peak_bytes)
            peer.record("eval", eval_.per_second)
            peer.record("eval_cpu", eval_.per_cpu_second)
            print(
                f"round {round_ + 1}/{args.repeats} {peer.name}: train "
                f"{speed(train.per_second)}, eval {speed(eval_.per_second)} img/s "
                f"(load {os.getloadavg()[0]:.1f})"
            )
        full = measure(full_step, setup, full_step.resident_bytes)
        ours.record("full_train", full.per_second)
        ours.record("full_train_cpu", full.per_cpu_second)
        ours.record("full_train_peak_bytes", full.peak_bytes)
        for key, value in time_data_path(host, data, keys, setup).items():
            ours.record(key, value)
    return {p.name: p.results for p in peers}


# ---------------------------------------------------------------------------------------------
# Report


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def speed(value: float | None) -> str:
    """Images/s with three significant figures below 100 (CPU figures are around 1)."""
    if not value:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def print_table(results: dict[str, dict[str, list[float]]], setup: Setup, cpu_time=False) -> dict:
    """Print medians of images/s (per CPU-second if ``cpu_time``), ratios and peak memory."""
    key = {"train": "train_cpu", "eval": "eval_cpu", "full": "full_train_cpu"} if cpu_time else {}
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    timm = next((m for n, m in med.items() if n.startswith("timm")), {})
    ref = next((m for n, m in med.items() if n.startswith("reference")), {})
    train, eval_ = key.get("train", "train"), key.get("eval", "eval")
    rows = [(n, m[train], m[eval_], max(results[n]["train_peak_bytes"])) for n, m in med.items()]
    full = med["ours"][key.get("full", "full_train")]
    full_peak = max(results["ours"]["full_train_peak_bytes"])
    rows.insert(1, ("ours, full step (data + model)", full, None, full_peak))
    unit = "images per CPU-second (all threads)" if cpu_time else "images/s"
    rounds = len(results["ours"]["train"])
    where = device_name(setup.device)
    where += f", {torch.get_num_threads()} threads" if setup.device.type == "cpu" else ""
    print(f"\n{where}, {setup.precision}, batch {setup.batch_size}: {unit}")
    columns = ["train/timm", "train/ref", "eval/timm", "eval/ref"]
    print(f"{f'median of {rounds} rounds':<32}{'train':>9}{'eval':>9}", end="")
    print("".join(f"{c:>11}" for c in columns) + f"{'peak MiB':>10}")
    ratios = {}
    for name, train_speed, eval_speed, peak in rows:
        cells = [ratio(train_speed, timm.get(train)), ratio(train_speed, ref.get(train))]
        cells += [ratio(eval_speed, timm.get(eval_)), ratio(eval_speed, ref.get(eval_))]
        ratios[name] = dict(zip(columns, cells, strict=True))
        mib = f"{peak / 2**20:.0f}" if peak else "-"
        print(f"{name:<32}{speed(train_speed):>9}{speed(eval_speed):>9}", end="")
        print("".join(f"{c:>11}" for c in cells) + f"{mib:>10}")
    return ratios


def print_data_path(results: dict[str, dict[str, list[float]]], setup: Setup) -> None:
    ours = {k: statistics.median(v) for k, v in results["ours"].items()}
    print(
        f"data path alone: {ours['data_path']:.0f} img/s from keys on the device (its crop draws "
        f"alone {ours['draws']:.0f} img/s); one CPU worker making the same batches: "
        f"{ours['worker_path']:.0f} img/s"
    )
    if setup.device.type == "cpu":
        print("(on CPU the data path runs on the same cores, in series with the model step)")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"


# ---------------------------------------------------------------------------------------------
# Memory table


@contextmanager
def memory_cap(device: torch.device, capacity: float) -> Iterator[None]:
    """Let the allocator use ``capacity`` bytes of this GPU (1 GiB less, for the CUDA context)."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (capacity - GIB) / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def fits(model: nn.Module, setup: Setup, batch: int, img_size: int) -> bool:
    """Whether one training step of ``batch`` images runs without running out of memory."""

    def attempt() -> None:  # its batch, gradients and optimizer state are freed on return
        data = (
            torch.randn(batch, 3, img_size, img_size, device=setup.device),
            torch.zeros(batch, dtype=torch.long, device=setup.device),
        )
        TrainStep(Peer("", model, first_output), setup, lambda: data)()
        setup.sync()

    return fits_in_memory(attempt, model, setup.device)


def largest_batch(model: nn.Module, setup: Setup, img_size: int) -> int:
    """Largest multiple of 8 images whose step fits; 0 if none does."""
    return largest_that_runs(lambda batch: fits(model, setup, batch, img_size), multiple=8)


def parse_memory_row(text: str) -> tuple[str, int]:
    model_type, _, pixels = text.strip().partition("@")
    if model_type not in CONFIGS or not pixels.isdigit():
        raise UsageError(f"--memory_rows: {text!r} is not MODEL@PIXELS, e.g. ViT-B_16@224")
    return model_type, int(pixels)


def memory_table(args: argparse.Namespace, setup: Setup) -> dict:
    """Largest batch per GPU size; measured on CUDA, computed from a formula elsewhere."""
    measured = setup.device.type == "cuda"
    capacities = (24, 40, 80)
    print(
        f"largest training batch (ours, {setup.precision} autocast, SGD momentum): "
        + ("measured" if measured else "computed")
    )
    if measured:
        print(f"measured on {device_name(setup.device)}, the allocator capped at N - 1 GiB")
    else:
        print(
            "computed as (N GiB - 1 GiB - 12 bytes/parameter - per-step bytes) / "
            f"({BACKWARD} x activation bytes per image), activations counted by autograd hooks"
        )
    if args.grad_checkpointing:
        print("with --grad_checkpointing: each block's activations recomputed in the backward")
    print(f"{'model':<10}{'img':>5}" + "".join(f"{f'{c} GB':>9}" for c in capacities))
    table = {}
    for model_type, img_size in args.memory_rows:
        overrides = [] if is_mixer(CONFIGS[model_type]) else NO_DROPOUT
        model = build_model(model_type, overrides, img_size, 10, zero_head=True).to(setup.device)
        model.set_grad_checkpointing(args.grad_checkpointing)
        if measured:
            row = []
            for c in capacities:
                with memory_cap(setup.device, c * GIB):
                    row.append(largest_batch(model, setup, img_size))
        else:
            step = measure_step(model, img_size, setup.device, setup.autocast)
            weights = 4 * step.parameters  # in place before train.py compares, here not yet
            row = [step.largest_micro_batch(c * GIB - weights) for c in capacities]
            print(
                f"  {model_type} {img_size}px: {step.per_image / 2**20:.1f} MiB/image saved for "
                f"backward, {step.per_step / 2**20:.0f} MiB/step, {3 * weights / 2**20:.0f} MiB "
                "static"
            )
        table[f"{model_type}@{img_size}"] = dict(zip(map(str, capacities), row, strict=True))
        print(f"{model_type:<10}{img_size:>5}" + "".join(f"{b:>9}" for b in row))
        del model
    return {
        "kind": "measured" if measured else "computed",
        "grad_checkpointing": args.grad_checkpointing,
        "table": table,
    }


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(None if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    setup = Setup(
        device=device,
        precision=args.precision or ("bf16" if cuda or args.memory_table else "fp32"),
        batch_size=args.batch_size or (256 if cuda else 8),
        steps=args.steps or (20 if cuda else 3),
        warmup=args.warmup if args.warmup is not None else (5 if cuda else 1),
    )
    if min(setup.batch_size, setup.steps, args.repeats, args.img_size) <= 0:
        raise UsageError("--batch_size, --steps, --repeats and --img_size must be positive")
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := sorted(set(args.peers) - set(PEERS)):
        raise UsageError(f"--peers: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    args.memory_rows = [parse_memory_row(row) for row in args.memory_rows.split(",") if row]
    if not cuda:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "flags": vars(args),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(),
    }
    if args.memory_table:
        report["memory_table"] = memory_table(args, setup)
    else:
        import timm
        import torchvision

        report |= {"timm": timm.__version__, "torchvision": torchvision.__version__}
        report["results"] = benchmark(args, setup)
        report["ratios"] = print_table(report["results"], setup)
        if device.type == "cpu":  # CPU time is less disturbed by other processes on the machine
            report["ratios_cpu_time"] = print_table(report["results"], setup, cpu_time=True)
        print_data_path(report["results"], setup)
        report["load_average_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main, "bench.throughput")
