"""The memory estimate against what a real CPU step takes.

Only ``StepMemory.least`` may refuse a step before training (off CUDA, where no trial step is
possible: running out of memory there kills the process). It must never overstate: the peak
resident memory of a real step, measured by the kernel, is at least as large. ``needed``, which
chooses micro-batches, must cover that peak.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import REPO
from utils.training import memory
from utils.training.memory import GIB, StepMemory, StepToFit
from utils.training.precision import Precision

pytestmark = pytest.mark.slow

# One step after a first one (which creates the momentum buffers), its peak resident memory
# read from VmHWM after clear_refs reset it. glibc's malloc is told to map every large block on
# its own, so that freed memory leaves the resident set instead of being kept for reuse and
# hiding the next step's growth.
STEP = r"""
import json, re, sys
from pathlib import Path
import torch
from models.configs import CONFIGS
from models.modeling import VisionTransformer
from utils.training.memory import measure_step
from utils.training.precision import Precision

def status(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024

model_type, img, micro, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = VisionTransformer(CONFIGS[model_type], img, zero_head=True, num_classes=10)
precision = Precision(name, torch.device("cpu"), 0)
step = measure_step(model, img, torch.device("cpu"), precision.autocast)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
x, y = torch.randn(micro, 3, img, img), torch.zeros(micro, dtype=torch.long)

def one_step():
    with precision.autocast():
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

one_step()
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
one_step()
print(json.dumps({"growth": status("VmHWM") - before, "parameters": step.parameters,
                  "least": step.least(micro), "needed": step.needed(micro)}))
"""


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs"
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_least_a_step_needs_is_below_a_real_steps_peak(precision: str) -> None:
    """ViT-B/16 at 224 px, 4 images: the momentum (already resident before the measured step)
    plus the peak growth of the step is at least ``least`` and at most ``needed`` (which leaves
    out the weights, in place before either is compared with free memory)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2",
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", STEP, "ViT-B_16", "224", "4", precision],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    peak = 4 * measured["parameters"] + measured["growth"]  # momentum + the step's growth
    assert measured["least"] <= peak <= measured["needed"], measured
    assert peak <= 1.15 * measured["least"], measured  # and close: a refusal is not too timid


# ViT-B/16 at 224 px in fp32, as ``measure_step`` finds it on this CPU: 0.14 GiB per image
VIT_B16 = StepMemory(per_image=150_284_328, per_step=82_575_360, parameters=85_806_346)


@pytest.mark.parametrize(
    ("free_gib", "micro_batches"),
    [(12, 16), (17.5, 8), (24, 8), (3, 64)],
    ids=["12GiB", "17.5GiB", "24GiB", "3GiB"],
)
def test_auto_on_the_cpu_keeps_a_share_of_the_free_memory(
    free_gib: float, micro_batches: int, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """The README's step (512 images) on a CPU: ``auto`` plans with the free memory less
    max(2 GiB, 15 %) of it, which other processes may take while a step runs. With 12 GiB free
    it once took micro-batches of 64 (11.1 GiB by the estimate, 0.9 GiB to spare); now 32. Where
    not even one image fits beside that share (3 GiB free), it plans with all of it rather than
    going one image at a time."""
    free = int(free_gib * GIB)
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    cpu = torch.device("cpu")
    fit = StepToFit(torch.nn.Linear(1, 1), "ViT-B_16", 224, 512, Precision("fp32", cpu, 0), False)
    with caplog.at_level(logging.INFO, logger="vit"):
        assert fit.fewest_micro_batches(VIT_B16, resumed=None) == micro_batches
    kept = max(2 * GIB, 0.15 * free) if free_gib > 3 else 0
    micro = 512 // micro_batches
    assert VIT_B16.needed(micro) <= free - kept < VIT_B16.needed(2 * micro)  # the fewest
    assert (
        f"--gradient_accumulation_steps auto: {micro_batches} micro-batches of {micro} images, "
        f"the fewest that fit in the {free / GIB:.1f} GiB free, from the memory estimate, "
        f"keeping {kept / GIB:.1f} GiB of it for other processes"
    ) in caplog.text
