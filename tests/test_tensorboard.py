"""What TensorBoard shows of a run, read back by TensorBoard's own code: the HParams tab's columns
and values, and where the results sort among the curves; which runs a log folder holds, and what
a full disk under --logdir does to a run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import (
    api_pb2,
    backend_context,
    get_experiment,
    list_session_groups,
)

import train
from tests.test_train import REPO, SMALL, event_scalars
from utils.data.batches import BatchSource
from utils.training.logger import Reporter
from utils.training.run_files import TrainingState


def hparams_tab(logdir: Path) -> tuple[list[str], dict[str, tuple[dict, dict[str, float]]]]:
    """The HParams tab of ``tensorboard --logdir logdir``: its metric columns, and for each run
    its flags and metric values, as TensorBoard's HParams plugin serves them to the page."""
    events = multiplexer.EventMultiplexer().AddRunsFromDirectory(str(logdir))
    events.Reload()
    provider = data_provider.MultiplexerDataProvider(events, str(logdir))
    plugin = backend_context.Context(
        base_plugin.TBContext(logdir=str(logdir), multiplexer=events, data_provider=provider)
    )
    request = context.RequestContext()
    experiment = get_experiment.Handler(request, plugin, "", api_pb2.GetExperimentRequest()).run()
    every_status = list(api_pb2.Status.values())
    groups = list_session_groups.Handler(
        request,
        plugin,
        "",
        api_pb2.ListSessionGroupsRequest(slice_size=100, allowed_statuses=every_status),
    ).run()
    runs = {}
    for group in groups.session_groups:
        (session,) = group.sessions
        flags = {
            name: getattr(value, value.WhichOneof("kind")) for name, value in group.hparams.items()
        }
        runs[session.name] = (flags, {m.name.tag: m.value for m in session.metric_values})
    return [m.name.tag for m in experiment.metric_infos], runs


def tags(logdir: Path, kind: str) -> set[str]:
    """The tags of one kind ("scalars", "images", "tensors"...) in a run's event files."""
    found = set()
    for events in logdir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={kind: 1})
        accumulator.Reload()
        found |= set(accumulator.Tags()[kind])
    return found


def tag_groups_in_order(logdir: Path) -> list[str]:
    """The scalar tag groups of a run top to bottom in TensorBoard's Scalars and Time Series tabs:
    by name, which for names of lower-case letters is Python's string order."""
    return sorted({tag.split("/")[0] for tag in tags(logdir, "scalars")})


def write_run(logdir: Path, results: dict[str, float]) -> None:
    reporter = Reporter(logdir, total_steps=10, start_step=0)
    for step in (5, 10):
        reporter.scalars({"train/loss": 1.0 / step, "val/accuracy": step / 20}, step)
    reporter.hparams({"learning_rate": 0.03, "model_type": "ViT-B_16", "config": []}, results, 10)
    reporter.close()


def test_results_sort_below_the_curves_and_fill_the_hparams_tab(tmp_path: Path) -> None:
    write_run(tmp_path / "plain", {"best_accuracy": 0.5, "final_accuracy": 0.25})
    with_test = {"test_accuracy_final": 0.375, "test_accuracy_best": 0.4375}
    write_run(tmp_path / "split", {"best_accuracy": 0.75, "final_accuracy": 0.5, **with_test})

    columns, runs = hparams_tab(tmp_path)
    assert runs == {
        "plain": (
            {"learning_rate": 0.03, "model_type": "ViT-B_16", "config": "[]"},
            {"verdict/best_accuracy": 0.5, "verdict/final_accuracy": 0.25},
        ),
        "split": (
            {"learning_rate": 0.03, "model_type": "ViT-B_16", "config": "[]"},
            {
                "verdict/best_accuracy": 0.75,
                "verdict/final_accuracy": 0.5,
                "verdict/test_accuracy_final": 0.375,
                "verdict/test_accuracy_best": 0.4375,
            },
        ),
    }
    # Whichever run TensorBoard takes the columns from, a run without a test score included.
    everything = [f"verdict/{name}" for name in ("best_accuracy", "final_accuracy", *with_test)]
    for run in ("plain", "split"):
        assert hparams_tab(tmp_path / run)[0] == everything
    assert columns == everything

    # The results are single points at the last step, in a group below the curves.
    for run, (_, values) in runs.items():
        scalars = event_scalars(tmp_path / run)
        assert {tag: scalars[tag] for tag in values} == {t: [(10, v)] for t, v in values.items()}
        assert tag_groups_in_order(tmp_path / run) == ["train", "val", "verdict"]


def small_run(tmp_path: Path, subset: Path, name: str, *extra: str) -> list[str]:
    return [*SMALL, "--name", name, "--pretrained_dir", "none", "--data_dir", str(subset),
            "--train_batch_size", "64", "--output_dir", str(tmp_path / "out"), *extra]  # fmt: skip


@pytest.mark.slow
def test_a_run_stopped_before_its_first_step_leaves_no_tensorboard_run(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """SIGTERM once step 1 is under way (its batch made), as a scheduler or the out-of-memory
    killer ends a long first step: the run says that step 1 began, stops with nothing saved,
    and leaves nothing under --logdir for TensorBoard to list as an empty run; the same command
    run to its end then writes its run there."""
    argv = small_run(tmp_path, subset, "early", "--num_steps", "2", "--eval_every", "2",
                     "--logdir", str(tmp_path / "logs"))  # fmt: skip
    real_batches = BatchSource.training_batches

    def first_batch_then_signal(data_path, *args):
        next_batch = real_batches(data_path, *args)

        def made_then_signal():
            batch = next_batch()
            os.kill(os.getpid(), signal.SIGTERM)
            return batch

        return made_then_signal

    monkeypatch.setattr(BatchSource, "training_batches", first_batch_then_signal)
    assert train.main(argv) == 128 + signal.SIGTERM
    log = capfd.readouterr().err
    assert "step 1/2 under way (1 micro-batch of 64 images)" in log
    assert "stopped by signal before step 1: nothing was trained yet" in log
    assert not (tmp_path / "logs").exists()

    monkeypatch.undo()
    assert train.main(argv) == 0
    assert [step for step, _ in event_scalars(tmp_path / "logs" / "early")["train/loss"]] == [1, 2]


def in_a_full_file_system(folder: Path, size: str) -> list[str]:
    """The words that run a command with a new tmpfs of ``size`` mounted on ``folder``, seen by
    that command alone (a mount namespace of its own: nothing to unmount afterwards); skips the
    test where this machine allows no such mount."""
    namespace = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    mount = [*namespace, "sh", "-c", 'mount -t tmpfs -o size="$1" tmpfs "$0" && shift && exec "$@"',
             str(folder), size]  # fmt: skip
    try:
        probe = subprocess.run([*mount, "true"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no unshare(1) to mount a small file system with")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    return mount


@pytest.mark.slow
def test_a_full_logdir_disk_stops_the_run_in_one_line_with_its_state_saved(
    tmp_path: Path, subset: Path
) -> None:
    """--logdir on a real file system of 48 KiB, which the first evaluation's images fill: the
    run stops with one line naming the folder and the fix, no traceback (TensorBoard's writer
    thread included); the state of the step it stopped at is saved in --output_dir, and the same
    command with another --logdir and --resume auto trains on to the end."""
    full = tmp_path / "full"
    full.mkdir()
    argv = small_run(tmp_path, subset, "r", "--num_steps", "40", "--eval_every", "10")
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [sys.executable, str(REPO / "train.py"), *argv]
    result = subprocess.run(
        [*in_a_full_file_system(full, "48k"), *command, "--logdir", str(full)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr
    last = result.stderr.splitlines()[-1]
    said = re.fullmatch(
        rf"train.py: error: TensorBoard cannot write to {re.escape(str(full / 'r'))}, this "
        r"run's folder under --logdir \(No space left on device\); the training state of step "
        rf"(\d+) is saved in {re.escape(str(tmp_path / 'out' / 'r_last.pt'))}: free space on the "
        r"--logdir disk \(or choose another --logdir\), then run the same command with --resume "
        r"auto",
        last,
    )
    assert said, result.stderr
    step = int(said[1])
    assert step >= 10 and TrainingState.read(tmp_path / "out" / "r_last.pt").step == step
    assert (tmp_path / "out" / "r_checkpoint.bin").is_file()  # the best weights, of step 10

    resumed = subprocess.run(
        [*command, "--logdir", str(tmp_path / "logs"), "--resume", "auto"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'out' / 'r_last.pt'} at step {step}" in resumed.stderr
    assert "| 40 steps |" in resumed.stdout
