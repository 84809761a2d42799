"""What the entry scripts share: one command-line grammar, one-line errors for user mistakes, and
the model flags.

The grammar, the same in every script: each ``--flag_name`` is also accepted as ``--flag-name``
(``--help`` shows the first, the reference's spelling); ``@FILE`` reads flags from a file (a
recipe), and flags typed after it override it, as a later flag overrides an earlier one. A
repeatable flag (``--config``) adds to the file's values instead; for ``--config`` the later
``KEY=VALUE`` of a key wins, so the effect is the same.

One rule per kind of value, for every flag of every script: a float must be finite (nan and inf
get past every ``<= 0`` check), an integer must fit in 64 bits (what PyTorch and NumPy hold), and
no value may be empty (an unset shell variable). A misspelt flag or choice gets the close match.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import math
import multiprocessing
import os
import shlex
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from models.configs import CONFIGS
from models.errors import UserError
from utils.data.datasets import DATASETS
from utils.runtime import distributed as dist

GRAMMAR = """\
Every --flag_name is also accepted as --flag-name. @FILE reads flags from FILE, as many to a line
as you like, a # starting a comment; flags typed after @FILE override its own."""


class Help(argparse.RawDescriptionHelpFormatter):
    """argparse's help layout, but a line breaks between words only: never inside a model
    type (``ViT-\\nH_14``) or a path."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


MAX_FLAG_FILE_DEPTH = 16  # @FILEs inside @FILEs: a recipe that includes a base, and so on


class Parser(argparse.ArgumentParser):
    """argparse with the grammar above, which reports a bad flag in one line (no usage dump),
    with exit code 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("fromfile_prefix_chars", "@")
        kwargs.setdefault("epilog", GRAMMAR)
        super().__init__(*args, **kwargs)
        # argparse looks each type= up here first: the rules above hold for every flag, those
        # of argument groups too, without each flag having to ask for them
        self.register("type", float, finite_float)
        self.register("type", int, int64)
        self.register("type", None, non_empty)
        self.register("type", str, non_empty)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """argparse's, with the flag meant for each unrecognized one, where one is close."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            known = [o for o in self._option_string_actions if o.startswith("--")]
            meant = {}
            for word in extras:
                flag = word.partition("=")[0]
                if flag.startswith("--") and (close := close_match(flag.replace("-", "_"), known)):
                    meant[flag] = close
            hint = ", ".join(m if len(meant) == 1 else f"{m} (for {f})" for f, m in meant.items())
            self.error(
                f"unrecognized arguments: {' '.join(extras)}"
                + (f"; did you mean {hint}?" if hint else "")
            )
        return parsed

    def _parse_optional(self, arg_string: str):  # type: ignore[no-untyped-def]
        """A number is a value, never a flag: argparse takes ``-1`` and ``-0.5`` as values, but
        ``-1e-4`` and ``-inf`` as unknown flags ("expected one argument")."""
        with contextlib.suppress(ValueError):
            float(arg_string)
            return None
        return super()._parse_optional(arg_string)

    def _check_value(self, action: argparse.Action, value: object) -> None:
        """A value outside the choices: the close one where there is one, else all of them."""
        if action.choices is None or value in action.choices:
            return
        choices = [str(choice) for choice in action.choices]
        close = close_match(str(value), choices)
        hint = f"did you mean {close}?" if close else f"choose from {', '.join(choices)}"
        raise argparse.ArgumentError(action, f"invalid choice: {value!r}; {hint}")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        tokens = list(sys.argv[1:] if args is None else args)
        for token in tokens:
            self._check_flag_file(token)
        end = tokens.index("--") if "--" in tokens else len(tokens)  # then positionals only
        tokens[:end] = [self._underscored(token) for token in tokens[:end]]
        return super().parse_known_args(tokens, namespace)

    def _read_args_from_files(self, arg_strings: list[str]) -> list[str]:
        """argparse's reading of @FILEs, which recurses into an @FILE inside one: a file that
        includes itself, directly or through others, is one line, not a RecursionError."""
        self._flag_file_depth = getattr(self, "_flag_file_depth", 0) + 1
        try:
            if self._flag_file_depth > MAX_FLAG_FILE_DEPTH:
                files = [token for token in arg_strings if token.startswith("@")]
                self.error(
                    f"{' '.join(files) or '@FILE'}: flag files include each other more than "
                    f"{MAX_FLAG_FILE_DEPTH} deep; does one include itself? Remove that line"
                )
            return super()._read_args_from_files(arg_strings)
        finally:
            self._flag_file_depth -= 1

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
        if not token.startswith(tuple(self.fromfile_prefix_chars or "")):  # '' is no @FILE
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


LARGEST_INT = 2**63 - 1  # of an int64: what PyTorch and NumPy hold


def finite_float(text: str) -> float:
    """A float flag's value: nan and inf are refused here, before any check they would pass."""
    value = float(text)
    if not math.isfinite(value):
        overflow = text.strip().lower().lstrip("+-") not in ("nan", "inf", "infinity")
        raise argparse.ArgumentTypeError(
            f"{text} is not a finite number" + (f" (it overflows to {value})" if overflow else "")
            + "; give a finite value"
        )  # fmt: skip
    return value


def int64(text: str) -> int:
    """An integer flag's value: one that fits in 64 bits, as the tensors and seeds that take it."""
    value = int(text)
    if abs(value) > LARGEST_INT:
        raise argparse.ArgumentTypeError(
            f"{text} is beyond the 64-bit range (at most {LARGEST_INT} either way); give a "
            "smaller value"
        )
    return value


def non_empty(text: str) -> str:
    """A text flag's value: an empty one is most often an unset shell variable, and would
    otherwise mean the current folder to a path flag."""
    if not text:
        raise argparse.ArgumentTypeError("empty value; give one (is a shell variable unset?)")
    return text


def close_match(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``word`` (case aside), if any is close: difflib's measure, as
    argparse's own suggestions (Python 3.14) use, a little stricter (ViT-X_99 is not ViT-B_8)."""
    lowered = {candidate.lower(): candidate for candidate in candidates}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.7)
    return lowered[close[0]] if close else None


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


Flags = argparse.ArgumentParser | argparse._ArgumentGroup  # where flags are added


def add_model_args(parser: Flags, from_checkpoint: bool = False) -> None:
    """``--model_type``, ``--config``, ``--img_size``. With ``from_checkpoint`` they default to
    None: the scripts that load a trained model take what its checkpoint records instead. The
    types are listed once, in the help text (argparse's {a,b,...} would list them twice)."""
    recorded = "the checkpoint's, else " if from_checkpoint else ""
    recorded_config = "the checkpoint's" if from_checkpoint else "none"
    parser.add_argument(
        "--model_type",
        choices=list(CONFIGS),
        metavar="TYPE",
        default=None if from_checkpoint else "ViT-B_16",
        help=f"which variant to use: {', '.join(CONFIGS)} (default: {recorded}ViT-B_16)",
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
        metavar="PX",
        default=None if from_checkpoint else 224,
        help=f"input resolution in pixels (default: {recorded}224)",
    )


def add_data_on_device_arg(parser: Flags) -> None:
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
