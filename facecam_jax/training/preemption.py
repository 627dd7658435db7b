"""Stopping a training run cleanly on SIGTERM / SIGINT (spot preemption, SLURM, Ctrl-C).

``Preemption`` installs handlers that only record the signal; the loop asks ``stop()`` after
every step, saves a checkpoint and returns. ``stop()`` is agreed by every process (a one-int
all-gather per step in a multi-process run), so all of them stop after the same step even
when only one was signalled. A second signal ends the process at once with the signal's
usual status (143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Context manager: while open, SIGTERM and SIGINT ask the run to stop after its step."""

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is not threading.main_thread():
            log.info("training outside the main thread: SIGTERM / SIGINT are not caught (no clean stop)")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the second one: stop now, as if unhandled
            os.write(2, f"\n{name} again: exiting at once\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        # os.write: a handler may run in the middle of a print or a log call on this thread.
        os.write(2, f"\n{name} received: finishing this step, then saving a checkpoint and stopping "
                    f"(send it again to exit at once)\n".encode())

    @property
    def signal_name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def stop(self) -> bool:
        """Whether any process has been signalled; every process must call it at the same
        points (one small all-gather in a multi-process run)."""
        local = self.received is not None
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))
