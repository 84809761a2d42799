"""Many processes, mixed precision and interrupted runs, all checked against an equivalent run.

Multi-process runs use ``torchrun`` with the gloo backend on the CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import train
from models.errors import UsageError
from tests.test_data import cut, shuffled
from tests.test_train import SMALL, closed_port, run_cli
from utils.runtime import distributed as dist
from utils.training import learner as learner_module
from utils.training import update

pytestmark = pytest.mark.slow
NO_DROPOUT = ["--config", "transformer.dropout_rate=0"]


def child_env() -> dict[str, str]:
    """The environment of a training subprocess: this checkout importable, one thread each."""
    return {**os.environ, "PYTHONPATH": str(Path(train.__file__).parent), "OMP_NUM_THREADS": "1"}


def torchrun(tmp_path: Path, nproc: int, *args: str, wait: bool = True):
    """``torchrun --nproc_per_node nproc train.py ...`` on the CPU; Popen when not waiting."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(closed_port()),
        str(Path(train.__file__)), "--output_dir", str(tmp_path / "output"),
        "--logdir", str(tmp_path / "logs"), *args,
    ]  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = child_env()
    if not wait:
        return subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def last_state(folder: Path, name: str) -> dict:
    return torch.load(folder / "output" / f"{name}_last.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol, msg=key)


def accuracies(log: str) -> list[tuple[float, int]]:
    return [
        (float(a), int(n)) for a, n in re.findall(r"test accuracy ([\d.]+), .*\((\d+) images", log)
    ]


def test_torchrun_equals_one_process(tmp_path: Path, subset: Path) -> None:
    """2 processes x 8 images (in 2 micro-batches each, blocks recomputed in the backward pass)
    == 1 process x 16 images, step by step."""
    common = [*SMALL, *NO_DROPOUT, "--pretrained_dir", "none", "--data_dir", str(subset),
              "--num_steps", "12", "--eval_every", "6", "--warmup_steps", "2"]  # fmt: skip
    two = torchrun(
        tmp_path / "two", 2, "--name", "r", *common, "--train_batch_size", "8",
        "--gradient_accumulation_steps", "2", "--grad_checkpointing",
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(tmp_path / "one", "--name", "r", *common, "--train_batch_size", "16")
    assert one.returncode == 0, one.stderr
    assert "global batch 16 (8 per process in 2 micro-batches of 4)" in two.stderr
    assert_same_weights(
        last_state(tmp_path / "two", "r")["model"], last_state(tmp_path / "one", "r")["model"]
    )
    two_acc, one_acc = accuracies(two.stderr), accuracies(one.stderr)
    assert [n for _, n in two_acc] == [509, 509]
    assert two_acc == one_acc


def test_evaluation_counts_every_image_once_with_three_processes(
    tmp_path: Path, subset: Path
) -> None:
    """509 test images over 3 processes: shares of 170, 170 and 169, no padding duplicates."""
    common = [*SMALL, *NO_DROPOUT, "--pretrained_dir", "none", "--data_dir", str(subset),
              "--num_steps", "2", "--eval_every", "2", "--eval_batch_size", "50"]  # fmt: skip
    three = torchrun(tmp_path / "three", 3, "--name", "r", *common, "--train_batch_size", "4")
    assert three.returncode == 0, three.stderr[-3000:]
    one = run_cli(tmp_path / "one", "--name", "r", *common, "--train_batch_size", "12")
    assert one.returncode == 0, one.stderr
    assert accuracies(three.stderr) == accuracies(one.stderr)
    assert accuracies(three.stderr)[0][1] == 509


def run_in_process(tmp_path: Path, subset: Path, *extra: str) -> int:
    return train.main(
        [
            "--name", "run", *SMALL, "--pretrained_dir", "none", "--data_dir", str(subset),
            "--output_dir", str(tmp_path / "output"), "--logdir", str(tmp_path / "logs"),
            "--train_batch_size", "16", "--num_steps", "16", "--eval_every", "8",
            "--warmup_steps", "3", "--log_every", "4", *extra,
        ]
    )  # fmt: skip


def test_sigterm_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropout on: the RNG state is part of what a resumed run must restore."""
    assert run_in_process(tmp_path / "straight", subset) == 0
    straight = last_state(tmp_path / "straight", "run")

    real_step, calls = update.train_step, []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 6:  # a real SIGTERM, delivered to this process mid-run
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(update, "train_step", step_then_signal)
    assert run_in_process(tmp_path / "split", subset) == 128 + signal.SIGTERM
    monkeypatch.setattr(update, "train_step", real_step)
    stopped = last_state(tmp_path / "split", "run")
    assert stopped["step"] == 6
    assert run_in_process(tmp_path / "split", subset, "--resume", "auto") == 0
    resumed = last_state(tmp_path / "split", "run")

    assert resumed["step"] == straight["step"] == 16
    assert_same_weights(resumed["model"], straight["model"], atol=1e-6)
    momentum = [s["momentum_buffer"] for s in straight["optimizer"]["state"].values()]
    momentum_resumed = [s["momentum_buffer"] for s in resumed["optimizer"]["state"].values()]
    for a, b in zip(momentum, momentum_resumed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert resumed["scheduler"] == straight["scheduler"]
    assert resumed["best_acc"] == straight["best_acc"]


def test_resume_refuses_another_model_or_no_steps_left(tmp_path: Path, subset: Path) -> None:
    assert run_in_process(tmp_path, subset, "--num_steps", "8") == 0
    with pytest.raises(UsageError, match="--img_size"):
        run_in_process(tmp_path, subset, "--resume", "auto", "--img_size", "16")
    for steps in ("8", "6"):
        with pytest.raises(
            UsageError,
            match=f"(already at step 8|belongs to a run of 8 steps), and --num_steps is {steps}",
        ):
            run_in_process(tmp_path, subset, "--resume", "auto", "--num_steps", steps)


@pytest.mark.parametrize("precision", [["--fp16"], ["--precision", "bf16"]])
def test_mixed_precision_runs_on_the_cpu(
    tmp_path: Path, subset: Path, precision: list[str]
) -> None:
    result = run_cli(
        tmp_path, "--name", "amp", *SMALL, *precision, "--pretrained_dir", "none",
        "--data_dir", str(subset), "--train_batch_size", "16", "--num_steps", "6",
        "--eval_every", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"final accuracy 0\.\d+", result.stdout)
    assert "fp16" in result.stderr if precision == ["--fp16"] else "bf16" in result.stderr


def test_fp16_overflow_is_skipped_and_counted(tmp_path: Path, subset: Path) -> None:
    """A static loss scale of 1e10 overflows float16 gradients: every update is skipped."""
    result = run_cli(
        tmp_path, "--name", "ovf", *SMALL, "--fp16", "--loss_scale", "1e10",
        "--pretrained_dir", "none", "--data_dir", str(subset), "--train_batch_size", "16",
        "--num_steps", "3", "--eval_every", "3", "--warmup_steps", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 steps had inf/NaN gradients (skipped by the fp16 loss scaler)" in result.stderr
    state = torch.load(tmp_path / "output" / "ovf_last.pt", weights_only=True)
    assert state["optimizer"]["state"] == {}, "a skipped step must not touch the optimizer"


# ---------------------------------------------------------------------------------------------
# Two nodes that share no disk


def two_node_flags(*extra: str) -> list[str]:
    """Relative paths only: each node resolves them in its own folder, on its own disk."""
    return [
        "--name", "two", *SMALL, *NO_DROPOUT, "--data_dir", "data", "--pretrained_dir", "init.bin",
        "--val_split", "0.1", "--gradient_accumulation_steps", "2", "--num_steps", "16",
        "--eval_every", "4", "--log_every", "1", "--warmup_steps", "2", "--eval_batch_size", "128",
        "--output_dir", "output", "--logdir", "logs", *extra,
    ]  # fmt: skip


def node(folder: Path, rank: int, port: int, args: list[str]) -> subprocess.Popen:
    """One node's ``torchrun --nnodes 2 --node_rank rank`` (one process), started in ``folder``
    as the leader of its own session; node 1's output goes to a file (nobody reads it live)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
        "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
        str(Path(train.__file__)), *args,
    ]  # fmt: skip
    env = child_env()
    out = subprocess.PIPE if rank == 0 else (folder.parent / f"node{rank}.log").open("a")
    return subprocess.Popen(
        command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def watchdog(launches: list[subprocess.Popen], seconds: float) -> None:
    """Kill the launches' process groups if they still run after ``seconds``: a node left
    waiting for a peer that has died fails the test instead of hanging it."""

    def kill() -> None:
        for launch in launches:
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)

    timer = threading.Timer(seconds, kill)
    timer.daemon = True
    timer.start()


def summary_of(output: str) -> str:
    """The summary line up to its timings."""
    line = next((line for line in output.splitlines() if line.startswith("summary:")), "")
    return line.split(" | wall time")[0]


def test_two_nodes_without_a_shared_disk_train_stop_resume_and_equal_one_process(
    tmp_path: Path, subset: Path
) -> None:
    """Two torchrun launches on 127.0.0.1 from two folders, each with its own copy of the data;
    the checkpoint to fine-tune from is on node 0's disk only. They train and evaluate (a
    validation split selects, the test set is scored at the end with the best weights), are
    stopped by SIGTERM to both launches, resume, and end with the weights and summary of one
    process with the same global batch. Node 1 writes nothing and reads no file of node 0."""
    from models.configs import CONFIGS, apply_overrides
    from models.modeling import VisionTransformer
    from tests.test_train import SMALL_CONFIG

    folders = {name: tmp_path / name for name in ("node0", "node1", "one")}
    for name, folder in folders.items():
        shutil.copytree(subset / "cifar-10-batches-py", folder / "data" / "cifar-10-batches-py")
        if name != "node1":
            torch.manual_seed(3)
            model = VisionTransformer(apply_overrides(CONFIGS["testing"], SMALL_CONFIG), 32)
            torch.save(model.state_dict(), folder / "init.bin")
    env = child_env()
    one = subprocess.run(
        [sys.executable, str(Path(train.__file__)), *two_node_flags("--train_batch_size", "8")],
        cwd=folders["one"], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    args = two_node_flags("--train_batch_size", "4")
    port = closed_port()
    first = [node(folders[f"node{r}"], r, port, args) for r in (0, 1)]
    watchdog(first, 300)
    lines = []
    for line in first[0].stdout:  # stop both once node 0 has trained past an evaluation
        lines.append(line)
        if re.search(r"step (9|1\d)/16", line):
            for launch in first:
                os.killpg(launch.pid, signal.SIGTERM)
            break
    stopped_log = "".join(lines) + first[0].communicate(timeout=300)[0]
    first[1].wait(timeout=300)
    assert "Resume with the same command and --resume auto" in stopped_log, stopped_log[-3000:]
    assert 9 <= last_state(folders["node0"], "two")["step"] < 16

    port = closed_port()
    resumed = [node(folders[f"node{r}"], r, port, [*args, "--resume", "auto"]) for r in (0, 1)]
    watchdog(resumed, 300)
    resumed_log = resumed[0].communicate(timeout=600)[0]
    assert resumed[1].wait(timeout=300) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    assert resumed[0].returncode == 0, resumed_log[-3000:]
    assert f"resumed from {folders['node0'] / 'output/two_last.pt'} at step" in resumed_log
    assert_same_weights(
        last_state(folders["node0"], "two")["model"], last_state(folders["one"], "two")["model"]
    )
    assert summary_of(resumed_log) == summary_of(one.stdout)
    assert "test set, weights of step" in summary_of(one.stdout)
    assert sorted(p.name for p in folders["node1"].iterdir()) == ["data"]  # wrote nothing


# ---------------------------------------------------------------------------------------------
# torch.compile under DDP


def test_compile_wraps_the_ddp_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's recommended order, torch.compile(DDP(model)), lets DDP's all-reduce overlap
    the compiled backward; DDP(torch.compile(model)) would not."""
    from models.configs import CONFIGS
    from models.modeling import VisionTransformer

    monkeypatch.setattr(learner_module, "DDP", lambda module, device_ids: ("DDP", module))
    monkeypatch.setattr(torch, "compile", lambda module: ("compiled", module))
    model = VisionTransformer(CONFIGS["testing"], 224)
    ctx = dist.Context(0, 2, 0, torch.device("cpu"))
    assert learner_module.for_training(model, ctx, compile=True) == ("compiled", ("DDP", model))


def test_compiled_ddp_with_accumulation_equals_eager(tmp_path: Path, subset: Path) -> None:
    """2 processes x 2 micro-batches (no_sync on the first), compiled against eager."""
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.compile(lambda x: x.sin() + 1)"
         "(torch.ones(4)).sum().item())"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"torch.compile does not work on this CPU: {probe.stderr.strip()[-300:]}")
    common = [*SMALL, *NO_DROPOUT, "--pretrained_dir", "none", "--data_dir", str(subset),
              "--num_steps", "3", "--eval_every", "3", "--train_batch_size", "8",
              "--gradient_accumulation_steps", "2"]  # fmt: skip
    eager = torchrun(tmp_path / "eager", 2, "--name", "r", *common)
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = torchrun(tmp_path / "compiled", 2, "--name", "r", *common, "--compile")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    compiled_state, eager_state = (last_state(tmp_path / k, "r") for k in ("compiled", "eager"))
    assert_same_weights(compiled_state["model"], eager_state["model"])


# ---------------------------------------------------------------------------------------------
# Two nodes whose copies of the data differ


@pytest.mark.parametrize("copy", ["shuffled", "truncated", "missing"])
def test_two_nodes_whose_data_differ_start_neither_and_leave_nothing(
    tmp_path: Path, subset: Path, copy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two torchrun launches on 127.0.0.1 from two folders. Node 1's copy of the data holds the
    same images in another order, or has two files cut to 300 images: both nodes refuse in the
    same one line, naming node 1 and what it read, before training. Node 1 without data whose
    download fails: the one line, and node 1's empty data folder is gone, as node 0's output is.
    (Identical copies train: the two-node test above.)"""
    monkeypatch.setenv("VIT_CIFAR_MIRROR", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("no_proxy", "*")
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
        if folder == folders[0] or copy != "missing":
            shutil.copytree(subset / "cifar-10-batches-py", folder / "data" / "cifar-10-batches-py")
    if copy == "shuffled":
        shuffled(folders[1] / "data" / "cifar-10-batches-py")
    elif copy == "truncated":
        cut(folders[1] / "data" / "cifar-10-batches-py", 300, "data_batch_1", "test_batch")
    args = ["--name", "differ", *SMALL, "--data_dir", "data", "--pretrained_dir", "none",
            "--output_dir", "output", "--logdir", "logs", "--train_batch_size", "4"]  # fmt: skip
    port = closed_port()
    launches = [node(folder, rank, port, args) for rank, folder in enumerate(folders)]
    watchdog(launches, 300)
    outputs = [launches[0].communicate(timeout=300)[0]]
    launches[1].wait(timeout=300)
    outputs.append((tmp_path / "node1.log").read_text())
    lines = [[line for line in out.splitlines() if "train.py: error" in line] for out in outputs]
    assert len(lines[0]) == 1 and lines[0] == lines[1], outputs
    assert "exitcode  : 2" in outputs[0] and "exitcode  : 2" in outputs[1], outputs
    # torchrun's own traceback follows (ChildFailedError, "exitcode  : 2"); none of ours
    assert not re.search(r'File "[^"]*/(train\.py|utils/)', "".join(outputs)), outputs
    here = [f"{folder}/data/cifar-10-batches-py" for folder in folders]
    host = socket.gethostname()
    expected = {
        "shuffled": f"the nodes' copies of the data differ: rank 1 (node 1, host {host}) read "
        f"5085 train images from {here[1]}, rank 0 (node 0, host {host}) 5085 from {here[0]}: "
        "as many, but not the same images or not in the same order; give every node the same "
        "copy of --data_dir data",
        "truncated": f"the nodes' copies of the data differ: rank 1 (node 1, host {host}) read "
        f"4368 train images from {here[1]}, rank 0 (node 0, host {host}) 5085 from {here[0]}; "
        "give every node the same copy of --data_dir data",
        "missing": f"CIFAR-10 not found in {here[1]} (expected data_batch_1, ",
    }[copy]
    assert lines[0][0].startswith(f"train.py: error: {expected}"), lines[0][0]
    assert sorted(p.name for p in folders[0].iterdir()) == ["data"]
    assert sorted(p.name for p in folders[1].iterdir()) == ([] if copy == "missing" else ["data"])
