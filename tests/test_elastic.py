"""``torchrun --max-restarts``: a worker that dies is started again by torchrun and goes on from
the run's own last state, with no flag added (docs/training.md, "Elastic restarts")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from tests.test_distributed import (
    NO_DROPOUT,
    assert_same_weights,
    child_env,
    last_state,
    torchrun,
)
from tests.test_train import SMALL, closed_port

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_killed_worker_is_restarted_and_ends_where_an_uninterrupted_run_does(
    tmp_path: Path, subset: Path
) -> None:
    common = ["--name", "r", *SMALL, *NO_DROPOUT, "--pretrained_dir", "none",
              "--data_dir", str(subset), "--num_steps", "120", "--eval_every", "60",
              "--save_every", "10", "--warmup_steps", "5", "--train_batch_size", "8",
              "--log_every", "1"]  # fmt: skip
    folder = tmp_path / "elastic"
    folder.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
        "--max_restarts", "1", "--master_addr", "127.0.0.1", "--master_port", str(closed_port()),
        str(Path(train.__file__)), "--output_dir", str(folder / "output"),
        "--logdir", str(folder / "logs"), *common,
    ]  # fmt: skip
    job = subprocess.Popen(command, cwd=folder, env=child_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output, killed, deadline = [], None, time.monotonic() + 400
    for line in job.stdout:
        output.append(line)
        if killed is None and "step 40/120" in line:
            (worker,) = children(job.pid)
            os.kill(worker, signal.SIGKILL)  # as the OOM killer or a failing node does
            killed = worker
        assert time.monotonic() < deadline, "".join(output[-30:])
    log = "".join(output)
    assert job.wait(timeout=60) == 0, log[-4000:]
    assert killed is not None, log[-3000:]
    assert "resumed from" in log, log[-3000:]
    restarted = log.split("resumed from", 1)[1]
    assert "Traceback" not in restarted and "step 120/120" in restarted

    straight = torchrun(tmp_path / "straight", 1, *common)  # the same launcher, never killed
    assert straight.returncode == 0, straight.stderr[-3000:]
    ended, expected = last_state(folder, "r"), last_state(tmp_path / "straight", "r")
    assert ended["step"] == expected["step"] == 120
    assert_same_weights(ended["model"], expected["model"], atol=0, rtol=0)
