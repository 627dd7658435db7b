"""Progress bars for every long step (training, sampling, dataset preparation, checkpoints).

    from facecam_jax.runtime import progress
    for path in progress.bar(paths, desc="convert", unit="file"): ...
    with progress.bar(total=steps, initial=start, desc="train", unit="step") as pbar:
        ...
        pbar.set_postfix(loss=f"{loss:.4f}", step_s=f"{dt:.2f}", refresh=False)
        pbar.update()

A bar is a plain ``tqdm``. It is silent on every process but JAX process 0 (so a multi-host
run draws one bar), and when stderr is not a terminal (a log file, a batch job) it writes a
plain line at the start, at most one every ``interval`` seconds, and one at the end, instead
of redrawing a line with carriage returns. Importing this module does not import JAX.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between the lines of a bar written to a log (stderr not a TTY)
DELAY = 1.0  # a `delay=` for work that is often instant (small checkpoints): no bar below it


def process_index() -> int:
    """JAX's process index, 0 while JAX is not imported or its backends not yet started.

    Starting the backends here would be a side effect (and too early before
    ``jax.distributed.initialize``), so a bar made before that counts as process 0's.
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return 0
    from jax._src import xla_bridge  # private, so looked up defensively

    started = getattr(xla_bridge, "backends_are_initialized", lambda: True)
    return jax.process_index() if started() else 0


class _LogLines(tqdm):
    """tqdm for logs: one plain line per display, at most one every ``mininterval`` seconds
    however often it is updated (``set_postfix`` too), and one when it closes unless the last
    line already showed the final count."""

    def __init__(self, *args, **kwargs):
        self._last_line, self._last_state = None, None
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg is not None:  # tqdm clearing its line: nothing to clear in a log
            return False
        now = time.monotonic()
        if self._last_line is None or now - self._last_line >= self.mininterval:
            self._write_line(now)
        return True

    def _write_line(self, now: float) -> None:
        self._last_line, self._last_state = now, (self.n, self.postfix)
        self.fp.write(self.format_meter(**self.format_dict) + "\n")
        self.fp.flush()

    def close(self):
        if (not getattr(self, "disable", True) and getattr(self, "_last_line", None) is not None
                and self._last_state != (self.n, self.postfix)):  # else the last line says it all
            with self._lock:
                self._ema_dt = lambda: None  # the final line shows the overall rate
                self._write_line(time.monotonic())
        self.leave = False  # tqdm's own close then only "clears", which display() ignores
        super().close()


def bar(iterable: Iterable | None = None, total: float | None = None, *, desc: str | None = None,
        unit: str = "it", interval: float = LOG_INTERVAL, **kwargs: Any) -> tqdm:
    """A tqdm over ``iterable`` (or updated by hand up to ``total``), on stderr.

    Disabled on JAX processes other than 0. When stderr is not a TTY, a line every
    ``interval`` seconds (and at the start and end) instead of a redrawn bar. Other keyword
    arguments (``initial``, ``leave``, ``postfix``, ``disable``...) go to tqdm.
    """
    kwargs.setdefault("file", sys.stderr)
    if process_index() != 0:
        kwargs["disable"] = True
    isatty = getattr(kwargs["file"], "isatty", None)
    if isatty is not None and isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, **kwargs)
    # miniters=1: a time-only schedule (tqdm's adaptive miniters can go quiet for long stretches
    # when steps slow down).
    return _LogLines(iterable, total=total, desc=desc, unit=unit, mininterval=interval, miniters=1,
                     ascii=True, **kwargs)
