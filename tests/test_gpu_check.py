"""`python -m bench.gpu_check --toy`: the one-call GPU check runs on the CPU at toy sizes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_train import run_cli


def test_the_check_runs_every_part_and_writes_one_table(subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    result = run_cli(
        tmp_path, "--toy", "--data_dir", str(subset), "--output_dir", str(tmp_path / "parts"),
        "--json", str(out), script="bench.gpu_check",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["part"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {
        "bench_eager", "train_eager", "train_eager_dropout0", "train_workers", "train_torchrun",
        "memory", "memory_checkpointed", "bench_checkpointed", "finetune_modes",
    }  # fmt: skip
    assert all(row["status"] == "ok" for row in rows.values()), rows
    for name in ("train_eager", "train_eager_dropout0", "train_workers", "train_torchrun"):
        assert rows[name]["images_per_second"] > 0, name  # read from train.py's summary line
    for name in ("train_eager", "train_eager_dropout0", "train_workers"):
        assert rows[name]["fraction_of_bench_step"] > 0, name
    assert "checkpointing_cost" in rows["bench_checkpointed"]
    assert "ViT-Ti_16@32" in rows["memory_checkpointed"]["against"]
    table = result.stdout[result.stdout.index("part ") :]
    assert len(table.splitlines()) == 1 + len(rows)


def test_a_folder_without_cifar_is_one_line(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--toy", "--data_dir", str(tmp_path), script="bench.gpu_check")
    assert result.returncode == 2 and "has no cifar-10-batches-py/ folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_parts_can_be_run_alone(subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    result = run_cli(
        tmp_path, "--toy", "--data_dir", str(subset), "--output_dir", str(tmp_path / "parts"),
        "--parts", "memory", "--json", str(out), script="bench.gpu_check",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert [row["part"] for row in json.loads(out.read_text())["rows"]] == ["memory"]
    wrong = run_cli(
        tmp_path, "--toy", "--data_dir", str(subset), "--parts", "memroy", script="bench.gpu_check"
    )
    assert wrong.returncode == 2 and "--parts: unknown memroy; choose from" in wrong.stderr
