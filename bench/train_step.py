"""The real FaceCam train step on random weights: step time, TFLOP/s, MFU, compiled plan vs peak memory.

    python bench/train_step.py                 # GPU: wan2.1-t2v-1.3b, 81 x 704 x 480 (55,440 tokens), bf16,
                                               #      cuDNN attention, full remat, batch 1, AdamW
    python bench/train_step.py --tiny          # CPU smoke run: the mini config
    python bench/train_step.py --config nersemble,model.dit=wan2.1-t2v-1.3b,remat=dots

The step is ``train_step.build_program``'s jitted step (frozen VAE encode of source, target and
camera videos, flow-matching loss, FaceCam's trainable subset, AdamW), on random uint8 videos.
TFLOP/s and MFU are ``flops.Throughput`` (the analytic FLOPs training logs every step, against the
chip's dense bf16 peak). The VAE encode is also timed alone, so the DiT's share of the step is
printed. Peak memory is the device's ``memory_stats()["peak_bytes_in_use"]`` next to the compiled
program's own plan (``memory_analysis()``, what ``python -m facecam_jax.aot`` reports).
Imports only what bench/gpu_suite.py may import (no Grain, no video I/O).
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
from flax import nnx  # noqa: E402

from bench.common import machine, peak_bytes, si  # noqa: E402
from facecam_jax import build  # noqa: E402
from facecam_jax import sharding as sh  # noqa: E402
from facecam_jax.models.wan_vae import to_unit_range  # noqa: E402
from facecam_jax.perf.flops import Throughput, step_flops  # noqa: E402
from facecam_jax.perf.report import Compiled  # noqa: E402
from facecam_jax.runtime.config_file import load_config  # noqa: E402
from facecam_jax.training import train_step

FULL = "nersemble,model.dit=wan2.1-t2v-1.3b,batch_size=1"
TINY = "mini,frames=9,batch_size=1"


def run(config, steps: int = 3, *, time_vae: bool = True) -> dict:
    """Compiles the step, runs one warm-up and ``steps`` timed steps; returns the numbers."""
    mesh, rules = build.mesh_and_rules(config)
    throughput = Throughput.of(config, mesh)
    with sh.use_mesh(mesh, rules):
        program = train_step.build_program(config, mesh, rules)
        rng = np.random.default_rng(0)
        batch = {k: jax.device_put(rng.integers(0, 256, v.shape, np.uint8), program.batch_sharding)
                 for k, v in program.batch.items()}
        start = time.perf_counter()
        compiled = program.lower().compile()
        plan = Compiled.of("train step", compiled, time.perf_counter() - start)
        state = program.state

        def step(state):
            state, metrics = compiled(state, program.frozen, program.vae_state, program.context, batch)
            jax.block_until_ready(metrics)
            return state

        state = step(state)  # warm-up
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state = step(state)
            times.append(time.perf_counter() - start)
        vae_s = None
        if time_vae:  # the frozen VAE encode alone, on the step's three videos
            vae = nnx.merge(program.vae_graphdef, program.vae_state)
            videos = jax.jit(lambda b: jax.numpy.concatenate([to_unit_range(b[k]) for k in program.video_keys]))(batch)
            vae.encode(videos).block_until_ready()  # compile
            start = time.perf_counter()
            vae.encode(videos).block_until_ready()
            vae_s = time.perf_counter() - start
    step_s = statistics.median(times)
    d = config.data
    out = {"config": f"{config.model.dit}, {d.frames} x {d.height} x {d.width}, batch {d.batch_size}, "
                     f"{config.model.compute_dtype}, attention {config.model.attention}, remat {config.model.remat}",
           "mesh": dict(mesh.shape), "params": program.num_params, "trainable": program.num_trainable,
           "tokens": build.token_counts(config)[0],
           "flops": step_flops(config, "train"), "compile_s": plan.seconds, "step_s": step_s, "steps_timed": steps,
           "vae_encode_s": vae_s, "plan_bytes": plan.total, "plan": plan.line(), "peak_bytes": peak_bytes()}
    out.update(throughput(step_s))
    return out


def report(r: dict) -> str:
    lines = [f"config: {r['config']}; mesh {r['mesh']}; {r['tokens']:,} tokens per sample",
             f"FLOPs per step: {si(r['flops']['total'])} (DiT forward {si(r['flops']['forward'])}, backward "
             f"{si(r['flops']['backward'])}, remat {si(r['flops']['remat'])}; VAE encode {si(r['flops']['vae'])})"]
    line = (f"step: {r['step_s']:.3f} s (median of {r['steps_timed']}; compile {r['compile_s']:.1f} s), "
            f"{r['tflops_per_device']:.1f} TFLOP/s per device")
    if "mfu" in r:
        line += f", MFU {100 * r['mfu']:.1f}%"
    lines.append(line)
    if r["vae_encode_s"] is not None:
        lines.append(f"  of which VAE encode alone {r['vae_encode_s']:.3f} s")
    peak = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "n/a on " + jax.default_backend()
    lines.append(f"memory per device: {r['plan']}; measured peak {peak}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"config variant and overrides (default {FULL!r})")
    p.add_argument("--tiny", action="store_true", help=f"the CPU smoke config ({TINY!r})")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    args = p.parse_args(argv)
    config = load_config(args.config or (TINY if args.tiny else FULL))
    print(f"machine: {machine()}")
    print(report(run(config, args.steps)))


if __name__ == "__main__":
    main()
