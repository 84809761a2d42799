"""What a person sees on a terminal: train.py run in a real pseudo-terminal, its output replayed
on a small screen model (carriage returns, erasures and cursor moves, as a terminal applies
them), and read line by line as the person reads it."""

from __future__ import annotations

import os
import pty
import re
import select
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.test_train import REPO, SMALL

pytestmark = pytest.mark.slow

LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")
COLUMNS = 150


def screen(output: str) -> list[str]:
    """The lines a terminal shows after ``output``: ``\\r`` returns to the line's start, ``\\n``
    goes down a line, text overwrites what is under it, ``ESC[A`` goes up, ``ESC[K`` erases
    to the line's end, other escape sequences change nothing here."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(output):
        char = output[i]
        if char == "\x1b" and (escape := re.match(r"\x1b\[([0-9;?]*)([@-~])", output[i:])):
            count = int(escape[1]) if escape[1].isdigit() else 1
            if escape[2] == "A":
                row = max(0, row - count)
            elif escape[2] == "K":
                del lines[row][col:]
            i += len(escape[0])
            continue
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            if row == len(lines):
                lines.append([])
        else:
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col += 1
        i += 1
    return ["".join(line).rstrip() for line in lines]


def run_in_terminal(
    args: list[str], cwd: Path, ctrl_c_after: str, timeout: float = 300
) -> tuple[int, str]:
    """Run train.py with a pseudo-terminal as its controlling terminal (stdin, stdout, stderr),
    type Ctrl-C once ``ctrl_c_after`` has been shown; its exit status and all it wrote."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": str(REPO), "TERM": "xterm",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of COLUMNS columns, then train.py
        try:
            import fcntl

            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, COLUMNS, 0, 0))
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, str(REPO / "train.py"), *args], env)
        finally:
            os._exit(127)
    received, typed, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not typed and ctrl_c_after.encode() in received:
                os.write(fd, b"\x03")  # the terminal sends SIGINT to the foreground group
                typed = True
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every process holding the terminal has ended
                break
            if not chunk:
                break
            received += chunk
        else:
            os.kill(pid, 9)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), received.decode(errors="replace")


def test_log_lines_start_on_their_own_line_beside_the_progress_bar(
    tmp_path: Path, subset: Path
) -> None:
    """A run on a terminal shows the progress bar; every log line written while the bar is up
    (the first step under way, an evaluation, the stop of a Ctrl-C) starts on its own line,
    none after the bar's text, and the bar is left whole."""
    args = [*SMALL, "--name", "tty", "--pretrained_dir", "none", "--data_dir", str(subset),
            "--train_batch_size", "64", "--num_steps", "2000", "--eval_every", "10",
            "--output_dir", str(tmp_path / "out"), "--logdir", str(tmp_path / "logs")]  # fmt: skip
    code, output = run_in_terminal(args, tmp_path, ctrl_c_after="step 10: test accuracy")
    lines = screen(output)
    assert code == 130, output  # 128 + SIGINT: stopped, saved, resumable
    shown = "\n".join(lines)
    glued = [line for line in lines if (m := LOG_LINE.search(line)) and m.start() > 0]
    assert not glued, shown
    bars = [line for line in lines if line.startswith("train:")]
    assert bars and all("|" in bar and "/2000" in bar for bar in bars), shown
    logged = [line for line in lines if LOG_LINE.match(line)]
    under_way = next(i for i, line in enumerate(logged) if "step 1/2000 under way" in line)
    evaluated = next(i for i, line in enumerate(logged) if "step 10: test accuracy" in line)
    stopped = next(i for i, line in enumerate(logged) if "stopped by signal" in line)
    assert under_way < evaluated < stopped, shown
    assert "--resume auto" in logged[stopped] and (tmp_path / "out" / "tty_last.pt").is_file()
