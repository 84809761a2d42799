"""Will a training step fit? Estimated before the first step, so that a machine too small for
the job says so in one line (with the flags that make it fit) instead of being killed later.

Autograd's saved tensors are counted with saved-tensor hooks on a forward pass of one and of two
images (their difference is the per-image part). Two figures come of them:

- ``needed``, what a step takes at its peak, to choose micro-batches with: 8 bytes per parameter
  that trains (gradient and momentum, or 12 with AdamW's two moments; the weights are already in
  place; a frozen one has neither), a weight average's copy (``--ema_decay``), the saved tensors,
  5 % on top for the backward pass's temporaries, and 1 GiB for the rest (allocator slack, the
  CUDA context).
  It puts the largest micro-batch of the rows measured on an H200 (docs/PERFORMANCE.md, bf16)
  between 11 % below (ViT-L/16 at 224 px, 24 GB) and 3 % above (within the bench's steps of 8);
- ``least``, what must exist when the forward pass ends (the momentum and every saved tensor),
  which no step can do without: only it may refuse a step before training, where no trial step
  is possible. ``tests/test_memory.py`` checks it against the peak RSS of real CPU steps.

``StepToFit`` turns them into train.py's decisions: the micro-batches of ``auto`` (by trial steps
on CUDA), and the advice an out-of-memory error gives. The bench's memory table searches with
``largest_that_runs``, over the same ``fits_in_memory`` trials.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.errors import UsageError
from utils.runtime import distributed as dist
from utils.training.precision import Precision

log = logging.getLogger("vit")

GIB = 2**30
MARGIN = GIB  # allocator slack, data-loader workers, the CUDA context's growth
# Off CUDA, ``auto`` plans with the free memory less max(2 GiB, 15 %) of it: the figure comes from
# an estimate, not a trial step, and the machine's other processes may take more of it while a
# step runs; running out there is the kernel's out-of-memory kill, with nothing saved.
CPU_HEADROOM = (2 * GIB, 0.15)
BACKWARD = 1.05  # the backward pass's temporaries, per saved byte (fitted to the H200 table)
WORKING_SET = 3  # the largest layer output's bytes that a forward pass holds at once, at least


def averaged_bytes(model: nn.Module, averaging: bool) -> int:
    """The bytes of a weight average's copy of ``model`` (``--ema_decay``), or 0."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) if averaging else 0


def activation_bytes(
    model: nn.Module,
    img_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[int, int]:
    """(bytes per image, bytes per step) that autograd keeps for backward in one forward pass.

    Each storage is counted once and parameters not at all; what does not grow with the batch
    (autocast's low-precision weight copies, for instance) is per step. The global RNG is left
    as it was, so that dropout masks stay those of a run without the estimate.

    With gradient checkpointing the hooks see only what checkpoint keeps, each block's input;
    the backward pass then rebuilds one block's activations at a time, so one block's count is
    added: the peak, not just what waits between the passes.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(module: nn.Module, shape: tuple[int, ...]) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                storages[s.data_ptr()] = s.nbytes()
            return t

        # a block's input requires grad, as it does inside the model; the images do not
        x = torch.randn(shape, device=device, requires_grad=module is not model)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
            out = module(x)
            (out[0] if isinstance(out, tuple) else out).float().sum()
        return sum(storages.values())

    def per_image_and_step(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
        one, two = saved(module, (1, *shape)), saved(module, (2, *shape))
        return two - one, max(0, 2 * one - two)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        per_image, per_step = per_image_and_step(model, (3, img_size, img_size))
        # a ViT's or a Mixer's (models/families.py); None: not checkpointed
        block = getattr(model, "checkpointed_block_input", lambda: None)()
        if block is not None:
            block_image, block_step = per_image_and_step(*block)
            per_image, per_step = per_image + block_image, per_step + block_step
        # a model that keeps little for backward (frozen below the head) still holds an op's
        # input, output and a temporary at once while the forward pass runs
        per_image = max(per_image, WORKING_SET * largest_output(model, img_size, device, autocast))
    return per_image, per_step


def largest_output(
    model: nn.Module,
    img_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> int:
    """The bytes of the largest output of any layer of ``model`` for one image."""
    largest = 0

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal largest
        for t in output if isinstance(output, tuple) else (output,):
            if isinstance(t, torch.Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad(), autocast():
            model(torch.randn(1, 3, img_size, img_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return largest


def available_bytes(device: torch.device) -> int:
    """Free memory of the GPU, or the memory this process may still take on the CPU: the
    kernel's MemAvailable, or less where a cgroup (a container, a SLURM job) caps it."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _meminfo_available()
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, available)


def cpu_headroom(available: int) -> int:
    """What ``auto`` leaves unplanned of ``available`` free bytes off CUDA (``CPU_HEADROOM``)."""
    least, share = CPU_HEADROOM
    return max(least, math.ceil(share * available))


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class StepMemory:
    """What one optimizer step needs, as a function of the micro-batch."""

    per_image: int
    per_step: int
    parameters: int
    optimizer_states: int = 1  # float32 values per parameter: SGD's momentum; AdamW's two moments
    averaged: int = 0  # bytes of --ema_decay's copy of the weights

    def needed(self, micro_batch: int) -> int:
        """Bytes a step of ``micro_batch`` images takes at its peak, with room to spare."""
        fixed = 4 * (1 + self.optimizer_states) * self.parameters + self.per_step + MARGIN
        fixed += self.averaged
        return fixed + math.ceil(BACKWARD * self.per_image * micro_batch)

    def least(self, micro_batch: int) -> int:
        """Bytes that exist at the end of the forward pass of ``micro_batch`` images: momentum
        and saved tensors. A step needs more than this, never less."""
        return (
            4 * self.optimizer_states * self.parameters
            + self.averaged
            + self.per_step
            + self.per_image * micro_batch
        )

    def largest_micro_batch(self, available: int) -> int:
        """The most images whose step fits in ``available`` bytes by ``needed`` (0: none)."""
        room = available - self.needed(0)
        return max(0, math.floor(room / (BACKWARD * self.per_image))) if room > 0 else 0

    def fewest_micro_batches(self, batch: int, available: int) -> int | None:
        """The smallest divisor n of ``batch`` whose micro-batches of batch / n fit, if any."""
        return fewest_micro_batches_that_run(batch, lambda micro: self.needed(micro) <= available)


def measure_step(
    model: nn.Module,
    img_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    optimizer_states: int = 1,
    averaged: int = 0,
) -> StepMemory:
    """The step's memory; only the parameters that train have a gradient and optimizer state,
    while ``averaged`` bytes (a weight average's copy) are kept beside."""
    per_image, per_step = activation_bytes(model, img_size, device, autocast)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return StepMemory(per_image, per_step, trainable, optimizer_states, averaged)


def fits_in_memory(attempt: Callable[[], None], model: nn.Module, device: torch.device) -> bool:
    """Whether ``attempt`` runs without running out of device memory. Write it as a function
    whose tensors die when it returns or raises; the model's gradients and the allocator's
    cache are released either way."""
    try:
        attempt()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def trial_step_fits(
    model: nn.Module,
    micro_batch: int,
    img_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    optimizer_states: int = 1,
    averaged: int = 0,
) -> bool:
    """Whether a forward and backward pass of ``micro_batch`` images runs without running out
    of memory, with room held for the optimizer's state. Leaves no gradient, no cached block
    and the RNG as it found them."""

    def attempt() -> None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            momentum = torch.empty(optimizer_states * trained + averaged // 4, device=device)
            x = torch.randn(micro_batch, 3, img_size, img_size, device=device)
            labels = torch.zeros(micro_batch, dtype=torch.long, device=device)
            with autocast():
                loss = model(x, labels)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            del momentum

    return fits_in_memory(attempt, model, device)


def fewest_micro_batches_that_run(batch: int, runs: Callable[[int], bool]) -> int | None:
    """The smallest divisor n of ``batch`` for which ``runs(batch // n)``, trying the largest
    micro-batch first (the answer is usually among the first few); None if none does."""
    for n in range(1, batch + 1):
        if batch % n == 0 and runs(batch // n):
            return n
    return None


def largest_that_runs(runs: Callable[[int], bool], multiple: int = 8) -> int:
    """The largest multiple of ``multiple`` for which ``runs`` holds (doubling, then bisection),
    assuming that what runs at a size runs at every smaller one; 0 if none does."""
    low, high = 0, multiple
    while runs(high):
        low, high = high, high * 2
    while high - low > multiple:
        mid = (low + high) // 2 // multiple * multiple
        low, high = (mid, high) if runs(mid) else (low, mid)
    return low


@dataclass
class StepToFit:
    """One process's training step, to fit in its device's memory: ``batch`` images (split into
    micro-batches) of ``img_size`` px through ``model`` in ``precision``."""

    model: nn.Module
    model_type: str
    img_size: int
    batch: int
    precision: Precision
    grad_checkpointing: bool
    optimizer_states: int = 1  # float32 values per parameter (``optimizer.STATE_VALUES``)
    averaged: int = 0  # bytes of --ema_decay's copy of the weights (``averaged_bytes``)

    @property
    def device(self) -> torch.device:
        return self.precision.device

    def measure(self) -> StepMemory:
        return measure_step(self.model, self.img_size, self.device, self.precision.autocast,
                            self.optimizer_states, self.averaged)  # fmt: skip

    def fewest_micro_batches(self, step: StepMemory, resumed: int | None) -> int:
        """``--gradient_accumulation_steps auto``: the fewest micro-batches that fit, by trial
        steps on CUDA and from the estimate ``step`` elsewhere; a resumed run's own count while
        it fits (the same sums in the same order). Every process takes the largest count any of
        them needs, so that all run the same micro-batches."""
        batch, started = self.batch, time.perf_counter()
        if self.device.type == "cuda":
            how = f"whose trial forward and backward passes ran on {self.device}"

            def fits(micro: int) -> bool:
                return trial_step_fits(self.model, micro, self.img_size, self.device,
                                       self.precision.autocast, self.optimizer_states,
                                       self.averaged)  # fmt: skip
        else:
            available = available_bytes(self.device)
            kept = cpu_headroom(available)
            if step.needed(1) > available - kept:  # too little to keep any: plan with it all
                kept = 0
            how = (
                f"that fit in the {available / GIB:.1f} GiB free, from the memory estimate, "
                f"keeping {kept / GIB:.1f} GiB of it for other processes"
            )

            def fits(micro: int) -> bool:
                return step.needed(micro) <= available - kept

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

    def advice(
        self, step: StepMemory, micro_batches: int, auto: bool, switches: bool = True
    ) -> str:
        """What an out-of-memory error in a step will say. Refuse the step now only where no
        trial step can say (off CUDA, where running out of memory kills the process) and only
        when even the least it needs, ``StepMemory.least``, exceeds the free memory; on CUDA
        what runs decides, and an estimate that says no is a warning. With ``switches``, where
        not even one image fits, the flags that would make it fit are measured and named."""
        available = available_bytes(self.device)
        batch, accum = self.batch, micro_batches
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
        if fewest is None and switches:  # not even one image at a time fits
            fixes += self.switches_that_fit(available)
        advice = (
            f"a step of {micro} images of {self.img_size} px ({self.model_type}, "
            f"{self.precision.name}) needs about {needed / GIB:.1f} GiB, and "
            f"{available / GIB:.1f} GiB of {self.device.type} memory are free; use "
            + ", or ".join(fixes)
        )
        cannot = self.device.type != "cuda" and step.least(micro) > available
        if dist.any_rank(cannot):
            raise UsageError(advice)
        if needed > available:
            log.warning("the memory estimate says this may not fit (%s); trying it", advice)
        return advice

    def switches_that_fit(self, available: int) -> list[str]:
        """Where no micro-batch fits: ``--grad_checkpointing`` and/or ``--precision bf16``, each
        with the micro-batches it needs, measured as the run's own step was; only those that
        fit."""
        batch, found, own = self.batch, [], (self.grad_checkpointing, self.precision.name)
        names = {own[1], "bf16" if own[1] == "fp32" else own[1]}
        for checkpointing, name in sorted((c, p) for c in {own[0], True} for p in names):
            if (checkpointing, name) == own:
                continue
            self.model.set_grad_checkpointing(checkpointing)
            autocast = Precision(name, self.device, 0).autocast
            step = measure_step(self.model, self.img_size, self.device, autocast,
                                self.optimizer_states, self.averaged)  # fmt: skip
            if n := step.fewest_micro_batches(batch, available):
                switches = " ".join(
                    ([] if checkpointing == own[0] else ["--grad_checkpointing"])
                    + ([] if name == own[1] else [f"--precision {name}"])
                )
                found.append(
                    f"{switches} --gradient_accumulation_steps {n} (micro-batches of "
                    f"{batch // n}, about {step.needed(batch // n) / GIB:.1f} GiB)"
                )
        self.model.set_grad_checkpointing(own[0])
        if not found:
            found.append(
                "a smaller --img_size or --model_type: no flag of this run makes one image fit"
            )
        return found
