"""Classifier-free guidance as one batch on a mesh with a data axis of 2 (one branch per device
group) against the same batch on a pure-fsdp mesh: loop time and per-device memory, one run.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/cfg_split.py
    python bench/cfg_split.py --preset small --frames 17 --steps 4 --topology v5e:2x4   # + a TPU compile

The conditional and unconditional passes are one batch of 2 rows; the batch is sharded over
(data, fsdp). With ``mesh.data=2`` each half of the devices holds one row (one branch) and the
weights are fsdp-sharded within the half; with ``mesh.fsdp=8`` the 2 rows cannot split 8 ways,
so the batch stays whole and the work splits along the weights instead. Timed on the local
devices (fake CPU devices share the host's cores: a CPU ratio is a property of this emulation,
not of an accelerator), and, with ``--topology``, compiled for a TPU slice for its memory plan.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from bench.common import machine  # noqa: E402
from facecam_jax import build, conditioning  # noqa: E402
from facecam_jax import sharding as sh  # noqa: E402
from facecam_jax.models import wan_dit  # noqa: E402
from facecam_jax.perf import chips
from facecam_jax.perf.report import Compiled  # noqa: E402
from facecam_jax.runtime.config_file import load_config  # noqa: E402
from facecam_jax.sampling import program as sp  # noqa: E402
from facecam_jax.sampling.inputs import abstract_inputs  # noqa: E402


def programs(config, devices, layouts, steps):
    cfg = build.dit_config(config)
    options = sp.SampleOptions(steps, config.model.shift, 5.0, camera=conditioning.of(config).name)
    for name, (data, fsdp) in layouts.items():
        mesh = sh.make_mesh(data, fsdp, 1, 1, devices=devices)
        with sh.use_mesh(mesh, sh.DEFAULT_RULES):
            dit = build.abstract_dit(config, mesh, sh.DEFAULT_RULES)
            fn = jax.jit(sp.make_sample_fn(nnx.graphdef(dit), options))
            inputs = abstract_inputs(config, conditioning.of(config), cfg, mesh, config.data.frames, None)
            lowered = fn.lower((nnx.state(dit),), inputs)
        yield name, mesh, dit, fn, lowered


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--topology", default=None, help="also compile for this TPU topology (memory only)")
    args = p.parse_args(argv)
    config = load_config(f"mini,model.dit={args.preset},frames={args.frames}")
    layouts = {"fsdp 8 (batch whole)": (1, 8), "data 2 x fsdp 4 (one branch per group)": (2, 4)}
    print(f"machine: {machine()}; {args.preset} DiT, {args.frames} frames at 64 x 48, {args.steps} steps, CFG 5")
    if len(jax.devices()) >= 8:
        rng = np.random.default_rng(0)
        for name, mesh, dit, fn, lowered in programs(config, jax.devices()[:8], layouts, args.steps):
            compiled = lowered.compile()
            model = wan_dit.WanDiT(build.dit_config(config), rngs=nnx.Rngs(0))
            state = (jax.device_put(nnx.state(model), sh.state_shardings(nnx.state(model), mesh)),)
            shapes = abstract_inputs(config, conditioning.of(config), dit.config, mesh, config.data.frames, None)
            call = jax.device_put(jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32),
                                               shapes), NamedSharding(mesh, PartitionSpec()))
            compiled(state, call).block_until_ready()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                compiled(state, call).block_until_ready()
                times.append(time.perf_counter() - start)
            plan = Compiled.of(name, compiled, 0.0)
            print(f"{name:<40} loop {statistics.median(times):.3f} s (median of {args.repeats}), per device: "
                  f"temporaries {plan.temporaries / 2**20:.1f} MiB, arguments {plan.arguments / 2**20:.1f} MiB")
    else:
        print("(fewer than 8 local devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8 to time)")
    if args.topology:
        chips.no_persistent_cache()
        for name, _, _, _, lowered in programs(config, chips.tpu_topology(args.topology), layouts, args.steps):
            plan = Compiled.of(name, lowered.compile(), 0.0)
            print(f"{args.topology} {name:<40} per device: temporaries {plan.temporaries / 2**20:.1f} MiB, "
                  f"arguments {plan.arguments / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
