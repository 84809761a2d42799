"""The training application end to end, its pieces against their formulas, and its errors."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from models.configs import CONFIGS, apply_overrides
from models.errors import UsageError
from models.families import build_model
from models.modeling import VisionTransformer
from tests.helpers import md5_of
from utils.cli import run_main
from utils.data import cifar as data_module
from utils.data.batches import BatchSource
from utils.training import flags as train_flags
from utils.training import memory, update
from utils.training.optimizer import LearningRate, warmup_cosine, warmup_linear
from utils.training.precision import Precision

REPO = Path(__file__).resolve().parents[1]
# A small ViT for 32 px: 8x8 patches of 4 px, width 64.
SMALL_CONFIG = [
    "patches.size=4,4",
    "hidden_size=64",
    "transformer.mlp_dim=128",
    "transformer.num_heads=4",
]
SMALL = ["--model_type", "testing", "--img_size", "32", "--num_workers", "0", "--warmup_steps", "0"]
for _item in SMALL_CONFIG:
    SMALL += ["--config", _item]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(tmp_path: Path, *args: str, script: str = "train.py") -> subprocess.CompletedProcess:
    """Run a script in a subprocess whose every download goes to a closed port on 127.0.0.1."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "http_proxy": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "PYTHONPATH": str(REPO),
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    defaults = ["--output_dir", str(tmp_path / "output"), "--logdir", str(tmp_path / "logs")]
    defaults = defaults if script == "train.py" else []
    return subprocess.run(
        [
            sys.executable,
            *([str(REPO / script)] if script.endswith(".py") else ["-m", script]),
            *defaults,
            *args,
        ],  # fmt: skip
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def event_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["tensors"]:
            scalars.setdefault(tag, [])
    return scalars


@pytest.mark.slow
def test_trains_from_scratch_end_to_end(tmp_path: Path, subset: Path) -> None:
    """The whole CLI on real CIFAR-10 images: it learns, logs, checkpoints and summarises."""
    result = run_cli(
        tmp_path, "--name", "e2e", *SMALL, "--pretrained_dir", "none",
        "--data_dir", str(subset), "--train_batch_size", "64", "--num_steps", "150",
        "--eval_every", "50", "--warmup_steps", "10", "--learning_rate", "0.03",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = re.search(
        r"summary: best accuracy ([\d.]+) .* final accuracy ([\d.]+) \| 150 steps \| "
        r"wall time [\d.]+ s \| [\d.]+ images/s",
        result.stdout,
    )
    assert summary, result.stdout
    best, final = map(float, summary.groups())
    assert final > 0.25, "a small ViT should beat chance (0.10) clearly after 150 steps"
    assert best >= final
    assert "global batch 64" in result.stderr

    scalars = event_scalars(tmp_path / "logs" / "e2e")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 151))
    assert len(scalars["train/lr"]) == 150 and scalars["train/images_per_second"]
    assert [s for s, _ in scalars["test/accuracy"]] == [50, 100, 150]
    assert math.isclose(scalars["test/accuracy"][-1][1], final, abs_tol=1e-4)
    assert "test/loss" in scalars
    for name, summarised in (("best_accuracy", best), ("final_accuracy", final)):  # HParams tab
        assert scalars[f"verdict/{name}"] == [(150, pytest.approx(summarised, abs=1e-4))]

    # The best checkpoint is a plain state_dict in the reference's format.
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    model = VisionTransformer(config, img_size=32, num_classes=10)
    state = torch.load(tmp_path / "output" / "e2e_checkpoint.bin", weights_only=True)
    model.load_state_dict(state)
    last = torch.load(tmp_path / "output" / "e2e_last.pt", weights_only=True)
    assert last["step"] == 150 and math.isclose(last["best_acc"], best, abs_tol=1e-4)
    assert not list((tmp_path / "output").glob("*.tmp")), "temporary files left behind"


@pytest.mark.slow
def test_fine_tunes_from_an_npz_at_another_resolution(tmp_path: Path, subset: Path) -> None:
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    VisionTransformer(config, img_size=16, num_classes=21843).export_npz(str(tmp_path / "i21k.npz"))
    result = run_cli(
        tmp_path, "--name", "ft", *SMALL, "--pretrained_dir", str(tmp_path / "i21k.npz"),
        "--data_dir", str(subset), "--train_batch_size", "16", "--num_steps", "4",
        "--eval_every", "4", "--warmup_steps", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "resizing position embedding (1, 17, 64) -> (1, 65, 64)" in result.stderr


def test_downloads_data_and_weights_from_a_mirror(
    tmp_path: Path, subset: Path, server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh machine: no data, no checkpoint. Both come over HTTP (here from 127.0.0.1)."""
    base, files = server
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(subset / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    files["/cifar-10-python.tar.gz"] = archive.read_bytes()
    spec = dataclasses.replace(
        data_module.CIFAR["cifar10"], url=f"{base}/cifar-10-python.tar.gz", md5=md5_of(archive)
    )
    monkeypatch.setitem(data_module.CIFAR, "cifar10", spec)
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    VisionTransformer(config, img_size=32).export_npz(str(tmp_path / "w.npz"))
    files["/imagenet21k/ViT-B_16.npz"] = (tmp_path / "w.npz").read_bytes()
    monkeypatch.setattr("models.pretrained.BUCKET", base)

    weights = tmp_path / "checkpoint" / "ViT-B_16.npz"
    code = train.main(
        [
            "--name", "dl", *SMALL, "--pretrained_dir", str(weights),
            "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
            "--logdir", str(tmp_path / "logs"), "--train_batch_size", "8", "--num_steps", "2",
            "--eval_every", "2", "--eval_batch_size", "128",
        ]
    )  # fmt: skip
    assert code == 0
    assert weights.read_bytes() == files["/imagenet21k/ViT-B_16.npz"]
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    assert (tmp_path / "out" / "dl_checkpoint.bin").is_file()


def test_accumulation_equals_one_large_batch() -> None:
    """4 micro-batches of 8 make the same update as one batch of 32 (dropout off)."""
    config = apply_overrides(CONFIGS["testing"], ["transformer.dropout_rate=0"])
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    results = []
    for accum in (1, 4):
        torch.manual_seed(1)
        model = VisionTransformer(config, img_size=16, num_classes=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        precision = Precision("fp32", torch.device("cpu"), 0)
        scaler = precision.scaler()
        for _ in range(2):
            loss, _ = update.train_step(model, (x, y), optimizer, scaler, precision, accum, 1.0)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    (loss1, params1), (loss4, params4) = results
    torch.testing.assert_close(loss1, loss4)
    for a, b in zip(params1, params4, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_gradients_are_clipped_to_the_global_norm() -> None:
    model = VisionTransformer(CONFIGS["testing"], img_size=16, num_classes=10)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = Precision("fp32", torch.device("cpu"), 0)
    x, y = torch.randn(8, 3, 16, 16) * 100, torch.randint(0, 10, (8,))
    _, norm = update.train_step(model, (x, y), optimizer, precision.scaler(), precision, 1, 0.5)
    step = torch.cat(
        [(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)]
    )
    assert norm > 0.5
    assert math.isclose(step.norm().item(), 0.5, rel_tol=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_follow_their_formulas(schedule: str) -> None:
    warmup, total, base = 10, 100, 0.03
    formula = {
        "cosine": lambda k: 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))),
        "linear": lambda k: (total - k) / (total - warmup),
    }[schedule]
    lr = LearningRate.of_run(base, warmup, schedule, total, saved_ends=[])
    seen = {k: lr.at(k) for k in range(1, total + 1)}  # update k (from 1) runs at lr.at(k)
    for k in (1, 5, 9):
        assert math.isclose(seen[k], base * k / warmup)
    for k in (10, 11, 40, 55, 99, 100):
        assert math.isclose(seen[k], base * formula(k), abs_tol=1e-12)
    assert seen[100] == 0.0 and max(seen.values()) == pytest.approx(base)
    fn = {"cosine": warmup_cosine, "linear": warmup_linear}[schedule]
    assert fn(0, 0, 10) == 1.0 and fn(10, 0, 10) == 0.0


BAD_INPUTS = [
    (["--model_type", "ViT-X_99"], "invalid choice: 'ViT-X_99'"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--train_batch_size", "30", "--gradient_accumulation_steps", "4"], "not divisible"),
    (["--num_steps", "0"], "--num_steps must be positive"),
    (["--train_batch_size", "-8"], "--train_batch_size must be positive"),
    (["--learning_rate", "0"], "--learning_rate must be positive"),
    (["--max_grad_norm", "0"], "--max_grad_norm must be positive"),
    (["--weight_decay=-1e-4"], "--weight_decay must be >= 0"),
    (["--num_steps", "100", "--warmup_steps", "500"], "--warmup_steps 500 is not below"),
    (["--img_size", "30"], "not a multiple of the 4-pixel patch: the last 2 rows"),
    (["--img_size", "2"], "the last 2 rows and columns of pixels would be ignored; use 4"),
    (
        ["--model_type", "R+ViT-Ti_16", "--img_size", "40"],
        "4x4 patches do not tile; use a multiple of 16",
    ),
    (["--name", "runs/a"], "not a plain file name"),
    (["--loss_scale", "128"], "add --fp16"),
    (["--val_split", "0.00005", "--pretrained_dir", "none"], "leaves a split empty"),
    (["--config", "transformer.layers=2"], "unknown key"),
    (["--config", "hidden_size=wide"], "expected a value of type int"),
    (["--config", "transformer.num_heads=3"], "num_heads 3"),
    (["--pretrained_dir", "nowhere/mine.npz"], "not the name of an official checkpoint"),
    (["--pretrained_dir", "nowhere/ViT-B_16.npz"], "storage.googleapis.com/vit_models/imagenet21k"),
    (["--pretrained_dir", "nowhere/ViT-B_16.npz"], "/nowhere/ViT-B_16.npz, or set"),
    (["--pretrained_dir", "nowhere/ViT-B_16.npz"], "or set VIT_CHECKPOINT_MIRROR"),
    ([], "the default --pretrained_dir of --model_type testing, /"),
    ([], "/checkpoint/testing.npz, does not exist"),
    (["--resume", "nowhere/x_last.pt"], "no such file"),
    (["--fp16", "--precision", "bf16"], "contradicts"),
    (["--device", "gpu"], "--device gpu: not a device name"),
]


def run_train(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """train.py in this process, as its command line runs it: (exit code, stderr)."""
    with pytest.raises(SystemExit) as stopped:
        run_main(lambda: train.main(argv), "train.py")
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message", BAD_INPUTS, ids=[" ".join(a) or "defaults" for a, _ in BAD_INPUTS]
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    subset: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    proxy = f"http://127.0.0.1:{closed_port()}"  # a download attempt goes nowhere else
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, proxy)
    monkeypatch.delenv("VIT_CHECKPOINT_MIRROR", raising=False)
    base = ["--name", "bad", *SMALL, "--data_dir", str(subset), "--output_dir", "out"]
    code, err = run_train([*base, "--logdir", "logs", *args], capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not Path("out").exists() and not Path("logs").exists(), "a failed start leaves nothing"


def test_a_bad_input_in_a_real_process_is_one_line(tmp_path: Path, subset: Path) -> None:
    result = run_cli(
        tmp_path, "--name", "bad", *SMALL, "--data_dir", str(subset), "--img_size", "0"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "train.py: error: --img_size must be positive, got 0"
    ]


def test_data_and_checkpoint_problems_are_one_line(
    tmp_path: Path, subset: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    corrupt = tmp_path / "corrupt"
    (corrupt / "cifar-10-batches-py").mkdir(parents=True)
    for f in (subset / "cifar-10-batches-py").iterdir():
        (corrupt / "cifar-10-batches-py" / f.name).write_bytes(f.read_bytes())
    (corrupt / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02garbage")
    other = apply_overrides(CONFIGS["testing"], ["hidden_size=32"])
    VisionTransformer(other, img_size=32).export_npz(str(tmp_path / "other.npz"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["--data_dir", str(tmp_path / "empty")], "cs.toronto.edu"),
        (["--data_dir", str(corrupt)], "test_batch"),
        (["--pretrained_dir", str(tmp_path / "other.npz")], "does not fit the model"),
        (["--output_dir", str(blocker / "out")], "is a file, not a folder"),
    ]
    proxy = f"http://127.0.0.1:{closed_port()}"  # the CIFAR download goes nowhere else
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(variable, proxy)
    monkeypatch.delenv("VIT_CIFAR_MIRROR", raising=False)
    for args, message in cases:
        base = ["--data_dir", str(subset), "--pretrained_dir", "none", "--logdir", "logs"]
        code, err = run_train(["--name", "bad", *SMALL, *base, *args], capsys)
        lines = [line for line in err.splitlines() if "error" in line]
        assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert np.load(tmp_path / "other.npz")  # the input files are untouched


def test_device_data_path_trains_like_the_worker_path(tmp_path: Path, subset: Path) -> None:
    """--data_on_device on (what CUDA runs use by default) makes the same batches, here on CPU."""
    states = []
    for path in ("off", "on"):
        code = train.main(
            [
                "--name", path, *SMALL, "--config", "transformer.dropout_rate=0",
                "--pretrained_dir", "none", "--data_dir", str(subset), "--output_dir",
                str(tmp_path / "out"), "--logdir", str(tmp_path / "logs"), "--train_batch_size",
                "16", "--num_steps", "4", "--eval_every", "4", "--eval_batch_size", "256",
                "--val_split", "0.1", "--hflip", "--data_on_device", path, "--warmup_steps", "0",
                "--learning_rate", "0.1",
            ]
        )  # fmt: skip
        assert code == 0
        states.append(torch.load(tmp_path / "out" / f"{path}_last.pt", weights_only=True)["model"])
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_compiled_training_matches_eager(tmp_path: Path, subset: Path) -> None:
    """--compile (inductor, about 40 s to compile here) trains to the eager run's weights and
    saves checkpoints under the model's own parameter names."""
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    states = []
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        code = train.main(
            [
                "--name", name, *SMALL, "--config", "transformer.dropout_rate=0",
                "--config", "transformer.num_layers=2", "--pretrained_dir", "none",
                "--data_dir", str(subset), "--output_dir", str(tmp_path / "out"),
                "--logdir", str(tmp_path / "logs"), "--train_batch_size", "16",
                "--num_steps", "3", "--eval_every", "3", "--eval_batch_size", "512",
                "--warmup_steps", "0", "--learning_rate", "0.1", *extra,
            ]
        )  # fmt: skip
        assert code == 0
        states.append(torch.load(tmp_path / "out" / f"{name}_checkpoint.bin", weights_only=True))
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, atol=1e-5, rtol=1e-4, msg=key)
    assert counters["stats"]["unique_graphs"] > graphs_before  # it did compile


def test_evaluation_batches_on_the_device_are_the_workers(subset: Path) -> None:
    """Each rank's device-made evaluation batches hold the DataLoader's images and labels, the
    ranks together score every image once, and the validation split shares the training set's
    device copy."""
    from utils.data.datasets import build_datasets
    from utils.data.device_batches import DeviceEvalBatches
    from utils.runtime.distributed import Context

    data = build_datasets("cifar10", subset, 40, seed=3, val_split=0.1, hflip=True)

    def path(ctx: Context, data_on_device: str) -> BatchSource:
        return BatchSource(
            data, ctx, 12, 0, seed=3, data_on_device=data_on_device, num_workers=0,
            eval_batch_size=64,
        )  # fmt: skip

    for name in ("select", "test"):
        labels = []
        for rank in range(3):
            ctx = Context(rank, 3, rank, torch.device("cpu"))
            on_device, workers = path(ctx, "on"), path(ctx, "off")
            made = on_device.select if name == "select" else on_device.test()
            loaded = list(workers.select if name == "select" else workers.test())
            assert isinstance(made, DeviceEvalBatches)
            # the training set, its validation split and the test set: two device copies
            assert len(on_device.copies) == 1 + (name == "test") and workers.copies is None
            assert len(list(made)) == len(loaded) == len(made)
            for (x, y), (x_ref, y_ref) in zip(made, loaded, strict=True):
                torch.testing.assert_close(x, x_ref, rtol=0, atol=2e-6)
                assert torch.equal(y, y_ref)
                labels += y.tolist()
        dataset = data.select if name == "select" else data.test
        assert sorted(labels) == sorted(dataset[i][1] for i in range(len(dataset)))


def test_both_launcher_spellings_of_local_rank() -> None:
    parser = train_flags.build_parser()
    for flag in ("--local_rank", "--local-rank"):
        assert parser.parse_args(["--name", "x", flag, "3"]).local_rank == 3


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_state(
    tmp_path: Path, subset: Path
) -> None:
    args = [
        "--name", "nan", *SMALL, "--pretrained_dir", "none", "--data_dir", str(subset),
        "--output_dir", str(tmp_path / "out"), "--logdir", str(tmp_path / "logs"),
        "--train_batch_size", "16", "--num_steps", "40", "--eval_every", "1", "--log_every", "1",
        "--warmup_steps", "0", "--max_grad_norm", "1e30", "--eval_batch_size", "256",
    ]  # fmt: skip
    with pytest.raises(UsageError, match=r"the loss became (nan|inf) at step \d+; stopping"):
        train.main([*args, "--learning_rate", "1e12"])
    state = torch.load(tmp_path / "out" / "nan_last.pt", weights_only=True)
    assert 1 <= state["step"] < 40
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_the_default_pretrained_dir_is_read_and_named(
    tmp_path: Path, subset: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --pretrained_dir: checkpoint/<the type's default file> is loaded (a bad one is an
    error, not ignored), and the log, the summary and the saved state say where it came from."""
    monkeypatch.chdir(tmp_path)
    args = [
        "--name", "ft", *SMALL, "--data_dir", str(subset), "--train_batch_size", "8",
        "--num_steps", "2", "--eval_every", "2", "--eval_batch_size", "512",
        "--learning_rate", "1e-12", "--output_dir", "out", "--logdir", "logs",
    ]  # fmt: skip
    default = Path("checkpoint") / "testing.npz"
    default.parent.mkdir()
    default.write_bytes(b"not an npz")
    code, err = run_train(args, capsys)
    assert code == 2 and "checkpoint/testing.npz" in err, err

    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    torch.manual_seed(5)
    VisionTransformer(config, img_size=32, num_classes=21843).export_npz(str(default))
    assert train.main(args) == 0
    out = capsys.readouterr()
    start = "fine-tuning from checkpoint/testing.npz (a .npz in Google's layout)"
    assert start in out.err.splitlines()[0] and out.out.strip().endswith(start), out
    served = VisionTransformer(config, img_size=32, zero_head=True, num_classes=10)
    served.load_from(np.load(default))
    saved = torch.load(Path("out") / "ft_checkpoint.bin", weights_only=True)
    for key, value in served.state_dict().items():
        torch.testing.assert_close(saved[key], value, atol=1e-9, rtol=0, msg=key)
    assert torch.load(Path("out") / "ft_last.pt", weights_only=True)["start"] == start

    assert train.main([*args, "--name", "scratch", "--pretrained_dir", "NONE"]) == 0
    random = "training from random weights (--pretrained_dir none)"
    out = capsys.readouterr()
    assert random in out.err.splitlines()[0] and out.out.strip().endswith(random)
    scratch = torch.load(Path("out") / "scratch_checkpoint.bin", weights_only=True)
    key = "transformer.encoder.layer.0.attn.query.weight"
    assert not torch.allclose(scratch[key], saved[key])


def test_mirrors_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.pretrained import official_url
    from utils.data.cifar import archive_source

    monkeypatch.delenv("VIT_CHECKPOINT_MIRROR", raising=False)
    monkeypatch.delenv("VIT_CIFAR_MIRROR", raising=False)
    monkeypatch.delenv("VIT_CIFAR_MD5", raising=False)
    spec = data_module.CIFAR["cifar10"]
    assert archive_source(spec) == (spec.url, spec.md5)
    assert official_url("ViT-L_16.npz") == (
        "https://storage.googleapis.com/vit_models/imagenet21k/ViT-L_16.npz"
    )
    monkeypatch.setenv("VIT_CHECKPOINT_MIRROR", "http://mirror.internal/vit_models/")
    monkeypatch.setenv("VIT_CIFAR_MIRROR", "http://mirror.internal/cifar")
    assert (
        official_url("ViT-L_16.npz") == "http://mirror.internal/vit_models/imagenet21k/ViT-L_16.npz"
    )
    assert archive_source(spec) == ("http://mirror.internal/cifar/cifar-10-python.tar.gz", spec.md5)
    monkeypatch.setenv("VIT_CIFAR_MD5", "0" * 32)
    assert archive_source(spec)[1] == "0" * 32


def test_a_step_that_cannot_fit_stops_before_it_with_the_fix(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch, server
) -> None:
    """The README's main command with the reference's single micro-batch typed, on a CPU
    machine with 24 GiB free: exit 2 before any step or download, advising only what fits by
    the estimate (the fewest micro-batches, or auto); the advised count does fit. (The mirror
    only answers the start's question whether the checkpoint could be downloaded.)"""
    base, files = server
    files["/imagenet21k/ViT-B_16.npz"] = b"never downloaded"
    monkeypatch.setenv("VIT_CHECKPOINT_MIRROR", base)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 24 * 2**30)
    argv = ["--name", "cifar10-100_500", "--model_type", "ViT-B_16", "--data_dir", str(subset)]
    with pytest.raises(UsageError) as error:
        train.main([*argv, "--gradient_accumulation_steps", "1"])
    message = str(error.value)
    assert "a step of 512 images of 224 px (ViT-B_16, fp32) needs about" in message
    assert message.endswith("the same global batch), or --gradient_accumulation_steps auto")
    assert "--precision bf16" not in message  # alone, it would not fit either
    n = int(re.search(r"--gradient_accumulation_steps (\d+) \(micro-batches of", message)[1])
    assert not Path("checkpoint").exists() and not list(Path("output").glob("*.pt"))

    model = build_model("ViT-B_16", [], 224, 10, zero_head=True)
    fit = memory.StepToFit(model, "ViT-B_16", 224, 512, Precision("fp32", torch.device("cpu"), 0),
                           grad_checkpointing=False)  # fmt: skip
    step = fit.measure()
    fit.advice(step, n, auto=False, switches=False)  # the advice fits
    fewer = max(d for d in range(1, n) if 512 % d == 0)
    with pytest.raises(UsageError):  # and no fewer micro-batches would
        fit.advice(step, fewer, auto=False, switches=False)


def test_out_of_memory_in_a_step_is_one_line_with_the_fix(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(update, "train_step", out_of_memory)
    with pytest.raises(UsageError, match=r"out of memory in step 1: a step of 16 images"):
        train.main(
            ["--name", "oom", *SMALL, "--pretrained_dir", "none", "--data_dir", str(subset),
             "--train_batch_size", "16", "--num_steps", "4", "--output_dir", str(tmp_path),
             "--logdir", str(tmp_path / "logs")]
        )  # fmt: skip


@pytest.mark.parametrize(
    "script", ["train", "evaluate", "predict", "visualize_attention", "export"]
)
def test_cuda_asked_for_without_cuda_is_one_line(
    script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = importlib.import_module(script)
    argv = {
        "train": ["--name", "x", *SMALL],
        "evaluate": ["--checkpoint", "x.bin"],
        "predict": ["--checkpoint", "x.bin", "a.png"],
        "visualize_attention": ["--checkpoint", "x.bin", "a.png", "--output", "a_att.png"],
        "export": ["--checkpoint", "x.bin", "--output", "x.npz"],
    }[script]
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save("a.png")
    with pytest.raises(UsageError, match=r"^--device cuda: CUDA is not available here; "
                       r"use --device cpu$"):  # fmt: skip
        module.main([*argv, "--device", "cuda"])


def test_files_get_the_mode_of_the_users_umask(tmp_path: Path, subset: Path, server) -> None:
    """Checkpoints, their metadata, exports and downloads: readable by a team with umask 002."""
    import export
    from utils.data.download import download_file

    base, files = server
    files["/w.npz"] = b"weights"
    previous = os.umask(0o002)
    try:
        assert train.main(
            ["--name", "m", *SMALL, "--pretrained_dir", "none", "--data_dir", str(subset),
             "--train_batch_size", "16", "--num_steps", "1", "--output_dir", str(tmp_path),
             "--logdir", str(tmp_path / "logs")]
        ) == 0  # fmt: skip
        export.main(["--checkpoint", str(tmp_path / "m_checkpoint.bin"), "--output",
                     str(tmp_path / "m.npz"), "--device", "cpu"])  # fmt: skip
        download_file(f"{base}/w.npz", tmp_path / "w.npz")
    finally:
        os.umask(previous)
    for name in ("m_checkpoint.bin", "m_checkpoint.json", "m_last.pt", "m.npz", "w.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o664, name
