"""What trains (``--finetune``, ``--freeze_blocks``), the weight average (``--ema_decay``) and
mixed batches (``--mixup``, ``--cutmix``) as train.py runs them, each checked against an
equivalent run: a stopped and resumed run against an uninterrupted one, torchrun against one
process, recomputed blocks against kept ones, the device data path against the workers'."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as evaluate_script
import train
from models.configs import CONFIGS, apply_overrides
from models.errors import UserError
from models.families import build_model
from models.lora import is_lora
from models.modeling import VisionTransformer
from tests.test_distributed import last_state, torchrun
from tests.test_train import SMALL, SMALL_CONFIG, run_train
from utils.training import averaging, memory, update
from utils.training.finetune import WhatTrains
from utils.training.precision import Precision

pytestmark = pytest.mark.slow
MIXED = ["--mixup", "0.8", "--cutmix", "1.0", "--label_smoothing", "0.1"]


def npz(folder: Path, seed: int = 0) -> Path:
    """Starting weights in Google's layout, for the SMALL model at 16 px."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    path = folder / f"start{seed}.npz"
    VisionTransformer(config, img_size=16, num_classes=21843).export_npz(str(path))
    return path


def run(folder: Path, subset: Path, *extra: str, start: str = "none", name: str = "run") -> int:
    return train.main(
        [
            "--name", name, *SMALL, "--pretrained_dir", start, "--data_dir", str(subset),
            "--output_dir", str(folder / "output"), "--logdir", str(folder / "logs"),
            "--train_batch_size", "16", "--num_steps", "8", "--eval_every", "4",
            "--warmup_steps", "2", "--log_every", "4", "--learning_rate", "0.05", *extra,
        ]
    )  # fmt: skip


def assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "mode",
    [
        ["--ema_decay", "0.7", *MIXED],
        ["--finetune", "lora", "--lora_targets", "attn+mlp", "--ema_decay", "0.7", *MIXED],
    ],
    ids=["full", "lora"],
)
def test_a_stopped_run_resumes_bit_for_bit(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch, mode: list[str]
) -> None:
    """Dropout on, SIGTERM after step 3: the weights, their average and the optimizer state of
    the resumed run are the uninterrupted run's, bit for bit."""
    start = str(npz(tmp_path))
    assert run(tmp_path / "straight", subset, *mode, start=start) == 0
    straight = last_state(tmp_path / "straight", "run")
    real_step, calls = update.train_step, []

    def step_then_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(update, "train_step", step_then_signal)
    assert run(tmp_path / "split", subset, *mode, start=start) == 128 + signal.SIGTERM
    monkeypatch.setattr(update, "train_step", real_step)
    assert run(tmp_path / "split", subset, *mode, "--resume", "auto", start=start) == 0
    resumed = last_state(tmp_path / "split", "run")
    assert resumed["step"] == straight["step"] == 8
    assert_equal_tensors(resumed["model"], straight["model"])
    assert_equal_tensors(resumed["average"], straight["average"])
    assert int(straight["average"]["n_averaged"]) == 8
    for a, b in zip(
        straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert (resumed["best_acc"], resumed["best_averaged"]) == (
        straight["best_acc"], straight["best_averaged"]
    )  # fmt: skip


def test_torchrun_equals_one_process_with_lora_mixing_and_an_average(
    tmp_path: Path, subset: Path
) -> None:
    """2 processes x 8 images in 2 micro-batches, blocks recomputed, == 1 process x 16 images:
    the mixed pairs, the adapters and the average are the same."""
    common = [*SMALL, "--config", "transformer.dropout_rate=0", "--pretrained_dir",
              str(npz(tmp_path)), "--data_dir", str(subset), "--num_steps", "6",
              "--eval_every", "3", "--warmup_steps", "2", "--finetune", "lora",
              "--ema_decay", "0.5", *MIXED]  # fmt: skip
    two = torchrun(
        tmp_path / "two", 2, "--name", "r", *common, "--train_batch_size", "8",
        "--gradient_accumulation_steps", "2", "--grad_checkpointing",
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert (
        train.main(
            [
                "--name",
                "r",
                *common,
                "--train_batch_size",
                "16",
                "--output_dir",
                str(tmp_path / "one" / "output"),
                "--logdir",
                str(tmp_path / "one" / "logs"),
            ]
        )  # fmt: skip
        == 0
    )
    two_state, one_state = last_state(tmp_path / "two", "r"), last_state(tmp_path / "one", "r")
    for part in ("model", "average"):
        assert two_state[part].keys() == one_state[part].keys()
        for key, value in one_state[part].items():
            torch.testing.assert_close(two_state[part][key], value, atol=1e-5, rtol=1e-4)


def test_a_linear_probe_trains_the_head_alone_and_saves_the_whole_model(
    tmp_path: Path, subset: Path, capfd: pytest.CaptureFixture
) -> None:
    """--finetune head: every other weight is the starting one bit for bit; _last.pt holds the
    head alone, the .bin the whole model, which evaluate.py scores as the run did."""
    start = npz(tmp_path)
    assert run(tmp_path, subset, "--finetune", "head", start=str(start)) == 0
    err = "".join(capfd.readouterr())
    assert re.search(r"--finetune head: training the head alone \(a linear probe\), 650 "
                     r"parameters \(0\.\d+ % of the model's [\d,]+\)", err), err  # fmt: skip
    best = torch.load(tmp_path / "output" / "run_checkpoint.bin", weights_only=True)
    model = build_model("testing", SMALL_CONFIG, 32, 10, zero_head=True)
    model.load_from(np.load(start))
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(best[key], value), key
    assert best["head.weight"].abs().sum() > 0
    state = last_state(tmp_path, "run")
    assert sorted(state["model"]) == ["head.bias", "head.weight"] and state["frozen"]
    accuracy = re.findall(r"best accuracy ([\d.]+) at step (\d+)", err)[-1][0]
    assert evaluate_script.main(
        ["--checkpoint", str(tmp_path / "output" / "run_checkpoint.bin"), "--data_dir",
         str(subset), "--num_workers", "0"]
    ) == 0  # fmt: skip
    assert f"accuracy {accuracy}" in capfd.readouterr().out


def test_frozen_blocks_stay_as_they_started(tmp_path: Path, subset: Path) -> None:
    start = npz(tmp_path)
    assert run(tmp_path, subset, "--freeze_blocks", "1", start=str(start)) == 0
    best = torch.load(tmp_path / "output" / "run_checkpoint.bin", weights_only=True)
    model = build_model("testing", SMALL_CONFIG, 32, 10, zero_head=True)
    model.load_from(np.load(start))
    for key, value in model.state_dict().items():
        frozen = key.startswith(("transformer.embeddings.", "transformer.encoder.layer.0."))
        assert torch.equal(best[key], value) == frozen, key


def test_a_lora_run_saves_merged_weights_that_score_as_the_adapters_did(
    tmp_path: Path, subset: Path, capfd: pytest.CaptureFixture
) -> None:
    """The best weights merge the adapters: evaluate.py on them gives the run's accuracy; the
    training state holds adapters and head, and is refused as a model file by name."""
    start = npz(tmp_path)
    assert run(tmp_path, subset, "--finetune", "lora", start=str(start)) == 0
    err = "".join(capfd.readouterr())
    accuracy = re.findall(r"best accuracy ([\d.]+) at step (\d+)", err)[-1][0]
    state = last_state(tmp_path, "run")
    assert all(is_lora(k) or k.startswith("head.") for k in state["model"])
    output = tmp_path / "output"
    assert evaluate_script.main(
        ["--checkpoint", str(output / "run_checkpoint.bin"), "--data_dir", str(subset),
         "--num_workers", "0"]
    ) == 0  # fmt: skip
    assert f"accuracy {accuracy}" in capfd.readouterr().out
    with pytest.raises(
        UserError,
        match=r"holds only the weights its run trained \(--finetune "
        r"lora\), for --resume; the whole model is in .*run_checkpoint\.bin",
    ):
        run(tmp_path / "again", subset, start=str(output / "run_last.pt"))


def test_a_resume_whose_frozen_weights_changed_is_refused(
    tmp_path: Path, subset: Path, capsys: pytest.CaptureFixture
) -> None:
    start = npz(tmp_path)
    args = ["--name", "run", *SMALL, "--pretrained_dir", str(start), "--data_dir", str(subset),
            "--output_dir", str(tmp_path / "out"), "--logdir", str(tmp_path / "logs"),
            "--train_batch_size", "16", "--eval_every", "2", "--finetune", "lora"]  # fmt: skip
    assert run_train([*args, "--num_steps", "2"], capsys)[0] == 0
    npz(tmp_path, seed=1).replace(start)  # the same path, other weights
    code, err = run_train([*args, "--num_steps", "4", "--resume", "auto"], capsys)
    assert code == 2 and "the weights this run keeps frozen differ" in err, err
    code, err = run_train([*args[:-2], "--num_steps", "4", "--resume", "auto"], capsys)
    assert code == 2 and "--finetune lora (now full)" in err, err


def test_the_best_weights_can_be_the_average_and_the_summary_says_so(
    tmp_path: Path, subset: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """An average that scores higher is saved as the best weights, and named so."""
    real_evaluate, real_init = train.evaluate, averaging.WeightAverage.__init__

    def init(self, model, decay):
        real_init(self, model, decay)
        self.module.scored_higher = True

    def evaluate(model, *args, **kwargs):
        scores = real_evaluate(model, *args, **kwargs)
        return scores._replace(accuracy=scores.accuracy + getattr(model, "scored_higher", 0))

    monkeypatch.setattr(averaging.WeightAverage, "__init__", init)
    monkeypatch.setattr(train, "evaluate", evaluate)
    assert run(tmp_path, subset, "--ema_decay", "0.9999") == 0
    err = "".join(capfd.readouterr())
    assert (
        "--ema_decay 0.9999 averages over about 10,000 steps, more than half of the run's 8" in err
    )
    assert re.search(r"best accuracy [\d.]+ at step 8 \(averaged weights\)", err), err
    assert "step 8: test accuracy" in err and "images, averaged weights)" in err
    state = last_state(tmp_path, "run")
    best = torch.load(tmp_path / "output" / "run_checkpoint.bin", weights_only=True)
    assert state["best_averaged"] is True
    for key, value in best.items():
        assert torch.equal(state["average"][f"module.{key}"], value), key


def test_mixed_batches_on_the_device_are_the_workers(tmp_path: Path, subset: Path) -> None:
    states = []
    for path in ("off", "on"):
        code = run(tmp_path, subset, *MIXED, "--config", "transformer.dropout_rate=0",
                   "--hflip", "--data_on_device", path, name=path)  # fmt: skip
        assert code == 0
        states.append(last_state(tmp_path, path)["model"])
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("mode", ["full", "head", "lora"])
def test_recomputed_blocks_give_the_same_gradients_in_every_mode(mode: str) -> None:
    torch.manual_seed(0)
    model = build_model("testing", [*SMALL_CONFIG, "transformer.dropout_rate=0"], 32, 10)
    WhatTrains(mode, 1 if mode == "full" else 0).apply(model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for recompute in (False, True):
        model.set_grad_checkpointing(recompute)
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert grad is not None, name
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_the_memory_estimate_counts_what_trains_and_the_average() -> None:
    """Frozen parameters have no gradient or optimizer state, and keep no activation for a
    backward pass that does not reach them; the average is a copy of every weight."""
    cpu, fp32 = torch.device("cpu"), Precision("fp32", torch.device("cpu"), 0)
    steps = {}
    for mode in ("full", "head", "lora"):
        torch.manual_seed(0)
        model = build_model("testing", SMALL_CONFIG, 32, 10)
        WhatTrains(mode).apply(model)
        steps[mode] = memory.measure_step(model, 32, cpu, fp32.autocast, 1, 0)
    total = sum(p.numel() for n, p in model.named_parameters() if not is_lora(n))
    assert steps["full"].parameters == total and steps["head"].parameters == 64 * 10 + 10
    adapters = sum(p.numel() for n, p in model.named_parameters() if is_lora(n))
    assert steps["lora"].parameters == adapters + 650
    assert steps["head"].per_image < steps["lora"].per_image <= steps["full"].per_image
    # with nothing kept for backward, a forward pass still holds its largest layer output, the
    # MLP's hidden layer (65 tokens x 128 float32), with its input and a temporary
    assert steps["head"].per_image == 3 * 65 * 128 * 4
    assert memory.averaged_bytes(model, True) == 4 * sum(p.numel() for p in model.parameters())


BAD_FLAGS = [
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1), got 1.0"),
    (["--ema_decay=-0.5"], "--ema_decay must be in [0, 1)"),
    (["--mixup=-1"], "--mixup must be >= 0"),
    (["--mixup", "0.8", "--train_batch_size", "1"], "pass an even --train_batch_size (got 1)"),
    (["--cutmix", "1", "--mixup_switch_prob", "2"], "--mixup_switch_prob must be in [0, 1]"),
    (["--finetune", "lora", "--lora_rank", "0"], "--lora_rank must be at least 1, got 0"),
    (["--finetune", "lora", "--lora_rank", "65"], "--lora_rank 65 exceeds the model's width 64"),
    (["--finetune", "lora", "--lora_alpha", "0"], "--lora_alpha must be positive"),
    (["--finetune", "head", "--freeze_blocks", "1"], "--freeze_blocks applies to --finetune full"),
    (["--freeze_blocks", "3"], "--freeze_blocks 3 exceeds the model's 2 blocks"),
    (["--model_type", "Mixer-B_16", "--finetune", "lora"],
     "a Mixer has no attention: pass --lora_targets mlp"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_nonsense_is_one_line_before_anything_runs(
    tmp_path: Path, subset: Path, args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    model = [] if "--model_type" in args else SMALL
    base = ["--name", "bad", *model, "--data_dir", str(subset), "--output_dir",
            str(tmp_path / "out"), "--logdir", str(tmp_path / "logs")]  # fmt: skip
    code, err = run_train([*base, *args], capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_the_documented_set_up_line_is_what_a_vit_b16_run_logs() -> None:
    """docs/training.md quotes the line of a LoRA run of ViT-B/16 on CIFAR-10."""
    with torch.device("meta"):
        model = build_model("ViT-B_16", [], 224, 10, zero_head=True)
        line = WhatTrains("lora").apply(model)
    assert f"`{line}`" in (Path(__file__).parents[1] / "docs" / "training.md").read_text()
