"""What a camera kind costs: the real train step of each kind at the same shape, side by side.

    python bench/camera_kinds.py                      # small DiT, 17 x 96 x 128, batch 1, CPU-sized
    python bench/camera_kinds.py --base nersemble,model.dit=wan2.1-t2v-1.3b,batch_size=1   # on a GPU

Each kind's config is the base plus ``camera.kind`` (and its own input width): FaceCam's
``landmarks`` (a third video VAE-encoded, 36 input channels) and ReCamMaster's ``recammaster``
(camera layers in every block, 16 channels, its poses from the batch's cameras). The steps are
``train_step.build_program``'s on random videos (and random rotations for the cameras), timed in
turn (A B A B ...) so that drift on a shared machine falls on both. Reported per kind: median
step time, the analytic FLOPs of the DiT and the VAE (``perf.flops``), and the compiled plan's
per-device memory; then the ratios recammaster / landmarks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import machine, si  # noqa: E402
from facecam_jax import build  # noqa: E402
from facecam_jax import sharding as sh  # noqa: E402
from facecam_jax.perf.flops import step_flops  # noqa: E402
from facecam_jax.perf.report import Compiled  # noqa: E402
from facecam_jax.runtime.config_file import load_config  # noqa: E402
from facecam_jax.training import train_step  # noqa: E402

BASE = "mini,model.dit=small,frames=17,height=96,width=128,batch_size=1"
KINDS = {"landmarks": "camera.kind=landmarks", "recammaster": "camera.kind=recammaster,model.in_dim=16"}


def _batch(program, rng):
    """Random uint8 videos, and world-to-camera matrices (random rotations, metres) for camera arrays."""
    out = {}
    for key, spec in program.batch.items():
        if spec.dtype == np.uint8:
            value = rng.integers(0, 256, spec.shape, np.uint8)
        else:
            q = np.linalg.qr(rng.standard_normal((*spec.shape[:-2], 3, 3)))[0]
            value = np.broadcast_to(np.eye(4), spec.shape).copy()
            value[..., :3, :3], value[..., :3, 3] = q, rng.standard_normal((*spec.shape[:-2], 3))
            value = value.astype(np.float32)
        out[key] = jax.device_put(value, program.batch_sharding)
    return out


def prepare(config):
    mesh, rules = build.mesh_and_rules(config)
    with sh.use_mesh(mesh, rules):
        program = train_step.build_program(config, mesh, rules)
        batch = _batch(program, np.random.default_rng(0))
        start = time.perf_counter()
        compiled = program.lower().compile()
        plan = Compiled.of("train step", compiled, time.perf_counter() - start)
    state = [program.state]

    def step():
        with sh.use_mesh(mesh, rules):
            t0 = time.perf_counter()
            state[0], metrics = compiled(state[0], program.frozen, program.vae_state, program.context, batch)
            jax.block_until_ready(metrics)
            return time.perf_counter() - t0

    step()  # warm-up
    return step, plan


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=BASE, help="the config both kinds share")
    p.add_argument("--steps", type=int, default=5, help="timed steps per kind, in turn")
    args = p.parse_args(argv)
    print(f"machine: {machine()}; base config {args.base}")
    runs = {}
    for kind, overrides in KINDS.items():
        config = load_config(f"{args.base},{overrides}")
        step, plan = prepare(config)
        runs[kind] = dict(step=step, plan=plan, flops=step_flops(config, "train"), times=[],
                          tokens=build.token_counts(config)[0])
    for _ in range(args.steps):
        for r in runs.values():
            r["times"].append(r["step"]())
    rows = ["| kind | tokens | step (median) | DiT FLOPs | VAE FLOPs | per-device memory (plan) |",
            "|---|---|---|---|---|---|"]
    for kind, r in runs.items():
        r["median"] = statistics.median(r["times"])
        dit = r["flops"]["forward"] + r["flops"]["backward"] + r["flops"]["remat"]
        r["dit"] = dit
        rows.append(f"| {kind} | {r['tokens']} | {r['median'] * 1000:.0f} ms | {si(dit)} | {si(r['flops']['vae'])} | "
                    f"{r['plan'].total / 2**20:.1f} MiB |")
    print("\n".join(rows))
    a, b = runs["recammaster"], runs["landmarks"]
    print(f"recammaster / landmarks: step time {a['median'] / b['median']:.2f}x, DiT FLOPs {a['dit'] / b['dit']:.3f}x, "
          f"VAE FLOPs {a['flops']['vae'] / b['flops']['vae']:.2f}x, memory {a['plan'].total / b['plan'].total:.2f}x")


if __name__ == "__main__":
    main()
