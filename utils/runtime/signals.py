"""Stop signals: stop before the next micro-batch, save the last whole step, and exit resumable
(train.py asks ``StopRequest`` before every micro-batch).

SIGTERM (SLURM, Kubernetes, ``timeout``), SIGINT (Ctrl-C), SIGHUP (the terminal or ssh session
closed) and SIGUSR1 (``#SBATCH --signal=B:USR1@120``) each ask for that stop, which is said at
once in one line; one ignored when the run starts (SIGHUP under ``nohup``) stays ignored.

One request often comes more than once: ``scancel --signal`` reaches every process of a job, and
torchrun forwards its own copy. Copies within ``REPEAT_S`` of the first are that one request; a
Ctrl-C after that is a second one, which stops at once without saving.

Python runs a signal's handler in the main thread, between two bytecodes, which a backward pass on
the CPU can hold off for a minute. So a thread notes each signal as it arrives, from Python's
wakeup fd (the signal's number, written by the C-level handler at once): it acknowledges the
first, times the copies, and has the main thread raise for a second Ctrl-C.

Schedulers and terminals signal DataLoader workers too. PyTorch's workers die of a SIGTERM that
their parent did not send, and the parent then fails with "DataLoader worker exited
unexpectedly". Workers therefore ignore these signals (they still exit when the main process
shuts them down or dies), and they are started with the signals blocked so that none can arrive
before they ignore it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("vit")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
REPEAT_S = 1.0  # copies of one request (torchrun's, scancel's) arrive within milliseconds
ACKNOWLEDGED = (
    "%s received: the run stops before its next micro-batch and saves its last whole step; "
    "Ctrl-C again stops it at once, saving nothing more"
)
SECOND_CTRL_C = (
    "a second Ctrl-C stopped the run at once, saving nothing more; files saved before are "
    "intact (saves are atomic), and --resume auto continues from the last saved state, if any"
)


class StopRequest:
    """A stop signal asks the loop to stop before its next micro-batch, save, and exit
    resumable; ``signum`` is the first one's."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.first: float | None = None  # when the first signal arrived (time.monotonic)
        self.at_once = self.raised = False  # a second Ctrl-C came; the main thread raised it
        self.acknowledged = False
        self.lock = threading.RLock()
        self.previous = {  # one ignored from the start stays so: SIGHUP under nohup
            sig: signal.signal(sig, self._handle)
            for sig in SIGNALS
            if signal.getsignal(sig) != signal.SIG_IGN
        }
        self.read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        self.previous_fd = signal.set_wakeup_fd(self.write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="stop signals", daemon=True).start()

    def restore(self) -> None:
        signal.set_wakeup_fd(self.previous_fd)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.write(self.write, b"\0")  # ends the watch
        os.close(self.write)

    def _watch(self) -> None:
        """Each signal's number as it arrives: the first is acknowledged, and a Ctrl-C that
        comes ``REPEAT_S`` after it makes the main thread raise, at once."""
        while (data := os.read(self.read, 64)) and 0 not in data:
            for signum in (s for s in data if s in SIGNALS):
                now = time.monotonic()
                if self.first is None:
                    self.first = now
                    self._acknowledge(signum)
                elif signum == signal.SIGINT and now - self.first >= REPEAT_S:
                    with self.lock:  # the main thread sees at_once only once its signal is sent
                        if not self.at_once:
                            self.at_once = True
                            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        os.close(self.read)

    def _acknowledge(self, signum: int) -> None:
        """Note the stop, and say so once: from the watch, or from the handler where it runs
        first. (The watch alone times the copies, each of which it reads once.)"""
        with self.lock:
            self.signum = self.signum or signum
            said, self.acknowledged = self.acknowledged, True
        if not said:
            log.info(ACKNOWLEDGED, signal.Signals(signum).name)  # a closed terminal: no-op

    def _handle(self, signum, frame) -> None:
        """Python's handler, in the main thread: the stop is noted here too (the watch may be
        later), and a second Ctrl-C raised once, however many signals carried it."""
        self._acknowledge(signum)  # before the stop's own line, where the main thread is first
        with self.lock:
            second = self.at_once and not self.raised
            self.raised = self.raised or second
        if second:
            raise KeyboardInterrupt(SECOND_CTRL_C)  # stops at once; run_main prints it


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold the stop signals back from this thread (and the processes it forks) meanwhile; one
    that arrives is delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: leave the stop signals to the main process."""
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
