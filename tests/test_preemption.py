"""Signals as schedulers and terminals deliver them: to the whole process group, workers included.

SLURM, Kubernetes and ``timeout`` send SIGTERM to every process of a job; Ctrl-C sends SIGINT to
the terminal's foreground group. Each run here starts in its own session and gets the signal
through ``os.killpg``, with DataLoader workers running, then resumes and must end where an
uninterrupted run ends. The stops inside an accumulated step run in this process, the signal
delivered during a chosen micro-batch's forward pass.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.modeling import VisionTransformer
from tests.test_distributed import assert_same_weights, last_state, run_in_process
from tests.test_train import REPO, SMALL, closed_port
from utils.training.saving import Saver

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


# ---------------------------------------------------------------------------------------------
# A stop inside an accumulated step: acted on before the next micro-batch, the step dropped


def accumulated_run(folder: Path, subset: Path, *extra: str) -> int:
    """16 images per step in 4 micro-batches of 4, dropout on, in this process."""
    return run_in_process(
        folder, subset, "--gradient_accumulation_steps", "4", "--num_steps", "8",
        "--eval_every", "4", "--warmup_steps", "2", "--log_every", "2", "--device", "cpu", *extra,
    )  # fmt: skip


def micro_batches(monkeypatch: pytest.MonkeyPatch, signal_at: int | None = None) -> list[int]:
    """The training micro-batches run (their forward passes, counted); SIGTERM is delivered to
    this process during the forward pass of number ``signal_at``, as a scheduler's would."""
    calls: list[int] = []
    real = VisionTransformer.forward

    def forward(self, x, labels=None):
        if self.training and labels is not None:
            calls.append(len(x))
            if len(calls) == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(self, x, labels)

    monkeypatch.setattr(VisionTransformer, "forward", forward)
    return calls


def test_a_stop_inside_a_step_drops_it_and_the_resumed_run_ends_bit_for_bit(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """SIGTERM during the second micro-batch of step 5: micro-batches 3 and 4 never run, the
    saved state is exactly the straight run's after step 4 (weights, momentum, RNG), and the
    resumed run ends on the straight run's weights, bitwise."""
    real_last, kept = Saver.last, tmp_path / "straight_step4.pt"

    def keep_step_4(saver, run) -> None:
        real_last(saver, run)
        if run.step == 4:
            shutil.copy(saver.files.last, kept)

    monkeypatch.setattr(Saver, "last", keep_step_4)
    assert accumulated_run(tmp_path / "straight", subset) == 0
    monkeypatch.setattr(Saver, "last", real_last)
    straight = last_state(tmp_path / "straight", "run")

    calls = micro_batches(monkeypatch, signal_at=4 * 4 + 2)
    assert accumulated_run(tmp_path / "split", subset) == 128 + signal.SIGTERM
    assert len(calls) == 18, "the stop waited for more than the micro-batch it came in"
    log = capfd.readouterr().err
    assert "stopped by signal during step 5, which was dropped; the state of step 4 saved" in log
    stopped, at_4 = last_state(tmp_path / "split", "run"), torch.load(kept, weights_only=True)
    assert stopped["step"] == 4
    assert_same_weights(stopped["model"], at_4["model"], atol=0, rtol=0)
    for a, b in zip(stopped["optimizer"]["state"].values(), at_4["optimizer"]["state"].values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert torch.equal(stopped["rng"][0]["torch"], at_4["rng"][0]["torch"])

    assert accumulated_run(tmp_path / "split", subset, "--resume", "auto") == 0
    resumed = last_state(tmp_path / "split", "run")
    assert resumed["step"] == 8
    assert_same_weights(resumed["model"], straight["model"], atol=0, rtol=0)


def test_a_stop_inside_the_first_step_says_nothing_was_trained(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    calls = micro_batches(monkeypatch, signal_at=2)
    assert accumulated_run(tmp_path, subset) == 128 + signal.SIGTERM
    assert len(calls) == 2
    assert "nothing was trained yet, so nothing was saved" in capfd.readouterr().err
    assert not (tmp_path / "output" / "run_last.pt").exists()


def test_two_ctrl_c_during_start_up_end_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    """The first SIGINT asks for a stop at the next micro-batch, the second stops at once: here
    both come while the pre-trained checkpoint downloads from a server that never answers, and
    the run ends with one line and exit code 130, the interrupted download leaving no file."""
    from tests.helpers import write_cifar10

    write_cifar10(tmp_path / "data")
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "no_proxy": "*",
               "VIT_CHECKPOINT_MIRROR": f"http://127.0.0.1:{silent.getsockname()[1]}"}  # fmt: skip
        for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env.pop(proxy, None)
        run = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "--name", "x", *SMALL, "--device", "cpu",
             "--dataset", "cifar10", "--data_dir", str(tmp_path / "data"), "--num_steps", "1000",
             "--train_batch_size", "8", "--pretrained_dir", str(tmp_path / "ViT-B_16.npz"),
             "--output_dir", str(tmp_path / "out"), "--logdir", str(tmp_path / "logs")],
            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            lines = []
            for line in run.stderr:
                lines.append(line)
                if "downloading http://127.0.0.1" in line:
                    break
            else:
                pytest.fail("train.py ended before the download: " + "".join(lines)[-3000:])
            time.sleep(0.3)  # blocked reading the response
            os.killpg(run.pid, signal.SIGINT)
            time.sleep(0.3)
            os.killpg(run.pid, signal.SIGINT)
            out, err = run.communicate(timeout=30)
        finally:
            run.kill()
    assert run.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("train.py: interrupted: a second Ctrl-C")
    assert not list(tmp_path.glob("*ViT-B_16.npz*"))


def test_a_workers_resource_sharer_hung_up_on_prints_no_traceback() -> None:
    """A second Ctrl-C can stop the main process while a worker hands it a batch's shared memory;
    the worker's sharing thread then has its connection reset, which is no error to report."""
    import threading

    from utils.runtime.signals import _quiet_hang_up

    def thread_failure(filename: str, error: type[BaseException]) -> threading.ExceptHookArgs:
        namespace: dict = {}
        exec(compile("def serve(e):\n    raise e\n", filename, "exec"), namespace)
        try:
            namespace["serve"](error())
        except error as raised:
            return threading.ExceptHookArgs((error, raised, raised.__traceback__, None))

    reported = []
    hook = _quiet_hang_up(reported.append)
    sharer = "/usr/lib/python3/multiprocessing/resource_sharer.py"
    hook(thread_failure(sharer, ConnectionResetError))
    hook(thread_failure(sharer, BrokenPipeError))
    assert reported == []
    hook(thread_failure(sharer, ValueError))
    hook(thread_failure("/work/elsewhere.py", ConnectionResetError))
    assert [args.exc_type for args in reported] == [ValueError, ConnectionResetError]
