"""Progress bars: silent off process 0, periodic plain lines when stderr is not a terminal."""

import io
import time

import jax

from facecam_jax.runtime import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_only_process_zero_draws(monkeypatch):
    jax.devices()  # backends started: the helper asks JAX for the process index
    assert progress.process_index() == 0
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    assert progress.process_index() == 1
    for out in (io.StringIO(), _Terminal()):
        pbar = progress.bar(total=3, desc="train", file=out, interval=0.0)
        for _ in range(3):
            pbar.set_postfix(loss=1.0)
            pbar.update()
        pbar.close()
        assert pbar.disable and out.getvalue() == ""


def test_log_lines_are_periodic_and_plain():
    out = io.StringIO()  # not a TTY
    with progress.bar(total=200, desc="train", unit="step", file=out, interval=60.0) as pbar:
        for step in range(200):
            pbar.set_postfix(loss=0.5, step_s=0.01)  # refreshes (tqdm's default) are rate-limited too
            pbar.update()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2  # the start and the end, nothing between
    assert lines[0].startswith("train:   0%") and "0/200" in lines[0]
    assert "200/200" in lines[1] and "loss=0.5" in lines[1] and "step_s=0.01" in lines[1]

    out = io.StringIO()
    for _ in progress.bar(range(4), desc="slow", file=out, interval=0.05):
        time.sleep(0.06)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("slow: 100%")  # the start, then every (slow) step


def test_terminal_gets_a_redrawn_bar():
    out = _Terminal()
    for _ in progress.bar(range(3), desc="prepare", file=out):
        pass
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()


def test_short_work_with_a_delay_prints_nothing():
    out = io.StringIO()
    for _ in progress.bar(range(50), desc="loading", file=out, delay=progress.DELAY):
        pass
    assert out.getvalue() == ""
