"""train.py's memory and length options: --grad_checkpointing, --gradient_accumulation_steps auto,
--save_every and --num_epochs, each against the run it must equal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from tests.test_distributed import assert_same_weights
from tests.test_train import SMALL
from utils.training import memory
from utils.training.learner import Learner
from utils.training.run_files import TrainingState
from utils.training.saving import Saver


def run(tmp_path: Path, subset: Path, name: str, *extra: str) -> int:
    return train.main(
        [
            "--name", name, *SMALL, "--pretrained_dir", "none", "--data_dir", str(subset),
            "--output_dir", str(tmp_path / "out"), "--logdir", str(tmp_path / "logs"),
            "--train_batch_size", "16", "--eval_batch_size", "512", "--device", "cpu",
            "--learning_rate", "0.1", *extra,
        ]
    )  # fmt: skip


def last_state(tmp_path: Path, name: str) -> TrainingState:
    return TrainingState.read(tmp_path / "out" / f"{name}_last.pt")


def assert_equal_weights(a: TrainingState, b: TrainingState) -> None:
    """Bitwise: the runs compared here do the same arithmetic in the same order."""
    assert_same_weights(a.model, b.model, atol=0, rtol=0)


def test_grad_checkpointing_trains_to_the_same_weights(subset: Path, tmp_path: Path) -> None:
    """Dropout on (the testing config's 0.1): the recomputed blocks draw the same masks."""
    steps = ["--num_steps", "3", "--eval_every", "3", "--warmup_steps", "1", "--hflip"]
    assert run(tmp_path, subset, "plain", *steps) == 0
    assert run(tmp_path, subset, "checkpointed", *steps, "--grad_checkpointing") == 0
    plain, checkpointed = last_state(tmp_path, "plain"), last_state(tmp_path, "checkpointed")
    assert_equal_weights(plain, checkpointed)
    assert plain.step == checkpointed.step == 3


def test_auto_accumulation_takes_the_fewest_micro_batches_that_fit(
    subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """On the CPU the estimate decides: with room for a micro-batch of 4 images and not of 8,
    16 images become 4 micro-batches, and the run equals one typed with the number."""
    real = memory.measure_step
    room: dict[str, int] = {}

    def measured(*args, **kwargs) -> memory.StepMemory:
        step = real(*args, **kwargs)
        room["bytes"] = (step.needed(4) + step.needed(8)) // 2
        return step

    monkeypatch.setattr(memory, "measure_step", measured)
    monkeypatch.setattr(memory, "available_bytes", lambda device: room["bytes"])
    steps = ["--num_steps", "3", "--eval_every", "3", "--warmup_steps", "1"]
    assert run(tmp_path, subset, "auto", *steps, "--gradient_accumulation_steps", "auto") == 0
    log = capfd.readouterr().err
    assert "--gradient_accumulation_steps auto: 4 micro-batches of 4 images" in log
    assert "from the memory estimate" in log
    assert run(tmp_path, subset, "typed", *steps, "--gradient_accumulation_steps", "4") == 0
    auto, typed = last_state(tmp_path, "auto"), last_state(tmp_path, "typed")
    assert_equal_weights(auto, typed)
    assert auto.args["gradient_accumulation_steps"] == 4 and auto.global_batch == 16


def test_trial_steps_find_the_largest_micro_batch_that_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA path, with out-of-memory mocked: micro-batches above 24 images fail."""
    from models.configs import CONFIGS, apply_overrides
    from models.modeling import VisionTransformer

    config = apply_overrides(CONFIGS["testing"], ["hidden_size=16", "transformer.mlp_dim=32"])
    model = VisionTransformer(config, img_size=16, num_classes=10)
    real_forward = model.forward
    tried = []

    def forward(x, labels=None):
        tried.append(len(x))
        if len(x) > 24:
            raise torch.OutOfMemoryError("CUDA out of memory (mocked)")
        return real_forward(x, labels)

    monkeypatch.setattr(model, "forward", forward)
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    cpu = torch.device("cpu")

    def runs(micro: int) -> bool:
        return memory.trial_step_fits(
            model, micro, 16, cpu, lambda: torch.autocast("cpu", enabled=False)
        )

    n = memory.fewest_micro_batches_that_run(96, runs)
    assert n == 4 and tried == [96, 48, 32, 24]  # 96 / 4 = 24, the largest that runs
    assert all(p.grad is None for p in model.parameters())  # nothing left behind
    assert torch.equal(torch.rand(1), expected_next)  # the RNG as it was: dropout unchanged
    assert memory.fewest_micro_batches_that_run(7, lambda micro: False) is None


class Crash(Exception):
    pass


def test_a_crash_after_save_every_loses_nothing(
    subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed right after the save of step 4 (no evaluation yet), then resumed: the weights of
    the run that was never interrupted (which did not recompute its blocks: the same result)."""
    steps = ["--num_steps", "6", "--eval_every", "6", "--warmup_steps", "1", "--save_every", "2"]
    assert run(tmp_path, subset, "straight", *steps) == 0
    real = Saver.last

    def save_then_crash(saver: Saver, r: Learner) -> None:
        real(saver, r)
        if r.step == 4:
            raise Crash

    monkeypatch.setattr(Saver, "last", save_then_crash)
    with pytest.raises(Crash):
        run(tmp_path, subset, "crashed", *steps, "--grad_checkpointing")
    monkeypatch.setattr(Saver, "last", real)
    assert last_state(tmp_path, "crashed").step == 4
    resumed = ["--resume", "auto", "--grad_checkpointing"]
    assert run(tmp_path, subset, "crashed", *steps, *resumed) == 0
    assert_equal_weights(last_state(tmp_path, "straight"), last_state(tmp_path, "crashed"))


def test_save_every_saves_at_its_steps(
    subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved_at = []
    real = Saver.last
    monkeypatch.setattr(Saver, "last", lambda s, r: saved_at.append(r.step) or real(s, r))
    steps = ["--num_steps", "7", "--eval_every", "6", "--warmup_steps", "1", "--save_every", "4"]
    assert run(tmp_path, subset, "every", *steps) == 0
    assert saved_at == [4, 6, 7]  # its own step, and every evaluation as without it


def test_num_epochs_sets_the_steps(subset: Path, tmp_path: Path, capfd) -> None:
    # 0.1 epoch of the 5,085 training images in global batches of 16: 508 // 16 = 31 steps
    extra = ["--num_epochs", "0.1", "--eval_every", "100", "--warmup_steps", "1"]
    assert run(tmp_path, subset, "epochs", *extra, "--log_every", "100") == 0
    log = capfd.readouterr().err
    assert "--num_epochs 0.1: 31 steps of 16 images over 5085 training images" in log
    assert last_state(tmp_path, "epochs").step == 31


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_epochs", "0"], "--num_epochs must be positive"),
        (["--num_epochs", "0.001"], "is less than one global batch of 16; raise --num_epochs"),
        (["--num_epochs", "0.01", "--warmup_steps", "5"], "is not below the run's 3 steps"),
        (["--gradient_accumulation_steps", "often"], "'often' is neither a count nor auto"),
        (["--save_every", "0"], "--save_every must be positive"),
    ],
)
def test_length_and_memory_flags_refuse_bad_values(
    subset: Path, tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        from utils.cli import run_main

        run_main(lambda: run(tmp_path, subset, "bad", *flags), "train.py")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_cpu_run_on_busy_cores_says_to_use_one_thread(
    subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """The README's advice, given where it applies: threads > 1, no OMP_NUM_THREADS, and a load
    average that leaves the threads fewer free cores than they are."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    steps = ["--num_steps", "1", "--eval_every", "1", "--warmup_steps", "0"]
    for load, told in [(3.0, True), (1.2, False)]:
        monkeypatch.setattr("os.getloadavg", lambda load=load: (load, load, load))
        capfd.readouterr()
        assert run(tmp_path, subset, f"busy{load}", *steps) == 0
        log = capfd.readouterr().err
        assert ("load average 3.0 on 2 cores" in log and "OMP_NUM_THREADS=1" in log) == told, log
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a choice made: not second-guessed
    monkeypatch.setattr("os.getloadavg", lambda: (3.0, 3.0, 3.0))
    assert run(tmp_path, subset, "chosen", *steps) == 0
    assert "OMP_NUM_THREADS=1" not in capfd.readouterr().err


def test_a_resume_with_other_micro_batches_says_it_is_not_exact(
    subset: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    steps = ["--eval_every", "2", "--warmup_steps", "0", "--gradient_accumulation_steps"]
    assert run(tmp_path, subset, "acc", "--num_steps", "2", *steps, "1") == 0
    capfd.readouterr()
    assert run(tmp_path, subset, "acc", "--num_steps", "4", "--resume", "auto", *steps, "2") == 0
    log = capfd.readouterr().err
    assert "resumed with 2 micro-batches per step, saved with 1" in log
    assert "--gradient_accumulation_steps 1 to go on exactly" in log
    assert last_state(tmp_path, "acc").step == 4
    assert run(tmp_path, subset, "acc", "--num_steps", "6", "--resume", "auto", *steps, "2") == 0
    assert "micro-batches per step, saved with" not in capfd.readouterr().err
