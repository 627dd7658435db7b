"""Training robustness: one run per workdir (the lock), checksums of checkpointed arrays, a
NaN right after a restore, a full disk."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from facecam_jax import sharding as sh
from facecam_jax.errors import CheckpointSaveError, TrainingDiverged, WorkdirLocked
from facecam_jax.runtime.config_file import load_config as get_config
from facecam_jax.training import integrity, lock, metric_logger, run_state, trainer
from facecam_jax.training.run_state import Checkpoints
from facecam_jax.training.train_step import build_program

BASE = "mini,frames=9,batch_size=2"  # as tests/test_train.py: 9 frames at 64x48, one device


def one_device_mesh():
    return sh.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])


def train(config, workdir):
    return trainer.train(config, workdir, mesh=one_device_mesh())


def _logged_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _steps(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """Two steps checkpointed after each: checkpoints 1 and 2 (copy before changing it)."""
    workdir = str(tmp_path_factory.mktemp("run2") / "run")
    train(get_config(BASE + ",steps=2,checkpoint_every=1"), workdir)
    return workdir


def _copy(workdir, tmp_path):
    return shutil.copytree(workdir, str(tmp_path / "copy"))


# --------------------------------------------------------------------------- the workdir lock


def test_a_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "run")
    with lock.WorkdirLock(workdir, "training") as held:
        with pytest.raises(WorkdirLocked) as second:
            lock.WorkdirLock(workdir).acquire()
        text = str(second.value)
        assert "\n" not in text and text.startswith(f"{os.path.abspath(workdir)} is in use by a training run")
        assert f"host {socket.gethostname()}, pid {os.getpid()} (this process), started 20" in text
        assert held.path in text
        t0 = time.perf_counter()
        with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
            train(get_config(BASE + ",steps=1"), workdir)
        assert time.perf_counter() - t0 < 10
        assert os.listdir(workdir) == [lock.LOCK_NAME]  # the second run wrote nothing
    assert not os.path.exists(held.path)


def _dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()  # exited and reaped: nothing runs under that pid (until it is reused)
    return child.pid


@pytest.mark.parametrize("host, age_s, reason", [
    ("this", 0, "is not running"),
    ("other", 3600, "its heartbeat stopped 60 min ago"),
    ("other", 60, None),  # another host, refreshed a minute ago: held
])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, host, age_s, reason):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    path = os.path.join(workdir, lock.LOCK_NAME)
    stale = {"what": "training", "host": socket.gethostname() if host == "this" else "elsewhere.example",
             "boot_id": None, "pid": _dead_pid() if host == "this" else 4242, "pid_start": None,
             "started": time.time() - age_s, "token": "0123456789abcdef"}
    with open(path, "w") as f:
        json.dump(stale, f)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    held = lock.WorkdirLock(workdir)
    if reason is None:
        with pytest.raises(WorkdirLocked, match=r"a training run on host elsewhere\.example, pid 4242, started .*"
                                                r"refreshed 60 s ago"):
            held.acquire()
        return
    with caplog.at_level("WARNING", logger="facecam_jax.training.lock"):
        held.acquire()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "facecam_jax.training.lock"]
    assert f"taking over the stale lock {path}" in warning and f"pid {stale['pid']}" in warning
    assert reason in warning
    with open(path) as f:
        assert json.load(f)["pid"] == os.getpid()
    held.release()
    assert os.listdir(workdir) == []  # no claim file left


def test_the_lock_is_held_while_training_and_released_when_it_returns_is_preempted_or_fails(run2, tmp_path,
                                                                                           monkeypatch):
    workdir = _copy(run2, tmp_path)
    path = os.path.join(workdir, lock.LOCK_NAME)
    seen = []
    logged = metric_logger.Logger.__call__

    def log_and_look(self, step, metrics):
        logged(self, step, metrics)
        with open(path) as f:
            seen.append((step, json.load(f)["pid"]))
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metric_logger.Logger, "__call__", log_and_look)
    config = get_config(BASE + ",steps=4,checkpoint_every=1")
    assert train(config, workdir).preempted and not os.path.exists(path)
    assert train(config, workdir).step == 4 and not os.path.exists(path)
    assert seen == [(3, os.getpid()), (4, os.getpid())]
    config.train.trainable = ("selfattn",)
    with pytest.raises(ValueError, match="matches no DiT parameter"):
        train(config, workdir)
    assert not os.path.exists(path)


# --------------------------------------------------------------------------- checksums


@pytest.fixture(scope="module")
def program():
    config = get_config(BASE)
    with sh.use_mesh(one_device_mesh(), sh.DEFAULT_RULES):
        return config, build_program(config, one_device_mesh(), sh.DEFAULT_RULES)


def test_an_array_changed_on_disk_sets_the_step_aside(run2, program, tmp_path, caplog):
    """Random bytes written into a step's array file either break a zstd chunk (set aside as
    unreadable, as before) or decode to other values, which Orbax restores without complaint;
    only the checksums see those. TensorStore writes such a change deterministically: one
    element of one array, every chunk still valid."""
    config, prog = program
    workdir = _copy(run2, tmp_path)
    train_dir = os.path.join(workdir, "checkpoints", "2", "train")
    array = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{train_dir}/",
                                                    "path": "params.blocks.self_attn.q.kernel/"}}).result()
    array[0, 0, 0].write(array[0, 0, 0].read().result() + 1).result()
    ckpt = Checkpoints(workdir, 3, config)
    with caplog.at_level("WARNING", logger="facecam_jax.training.run_state"), \
            sh.use_mesh(one_device_mesh(), sh.DEFAULT_RULES):
        restored = ckpt.restore(prog.state)
    ckpt.close()
    assert (restored.step, restored.batches, int(restored.state.step)) == (1, 1, 1)
    assert _steps(workdir) == ["1", "2.damaged-checksum-mismatch"]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "facecam_jax.training.run_state"]
    assert "checkpoint step 2" in warning and "resuming from step 1" in warning
    assert "1 of " in warning and "differ from the checksums taken when it was saved (e.g. " \
        "params.blocks.self_attn.q.kernel)" in warning


def test_checksums_depend_on_every_bit_and_position_not_on_the_sharding():
    x = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    base = integrity.checksums({"x": x})["x"]
    flipped = x.copy()
    flipped.view(np.uint32)[2, 3] ^= 1  # one bit of one element
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values elsewhere
    assert integrity.checksums({"x": flipped})["x"] != base != integrity.checksums({"x": swapped})["x"]
    mesh = sh.make_mesh(2, 1, 1, 1, devices=jax.devices()[:2])
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    assert integrity.checksums({"x": sharded})["x"] == base


# --------------------------------------------------------------------------- NaN after a restore


@pytest.mark.parametrize("finite_steps", [0, 1])
def test_a_nan_soon_after_a_restore_names_the_checkpoint_and_writes_no_new_step(run2, tmp_path, monkeypatch,
                                                                                  finite_steps):
    """Resumed at step 2, the loss is NaN at the first (or second) step: the checkpoint is
    named, and no step 2 (or 3) is written as a "last finite" state for restarts to resume."""
    workdir = _copy(run2, tmp_path)
    programs = []
    real_build = trainer.build_program

    def poison(program):  # a NaN text context makes the loss and every gradient NaN inside the step
        program.context = program.context * np.nan

    def build(*args, **kwargs):
        programs.append(real_build(*args, **kwargs))
        if finite_steps == 0:
            poison(programs[0])
        return programs[0]

    logged = metric_logger.Logger.__call__

    def log_then_poison(self, step, metrics):
        logged(self, step, metrics)
        if step == 2 + finite_steps:
            poison(programs[0])

    monkeypatch.setattr(trainer, "build_program", build)
    monkeypatch.setattr(metric_logger.Logger, "__call__", log_then_poison)
    with pytest.raises(TrainingDiverged) as error:
        train(get_config(BASE + ",steps=6,checkpoint_every=10,log_every=1"), workdir)
    text = str(error.value)
    print(text)
    where = os.path.join(workdir, "checkpoints", "2")
    assert text.startswith(f"step {2 + finite_steps}: loss nan / grad norm nan is not finite")
    assert f"after resuming from checkpoint step 2 ({where}): that checkpoint is the likely cause" in text
    assert "no new checkpoint was written" in text and f"move {where} aside" in text
    assert ("in the first step after" in text) == (finite_steps == 0)
    assert _steps(workdir) == ["1", "2"]  # before: a NaN at step 3 wrote step 3 as the "last finite" state


# --------------------------------------------------------------------------- a full disk


def test_no_room_for_a_checkpoint_stops_at_once_in_one_line_and_keeps_the_others(run2, tmp_path, monkeypatch):
    workdir = _copy(run2, tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(run_state.shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    with pytest.raises(CheckpointSaveError) as error:
        train(get_config(BASE + ",steps=6,checkpoint_every=1"), workdir)
    text = str(error.value)
    print(text)
    assert "\n" not in text
    assert text.startswith(f"could not save checkpoint step 3 in {os.path.join(workdir, 'checkpoints')}: "
                           "not enough free space (a step needs about ")
    assert "judged by step 2; 10.0 KB free). The checkpoints there are kept (1, 2)" in text
    assert text.endswith("then start the same command again to resume from step 2")
    assert _steps(workdir) == ["1", "2"] and _logged_steps(workdir)[-1] == 3  # stopped at the first save
    assert not os.path.exists(os.path.join(workdir, lock.LOCK_NAME))


def test_a_save_failing_on_a_full_disk_stops_the_run_at_the_next_step(run2, tmp_path, monkeypatch, capsys):
    """Orbax reports TensorStore's ENOSPC from its background thread at the next save (here 3
    steps later) after ~100 lines of tracebacks; now it is one line at the next step."""
    workdir = _copy(run2, tmp_path)
    real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    saved = []

    def save(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        saved.append(step)

    def wait(self):  # the background write of a save fails (as TensorStore's error reaches Orbax)
        real_wait(self)
        if saved:
            saved.clear()
            raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "manifest.ocdbt": Failed to write 115 '
                             "bytes to file 12: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
    monkeypatch.setattr(ocp.CheckpointManager, "is_saving_in_progress", lambda self: False)  # finished at once
    config = get_config(BASE + ",steps=9,checkpoint_every=3,log_every=1")
    with pytest.raises(CheckpointSaveError, match=r"could not save checkpoint step 3 in .*: no space left on the "
                                                  r"device \(a step needs about .*judged by step 2"):
        train(config, workdir)
    assert _logged_steps(workdir)[-1] == 3  # stopped during step 4, not at step 6's save
    # A save that raises ENOSPC itself: the same line, at once.
    def no_space(self, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
    with pytest.raises(CheckpointSaveError, match=r"step 6 .*: no space left on the device.*kept \(1, 2, 3\)"):
        train(config, workdir)
    assert _logged_steps(workdir)[-1] == 6
