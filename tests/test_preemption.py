"""Signals as schedulers and terminals deliver them: to the whole process group, workers included.

SLURM, Kubernetes and ``timeout`` send SIGTERM to every process of a job; Ctrl-C sends SIGINT to
the terminal's foreground group, a shell whose terminal closed SIGHUP to its jobs, and
``#SBATCH --signal=B:USR1@120`` SIGUSR1. Each run here starts in its own session and gets the
signal through ``os.killpg``, with DataLoader workers running, then resumes and must end where an
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


def launch(folder: Path, args: list[str], nproc: int = 0, nohup: bool = False) -> subprocess.Popen:
    """train.py (under torchrun with ``nproc`` processes) as the leader of a new session."""
    folder.mkdir(parents=True, exist_ok=True)
    launcher = ["nohup"] * nohup + [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                     "--master_addr", "127.0.0.1", "--master_port", str(closed_port())]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*launcher, str(REPO / "train.py"), *args], cwd=folder, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=hangup_as_in_a_terminal,
    )  # fmt: skip


def hangup_as_in_a_terminal() -> None:
    """SIGHUP's default action in the run, as a shell in a terminal starts it, even when the
    suite itself runs under nohup (which would pass "ignore" on, and the run honours that);
    ``nohup=True`` sets it back to ignored, as the nohup command does."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def interrupt(run: subprocess.Popen, sig: int, at_step: int = 12, late: float = 0) -> str:
    """Send ``sig`` to the run's whole process group once it has logged ``at_step``. With
    ``late``, to every process of the job, as ``scancel --signal`` does (torchrun starts each of
    its processes in a group of its own), torchrun held back ``late`` seconds before it passes
    its own copy on."""
    lines = []
    for line in run.stdout:
        lines.append(line)
        match = re.search(rf"step (\d+)/{STEPS}", line)
        if match and int(match[1]) >= at_step:
            groups = {run.pid}
            if late:
                os.kill(run.pid, signal.SIGSTOP)
                groups |= {os.getpgid(pid) for pid in children(run.pid)}
            for group in groups:
                os.killpg(group, sig)
            if late:
                time.sleep(late)
                os.kill(run.pid, signal.SIGCONT)
            break
    return "".join(lines) + run.communicate(timeout=300)[0]


def children(parent: int) -> list[int]:
    """The processes whose parent is ``parent``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == parent:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            continue
    return found


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


def acknowledged(sig: int) -> str:
    """The line the run logs the moment the first stop signal arrives (docs/training.md shows
    SIGINT's)."""
    return (
        f"{signal.Signals(sig).name} received: the run stops before its next micro-batch and "
        "saves its last whole step; Ctrl-C again stops it at once, saving nothing more"
    )


def stopped_resumably(output: str, folder: Path, sig: int) -> int:
    """The step saved by a run stopped by ``sig``: acknowledged at once, saved, name released."""
    stopped = last_state(folder, "run")["step"]
    assert 12 <= stopped < STEPS
    said = output.index(f"stopped by signal at step {stopped}; state saved to")
    assert output.count(acknowledged(sig)) == 1 and output.index(acknowledged(sig)) < said
    assert "Resume with the same command and --resume auto" in output
    assert not (folder / "output" / "run.lock").exists()
    return stopped


def test_a_stop_is_acknowledged_during_a_long_backward_pass(caplog) -> None:
    """Python runs a signal's handler between two bytecodes of the main thread, and a backward
    pass (a minute, for ViT-B/16 on a CPU) is a single call: the line must not wait for its end."""
    import logging
    import threading

    from utils.runtime.signals import StopRequest

    caplog.set_level(logging.INFO, logger="vit")
    x = torch.full((1500, 1500), 1 / 1500, requires_grad=True)
    y = x
    for _ in range(8):
        y = y @ x
    stop = StopRequest()
    try:
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        y.sum().backward()  # about a second
        ended = time.time()
    finally:
        stop.restore()
    said = [r.created for r in caplog.records if r.getMessage() == acknowledged(signal.SIGTERM)]
    assert said and said[0] < ended - 0.1, f"said at {said}, the backward pass ended at {ended}"
    assert stop.signum == signal.SIGTERM


def test_the_documented_acknowledgement_is_the_one_printed() -> None:
    assert f"`{acknowledged(signal.SIGINT)}`" in (REPO / "docs" / "training.md").read_text()


SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1]


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_a_signal_to_the_group_saves_and_exits_resumably(
    tmp_path: Path, subset: Path, straight: dict, sig: int
) -> None:
    """SIGTERM from schedulers, Ctrl-C's SIGINT, SIGHUP from a shell whose terminal closed,
    SIGUSR1 from ``#SBATCH --signal=B:USR1@120``: each stops the run the same way."""
    args = flags(subset, tmp_path)
    run = launch(tmp_path, args)
    output = interrupt(run, sig)
    assert run.returncode == 128 + sig  # 143 SIGTERM, 130 SIGINT, 129 SIGHUP, 138 SIGUSR1
    assert "Traceback" not in output and "exited unexpectedly" not in output, output[-3000:]
    stopped_resumably(output, tmp_path, sig)

    if sig != signal.SIGTERM:
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


def test_sighup_under_nohup_is_still_ignored(tmp_path: Path, subset: Path) -> None:
    """``nohup`` starts the run with SIGHUP ignored, for it to outlive its terminal: it does."""
    run = launch(tmp_path, flags(subset, tmp_path), nohup=True)
    output = interrupt(run, signal.SIGHUP)
    assert run.returncode == 0, output[-3000:]
    assert last_state(tmp_path, "run")["step"] == STEPS and "received" not in output


def test_sigint_to_every_process_of_a_torchrun_job_is_one_ctrl_c(
    tmp_path: Path, subset: Path
) -> None:
    """``scancel --signal=INT`` (or a Ctrl-C where torchrun's processes share its group) reaches
    each process twice: directly, and forwarded by torchrun. That is one request, which saves,
    not a second Ctrl-C, which would stop at once and break the group. Sent as step 25's
    evaluation begins (an image a batch: it takes a while), with torchrun's copy 0.1 s late: the
    processes have acted on the first copy when the second comes, as when a stop waits for a
    micro-batch of ViT-B/16 (on time, the two copies here often merge into one)."""
    args = [*flags(subset, tmp_path), "--train_batch_size", "4", "--eval_batch_size", "1"]
    output = interrupt(launch(tmp_path, args, nproc=2), signal.SIGINT, at_step=25, late=0.1)
    ours = [line for line in output.splitlines() if "train.py" in line and "File" in line]
    assert not ours and "a second Ctrl-C" not in output, output[-3000:]
    assert output.count("Resume with the same command and --resume auto") == 1, output[-3000:]
    stopped_resumably(output, tmp_path, signal.SIGINT)


def test_a_closed_terminal_saves_and_exits_resumably(
    tmp_path: Path, subset: Path, straight: dict
) -> None:
    """The run's terminal closes (a pseudo-terminal whose other end is closed, as by an ssh
    session that ends): writes to it fail from then on, and the shell sends SIGHUP to the job."""
    import fcntl
    import pty
    import select
    import termios

    args = flags(subset, tmp_path)
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
        stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
        preexec_fn=lambda: (  # its controlling terminal; SIGHUP as in a terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0), hangup_as_in_a_terminal()
        ),
    )  # fmt: skip
    os.close(terminal)
    shown, deadline = b"", time.monotonic() + 300
    try:
        while b"step 25: test accuracy" not in shown:  # then close it, 35 steps before the end
            assert time.monotonic() < deadline and run.poll() is None, shown.decode()[-3000:]
            if select.select([controller], [], [], 1)[0]:
                shown += os.read(controller, 65536)
    finally:
        os.close(controller)  # the terminal is gone: the kernel sends SIGHUP to the run
    os.killpg(run.pid, signal.SIGHUP)  # and so does the shell, to its whole job
    assert run.wait(timeout=300) == 128 + signal.SIGHUP
    assert 25 <= last_state(tmp_path, "run")["step"] < STEPS
    assert not (tmp_path / "output" / "run.lock").exists()

    finish(tmp_path, [*args, "--resume", "auto"])
    final = last_state(tmp_path, "run")
    assert final["step"] == STEPS
    assert_same_weights(final["model"], straight["model"], atol=1e-6)


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
    """The first SIGINT asks for a stop at the next micro-batch, a second one a second later stops
    at once: here both come while the start asks a server that never answers for the pre-trained
    checkpoint, and the run ends with one line and exit code 130, leaving no file."""
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
            silent.settimeout(120)
            asking = silent.accept()[0]  # train.py has asked, and waits for the answer
            time.sleep(0.3)
            os.killpg(run.pid, signal.SIGINT)
            time.sleep(1.5)  # a deliberate second Ctrl-C, not a copy of the first
            os.killpg(run.pid, signal.SIGINT)
            out, err = run.communicate(timeout=30)
            asking.close()
        finally:
            run.kill()
    assert run.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert acknowledged(signal.SIGINT) in err
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
