"""Nothing a run finished is ever lost, and a resume means what its flags say: each fault
provoked for real (a diverging loss, a second command and a second process on one --name, a full
tmpfs, a killed save's leftovers, changed flags on resume, damaged files)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from models.errors import UsageError
from models.families import build_model
from models.npz_io import CheckpointError
from tests.test_train import SMALL
from utils.runtime import distributed as dist
from utils.training import flags as train_flags
from utils.training import memory, update
from utils.training.learner import Learner
from utils.training.optimizer import LearningRate, build_optimizer, warmup_cosine
from utils.training.precision import Precision
from utils.training.run_files import RunFiles, TrainingState, read_weights

REPO = Path(__file__).resolve().parents[1]


def argv(tmp_path: Path, subset: Path, name: str, *extra: str) -> list[str]:
    return [
        "--name", name, *SMALL, "--pretrained_dir", "none", "--data_dir", str(subset),
        "--output_dir", str(tmp_path / "out"), "--logdir", str(tmp_path / "logs"),
        "--train_batch_size", "16", "--eval_batch_size", "512", "--device", "cpu",
        "--img_size", "16", "--num_steps", "2", "--eval_every", "2", *extra,
    ]  # fmt: skip


def run(tmp_path: Path, subset: Path, name: str, *extra: str) -> int:
    return train.main(argv(tmp_path, subset, name, *extra))


def refusal(tmp_path: Path, subset: Path, name: str, *extra: str) -> str:
    with pytest.raises(UsageError) as error:
        run(tmp_path, subset, name, *extra)
    return str(error.value)


# ---------------------------------------------------------------------------------------------
# 1. The last good state is good


def test_a_diverging_run_keeps_only_finite_states_and_its_advice_works(
    tmp_path: Path, subset: Path
) -> None:
    """--learning_rate 1e6 with a save every step: the step whose loss was finite but whose
    update was not is never saved; the file named exists and is finite; the advice, followed,
    trains."""
    diverging = ["--learning_rate", "1e6", "--save_every", "1", "--num_steps", "20",
                 "--eval_every", "20", "--max_grad_norm", "1e30"]  # fmt: skip
    message = refusal(tmp_path, subset, "nan", *diverging)
    assert "stopping without saving it. The last good state is" in message
    named = Path(message.split("The last good state is ")[1].split(" (step")[0])
    assert named == tmp_path / "out" / "nan_last.pt" and named.is_file()
    state = TrainingState.read(named)
    assert all(torch.isfinite(v).all() for v in state.model.values())
    assert f"(step {state.step})" in message
    # followed: a lower learning rate, --overwrite
    assert run(tmp_path, subset, "nan", "--learning_rate", "0.01", "--overwrite") == 0
    assert TrainingState.read(named).step == 2


def test_a_run_diverging_before_its_first_save_says_nothing_was_saved(
    tmp_path: Path, subset: Path
) -> None:
    """Without --save_every nothing is written before the evaluation: the message names no
    file, and running the same command with a lower --learning_rate works."""
    diverging = ["--learning_rate", "1e6", "--num_steps", "20", "--eval_every", "20",
                 "--max_grad_norm", "1e30", "--log_every", "1"]  # fmt: skip
    message = refusal(tmp_path, subset, "nan", *diverging)
    assert "with nothing saved: run the same command with a lower --learning_rate" in message
    assert not (tmp_path / "out" / "nan_last.pt").exists()
    assert run(tmp_path, subset, "nan", "--learning_rate", "0.01") == 0


# ---------------------------------------------------------------------------------------------
# 2. No silent overwrite; one run per name


def test_a_second_run_of_a_finished_name_is_refused_unless_asked(
    tmp_path: Path, subset: Path
) -> None:
    assert run(tmp_path, subset, "base") == 0
    best = (tmp_path / "out" / "base_checkpoint.bin").read_bytes()
    message = refusal(tmp_path, subset, "base", "--seed", "7")
    assert "--resume auto" in message and "another --name" in message
    assert "--overwrite" in message and str(tmp_path / "out") in message
    assert (tmp_path / "out" / "base_checkpoint.bin").read_bytes() == best
    events = sorted((tmp_path / "logs" / "base").glob("events.out.tfevents.*"))
    assert events
    # --overwrite: a new run, with its own TensorBoard events only
    assert run(tmp_path, subset, "base", "--seed", "7", "--overwrite") == 0
    assert (tmp_path / "out" / "base_checkpoint.bin").read_bytes() != best
    assert not any(e.exists() for e in events)
    assert "--overwrite starts afresh" in refusal(
        tmp_path, subset, "base", "--overwrite", "--resume", "auto"
    )


def test_a_name_in_use_by_a_live_process_is_refused_and_a_killed_one_frees_it(
    tmp_path: Path, subset: Path
) -> None:
    """A real second process holds the name; after its kill -9, --resume auto works."""
    assert run(tmp_path, subset, "shared", "--save_every", "1") == 0
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from utils.training.run_files import "
         "RunFiles; RunFiles(Path(sys.argv[1]), 'shared').claim('auto', False); "
         "print('held', flush=True); time.sleep(120)", str(tmp_path / "out")],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        message = refusal(tmp_path, subset, "shared", "--resume", "auto", "--num_steps", "3",
                          "--eval_every", "3")  # fmt: skip
        assert f"pid {holder.pid}" in message and "is in use" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    resumed = ["--resume", "auto", "--num_steps", "3", "--eval_every", "3"]
    assert run(tmp_path, subset, "shared", *resumed) == 0
    assert TrainingState.read(tmp_path / "out" / "shared_last.pt").step == 3


def test_the_leftovers_of_a_killed_save_are_removed_by_the_next_run(
    tmp_path: Path, subset: Path
) -> None:
    assert run(tmp_path, subset, "kept") == 0
    leftover = tmp_path / "out" / ".kept_last.pt.k1ll3d0x.tmp"
    other = tmp_path / "out" / ".other_last.pt.k1ll3d0x.tmp"  # another run's: not ours
    leftover.write_bytes(b"half a state")
    other.write_bytes(b"half a state")
    assert run(tmp_path, subset, "kept", "--resume", "auto", "--num_steps", "4") == 0
    assert not leftover.exists() and other.exists()


# ---------------------------------------------------------------------------------------------
# 4. Every place a run writes is checked before training; a failed write is one line


def test_unwritable_places_are_refused_before_training(tmp_path: Path, subset: Path) -> None:
    (tmp_path / "afile").write_text("")
    message = refusal(tmp_path, subset, "r", "--logdir", str(tmp_path / "afile"))
    assert "--logdir" in message and "is a file, not a folder" in message
    message = refusal(tmp_path, subset, "x" * 240)
    assert "is too long" in message and "shorter --name" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


def test_a_failed_start_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong --data_dir (and a missing checkpoint, in the same line) with the default output
    folders: no output/, logs/, data/ or checkpoint/ is made, and the paths are absolute."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as error:
        train.main(["--name", "r", "--dataset", "imagefolder", "--data_dir", "nowhere",
                    "--model_type", "testing", "--img_size", "32",
                    "--pretrained_dir", "missing.npz"])  # fmt: skip
    message = str(error.value)
    assert f"--data_dir {tmp_path / 'nowhere'} has no train/ folder" in message
    assert f"--pretrained_dir {tmp_path / 'missing.npz'} does not exist" in message
    assert list(tmp_path.iterdir()) == []


def test_a_start_failing_late_removes_the_folders_it_made(tmp_path: Path, subset: Path) -> None:
    """A refusal after the name was claimed (here: a batch larger than the data set) takes the
    run's lock and the empty output folder with it."""
    message = refusal(tmp_path, subset, "big", "--train_batch_size", "100000")
    assert "exceeds the" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real tmpfs of 900 KiB (root, or a user namespace where unprivileged ones are allowed);
    else skipped: the mocked failure below covers the same path."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_training_is_one_line_with_the_last_state_intact(
    tmp_path: Path, subset: Path, small_disk: Path
) -> None:
    """A state of ~600 KB fits the 900 KiB disk once, not twice (the new one is written beside
    the old before it replaces it): the second save fails; the first stays readable, no
    temporary file is left, and the message says how to go on."""
    out = small_disk
    args = argv(tmp_path, subset, "full", "--save_every", "1", "--num_steps", "6",
                "--eval_every", "6")  # fmt: skip
    args[args.index("--output_dir") + 1] = str(out)
    with pytest.raises(UsageError) as error:
        train.main(args)
    message = str(error.value)
    assert message.startswith(f"cannot write {out / 'full_last.pt'} (No space left on device)")
    assert f"step 1, is intact in {out / 'full_last.pt'}" in message
    assert "--resume auto" in message
    assert TrainingState.read(out / "full_last.pt").step == 1
    assert sorted(p.name for p in out.iterdir()) == ["full_last.pt"]


def test_a_write_refused_during_training_is_one_line(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same path without a tmpfs: the third write of a state fails with EDQUOT (a quota)."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(122, "Disk quota exceeded")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    message = refusal(tmp_path, subset, "quota", "--save_every", "1", "--num_steps", "5",
                      "--eval_every", "5")  # fmt: skip
    assert "(Disk quota exceeded)" in message and "step 2, is intact" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["quota_last.pt"]


# ---------------------------------------------------------------------------------------------
# 6. A resume means what its flags say


def test_a_resume_with_changed_optimisation_flags_is_refused_listing_each(
    tmp_path: Path, subset: Path
) -> None:
    assert run(tmp_path, subset, "r", "--num_steps", "4", "--eval_every", "2") == 0
    shutil.copy(tmp_path / "out" / "r_last.pt", tmp_path / "half.pt")  # as after a stop at 4
    state = TrainingState.read(tmp_path / "half.pt")
    message = refusal(tmp_path, subset, "r", "--resume", "auto", "--num_steps", "4",
                      "--learning_rate", "0.001", "--weight_decay", "0.1", "--hflip",
                      "--precision", "bf16")  # fmt: skip
    assert "--learning_rate 0.03 (now 0.001)" in message
    assert "--weight_decay 0.0 (now 0.1)" in message and "--hflip False (now True)" in message
    assert "--precision fp32 (now bf16)" in message
    assert "pass the saved values" in message
    assert state.step == 4
    # the intervals may differ
    assert "nothing is left to train" in refusal(
        tmp_path, subset, "r", "--resume", "auto", "--num_steps", "4", "--eval_every", "1"
    )


def test_a_larger_num_steps_trains_a_finished_run_further_with_a_new_warm_up(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """20 steps with a warm-up of 10, then --num_steps 40: steps 21-40 run at the learning rates
    of a 20-step schedule of their own, and a resume in the middle of the extension keeps it."""
    rates: list[float] = []
    real = update.train_step

    def recording(model, batch, optimizer, *args, **kwargs):  # the rate each update runs at
        rates.append(optimizer.param_groups[0]["lr"])
        return real(model, batch, optimizer, *args, **kwargs)

    monkeypatch.setattr(update, "train_step", recording)
    peak = 0.03
    common = ["--warmup_steps", "10", "--eval_every", "100", "--log_every", "100"]
    assert run(tmp_path, subset, "far", *common, "--num_steps", "20") == 0
    expected = [peak * warmup_cosine(k, 10, 20) for k in range(1, 21)]
    assert rates == pytest.approx(expected, rel=1e-12) and rates[-1] == 0
    rates.clear()
    capfd.readouterr()
    further = [*common, "--resume", "auto", "--num_steps", "40", "--save_every", "5"]
    assert run(tmp_path, subset, "far", *further) == 0
    log = capfd.readouterr().err
    assert "its run of 20 steps was finished, then steps 21 to 40 warm up again over 10" in log
    assert rates == pytest.approx(expected, rel=1e-12)
    assert TrainingState.read(tmp_path / "out" / "far_last.pt").schedule == [20, 40]


def test_a_resume_whose_best_checkpoint_is_damaged_goes_on_and_says_so(
    tmp_path: Path, subset: Path, capfd: pytest.CaptureFixture
) -> None:
    """A zero-byte ``_checkpoint.bin`` (a disk that filled, a copy cut short): the resume says
    what is lost and the next evaluation writes a new best, which the final scores read back."""
    assert run(tmp_path, subset, "z", "--val_split", "0.1") == 0
    best = tmp_path / "out" / "z_checkpoint.bin"
    best.write_bytes(b"")
    capfd.readouterr()
    assert run(tmp_path, subset, "z", "--val_split", "0.1", "--num_steps", "4", "--resume",
               "auto") == 0  # fmt: skip
    out, log = capfd.readouterr()
    assert f"checkpoint {best} is not a readable PyTorch file" in log
    assert "the best weights so far (step 2, accuracy" in log
    assert "weights of step 4, selected on validation accuracy" in out
    assert read_weights(best)[0]


def test_a_resume_inside_an_extension_keeps_its_schedule(tmp_path: Path, subset: Path) -> None:
    """Stopped at step 25 of the extension 20 -> 40 and resumed: the same weights as the
    extension run through."""
    common = ["--warmup_steps", "2", "--eval_every", "100", "--log_every", "100"]
    assert run(tmp_path, subset, "a", *common, "--num_steps", "4") == 0
    shutil.copy(tmp_path / "out" / "a_last.pt", tmp_path / "out" / "b_last.pt")
    assert run(tmp_path, subset, "a", *common, "--resume", "auto", "--num_steps", "8") == 0
    assert run(tmp_path, subset, "b", *common, "--resume", "auto", "--num_steps", "8",
               "--save_every", "2") == 0  # fmt: skip
    whole = TrainingState.read(tmp_path / "out" / "a_last.pt")
    # b, cut at its step 6 and resumed
    state = TrainingState.read(tmp_path / "out" / "b_last.pt")
    assert whole.schedule == state.schedule == [4, 8]
    for key, value in whole.model.items():
        assert torch.equal(value, state.model[key]), key


def test_a_resume_that_would_shorten_the_schedule_is_refused(tmp_path: Path, subset: Path) -> None:
    assert run(tmp_path, subset, "s", "--num_steps", "4", "--eval_every", "4") == 0
    message = refusal(tmp_path, subset, "s", "--resume", "auto", "--num_steps", "3")
    assert "belongs to a run of 4 steps" in message and "keeps its schedule" in message


# ---------------------------------------------------------------------------------------------
# 7. Damaged files: one line each


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, subset: Path) -> Path:
    """The files of one finished 2-step run, shared by the tests that damage a copy."""
    folder = tmp_path_factory.mktemp("trained")
    assert run(folder, subset, "d") == 0
    return folder / "out"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda s: s.pop("rng"), "it has no 'rng' field"),
        (lambda s: s.update(step=-1), "'step' field is malformed"),
        (lambda s: s.update(step="2"), "'step' field is malformed"),
        (lambda s: s.update(classes=[]), "'classes' field is malformed"),
        (lambda s: s.update(best_step=9), "best step 9 is after its step 2"),
        (lambda s: s["scheduler"].update(last_epoch=1), "schedule is not at its step"),
        (lambda s: s.update(schedule=[4, 2]), "'schedule' field is malformed"),
        (lambda s: s.update(model={"x": torch.zeros(1)}), "does not fit the model"),
        (lambda s: s["model"][next(iter(s["model"]))].fill_(math.nan), "non-finite weights"),
    ],
)
def test_a_damaged_training_state_is_one_line(
    tmp_path: Path, subset: Path, trained: Path, change, words: str
) -> None:
    shutil.copytree(trained, tmp_path / "out")
    last = tmp_path / "out" / "d_last.pt"
    saved = torch.load(last, weights_only=True)
    change(saved)
    torch.save(saved, last)
    assert words in refusal(tmp_path, subset, "d", "--resume", "auto", "--num_steps", "4")


def test_damaged_best_checkpoints_are_one_line(tmp_path: Path) -> None:
    files = RunFiles(tmp_path, "b")
    files.save_best({"w": torch.ones(2)}, {"model_type": "testing", "config": [], "img_size": 32,
                    "dataset": "cifar10", "seed": 1, "val_split": 0.0}, {}, ["a", "b"])  # fmt: skip
    assert read_weights(files.best)[1]["classes"] == ["a", "b"]
    for text, words in [
        ("{not json", "is not valid JSON"),
        ("[1]", "not hold a JSON object"),
        ('{"classes": [1]}', "'classes' are not a list of class names"),
        ('{"args": {"img_size": "32"}}', "--img_size '32' is not a int"),
    ]:
        files.meta.write_text(text)
        with pytest.raises(CheckpointError, match=words):
            read_weights(files.best)
    files.meta.unlink()
    torch.save({"w": torch.tensor([1.0, math.inf])}, files.best)
    with pytest.raises(CheckpointError, match="non-finite weights"):
        read_weights(files.best)


def test_a_lock_file_records_its_holder(tmp_path: Path) -> None:
    files = RunFiles(tmp_path, "mine")
    files.claim(None, False)
    try:
        text = files.lock_path.read_text()
        assert text.startswith(f"pid {os.getpid()} on ") and time.strftime("%Y") in text
        other = RunFiles(tmp_path, "mine")
        with pytest.raises(UsageError, match="is in use"):  # a second open file, same process
            other.claim(None, False)
    finally:
        files.release()
    assert not files.lock_path.exists()
    again = RunFiles(tmp_path, "mine")
    again.claim(None, False)  # released: free again
    again.release()


def test_where_nothing_fits_only_switches_that_fit_are_offered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Room for one image only with --grad_checkpointing and bf16 together: the refusal offers
    that pair with its micro-batches, not either switch alone; followed, the advice passes."""
    parser = train_flags.build_parser()
    base = ["--name", "m", "--model_type", "testing", "--img_size", "224",
            "--train_batch_size", "64", "--gradient_accumulation_steps", "1"]  # fmt: skip
    ctx = dist.Context(0, 1, 0, torch.device("cpu"))

    def estimate(*flags: str):
        args = parser.parse_args([*base, *flags])
        train_flags.check_args(args)
        model = build_model(args.model_type, args.config, 224, 10, zero_head=True)
        model.set_grad_checkpointing(args.grad_checkpointing)
        precision = Precision(args.precision or "fp32", ctx.device, 0)
        fit = memory.StepToFit(model, args.model_type, 224, args.train_batch_size, precision,
                               args.grad_checkpointing)  # fmt: skip
        return args, fit, precision, fit.measure()

    *_, both = estimate("--grad_checkpointing", "--precision", "bf16")
    *_, alone = estimate("--grad_checkpointing")
    room = (
        both.needed(1) + min(alone.needed(1), estimate("--precision", "bf16")[3].needed(1))
    ) // 2
    monkeypatch.setattr(memory, "available_bytes", lambda device: room)
    args, fit, precision, step = estimate()
    advice = fit.advice(step, args.gradient_accumulation_steps, auto=False)
    offered = advice.split("; use ")[1].split(", or ")
    assert offered == [
        "--gradient_accumulation_steps auto",
        f"--grad_checkpointing --precision bf16 --gradient_accumulation_steps 64 (micro-batches "
        f"of 1, about {both.needed(1) / 2**30:.1f} GiB)",
    ]
    args, fit, precision, step = estimate(*offered[1].split(" (")[0].split())
    assert step.needed(1) <= room  # followed, it fits


def test_a_resume_on_another_world_size_says_what_differs(
    tmp_path: Path, subset: Path, capfd
) -> None:
    """A state of one process resumed as rank 1 of 2 (the same global batch): the dropout
    streams cannot be carried over, and the warning says so; they are seeded from --seed, the
    rank and the step, the same on every try."""
    assert run(tmp_path, subset, "w", "--num_steps", "4", "--eval_every", "4") == 0
    state = TrainingState.read(tmp_path / "out" / "w_last.pt")
    args = train_flags.build_parser().parse_args(argv(tmp_path, subset, "w", "--num_steps", "8"))
    train_flags.check_args(args)
    draws = []
    for _ in range(2):
        model = build_model(args.model_type, args.config, args.img_size, 10, zero_head=True)
        lr = LearningRate.of_run(args.learning_rate, args.warmup_steps, "cosine", 8, state.ends)
        optimizer = build_optimizer(model, args.weight_decay, fp16=False)
        learner = Learner(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), lr)
        capfd.readouterr()
        learner.restore(state, dist.Context(0, 2, 0, torch.device("cpu")), args.seed)
        draws.append(torch.rand(4))
        assert learner.step == 4
    assert torch.equal(*draws)
    assert "resumed on 2 process(es), saved on 1: the data order and augmentation go on" in (
        capfd.readouterr().err
    )
