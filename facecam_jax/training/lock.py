"""A lock on a directory that one run writes (a training workdir; a batch-sampling output
directory alike): a second run on it fails at once with one line naming the holder, instead of
both interleaving their logs and racing on the same checkpoints.

The lock is the file ``<directory>/facecam.lock``, created with ``O_CREAT | O_EXCL`` (atomic on
local file systems and on NFS, where ``flock`` is per host, or unsupported on Lustre and some
FUSE mounts), holding JSON about the holder: host, boot id, pid and the pid's start time, when
it started, what it does, and a random token. While it is held a daemon thread touches the
file every ``HEARTBEAT_S``; the holder deletes it on release (a context manager: a normal end,
an exception, a preemption).

A lock whose holder died (SIGKILL, a crash, a reboot) is stale and is taken over with a
warning: on the holder's host when its pid is gone (or is another process now: another start
time, or the machine rebooted: another boot id); from another host, where the pid cannot be
asked, when its heartbeat is older than ``STALE_AFTER_S`` (10 minutes: ten missed heartbeats,
with room for clock skew between hosts). Two runs that find the same stale lock at once race
through a claim file (``O_EXCL`` again): one takes it over, the other then finds it held.

``held_by_process_zero`` takes it once for a multi-process run: process 0 holds it, and every
process fails alike when it cannot.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from facecam_jax.errors import WorkdirLocked

log = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "WorkdirLock", "WorkdirLocked", "held_by_process_zero"]

LOCK_NAME = "facecam.lock"
HEARTBEAT_S = 60.0  # how often a holder touches its lock file
STALE_AFTER_S = 600.0  # a lock from another host without a heartbeat for this long is taken over
WRITING_S = 10.0  # an unreadable lock file younger than this is being written (O_EXCL, then JSON)
CLAIM_STALE_S = 60.0  # a takeover claim older than this was left by a run that died taking over
_TRIES = 100
_PAUSE_S = 0.05


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux; None elsewhere or when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses


def _start_time(pid: int) -> str | None:
    """When ``pid`` started, in clock ticks after boot (field 22 of its stat), or None where unknown."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    fields = _proc_stat(pid)
    return not (fields and fields[0] == "Z")  # a zombie has exited


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(sep=" ", timespec="seconds")


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _read(path: str) -> tuple[dict | None, float | None]:
    """(holder, mtime) of a lock file: holder None when it cannot be parsed, mtime None when
    the file is gone."""
    try:
        mtime = os.stat(path).st_mtime
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(text)
    except ValueError:
        return None, mtime
    return (holder if isinstance(holder, dict) and "token" in holder else None), mtime


def _same(a: tuple[dict | None, float | None], b: tuple[dict | None, float | None]) -> bool:
    """Whether two reads of a lock file saw the same lock."""
    if a[0] is not None and b[0] is not None:
        return a[0]["token"] == b[0]["token"]
    return a[0] is None and b[0] is None and a[1] == b[1]


class WorkdirLock:
    """Context manager: ``directory`` locked for one ``what`` run ("training", "sampling").

    ``acquire`` raises ``WorkdirLocked`` (one line: host, pid, start time) while another live
    run holds it and takes a stale lock over with a warning."""

    def __init__(self, directory: str, what: str = "training", *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.what, self.heartbeat_s, self.stale_after_s = what, heartbeat_s, stale_after_s
        self.holder: dict | None = None  # what this object wrote, while it holds the lock
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ acquire

    def acquire(self) -> None:
        if self.holder is not None:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock")
        os.makedirs(self.directory, exist_ok=True)
        pid = os.getpid()
        me = {"what": self.what, "host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid,
              "pid_start": _start_time(pid), "started": time.time(), "token": secrets.token_hex(8)}
        for _ in range(_TRIES):
            if self._create(me):
                self.holder = me
                self._stop.clear()
                self._beat = threading.Thread(target=self._heartbeat, name=f"{LOCK_NAME} heartbeat", daemon=True)
                self._beat.start()
                return
            seen = _read(self.path)
            holder, mtime = seen
            if mtime is None:  # released in between: try again
                continue
            if holder is None and time.time() - mtime < WRITING_S:  # its holder is writing it
                time.sleep(_PAUSE_S)
                continue
            reason = self.stale_reason(holder, mtime)
            if reason is None:
                raise WorkdirLocked(self._busy(holder, mtime))
            self._take_over(seen, reason)
        holder, mtime = _read(self.path)
        raise WorkdirLocked(self._busy(holder, mtime) if mtime is not None else
                            f"could not create the lock file {self.path} after {_TRIES} tries")

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def stale_reason(self, holder: dict | None, mtime: float) -> str | None:
        """Why the lock left by ``holder`` is stale (its holder is gone), or None while it may live."""
        if holder is None:
            return f"it cannot be read (written {_ago(time.time() - mtime)} ago)"
        pid = int(holder.get("pid", -1))
        if holder.get("host") == socket.gethostname():
            boot = _boot_id()
            if holder.get("boot_id") and boot and holder["boot_id"] != boot:
                return "its host has rebooted since"
            if not _alive(pid):
                return f"pid {pid} is not running"
            start = _start_time(pid)
            if holder.get("pid_start") and start and holder["pid_start"] != start:
                return f"pid {pid} is another process now"
            return None
        age = time.time() - mtime
        if age > self.stale_after_s:
            return (f"its heartbeat stopped {_ago(age)} ago (a run on another host is taken as gone after "
                    f"{_ago(self.stale_after_s)})")
        return None

    def _take_over(self, seen: tuple[dict | None, float | None], reason: str) -> None:
        """Deletes the stale lock ``seen`` unless another run is taking it over (or took it)."""
        holder, mtime = seen
        claim = f"{self.path}.takeover-{holder['token'] if holder else int(mtime * 1e6)}"
        try:
            os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:  # another run is taking it over; wait for it
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(claim).st_mtime > CLAIM_STALE_S:
                    os.unlink(claim)
            time.sleep(_PAUSE_S)
            return
        try:
            if _same(_read(self.path), seen):  # still the stale one: nobody replaced it
                os.unlink(self.path)
                log.warning("taking over the stale lock %s of %s: %s", self.path, self._describe(holder, mtime),
                            reason)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claim)

    def _describe(self, holder: dict | None, mtime: float) -> str:
        if holder is None:
            return "an unknown run (the lock file cannot be read)"
        pid = holder.get("pid")
        this = " (this process)" if holder.get("host") == socket.gethostname() and pid == os.getpid() else ""
        started = _when(holder["started"]) if isinstance(holder.get("started"), (int, float)) else "?"
        return f"a {holder.get('what', '?')} run on host {holder.get('host', '?')}, pid {pid}{this}, started {started}"

    def _busy(self, holder: dict | None, mtime: float) -> str:
        return (f"{self.directory} is in use by {self._describe(holder, mtime)} (lock file {self.path}, refreshed "
                f"{_ago(time.time() - mtime)} ago). Wait for that run to end or stop it, or use another directory; "
                f"if that run is gone, delete the lock file (a lock from another host is taken over automatically "
                f"{_ago(self.stale_after_s)} after its last refresh)")

    # ------------------------------------------------------------------ hold, release

    def _heartbeat(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError as e:
                if not warned:
                    log.warning("cannot refresh the lock %s (%s): another run may take it over", self.path, e)
                    warned = True

    def release(self) -> None:
        """Deletes the lock file if this object still holds it (a no-op in a forked child)."""
        if self.holder is None or self.holder["pid"] != os.getpid():
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        holder, mtime = _read(self.path)
        if holder is not None and holder["token"] == self.holder["token"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
            log.warning("the lock %s was deleted or taken over while this run held it", self.path)
        self.holder = None


@contextlib.contextmanager
def held_by_process_zero(directory: str, what: str = "training"):
    """``WorkdirLock(directory, what)`` taken once for the whole run: by process 0, the others
    only learn whether it could (one all-gather), so that every process fails alike and none
    waits for the others in a collective. Yields the lock (None on other processes)."""
    lock = WorkdirLock(directory, what) if jax.process_index() == 0 else None
    error: BaseException | None = None
    if lock is not None:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001  raised below, after the others have heard of it
            error = e
    if jax.process_count() > 1:
        ok = bool(np.all(multihost_utils.process_allgather(np.int32(error is None))))
        if not ok and error is None:
            error = WorkdirLocked(f"process 0 could not lock {os.path.abspath(directory)} for this {what} run "
                                  "(its error says why: most likely another run holds it)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
