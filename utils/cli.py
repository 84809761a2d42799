"""What the entry scripts share: one command-line grammar, one-line errors for user mistakes, and
the model flags.

The grammar, the same in every script: each ``--flag_name`` is also accepted as ``--flag-name``
(``--help`` shows the first, the reference's spelling); ``@FILE`` reads flags from a file (a
recipe), and flags typed after it override it, as a later flag overrides an earlier one. A
repeatable flag (``--config``) adds to the file's values instead; for ``--config`` the later
``KEY=VALUE`` of a key wins, so the effect is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from models.configs import CONFIGS
from models.errors import UserError
from utils.data.datasets import DATASETS
from utils.runtime import distributed as dist

GRAMMAR = """\
Every --flag_name is also accepted as --flag-name. @FILE reads flags from FILE, as many to a line
as you like, a # starting a comment; flags typed after @FILE override its own."""


class Parser(argparse.ArgumentParser):
    """argparse with the grammar above, which reports a bad flag in one line (no usage dump),
    with exit code 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("fromfile_prefix_chars", "@")
        kwargs.setdefault("epilog", GRAMMAR)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        tokens = list(sys.argv[1:] if args is None else args)
        for token in tokens:
            self._check_flag_file(token)
        end = tokens.index("--") if "--" in tokens else len(tokens)  # then positionals only
        tokens[:end] = [self._underscored(token) for token in tokens[:end]]
        return super().parse_known_args(tokens, namespace)

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        """One line of an @FILE: its words, split and quoted as a shell would, up to a ``#`` that
        starts a word (a comment)."""
        try:
            tokens = shlex.split(without_comment(arg_line))
        except ValueError as error:  # an unclosed quote
            self.error(f"cannot split the flag-file line {arg_line.strip()!r}: {error}")
        for token in tokens:
            self._check_flag_file(token)  # an @FILE inside one
        return [self._underscored(token) for token in tokens]

    def _check_flag_file(self, token: str) -> None:
        """Name a missing @FILE in one line (argparse would print errno and the open() text)."""
        if token[:1] not in (self.fromfile_prefix_chars or ""):
            return
        path = Path(token[1:])
        if not path.is_file():
            problem = "a folder, not a flag file" if path.is_dir() else "no such flag file"
            self.error(f"{token}: {problem}; check the path after the @")

    def _underscored(self, token: str) -> str:
        """``--flag-name[=VALUE]`` as the registered ``--flag_name[=VALUE]`` (or a prefix of one,
        as argparse allows); every other word as it is, values included."""
        flag, sep, value = token.partition("=")
        known = self._option_string_actions
        if not flag.startswith("--") or "-" not in flag[2:] or flag in known:
            return token
        underscored = "--" + flag[2:].replace("-", "_")
        if underscored in known or (
            self.allow_abbrev and any(option.startswith(underscored) for option in known)
        ):
            return underscored + sep + value
        return token


class StoreOverriding(argparse.Action):
    """``store``, and reset the ``overrides`` destinations to None: of flags that set one thing in
    different units (``--num_steps``, ``--num_epochs``) the one typed last counts, as for any
    flag, so one typed after an @FILE overrides the file's."""

    def __init__(self, *args, overrides: tuple[str, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.overrides = overrides

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        for dest in self.overrides:
            setattr(namespace, dest, None)


def without_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a word outside quotes (``run#2`` keeps its ``#``)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def add_model_args(parser: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    """``--model_type``, ``--config``, ``--img_size``. With ``from_checkpoint`` they default to
    None: the scripts that load a trained model take what its checkpoint records instead."""
    recorded = "the checkpoint's, else " if from_checkpoint else ""
    recorded_config = "the checkpoint's" if from_checkpoint else "none"
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
        f"--config patches.size=4,4 (default: {recorded_config})",
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
        help="auto keeps the uint8 CIFAR images on the GPU and makes each batch there when they "
        "take at most a quarter of free memory; on does so on any device, the CPU too; off "
        "uses data-loader workers (default: auto)",
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


INTERRUPTED = 128 + signal.SIGINT  # the exit code a shell gives a Ctrl-C


def run_main(main: Callable[[], int], prog: str) -> None:
    """Call ``main``; turn user mistakes into one line on stderr and exit code 2, and a Ctrl-C
    into one line and exit code 130, never a traceback.

    A Ctrl-C can also land in a finaliser (a DataLoader shutting its workers down), which
    Python reports as "Exception ignored" and then goes on: that one is reported the same way.
    Once the program stops because of a signal, a further Ctrl-C ends its exit at once.
    """
    interrupts: list[str] = []  # their texts: what the code that stopped knows of the files
    previous_hook = sys.unraisablehook
    was_in_a_group = dist.joined_a_group()  # by an earlier main() of this process (tests)

    def unraisable(info) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt):
            interrupts.append(str(info.exc_value))
        else:
            previous_hook(info)

    sys.unraisablehook = unraisable
    try:
        code = main()
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as interrupt:
        _exit_at_once_on_ctrl_c()
        interrupts.append(str(interrupt))
        code = INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        code = 0
    finally:
        sys.unraisablehook = previous_hook
    if interrupts or (isinstance(code, int) and code > 128):
        _exit_at_once_on_ctrl_c()
    if interrupts:
        _end_daemonic_children()
        said = next((text for text in interrupts if text), "")
        print(f"{prog}: interrupted" + (f": {said}" if said else ""), file=sys.stderr)
        code = code if isinstance(code, int) and code > 128 else INTERRUPTED
    if dist.joined_a_group() and not was_in_a_group:
        # Its work is done and written, and the group left: end here, without the interpreter's
        # finalisation, in which gloo's C++ threads can still abort a finished rank (SIGABRT,
        # which torchrun reports as the job's failure).
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(ValueError, OSError):  # closed by a broken pipe
                stream.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)
    sys.exit(code)


def _end_daemonic_children() -> None:
    """Kill what a Ctrl-C may have left of a DataLoader whose shutdown it cut short: workers that
    ignore SIGTERM (utils/runtime/signals.py), which multiprocessing's exit, terminating its
    daemonic children and then waiting for them, would wait for forever."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        with contextlib.suppress(ValueError):  # PyTorch's handler would call their end an error
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join(timeout=5)


def _exit_at_once_on_ctrl_c() -> None:
    """The program only exits from here on: a further Ctrl-C ends it, with no traceback."""
    with contextlib.suppress(ValueError):  # only the main thread sets signal handlers
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(INTERRUPTED))
