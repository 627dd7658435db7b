"""Scale-out training on 8 fake CPU devices and as two processes: the same losses and trained
parameters as one device, checkpoints that resume on another mesh or process count, and one
clear error for each set-up that cannot work.

Tolerances were measured (fp32, tiny DiT, mini VAE, 9 frames): every mesh agrees with one
device to ~1e-6 in the trained parameters and ~1e-7 in the loss (the order of reductions
differs across devices), so 1e-5 is allowed for both.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from facecam_jax import build
from facecam_jax import sharding as sh
from facecam_jax.checkpoints.dit_naming import keys_of_paths, named_variables
from facecam_jax.checkpoints.io import open_checkpoint
from facecam_jax.errors import DistributedSetupError
from facecam_jax.runtime.config_file import load_config as get_config
from facecam_jax.training import trainer
from facecam_jax.training.distributed import initialize_distributed

BASE = "mini,frames=9,batch_size=2"
TOL = 1e-5


def _mesh(data=1, fsdp=1, context=1, tensor=1):
    n = data * fsdp * context * tensor
    return sh.make_mesh(data, fsdp, context, tensor, devices=jax.devices()[:n])


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def _trained(model):
    _, params, _ = nnx.split(model, nnx.All(nnx.Param, build.trainable_filter(("self_attn", "patch_embedding"))), ...)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _assert_close(got, want, what):
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    print(f"{what}: max abs diff {err:.2e}")
    assert err < TOL, what


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The reference: two steps on one device."""
    workdir = str(tmp_path_factory.mktemp("one_device"))
    result = trainer.train(get_config(BASE + ",steps=2,checkpoint_every=1"), workdir, mesh=_mesh())
    return _losses(workdir), _trained(result.model)


def test_fsdp8_trains_like_one_device_and_resumes_on_data_context_and_tensor_parallel(one_device, tmp_path):
    """fsdp 8 trains like one device; its step-1 checkpoint resumes on data 2 x context 2 x
    tensor 2 (batch split over data, the sequence over context with chunked attention, each
    device attending with KV all-gathered; heads and MLP tensor-parallel) and reaches the same
    step 2 as the uninterrupted runs."""
    losses, params = one_device
    fsdp = str(tmp_path / "fsdp8")
    straight = trainer.train(get_config(BASE + ",steps=2,checkpoint_every=1"), fsdp, mesh=_mesh(fsdp=8))
    np.testing.assert_allclose([_losses(fsdp)[s] for s in (1, 2)], [losses[1], losses[2]], rtol=TOL)
    _assert_close(_trained(straight.model), params, "fsdp 8 vs 1 device")

    moved = str(tmp_path / "moved")
    shutil.copytree(os.path.join(fsdp, "checkpoints", "1"), os.path.join(moved, "checkpoints", "1"))
    resumed = trainer.train(get_config(BASE + ",steps=2,checkpoint_every=1,model.attention=chunked"), moved,
                            mesh=_mesh(data=2, context=2, tensor=2))
    assert resumed.step == 2 and list(_losses(moved)) == [2]  # it ran step 2 only
    np.testing.assert_allclose(_losses(moved)[2], losses[2], rtol=TOL)
    _assert_close(_trained(resumed.model), _trained(straight.model),
                  "resumed on data 2 x context 2 x tensor 2 vs straight fsdp 8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# `python -m facecam_jax.train` whose process sends itself SIGTERM while logging step N (as a
# preemption would, mid-run), so that the test knows which step it lands in.
_SIGTERM_AT = """import os, runpy, signal, sys
from facecam_jax.training import metric_logger
at, log = int(sys.argv.pop(1)), metric_logger.Logger.__call__
def preempted(self, step, metrics):
    log(self, step, metrics)
    if step == at:
        os.kill(os.getpid(), signal.SIGTERM)
metric_logger.Logger.__call__ = preempted
runpy.run_module("facecam_jax.train", run_name="__main__")
"""


def _launch(process_id: int, num_processes: int, port: int, workdir: str, *extra: str,
            sigterm_at: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    program = ["-m", "facecam_jax.train"] if sigterm_at is None else ["-c", _SIGTERM_AT, str(sigterm_at)]
    cmd = [sys.executable, *program, f"--config=configs/facecam.py:{BASE},steps=2",
           f"--workdir={workdir}", f"--config.distributed.coordinator_address=localhost:{port}",
           f"--config.distributed.num_processes={num_processes}", f"--config.distributed.process_id={process_id}",
           "--config.distributed.initialization_timeout=120", *extra]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_train_like_one_stop_together_and_resume_in_one(one_device, tmp_path):
    """2 processes x 4 devices (fsdp 8 over both, gloo all-reduces): SIGTERM to process 1 alone
    in step 1 stops both after step 1 with one checkpoint written together, exit 0; that
    checkpoint resumes in a single process on 8 devices and gives the 1-device losses and weights.
    (A 2-process launch costs a minute on two cores, so the suite launches one round.)"""
    losses, params = one_device
    workdir = str(tmp_path / "two")
    port = _free_port()
    procs = [_launch(0, 2, port, workdir), _launch(1, 2, port, workdir, sigterm_at=1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "SIGTERM received" in outs[1][1]
    assert "preempted at step 1 (a signal to another process): checkpoint saved" in outs[0][1], outs[0][1][-3000:]
    assert "run summary: steps 0 -> 1 of 2 (1 this run, preempted by a signal to another process)" in outs[0][1]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"] and list(_losses(workdir)) == [1]
    assert not os.path.exists(os.path.join(workdir, "facecam.safetensors"))
    # One process, 8 devices, the same mesh size: step 2 from the 2-process checkpoint.
    again = trainer.train(get_config(BASE + ",steps=2"), workdir, mesh=_mesh(fsdp=8))
    assert again.step == 2
    got = _losses(workdir)  # step 1 by the 2 processes, step 2 after the resume
    np.testing.assert_allclose([got[1], got[2]], [losses[1], losses[2]], rtol=TOL)
    _assert_close(_trained(again.model), params, "2 processes, then 1, vs 1 device")
    exported = open_checkpoint(os.path.join(workdir, "facecam.safetensors"))
    assert set(exported) == set(keys_of_paths(again.model.config, [p for p, _ in named_variables(
        nnx.split(again.model, nnx.All(nnx.Param, build.trainable_filter(("self_attn", "patch_embedding"))), ...)[1])]))


def test_a_process_count_that_does_not_match_the_coordinator_is_one_clear_error(tmp_path):
    port = _free_port()
    coordinator = _launch(0, 2, port, str(tmp_path / "run"))
    try:
        wrong = _launch(1, 3, port, str(tmp_path / "run"))
        _, err = wrong.communicate(timeout=300)
    finally:
        coordinator.kill()
        coordinator.communicate()
    assert wrong.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: this process was started with distributed.num_processes=3") and "runs 2" in last
    assert "Traceback" not in err


def test_bad_meshes_and_batches_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs 6 devices, but 8 are visible"):
        sh.make_mesh(1, 3, 2, 1)
    with pytest.raises(ValueError, match="8 devices do not split into mesh"):
        sh.make_mesh(1, -1, 3, 1)
    with pytest.raises(ValueError, match=r"batch_size 3 does not divide over mesh.data=2"):
        trainer.train(get_config("mini,frames=9,batch_size=3"), str(tmp_path / "run"), mesh=_mesh(data=2, fsdp=4))
    config = get_config(BASE)
    config.distributed.coordinator_address = "localhost:1"
    config.distributed.num_processes, config.distributed.process_id = 2, 2
    # The config check says it before anything starts; the join itself refuses it too.
    with pytest.raises(ValueError, match=r"distributed.process_id=2 must be < distributed.num_processes=2"):
        trainer.train(config, str(tmp_path / "run"))
    with pytest.raises(DistributedSetupError, match=r"process_id must be in \[0, num_processes=2\)"):
        initialize_distributed(config.distributed)
