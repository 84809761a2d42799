"""Signals as schedulers and terminals deliver them: to the whole process group, workers included.

SLURM, Kubernetes and ``timeout`` send SIGTERM to every process of a job; Ctrl-C sends SIGINT to
the terminal's foreground group. Each run here starts in its own session and gets the signal
through ``os.killpg``, with DataLoader workers running, then resumes and must end where an
uninterrupted run ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_distributed import assert_same_weights, last_state
from tests.test_train import REPO, SMALL, closed_port

pytestmark = pytest.mark.slow

STEPS = 60


def flags(subset: Path, folder: Path) -> list[str]:
    return [
        "--name", "run", *SMALL, "--num_workers", "2", "--pretrained_dir", "none",
        "--data_dir", str(subset), "--train_batch_size", "8", "--num_steps", str(STEPS),
        "--eval_every", "25", "--eval_batch_size", "256", "--log_every", "1",
        "--output_dir", str(folder / "output"), "--logdir", str(folder / "logs"),
    ]  # fmt: skip


def launch(folder: Path, args: list[str], nproc: int = 0) -> subprocess.Popen:
    """train.py (under torchrun with ``nproc`` processes) as the leader of a new session."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                     "--master_addr", "127.0.0.1", "--master_port", str(closed_port())]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*launcher, str(REPO / "train.py"), *args], cwd=folder, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def interrupt(run: subprocess.Popen, sig: int, at_step: int = 12) -> str:
    """Send ``sig`` to the run's whole process group once it has logged ``at_step``."""
    lines = []
    for line in run.stdout:
        lines.append(line)
        match = re.search(rf"step (\d+)/{STEPS}", line)
        if match and int(match[1]) >= at_step:
            os.killpg(run.pid, sig)
            break
    return "".join(lines) + run.communicate(timeout=300)[0]


def finish(folder: Path, args: list[str], nproc: int = 0) -> str:
    run = launch(folder, args, nproc)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> dict:
    folder = tmp_path_factory.mktemp("straight")
    finish(folder, flags(subset, folder))
    return last_state(folder, "run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_group_saves_and_exits_resumably(
    tmp_path: Path, subset: Path, straight: dict, sig: int
) -> None:
    args = flags(subset, tmp_path)
    run = launch(tmp_path, args)
    output = interrupt(run, sig)
    assert run.returncode == 128 + sig  # 143 for SIGTERM, 130 for SIGINT
    assert "Traceback" not in output and "exited unexpectedly" not in output, output[-3000:]
    stopped = last_state(tmp_path, "run")
    assert 12 <= stopped["step"] < STEPS
    assert f"stopped by signal at step {stopped['step']}; state saved to" in output
    assert "Resume with the same command and --resume auto" in output

    if sig == signal.SIGINT:
        return  # resuming is the same as after SIGTERM
    resumed = finish(tmp_path, [*args, "--resume", "auto"])
    assert f"resumed from {tmp_path / 'output' / 'run_last.pt'} at step" in resumed
    final = last_state(tmp_path, "run")
    assert final["step"] == STEPS
    assert_same_weights(final["model"], straight["model"], atol=1e-6)


def test_sigterm_to_a_torchrun_group_saves_and_resumes_exactly(
    tmp_path: Path, subset: Path
) -> None:
    """Two processes with two workers each; torchrun gets the signal too and forwards it."""
    args = [*flags(subset, tmp_path / "x"), "--train_batch_size", "4"]
    args = [a.replace(str(tmp_path / "x"), ".") for a in args]
    finish(tmp_path / "straight", args, nproc=2)

    output = interrupt(launch(tmp_path / "split", args, nproc=2), signal.SIGTERM)
    ours = [line for line in output.splitlines() if "train.py" in line and "File" in line]
    assert not ours, output[-3000:]  # torchrun's own SignalException is torch's, not ours
    assert "exited unexpectedly" not in output
    assert output.count("Resume with the same command and --resume auto") == 1, output[-3000:]
    stopped = last_state(tmp_path / "split", "run")
    assert 12 <= stopped["step"] < STEPS

    finish(tmp_path / "split", [*args, "--resume", "auto"], nproc=2)
    assert_same_weights(
        last_state(tmp_path / "split", "run")["model"],
        last_state(tmp_path / "straight", "run")["model"],
        atol=1e-6,
    )
