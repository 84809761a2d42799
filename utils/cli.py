"""What the entry scripts share: one-line errors for user mistakes, and the model flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from models.configs import CONFIGS, ConfigOverrideError
from models.npz_io import CheckpointError
from utils.data import DataError
from utils.download import DownloadError

# Mistakes a user can fix from the command line: reported as one line, exit code 2.
USER_ERRORS = (ConfigOverrideError, CheckpointError, DataError, DownloadError)


class UsageError(Exception):
    """A bad flag value or an unusable file: the message names the problem and the fix."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump), with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model_type",
        choices=list(CONFIGS),
        default="ViT-B_16",
        help="which variant to use (default: ViT-B_16)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model-config field, repeatable: --config transformer.num_layers=4 "
        "--config patches.size=4,4",
    )
    parser.add_argument(
        "--img_size", type=int, default=224, help="input resolution in pixels (default: 224)"
    )


def run_main(main: Callable[[], int], prog: str) -> None:
    """Call ``main``; turn user mistakes into one line on stderr and exit code 2."""
    try:
        code = main()
    except (UsageError, *USER_ERRORS) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)
