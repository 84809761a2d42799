"""--pretrained_dir gs://<bucket>/<path>.npz and augreg:<NAME>: any file of Google's buckets, and
AugReg's pre-training picked from the bucket's index.csv as Google's loader picks it. Served from
127.0.0.1 (VIT_GCS_MIRROR), never from the internet."""

from __future__ import annotations

import argparse
import csv
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from models.configs import CONFIGS, apply_overrides
from models.errors import UsageError
from models.modeling import VisionTransformer
from models.npz_io import read_npz
from models.pretrained import BucketFile, choose_augreg, official_url, parse_gs, read_augreg_index
from tests.test_train import SMALL, SMALL_CONFIG, run_train
from utils.training import flags as train_flags
from utils.training import starting_weights

# The index's columns in its order (vit_jax/checkpoint.py's get_augreg_df lists them).
COLUMNS = [
    "name", "ds", "lr", "aug", "wd", "do", "sd", "best_val", "final_val", "final_test",
    "adapt_ds", "adapt_lr", "adapt_steps", "adapt_resolution", "adapt_final_val",
    "adapt_final_test", "params", "infer_samples_per_sec", "filename", "adapt_filename",
]  # fmt: skip
B16_A = "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
B16_B = "B_16-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.1-sd_0.1"
B16_I1K = "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1"
S16 = "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"


def index_row(name: str, filename: str, best_val: float, final_val: float, adapt_ds: str,
              adapt_final_test: float) -> dict[str, str]:  # fmt: skip
    fields = dict(part.partition("_")[::2] for part in filename.split("-")[3:])
    return {
        "name": name, "ds": filename.split("-")[1], "lr": "0.001", "aug": fields["aug"],
        "wd": fields["wd"], "do": fields["do"], "sd": fields["sd"], "best_val": str(best_val),
        "final_val": str(final_val), "final_test": str(final_val), "adapt_ds": adapt_ds,
        "adapt_lr": "0.01", "adapt_steps": "20000", "adapt_resolution": "224",
        "adapt_final_val": str(adapt_final_test), "adapt_final_test": str(adapt_final_test),
        "params": "86000000", "infer_samples_per_sec": "300", "filename": filename,
        "adapt_filename": f"{filename}--{adapt_ds}-steps_20k-lr_0.01-res_224",
    }  # fmt: skip


# B/16: a naive rule picks another row than Google's. The first row, the best best_val and the
# best fine-tune (adapt_final_test on imagenet2012) are A's; the best final_val of all is the
# ImageNet-1k pre-training's; the best final_val of the ImageNet-21k ones is B's.
INDEX_ROWS = [
    index_row("B/16", B16_A, 0.530, 0.500, "imagenet2012", 0.85),
    index_row("B/16", B16_A, 0.530, 0.500, "cifar100", 0.92),
    index_row("B/16", B16_B, 0.515, 0.510, "imagenet2012", 0.80),
    index_row("B/16", B16_I1K, 0.790, 0.780, "imagenet2012", 0.81),
    index_row("S/16", S16, 0.450, 0.440, "imagenet2012", 0.78),
]


def index_csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def tiny_npz(tmp_path: Path) -> bytes:
    """A Google-layout .npz of the tests' small `testing` model, by our own export."""
    path = tmp_path / "exported.npz"
    torch.manual_seed(3)
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    VisionTransformer(config, img_size=32, num_classes=21843).export_npz(str(path))
    return path.read_bytes()


def parse(*argv: str) -> argparse.Namespace:
    return train_flags.build_parser().parse_args(["--name", "x", *SMALL, *argv])


@pytest.fixture
def mirror(server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The test's server as VIT_GCS_MIRROR, in a fresh folder; yields (files, downloads), the
    latter the URLs train.py downloaded."""
    base, files = server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIT_GCS_MIRROR", f"{base}/")
    monkeypatch.delenv("VIT_CHECKPOINT_MIRROR", raising=False)
    downloads = []

    def counted(url, *args, **kwargs):
        downloads.append(url.removeprefix(base))
        return download(url, *args, **kwargs)

    download = starting_weights.download_file
    monkeypatch.setattr(starting_weights, "download_file", counted)
    return files, downloads


@pytest.mark.parametrize(
    "spec, local, url",
    [
        ("gs://vit_models/sam/ViT-B_16.npz", "checkpoint/vit_models/sam/ViT-B_16.npz",
         "https://storage.googleapis.com/vit_models/sam/ViT-B_16.npz"),
        ("gs://mixer_models/imagenet21k/Mixer-B_16.npz",
         "checkpoint/mixer_models/imagenet21k/Mixer-B_16.npz",
         "https://storage.googleapis.com/mixer_models/imagenet21k/Mixer-B_16.npz"),
        (f"gs://vit_models/augreg/{B16_A}.npz", f"checkpoint/vit_models/augreg/{B16_A}.npz",
         f"https://storage.googleapis.com/vit_models/augreg/{B16_A}.npz"),
        ("gs://vit_models/imagenet21k/R50+ViT-B_16.npz",
         "checkpoint/vit_models/imagenet21k/R50+ViT-B_16.npz",
         "https://storage.googleapis.com/vit_models/imagenet21k/R50+ViT-B_16.npz"),
    ],
)  # fmt: skip
def test_a_gs_path_names_its_url_and_local_file(
    spec: str, local: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VIT_GCS_MIRROR", raising=False)
    monkeypatch.delenv("VIT_CHECKPOINT_MIRROR", raising=False)
    file = parse_gs(spec)
    assert (file.local, file.url()) == (Path(local), url)


def test_mirrors_of_the_buckets_and_which_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    sam, mixer = BucketFile("vit_models", "sam/ViT-B_16.npz"), BucketFile("mixer_models", "m.npz")
    monkeypatch.delenv("VIT_GCS_MIRROR", raising=False)
    monkeypatch.setenv("VIT_CHECKPOINT_MIRROR", "http://old.internal/vit/")
    assert sam.url() == "http://old.internal/vit/sam/ViT-B_16.npz"  # the bucket's own mirror
    assert mixer.url() == "https://storage.googleapis.com/mixer_models/m.npz"
    assert official_url("ViT-B_16.npz") == "http://old.internal/vit/imagenet21k/ViT-B_16.npz"
    monkeypatch.setenv("VIT_GCS_MIRROR", "http://gcs.internal/")  # wins for every bucket
    assert sam.url() == "http://gcs.internal/vit_models/sam/ViT-B_16.npz"
    assert mixer.url() == "http://gcs.internal/mixer_models/m.npz"
    assert official_url("ViT-B_16.npz") == "http://gcs.internal/vit_models/imagenet21k/ViT-B_16.npz"


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("gs://", "no bucket name"),
        ("gs:///sam/ViT-B_16.npz", "no bucket name"),
        ("gs://vit_models", "does not end in a file name ending .npz"),
        ("gs://vit_models/sam/", "does not end in a file name ending .npz"),
        ("gs://vit_models/sam/ViT-B_16.bin", "does not end in a file name ending .npz"),
        ("gs://vit_models/.npz", "does not end in a file name ending .npz"),
        ("gs://vit_models/../mine/x.npz", "'..' component"),
        ("gs://vit_models/sam//x.npz", "empty, '.' or '..' component"),
        ("gs://Vit_Models/sam/x.npz", "'Vit_Models' is not a bucket name"),
        ("gs://vit_models/sam/a b.npz", "'a b.npz' has characters other than"),
    ],
)
def test_a_malformed_gs_path_is_a_usage_error(spec: str, problem: str) -> None:
    with pytest.raises(UsageError, match="expected gs://<bucket>/<path>.npz") as raised:
        starting_weights.StartingWeights.of(
            parse("--pretrained_dir", spec).pretrained_dir, "ViT-B_16"
        )
    assert problem in str(raised.value) and "\n" not in str(raised.value)


def test_a_gs_file_is_downloaded_once_and_loads(mirror, tmp_path: Path) -> None:
    files, downloads = mirror
    files["/vit_models/sam/testing.npz"] = tiny_npz(tmp_path)
    args = parse("--pretrained_dir", "gs://vit_models/sam/testing.npz")
    weights = starting_weights.StartingWeights.of(args.pretrained_dir, args.model_type)
    path, start = weights.path, weights.words
    assert path == Path("checkpoint/vit_models/sam/testing.npz")
    assert start == "fine-tuning from checkpoint/vit_models/sam/testing.npz (SAM, ImageNet-1k)"
    assert weights.problem() is None  # missing, yet downloadable: no error
    assert weights.fetch() == path
    assert path.read_bytes() == files["/vit_models/sam/testing.npz"]
    assert downloads == ["/vit_models/sam/testing.npz"]
    config = apply_overrides(CONFIGS["testing"], SMALL_CONFIG)
    VisionTransformer(config, img_size=32, num_classes=10, zero_head=True).load_from(read_npz(path))
    assert weights.fetch() == path
    assert downloads == ["/vit_models/sam/testing.npz"], "downloaded again"


def test_a_gs_file_the_mirror_lacks_names_the_mirror_variable(mirror, capsys) -> None:
    code, err = run_train(
        ["--name", "x", *SMALL, "--pretrained_dir", "gs://vit_models/sam/missing.npz",
         "--data_dir", "data", "--dataset", "imagefolder"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "no train/ folder" in err and "does not exist" not in err, err
    args = parse("--pretrained_dir", "gs://vit_models/sam/missing.npz")
    with pytest.raises(UsageError, match="or set VIT_GCS_MIRROR to a mirror of https://storage"):
        weights = starting_weights.StartingWeights.of(args.pretrained_dir, args.model_type)
        assert weights.path == Path("checkpoint/vit_models/sam/missing.npz")
        weights.fetch()


def test_augreg_picks_the_best_upstream_final_val_of_the_i21k_pretrainings() -> None:
    """Google's rule (vit_jax/train.py): rows whose file begins "B_16-", ds == "i21k", the highest
    final_val; not the first row, the best best_val, the best fine-tune, nor the i1k one."""
    rows = read_augreg_index(index_csv(INDEX_ROWS).decode())
    choice = choose_augreg(rows, "B_16")
    assert choice.row["filename"] == B16_B
    assert choice.file == BucketFile("vit_models", f"augreg/{B16_B}.npz")
    assert choose_augreg(rows, "B/16").row["filename"] == B16_B  # the index's own name
    assert choose_augreg(rows, "S_16").row["filename"] == S16
    summary = choice.summary()
    said = [f"{B16_B}.npz", "final_val 0.51,", "best_val 0.515", "of its 2 ImageNet-21k",
            "aug medium2", "weight decay 0.03", "dropout 0.1", "stochastic depth 0.1"]  # fmt: skip
    for words in said:
        assert words in summary, (words, summary)


def test_augreg_by_the_index_downloads_index_and_file_and_logs_the_choice(
    mirror, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, downloads = mirror
    files["/vit_models/augreg/index.csv"] = index_csv(INDEX_ROWS)
    files[f"/vit_models/augreg/{B16_B}.npz"] = tiny_npz(tmp_path)
    args = parse("--pretrained_dir", "augreg:B_16")
    weights = starting_weights.StartingWeights.of(args.pretrained_dir, args.model_type)
    path, start = weights.path, weights.words
    assert Path("checkpoint/augreg_index.csv").read_bytes() == files["/vit_models/augreg/index.csv"]
    assert path == Path(f"checkpoint/vit_models/augreg/{B16_B}.npz")
    assert start == (
        f"fine-tuning from {path} (AugReg, ImageNet-21k, aug medium2, wd 0.03, chosen for "
        "augreg:B_16)"
    )
    caplog.set_level(logging.INFO, logger="vit")
    assert weights.problem() is None
    assert f"augreg:B_16 is {B16_B}.npz: the best upstream validation accuracy" in caplog.text
    assert weights.fetch().read_bytes() == files[f"/vit_models/augreg/{B16_B}.npz"]
    starting_weights.StartingWeights.of(args.pretrained_dir, args.model_type)
    assert downloads == ["/vit_models/augreg/index.csv", f"/vit_models/augreg/{B16_B}.npz"]


def test_an_unknown_augreg_name_lists_the_names_of_the_index(mirror, capsys) -> None:
    files, _ = mirror
    files["/vit_models/augreg/index.csv"] = index_csv(INDEX_ROWS)
    code, err = run_train(["--name", "x", *SMALL, "--pretrained_dir", "augreg:B_99"], capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1, err
    assert "augreg:B_99: no such model in the AugReg index" in lines[0]
    assert lines[0].endswith("it has B_16, S_16")


def test_a_page_instead_of_the_index_is_refused_and_not_kept(mirror) -> None:
    files, _ = mirror
    files["/vit_models/augreg/index.csv"] = b"name,filename\nB/16,x\n"
    with pytest.raises(UsageError, match="without the AugReg index's columns ds, aug"):
        starting_weights.StartingWeights.of(
            parse("--pretrained_dir", "augreg:B_16").pretrained_dir, "ViT-B_16"
        )
    assert not Path("checkpoint/augreg_index.csv").exists()


def test_fine_tunes_from_a_gs_path_end_to_end(
    mirror, tmp_path: Path, subset: Path, capsys: pytest.CaptureFixture
) -> None:
    files, downloads = mirror
    files["/vit_models/sam/testing.npz"] = tiny_npz(tmp_path)
    code = train.main(
        [
            "--name", "sam", *SMALL, "--pretrained_dir", "gs://vit_models/sam/testing.npz",
            "--data_dir", str(subset), "--train_batch_size", "8", "--num_steps", "1",
            "--eval_every", "1", "--eval_batch_size", "512", "--learning_rate", "1e-12",
            "--output_dir", "out", "--logdir", "logs",
        ]
    )  # fmt: skip
    assert code == 0
    start = "fine-tuning from checkpoint/vit_models/sam/testing.npz (SAM, ImageNet-1k)"
    assert capsys.readouterr().out.strip().endswith(start)
    assert downloads == ["/vit_models/sam/testing.npz"]
    saved = torch.load(Path("out") / "sam_checkpoint.bin", weights_only=True)
    weights = np.load("checkpoint/vit_models/sam/testing.npz")
    key = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
    fc1 = saved["transformer.encoder.layer.0.ffn.fc1.weight"].numpy()
    np.testing.assert_allclose(fc1, weights[key].T, atol=1e-6)
