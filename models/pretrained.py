"""Where each of Google's official checkpoints can be downloaded.

All live in the public Google Cloud Storage bucket ``vit_models``: the paper's models under
``imagenet21k/`` (pre-trained, zeroed heads, with a pre-logits layer) and
``imagenet21k+imagenet2012/`` (then fine-tuned on ImageNet-1k), the AugReg models of Steiner et al.
2021 ("How to train your ViT") under ``augreg/`` by their published file names.

Any other file of Google's public buckets is named by its ``gs://<bucket>/<path>.npz`` path (the
SAM and GSAM models under ``gs://vit_models/sam/`` and ``gsam/``, the MLP-Mixers of
``gs://mixer_models``, every AugReg file), and ``augreg:<NAME>`` picks an AugReg pre-training from
the bucket's ``augreg/index.csv`` by the rule of Google's own loader (see ``choose_augreg``).
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from models.errors import UsageError

BUCKET = "https://storage.googleapis.com/vit_models"
# An internal mirror of the bucket (same layout), for clusters without internet access.
MIRROR_VARIABLE = "VIT_CHECKPOINT_MIRROR"
# Google Cloud Storage's public address, and a mirror of it, <mirror>/<bucket>/<path>, for every
# bucket; for vit_models it wins over MIRROR_VARIABLE when both are set.
GCS = "https://storage.googleapis.com"
GCS_MIRROR_VARIABLE = "VIT_GCS_MIRROR"

# The paper's checkpoints, by model name; the hybrid's file name in the bucket uses "+".
IMAGENET21K = ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14", "R50+ViT-B_16")
IMAGENET21K_IMAGENET2012 = (
    "ViT-B_16", "ViT-B_16-224", "ViT-B_32", "ViT-L_16", "ViT-L_16-224", "ViT-L_32",
    "R50+ViT-B_16",
)  # fmt: skip
# The reference implementation named the hybrid "R50-ViT-B_16"; the bucket calls it "R50+ViT-B_16".
_ALIASES = {"R50-ViT-B_16": "R50+ViT-B_16"}

AUGREG = (
    "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0.npz",
    "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz",
    "R26_S_32-i21k-300ep-lr_0.001-aug_light0-wd_0.03-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0.npz",
    "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz",
    "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
    "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz",
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz",
    "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
)


def official_url(filename: str) -> str | None:
    """The download URL of an official checkpoint file name, or None when it is not one.

    ``ViT-B_16.npz`` is the ImageNet-21k model (the reference's convention);
    ``imagenet21k+imagenet2012_ViT-B_16.npz`` the one fine-tuned on ImageNet-1k; AugReg files go by
    their published names.
    """
    folder = _bucket_path(Path(filename).name)
    if folder is None:
        return None
    return f"{bucket_url('vit_models')}/{folder}"


def bucket_url(bucket: str) -> str:
    """Where a bucket's files are downloaded from: ``$VIT_GCS_MIRROR/<bucket>`` when set, else, for
    ``vit_models``, ``$VIT_CHECKPOINT_MIRROR`` (its own layout) or ``BUCKET``, else Google's."""
    if mirror := os.environ.get(GCS_MIRROR_VARIABLE, "").rstrip("/"):
        return f"{mirror}/{bucket}"
    if bucket == "vit_models":
        return os.environ.get(MIRROR_VARIABLE, "").rstrip("/") or BUCKET
    return f"{GCS}/{bucket}"


def _bucket_path(name: str) -> str | None:
    """Where an official file lies in the bucket, e.g. ``imagenet21k/ViT-B_16.npz``."""
    if not name.endswith(".npz"):
        return None
    stem = name[: -len(".npz")]
    if name in AUGREG:
        return f"augreg/{name}"
    if stem.startswith("imagenet21k+imagenet2012_"):
        model = stem[len("imagenet21k+imagenet2012_") :]
        model = _ALIASES.get(model, model)
        known = model in IMAGENET21K_IMAGENET2012
        return f"imagenet21k+imagenet2012/{model}.npz" if known else None
    model = _ALIASES.get(stem, stem)
    return f"imagenet21k/{model}.npz" if model in IMAGENET21K else None


def describe(filename: str) -> str | None:
    """What an official file holds, e.g. "ImageNet-21k, paper release"; None for other files."""
    folder = _bucket_path(Path(filename).name)
    if folder is None:
        return None
    release, name = folder.split("/")
    if release == "augreg":
        if "-i1k-" in name:
            return "ImageNet-1k, AugReg release"
        then = " then ImageNet-1k" if "--imagenet2012-" in name else ""
        return f"ImageNet-21k{then}, AugReg release"
    then = " then ImageNet-1k" if release == "imagenet21k+imagenet2012" else ""
    return f"ImageNet-21k{then}, paper release"


# Model types whose ImageNet-21k weights exist only as AugReg files: their pre-training checkpoint.
_AUGREG_I21K = {
    "ViT-Ti_16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "ViT-S_16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "ViT-S_32": "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "ViT-B_8": "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
    "R+ViT-Ti_16": "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "R26+ViT-S_32": "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0.npz",
    "R50+ViT-L_32": "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0.npz",
}


# MLP-Mixer files pre-trained on ImageNet-21k exist for these two (Tolstikhin et al. 2021); a
# Mixer's default --pretrained_dir is that file, in its bucket.
MIXER_I21K = ("Mixer-B_16", "Mixer-L_16")


def default_source(model_type: str) -> str | None:
    """The gs:// path a Mixer's ``--model_type`` fine-tunes from by default, if it has one."""
    return f"gs://mixer_models/imagenet21k/{model_type}.npz" if model_type in MIXER_I21K else None


def default_filename(model_type: str) -> str:
    """The ImageNet-21k checkpoint file that ``--model_type`` fine-tunes from by default."""
    return _AUGREG_I21K.get(model_type) or f"{_ALIASES.get(model_type, model_type)}.npz"


# ---------------------------------------------------------------------------------------------
# Any file of Google's buckets, by its gs:// path

GS_PREFIX = "gs://"
# Google's rules for bucket names; object paths limited to the characters Google's files use, so
# that a path is its own URL and its own file name under checkpoint/.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
_PATH_PART = re.compile(r"[A-Za-z0-9._+=,@~-]+")

# What the files of a bucket's folder hold, for the first log line.
_FOLDERS = {
    ("vit_models", "imagenet21k"): "ImageNet-21k, paper release",
    ("vit_models", "imagenet21k+imagenet2012"): "ImageNet-21k then ImageNet-1k, paper release",
    ("vit_models", "sam"): "SAM, ImageNet-1k",
    ("vit_models", "gsam"): "GSAM, ImageNet-1k",
    ("mixer_models", "imagenet21k"): "MLP-Mixer, ImageNet-21k",
    ("mixer_models", "sam"): "MLP-Mixer, SAM, ImageNet-1k",
    ("mixer_models", "gsam"): "MLP-Mixer, GSAM, ImageNet-1k",
}
_AUGREG_DATA = {"i21k": "ImageNet-21k", "i1k": "ImageNet-1k", "i21k_30": "ImageNet-21k 30 epochs"}


@dataclass(frozen=True)
class BucketFile:
    """A file of one of Google's public Cloud Storage buckets: ``gs://<bucket>/<path>``."""

    bucket: str
    path: str  # inside the bucket, e.g. "sam/ViT-B_16.npz"

    @property
    def local(self) -> Path:
        """Where it is downloaded to: ``checkpoint/<bucket>/<path>``."""
        return Path("checkpoint") / self.bucket / self.path

    def url(self) -> str:
        return f"{bucket_url(self.bucket)}/{self.path}"

    def describe(self) -> str:
        """What it holds, e.g. "SAM, ImageNet-1k" or "AugReg, ImageNet-21k, aug medium1, wd 0.1"."""
        folder, _, name = self.path.rpartition("/")
        if self.bucket == "vit_models" and folder == "augreg":
            return _describe_augreg(name)
        where = f"a .npz of gs://{self.bucket}/{folder + '/' if folder else ''}"
        return _FOLDERS.get((self.bucket, folder), where)


def parse_gs(spec: str) -> BucketFile:
    """The file ``gs://<bucket>/<path>.npz`` names; a UsageError saying what is wrong with any
    other spelling."""
    bucket, _, path = spec.removeprefix(GS_PREFIX).partition("/")
    problem = None
    if not _BUCKET_NAME.fullmatch(bucket):
        problem = "no bucket name" if not bucket else f"{bucket!r} is not a bucket name"
    elif not path.endswith(".npz") or path.rpartition("/")[2] == ".npz":
        problem = "the path in the bucket does not end in a file name ending .npz"
    elif bad := [part for part in path.split("/") if part in ("", ".", "..")]:
        problem = f"the path has an empty, '.' or '..' component ({bad[0]!r})"
    elif bad := [part for part in path.split("/") if not _PATH_PART.fullmatch(part)]:
        problem = f"{bad[0]!r} has characters other than letters, digits and ._+=,@~-"
    if problem:
        raise UsageError(
            f"--pretrained_dir {spec}: {problem}; expected gs://<bucket>/<path>.npz, e.g. "
            "gs://vit_models/sam/ViT-B_16.npz"
        )
    return BucketFile(bucket, path)


def _describe_augreg(name: str) -> str:
    """``B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0[--imagenet2012-...-res_384]``
    in words: "AugReg, ImageNet-21k, aug medium1, wd 0.1[, fine-tuned on imagenet2012 at 384
    px]"."""
    upstream, _, adapted = name.removesuffix(".npz").partition("--")
    parts = upstream.split("-")
    if len(parts) < 2:
        return "AugReg"
    fields = dict(part.partition("_")[::2] for part in parts[2:])
    words = ["AugReg", _AUGREG_DATA.get(parts[1], parts[1])]
    words += [f"{key} {fields[key]}" for key in ("aug", "wd") if key in fields]
    if adapted:
        resolution = adapted.rpartition("res_")[2]
        words.append(f"fine-tuned on {adapted.split('-')[0]} at {resolution} px")
    return ", ".join(words)


# ---------------------------------------------------------------------------------------------
# AugReg by the index: augreg:<NAME>

AUGREG_PREFIX = "augreg:"
AUGREG_INDEX = BucketFile("vit_models", "augreg/index.csv")
AUGREG_INDEX_PATH = Path("checkpoint") / "augreg_index.csv"
# The columns read here, of the index's (vit_jax/checkpoint.py's get_augreg_df documents them all).
_INDEX_COLUMNS = ("name", "ds", "aug", "wd", "do", "sd", "best_val", "final_val", "filename")


@dataclass(frozen=True)
class AugRegChoice:
    """The pre-training ``augreg:<model>`` picked: a row of the index."""

    model: str
    row: dict[str, str]
    candidates: int  # ImageNet-21k pre-trainings of the model in the index

    @property
    def file(self) -> BucketFile:
        name = self.row["filename"]  # without .npz in Google's index
        return BucketFile("vit_models", f"augreg/{name.removesuffix('.npz')}.npz")

    def summary(self) -> str:
        """The row in words, for the log."""
        r = self.row
        return (
            f"augreg:{self.model} is {self.file.path.rpartition('/')[2]}: the best upstream "
            f"validation accuracy (final_val {r['final_val']}, best_val {r['best_val']}) of its "
            f"{self.candidates} ImageNet-21k pre-training(s) in {AUGREG_INDEX_PATH}; aug "
            f"{r['aug']}, weight decay {r['wd']}, dropout {r['do']}, stochastic depth {r['sd']}"
        )


def read_augreg_index(text: str) -> list[dict[str, str]]:
    """The rows of ``index.csv``; a ValueError when it lacks a column this module reads."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [column for column in _INDEX_COLUMNS if column not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"a CSV without the AugReg index's columns {', '.join(missing)}")
    return list(reader)


def load_augreg_index(path: Path = AUGREG_INDEX_PATH) -> list[dict[str, str]]:
    """The rows of the index downloaded to ``path``; a UsageError when it is not one."""
    try:
        return read_augreg_index(path.read_text(encoding="utf-8"))
    except ValueError as error:  # UnicodeDecodeError among them
        where = path.absolute()
        raise UsageError(
            f"{where} is not the AugReg index ({error}); delete it and run again to download it "
            "anew"
        ) from None


def check_augreg_index(file: BinaryIO) -> None:
    """``download_file``'s ``verify`` for the index: a ValueError unless it is one."""
    read_augreg_index(file.read().decode("utf-8"))


def choose_augreg(rows: list[dict[str, str]], model: str) -> AugRegChoice:
    """The pre-training Google's loader picks for ``model``: the rows whose file name begins
    ``<model>-`` (``B_16``, ``R50_L_32``; the ``name`` column's ``B/16`` is accepted too), of
    ImageNet-21k (``ds == "i21k"``), the one with the highest upstream ``final_val``.

    That is vit_jax/train.py's rule (google-research/vision_transformer: "Select best checkpoint
    from i21k pretraining by final upstream validation accuracy"), ``sort_values('final_val')
    .iloc[-1]``; it looks at no ``adapt_*`` column, which describe fine-tunes of the same file.
    """

    def key(row: dict[str, str]) -> str:
        return row["filename"].split("-")[0]

    mine = [row for row in rows if model in (key(row), row["name"])]
    if not mine:
        names = ", ".join(sorted({key(row) for row in rows}))
        raise UsageError(
            f"--pretrained_dir augreg:{model}: no such model in the AugReg index "
            f"{AUGREG_INDEX_PATH.absolute()}; it has {names}"
        )
    i21k = [row for row in mine if row["ds"] == "i21k"]
    if not i21k:
        found = ", ".join(sorted({row["ds"] for row in mine}))
        raise UsageError(
            f"--pretrained_dir augreg:{model}: the AugReg index has no ImageNet-21k pre-training "
            f"of it (only {found}); name a file instead, gs://vit_models/augreg/<filename>.npz"
        )
    best = max(i21k, key=lambda row: _accuracy(row["final_val"]))
    return AugRegChoice(model, best, len({row["filename"] for row in i21k}))


def _accuracy(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        return float("-inf")
    return number if number == number else float("-inf")  # NaN: never the best


def bucket_file(spec: str | None) -> BucketFile | None:
    """The bucket file a ``--pretrained_dir`` of the ``gs://`` or ``augreg:`` form names (for
    ``augreg:``, by the index already at ``AUGREG_INDEX_PATH``); None for a local path."""
    if spec is None:
        return None
    if spec.startswith(GS_PREFIX):
        return parse_gs(spec)
    if spec.startswith(AUGREG_PREFIX):
        return choose_augreg(load_augreg_index(), spec.removeprefix(AUGREG_PREFIX)).file
    return None
