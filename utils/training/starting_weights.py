"""Where a run's weights come from: ``--pretrained_dir`` (a Google .npz, downloaded when it is
official and missing, or a checkpoint of this project) or random weights; read by rank 0."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from models.errors import UsageError
from models.npz_io import check_downloaded_npz, npz_problem, read_npz
from models.pretrained import (
    AUGREG_INDEX,
    AUGREG_INDEX_PATH,
    AUGREG_PREFIX,
    BUCKET,
    GCS,
    GCS_MIRROR_VARIABLE,
    MIRROR_VARIABLE,
    MIXER_I21K,
    bucket_file,
    check_augreg_index,
    choose_augreg,
    default_filename,
    default_source,
    describe,
    load_augreg_index,
    official_url,
)
from models.resize import load_resized
from utils.data.download import DownloadError, download_file, unreachable
from utils.runtime import distributed as dist
from utils.training.run_files import learned_gelu, read_meta, read_weights

log = logging.getLogger("vit")


@dataclass(frozen=True)
class StartingWeights:
    """The file a run starts from (None: random weights) and the words every report uses."""

    path: Path | None
    words: str
    given: str | None  # --pretrained_dir as typed (None: the model type's default)
    model_type: str

    @classmethod
    def of(cls, pretrained_dir: str | None, model_type: str) -> StartingWeights:
        """``--pretrained_dir`` resolved to a local path; for ``augreg:NAME`` Google's index is
        downloaded first, to choose the file."""
        if pretrained_dir is not None and pretrained_dir.lower() == "none":
            words = "training from random weights (--pretrained_dir none)"
            return cls(None, words, None, model_type)
        spec = pretrained_dir or default_source(model_type)
        if spec is not None and spec.startswith(AUGREG_PREFIX) and not AUGREG_INDEX_PATH.exists():
            url = AUGREG_INDEX.url()
            log.info("downloading %s to %s", url, AUGREG_INDEX_PATH)
            try:
                download_file(url, AUGREG_INDEX_PATH, verify=check_augreg_index)
            except DownloadError as error:
                raise UsageError(
                    f"{error}, or set {GCS_MIRROR_VARIABLE} to a mirror of {GCS} "
                    "(<mirror>/vit_models/augreg/index.csv)"
                ) from None
        if (remote := bucket_file(spec)) is not None:  # gs://<bucket>/<path>.npz or augreg:<NAME>
            chosen = f", chosen for {spec}" if spec.startswith(AUGREG_PREFIX) else ""
            words = f"fine-tuning from {remote.local} ({remote.describe()}{chosen})"
            return cls(remote.local, words, pretrained_dir, model_type)
        if pretrained_dir is None:
            path = Path("checkpoint") / default_filename(model_type)
        else:
            path = Path(pretrained_dir)
        if path.suffix in (".bin", ".pt"):
            kind = "a checkpoint of this project"
        else:
            kind = describe(path.name) or "a .npz in Google's layout"
        return cls(path, f"fine-tuning from {path} ({kind})", pretrained_dir, model_type)

    def problem(self) -> str | None:
        """Why the run cannot start from these weights (a file neither here nor downloadable),
        or None; checked before anything slow. An AugReg choice is logged here."""
        if self.given and self.given.startswith(AUGREG_PREFIX):
            name = self.given.removeprefix(AUGREG_PREFIX)
            log.info("%s", choose_augreg(load_augreg_index(), name).summary())
        if self.path is None or self.path.exists():
            return None
        url = self._url()
        if url is None:
            return self.missing()
        reason = unreachable(url)  # asked now, so that every missing input is named at once
        return (
            None if reason is None else self._download_failed(DownloadError(url, self.path, reason))
        )

    def missing(self) -> str:
        """The words for a ``--pretrained_dir`` (given, or the default) that is not there."""
        given = (
            f"--pretrained_dir {self.path.absolute()}"
            if self.given
            else f"the default --pretrained_dir of --model_type {self.model_type}, "
            f"{self.path.absolute()},"
        )
        if self.given is None and self.model_type.startswith("Mixer-"):
            return (
                f"{given} does not exist, and Google published no ImageNet-21k file of "
                f"{self.model_type} (only of {' and '.join(MIXER_I21K)}): pass a file of its "
                f"bucket, e.g. --pretrained_dir gs://mixer_models/gsam/{self.model_type}.npz, or "
                "--pretrained_dir none for random weights"
            )
        return (
            f"{given} does not exist and is not the name of an official checkpoint (e.g. "
            "ViT-B_16.npz); pass an existing file, or --pretrained_dir none for random weights"
        )

    def fetch(self) -> Path:
        """The file, downloaded from Google's bucket first when it is official; an official file
        there or arriving that is not a readable .npz is refused, the download kept only when
        complete."""
        path, url = self.path, self._url()
        if path.exists():
            if url is not None and (problem := npz_problem(path)):
                where = path.absolute()
                raise UsageError(
                    f"{where} is not a readable .npz ({problem}); delete it "
                    f"(rm {shlex.quote(str(where))}) and run again to download it anew"
                )
            return path
        if url is None:
            raise UsageError(self.missing())
        log.info("downloading %s to %s", url, path)
        try:
            return download_file(url, path, desc=path.name, verify=check_downloaded_npz)
        except DownloadError as error:
            raise UsageError(self._download_failed(error)) from None

    def _url(self) -> str | None:
        """Where the file downloads from: Google's bucket (gs:// or augreg:, whatever its file
        name, or an official file name), or None."""
        remote = bucket_file(self.given)
        return remote.url() if remote is not None else official_url(self.path.name)

    def _download_failed(self, error: DownloadError) -> str:
        remote = bucket_file(self.given)
        if remote is not None:
            return (
                f"{error}, or set {GCS_MIRROR_VARIABLE} to a mirror of {GCS} "
                f"(<mirror>/{remote.bucket}/{remote.path})"
            )
        return f"{error}, or set {MIRROR_VARIABLE} to a mirror of {BUCKET} (the same layout)"

    def gelu(self) -> str | None:
        """The GELU these weights learned with: Google's tanh for a .npz, what a checkpoint of
        this project records (``run_files.learned_gelu``: exact for the reference's and for files
        that predate the record), None for random weights (the config's). Reads no weights."""
        if self.path is None:
            return None
        if self.path.suffix in (".bin", ".pt"):
            return learned_gelu(read_meta(self.path))
        return "tanh"

    def load_into(self, model: torch.nn.Module, ctx: dist.Context) -> None:
        """Read by rank 0, whose weights then reach the other processes (the file is on its
        disk): Google's .npz through ``load_from``, or our own checkpoint with a new head."""

        def on_main() -> dict[str, torch.Tensor]:
            if self.path.suffix in (".bin", ".pt"):
                load_resized(model, read_weights(self.path)[0], keep_head=False)
            else:
                model.load_from(read_npz(self.fetch()))
            return model.state_dict()

        weights = dist.from_main(on_main, ctx)
        if not ctx.is_main:
            model.load_state_dict(weights)
