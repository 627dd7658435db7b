"""What camera guidance costs: CameraCtrl II's sampling program with text CFG only against text
and camera CFG (one more DiT pass per step), side by side.

    python bench/camera_guidance.py                   # small DiT, 17 x 96 x 128, CPU-sized
    python bench/camera_guidance.py --base cameractrl2 --steps 32     # on a GPU: the 1.3B recipe

Both programs are ``sampling.program``'s for the ``plucker`` kind on random latents and a random
camera path, compiled once and timed in turn (A B A B ...). Reported: median time per video,
the analytic FLOPs (``perf.flops``), the compiled plan, and the ratio.
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
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from bench.common import machine, si  # noqa: E402
from facecam_jax import build, conditioning  # noqa: E402
from facecam_jax import sharding as sh  # noqa: E402
from facecam_jax.perf.flops import step_flops  # noqa: E402
from facecam_jax.perf.report import Compiled  # noqa: E402
from facecam_jax.runtime.config_file import load_config  # noqa: E402
from facecam_jax.sampling import program as sp  # noqa: E402
from facecam_jax.sampling.inputs import abstract_inputs  # noqa: E402

BASE = "plucker-mini,model.dit=small,frames=17,height=96,width=128,sample.cfg_scale=5.0"


def prepare(config, steps: int):
    mesh, rules = build.mesh_and_rules(config)
    kind = conditioning.of(config)
    with sh.use_mesh(mesh, rules):
        dit = build.build_dit(config, mesh, rules)
        kernel = dit.camera_patch.kernel  # a trained-looking camera patchify: the camera matters
        kernel.set_value(0.05 * jax.random.normal(jax.random.key(0), kernel.get_value().shape))
        options = sp.SampleOptions.of(config, 1, guidance=config.sample.cfg_scale)
        shapes = abstract_inputs(config, kind, dit.config, mesh, config.data.frames, None)
        rng = np.random.default_rng(0)

        def fill(a):
            if a.ndim == 4 and a.shape[-2:] == (4, 4):  # camera poses: identity plus a small move
                value = np.broadcast_to(np.eye(4), a.shape).copy()
                value[..., :3, 3] = 0.1 * rng.standard_normal(a.shape[:-2] + (3,))
                return value.astype(np.float32)
            if a.ndim == 3 and a.shape[-1] == 4:
                return np.broadcast_to([0.9, 1.2, 0.5, 0.5], a.shape).astype(np.float32)
            if a.ndim == 1:
                return np.ones(a.shape, np.float32)
            return rng.standard_normal(a.shape).astype(np.float32)

        inputs = jax.device_put(jax.tree.map(fill, shapes), NamedSharding(mesh, PartitionSpec()))
        fn = jax.jit(sp.make_sample_fn(nnx.graphdef(dit), options))
        states = (nnx.state(dit),)
        t0 = time.perf_counter()
        compiled = fn.lower(states, inputs).compile()
        plan = Compiled.of("sample loop", compiled, time.perf_counter() - t0)

    def run():
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(states, inputs))
        return time.perf_counter() - t0

    run()  # warm-up
    return run, plan, options


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=BASE)
    p.add_argument("--steps", type=int, default=4, help="solver steps per video")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(f"machine: {machine()}; base config {args.base}, {args.steps} steps")
    cases = {"text CFG": "sample.camera_guidance=1.0", "text + camera CFG": "sample.camera_guidance=4.0"}
    runs = {}
    for name, overrides in cases.items():
        config = load_config(f"{args.base},sample.num_steps={args.steps},{overrides}")
        run, plan, options = prepare(config, args.steps)
        runs[name] = dict(run=run, plan=plan, passes=options.passes, times=[],
                          flops=step_flops(config, "sample")["forward"])
    for _ in range(args.repeats):
        for r in runs.values():
            r["times"].append(r["run"]())
    print("| sampling | passes per step | time per video (median) | DiT FLOPs | per-device memory (plan) |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        r["median"] = statistics.median(r["times"])
        print(f"| {name} | {r['passes']} | {r['median'] * 1000:.0f} ms | {si(r['flops'])} | "
              f"{r['plan'].total / 2**20:.1f} MiB |")
    a, b = runs["text + camera CFG"], runs["text CFG"]
    print(f"camera guidance / text CFG only: time {a['median'] / b['median']:.2f}x, FLOPs {a['flops'] / b['flops']:.2f}x, "
          f"memory {a['plan'].total / b['plan'].total:.2f}x")


if __name__ == "__main__":
    main()
