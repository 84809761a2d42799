"""Preemption and Ctrl-C: finish the step, save, and exit resumable."""

from __future__ import annotations

import signal


class StopRequest:
    """SIGTERM or SIGINT asks the loop to finish its step, save, and exit resumable."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum
