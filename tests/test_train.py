"""The training application end to end, its pieces against their formulas, and its errors."""

from __future__ import annotations

import dataclasses
import math
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from models.configs import CONFIGS, apply_overrides
from models.modeling import VisionTransformer
from utils import data as data_module
from utils.download import md5_of
from utils.scheduler import build_scheduler, warmup_cosine, warmup_linear

REPO = Path(__file__).resolve().parents[1]
# A small ViT for 32 px: 8x8 patches of 4 px, width 64.
SMALL_CONFIG = [
    "patches.size=4,4",
    "hidden_size=64",
    "transformer.mlp_dim=128",
    "transformer.num_heads=4",
]
SMALL = ["--model_type", "testing", "--img_size", "32", "--num_workers", "0"]
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
        [sys.executable, str(REPO / script), *defaults, *args],
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
    assert "test/loss" in scalars and any("hparam" in tag for tag in scalars)

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
        precision = train.Precision("fp32", torch.device("cpu"), 0)
        scaler = precision.scaler()
        for _ in range(2):
            loss, _ = train.train_step(model, (x, y), optimizer, scaler, precision, accum, 1.0)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    (loss1, params1), (loss4, params4) = results
    torch.testing.assert_close(loss1, loss4)
    for a, b in zip(params1, params4, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_gradients_are_clipped_to_the_global_norm() -> None:
    model = VisionTransformer(CONFIGS["testing"], img_size=16, num_classes=10)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = train.Precision("fp32", torch.device("cpu"), 0)
    x, y = torch.randn(8, 3, 16, 16) * 100, torch.randint(0, 10, (8,))
    _, norm = train.train_step(model, (x, y), optimizer, precision.scaler(), precision, 1, 0.5)
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
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = build_scheduler(optimizer, schedule, warmup, total)
    seen = {}
    for k in range(1, total + 1):  # update k runs at the lr set before it
        seen[k] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
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
    (["--config", "transformer.layers=2"], "unknown key"),
    (["--config", "hidden_size=wide"], "expected a value of type int"),
    (["--pretrained_dir", "nowhere/mine.npz"], "not the name of an official checkpoint"),
    (["--pretrained_dir", "nowhere/ViT-B_16.npz"], "storage.googleapis.com/vit_models/imagenet21k"),
    (["--resume", "nowhere/x_last.pt"], "no such file"),
    (["--fp16", "--precision", "bf16"], "contradicts"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, subset: Path, args: list[str], message: str
) -> None:
    result = run_cli(tmp_path, "--name", "bad", *SMALL, "--data_dir", str(subset), *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_data_and_checkpoint_problems_are_one_line(tmp_path: Path, subset: Path) -> None:
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
        (["--output_dir", str(blocker / "out")], "cannot be written"),
    ]
    for args, message in cases:
        base = ["--data_dir", str(subset), "--pretrained_dir", "none"]
        result = run_cli(tmp_path, "--name", "bad", *SMALL, *base, *args)
        lines = [line for line in result.stderr.splitlines() if "error" in line]
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert "Traceback" not in result.stderr
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
    from utils.datasets import build_datasets
    from utils.device_data import DeviceEvalBatches
    from utils.distributed import Context

    data = build_datasets("cifar10", subset, 40, seed=3, val_split=0.1, hflip=True)
    args = train.build_parser().parse_args(
        ["--name", "x", "--num_workers", "0", "--eval_batch_size", "64"]
    )
    for dataset in (data.select, data.test):
        labels = []
        for rank in range(3):
            ctx = Context(rank, 3, rank, torch.device("cpu"))
            copies: dict = {}
            made = train.eval_batches(dataset, args, ctx, copies)
            assert isinstance(made, DeviceEvalBatches) and len(copies) == 1
            loaded = list(train.eval_batches(dataset, args, ctx, None))
            assert len(list(made)) == len(loaded) == len(made)
            for (x, y), (x_ref, y_ref) in zip(made, loaded, strict=True):
                torch.testing.assert_close(x, x_ref, rtol=0, atol=2e-6)
                assert torch.equal(y, y_ref)
                labels += y.tolist()
        assert sorted(labels) == sorted(dataset[i][1] for i in range(len(dataset)))
    copies = {}
    train.training_batches(data, [], args, Context(0, 1, 0, torch.device("cpu")), copies)
    train.eval_batches(data.select, args, Context(0, 1, 0, torch.device("cpu")), copies)
    assert len(copies) == 1  # the validation split reuses the training images' device copy


def test_both_launcher_spellings_of_local_rank() -> None:
    parser = train.build_parser()
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
    with pytest.raises(train.UsageError, match=r"the loss became (nan|inf) by step \d+; stopping"):
        train.main([*args, "--learning_rate", "1e12"])
    state = torch.load(tmp_path / "out" / "nan_last.pt", weights_only=True)
    assert 1 <= state["step"] < 40
    assert all(torch.isfinite(v).all() for v in state["model"].values())
