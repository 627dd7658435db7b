"""tools/cluster: the SLURM recipe trains in 2 processes (SLURM's environment set by hand, as
jax.distributed reads it) like 1 process; the TPU JobSet's hosts are the slice libtpu describes."""

import json
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "tools", "cluster")
sys.path.insert(0, CLUSTER)
import tpu_jobset  # noqa: E402

CONFIG = "configs/facecam.py:mini,frames=9,batch_size=2,steps=2"


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def _slurm_job_id() -> int:
    """A job id whose port (jax: 61440 + id % 4096) is free here."""
    for job in range(4096):
        with socket.socket() as s:
            try:
                s.bind(("localhost", 61440 + job))
            except OSError:
                continue
            return 1000 * 4096 + job
    pytest.skip("no free port in 61440-65535 for jax's SLURM coordinator")


def _task(workdir: str, devices: int, slurm: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    env.update(slurm or {})
    cmd = ["bash", os.path.join(CLUSTER, "slurm_task.sh"), CONFIG, workdir,
           "--config.distributed.initialization_timeout=120"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_slurm_recipe_two_processes_train_like_one(tmp_path):
    """slurm_task.sh as srun starts it on 2 nodes (1 device each, fsdp 2 over both, gloo) trains
    2 steps with the losses of one process on 2 devices."""
    one = _task(str(tmp_path / "one"), 2)
    _, err_one = one.communicate(timeout=600)
    assert one.returncode == 0, err_one[-3000:]
    job = _slurm_job_id()
    slurm = lambda i: {"SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",  # noqa: E731
                       "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "2"}
    two = [_task(str(tmp_path / "two"), 1, slurm(i)) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in two]
    for p, (_, err) in zip(two, outs):
        assert p.returncode == 0, err[-3000:]
    assert "on 2 cpu devices (2 processes)" in outs[0][1], outs[0][1][-3000:]  # one run joined over SLURM's env
    assert "on 2 cpu devices (1 processes)" in err_one, err_one[-3000:]
    want, got = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "two"))
    assert sorted(got) == sorted(want) == [1, 2]
    np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=1e-5)


def test_sbatch_script_starts_one_task_script_per_node(tmp_path):
    """The batch script hands its arguments to slurm_task.sh through srun (a stand-in srun here
    records its command line), and without a config and workdir it says how to call it."""
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
    script = os.path.join(CLUSTER, "slurm_train.sbatch")
    ok = subprocess.run(["bash", script, "configs/facecam.py:nersemble", "/shared/run", "--config.steps=10"],
                        cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    args = (tmp_path / "srun.args").read_text().split("\n")
    at = args.index("tools/cluster/slurm_task.sh")
    assert args[at + 1:at + 4] == ["configs/facecam.py:nersemble", "/shared/run", "--config.steps=10"]
    assert "--kill-on-bad-exit=1" in args[:at]
    bad = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("usage: sbatch tools/cluster/slurm_train.sbatch")


@pytest.mark.parametrize("topology", ["v5p:4x4x4", "v6e:4x4", "v5e:2x2"])
def test_tpu_jobset_runs_one_pod_per_host_of_the_slice(topology):
    """The JobSet's pods x TPU chips per pod are the slice's chips, one pod per host, as libtpu's
    compile-only client describes that topology (the hosts are its devices' process indices)."""
    pytest.importorskip("libtpu", reason="libtpu describes the TPU slices (pip install -e '.[tpu]')")
    from facecam_jax.perf import chips

    devices = chips.tpu_topology(topology)
    out = tpu_jobset.manifest(topology, "registry/facecam:1", "configs/facecam.py:nersemble", "gs://b/run")
    job = out["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    per_pod = pod["containers"][0]["resources"]["limits"]["google.com/tpu"]
    assert job["parallelism"] == job["completions"] == len({d.process_index for d in devices})
    assert job["parallelism"] * per_pod == len(devices)
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology.split(":")[1]
    assert "--config.distributed.auto=True" in pod["containers"][0]["command"]
    assert out["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and out["kind"] == "JobSet"


def test_tpu_jobset_cli_prints_json_and_refuses_a_bad_topology():
    base = [sys.executable, os.path.join(CLUSTER, "tpu_jobset.py"), "--image", "i", "--config", "c", "--workdir", "w"]
    ok = subprocess.run(base + ["--topology", "v6e:2x4", "--config.steps=5"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    command = json.loads(ok.stdout)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]["command"]
    assert command[-1] == "--config.steps=5"
    bad = subprocess.run(base + ["--topology", "v5p-8"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --topology must be GEN:AxB")
