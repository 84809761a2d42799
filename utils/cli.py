"""What the entry scripts share: one-line errors for user mistakes, and the model flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from models.configs import CONFIGS
from models.errors import UserError
from utils.data.datasets import DATASETS


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump), with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_args(parser: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """``--model_type``, ``--config``, ``--img_size``. With ``from_checkpoint`` they default to
    None: the scripts that load a trained model take what its checkpoint records instead."""
    recorded = "the checkpoint's, else " if from_checkpoint else ""
    parser.add_argument(
        "--model_type",
        choices=list(CONFIGS),
        default=None if from_checkpoint else "ViT-B_16",
        help=f"which variant to use (default: {recorded}ViT-B_16)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model-config field, repeatable: --config transformer.num_layers=4 "
        "--config patches.size=4,4" + (" (default: the checkpoint's)" if from_checkpoint else ""),
    )
    parser.add_argument(
        "--img_size",
        type=int,
        default=None if from_checkpoint else 224,
        help=f"input resolution in pixels (default: {recorded}224)",
    )


def add_data_on_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data_on_device",
        choices=["auto", "on", "off"],
        default="auto",
        help="keep the uint8 CIFAR images on the GPU and make each batch there (auto: on CUDA "
        "when the data takes at most a quarter of free memory; 'on' also works on the CPU)",
    )


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the scripts that use a trained model: which weights, classes and device."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="weights written by train.py: a <name>_checkpoint.bin or a <name>_last.pt",
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="the data set it was trained on, for its class names (default: the checkpoint's, "
        "else cifar10)",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def run_main(main: Callable[[], int], prog: str) -> None:
    """Call ``main``; turn user mistakes into one line on stderr and exit code 2."""
    try:
        code = main()
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        code = 0
    sys.exit(code)
