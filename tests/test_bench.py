"""`python -m bench.throughput` runs end to end on the CPU (tiny sizes) and reads a reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.test_train import run_cli

TINY = [
    "--device", "cpu", "--model_type", "ViT-Ti_16", "--img_size", "32", "--batch_size", "2",
    "--steps", "1", "--warmup", "1", "--repeats", "1",
]  # fmt: skip

FAKE_CONFIGS = """
import ml_collections

def get_ti16_config():
    config = ml_collections.ConfigDict()
    config.patches = ml_collections.ConfigDict({"size": (16, 16)})
    config.hidden_size = 192
    config.transformer = ml_collections.ConfigDict()
    config.transformer.mlp_dim = 768
    config.transformer.num_heads = 3
    config.transformer.num_layers = 12
    config.transformer.attention_dropout_rate = 0.0
    config.transformer.dropout_rate = 0.1
    config.classifier = "token"
    config.representation_size = None
    return config
"""

# Imports its sibling as the reference's modeling.py does (`import models.configs`), a name our
# own package also has; the model itself is the stand-in.
FAKE_MODELING = """
import models.configs as configs
from bench.reference_standin import VisionTransformer

CONFIGS = {"ViT-Ti_16": configs.get_ti16_config()}
"""


def run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    result = run_cli(tmp_path, *TINY, "--json", str(out), *args, script="bench.throughput")
    assert result.returncode == 0, result.stderr
    assert "data path alone" in result.stdout and "train/timm" in result.stdout
    return json.loads(out.read_text())


def test_benchmark_times_every_peer_and_writes_json(tmp_path: Path) -> None:
    report = run_bench(tmp_path)
    results = report["results"]
    assert set(results) == {
        "ours", "ours (config dropout 0.1)", "timm vit_tiny_patch16_224", "reference (stand-in)",
    }  # fmt: skip
    for name, figures in results.items():
        assert figures["train"][0] > 0 and figures["eval"][0] > 0, name
    assert results["ours"]["full_train"][0] > 0 and results["ours"]["data_path"][0] > 0
    assert report["ratios"]["timm vit_tiny_patch16_224"]["train/timm"] == "1.00x"


def test_benchmark_imports_a_reference_checkout(tmp_path: Path) -> None:
    models = tmp_path / "ViT-pytorch" / "models"
    models.mkdir(parents=True)
    (models / "configs.py").write_text(FAKE_CONFIGS)
    (models / "modeling.py").write_text(FAKE_MODELING)
    report = run_bench(tmp_path, "--reference_path", str(models.parent))
    assert report["results"]["reference"]["train"][0] > 0
    assert report["results"]["ours"]["train"][0] > 0


def test_benchmark_rejects_a_folder_that_is_not_a_checkout(tmp_path: Path) -> None:
    result = run_cli(tmp_path, *TINY, "--reference_path", str(tmp_path), script="bench.throughput")
    assert result.returncode == 2 and "no models/modeling.py there" in result.stderr
    assert "Traceback" not in result.stderr


def test_peers_are_selectable_and_a_type_the_reference_lacks_is_left_out(tmp_path: Path) -> None:
    models = tmp_path / "ViT-pytorch" / "models"
    models.mkdir(parents=True)
    (models / "configs.py").write_text(FAKE_CONFIGS)
    (models / "modeling.py").write_text(FAKE_MODELING.replace('"ViT-Ti_16"', '"ViT-B_16"'))
    out = tmp_path / "bench.json"
    result = run_cli(
        tmp_path, *TINY, "--peers", "ours,reference", "--reference_path", str(models.parent),
        "--json", str(out), script="bench.throughput",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "note: the reference has no ViT-Ti_16 (it has ViT-B_16); left out" in result.stdout
    assert set(json.loads(out.read_text())["results"]) == {"ours"}
    wrong = run_cli(tmp_path, *TINY, "--peers", "ours,timmy", script="bench.throughput")
    assert wrong.returncode == 2 and "--peers: unknown timmy; choose from" in wrong.stderr


def test_memory_table_with_grad_checkpointing_fits_more(tmp_path: Path) -> None:
    tables = {}
    for extra in ([], ["--grad_checkpointing"]):
        out = tmp_path / f"memory{len(extra)}.json"
        result = run_cli(
            tmp_path, "--device", "cpu", "--memory_table", "--memory_rows", "ViT-B_16@224",
            "--json", str(out), *extra, script="bench.throughput",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        tables[bool(extra)] = json.loads(out.read_text())["memory_table"]
    plain, checkpointed = (tables[k]["table"]["ViT-B_16@224"] for k in (False, True))
    assert tables[True]["grad_checkpointing"] and tables[True]["kind"] == "computed"
    assert all(checkpointed[c] >= 3 * plain[c] for c in ("24", "40", "80")), (plain, checkpointed)


def test_a_mixer_is_timed_beside_timms_mixer() -> None:
    """The peers of a Mixer row: ours and timm's of the same size, nothing that has no Mixer."""
    import bench.throughput as throughput

    args = throughput.build_parser().parse_args(["--model_type", "Mixer-S_32", "--device", "cpu"])
    args.peers = args.peers.split(",")  # as main() splits them
    peers = throughput.build_peers(args, torch.device("cpu"))
    assert [p.name for p in peers] == ["ours", "timm mixer_s32_224"]
    assert type(peers[0].model).__name__ == "MlpMixer"
    ours = sum(p.numel() for p in peers[0].model.parameters())
    assert ours == sum(p.numel() for p in peers[1].model.parameters())
