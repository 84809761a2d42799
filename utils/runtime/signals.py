"""Preemption and Ctrl-C: stop before the next micro-batch, save the last whole step, and exit
resumable (train.py asks ``StopRequest`` before every micro-batch).

Schedulers (SLURM, Kubernetes, ``timeout``) send SIGTERM to every process of a job and a terminal
sends Ctrl-C's SIGINT to the whole foreground group, so DataLoader workers receive them too.
PyTorch's workers die of a SIGTERM that their parent did not send, and the parent then fails with
"DataLoader worker exited unexpectedly". Workers therefore ignore both signals (they still exit
when the main process shuts them down or dies), and they are started with both signals blocked
so that none can arrive before they ignore it.
"""

from __future__ import annotations

import signal
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SECOND_CTRL_C = (
    "a second Ctrl-C stopped the run at once, saving nothing more; files saved before are "
    "intact (saves are atomic), and --resume auto continues from the last saved state, if any"
)


class StopRequest:
    """SIGTERM or SIGINT asks the loop to stop before its next micro-batch, save, and exit
    resumable."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(SECOND_CTRL_C)  # stops at once; run_main prints it
        self.signum = signum


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back from this thread (and the processes it forks) meanwhile;
    one that arrives is delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: leave SIGTERM and SIGINT to the main process."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # pending copies are now discarded
    threading.excepthook = _quiet_hang_up(threading.excepthook)


def _quiet_hang_up(previous):
    """A worker's ``threading.excepthook``: the thread that hands a batch's shared memory to the
    main process (multiprocessing's resource sharer) has the connection reset when a second
    Ctrl-C stops the main process mid-handover. That is the stop, not an error to print a
    traceback for; any other exception of a thread goes to ``previous``."""

    def hook(args: threading.ExceptHookArgs) -> None:
        frames = traceback.extract_tb(args.exc_traceback)
        sharer = any(frame.filename.endswith("resource_sharer.py") for frame in frames)
        if not (sharer and issubclass(args.exc_type, ConnectionError)):
            previous(args)

    return hook
