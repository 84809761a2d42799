"""The memory estimate against what a real CPU step takes.

Only ``StepMemory.least`` may refuse a step before training (off CUDA, where no trial step is
possible: running out of memory there kills the process). It must never overstate: the peak
resident memory of a real step, measured by the kernel, is at least as large. ``needed``, which
chooses micro-batches, must cover that peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train import REPO

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
