"""FaceCam sampling on random weights: seconds per step against the analytic FLOP time, the VAE
encode / decode around the loop, and the compiled plan next to the measured peak memory.

    python bench/sample.py                     # GPU: wan2.1-t2v-1.3b, 81 x 704 x 480, 50 steps, CFG 5
    python bench/sample.py --a14b --steps 2    # H200: two Wan2.2-A14B-shaped random experts, both resident
    python bench/sample.py --tiny              # CPU smoke run: the mini config, 3 steps

The loop is ``sp.sample_program`` (one jitted scan over the steps, cond and uncond in one
batch of 2, ``lax.cond`` between the experts); the VAE calls are those of ``sampler.render``.
FLOPs are ``flops.step_flops(config, "sample")``; MFU is against the chip's dense bf16 peak.
Imports only what bench/gpu_suite.py may import (no Grain, no video I/O).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from bench.common import machine, peak_bytes, si  # noqa: E402
from facecam_jax import build, conditioning  # noqa: E402
from facecam_jax import sampling as sampler
from facecam_jax import sharding as sh  # noqa: E402
from facecam_jax.models import wan_dit  # noqa: E402
from facecam_jax.perf import chips
from facecam_jax.perf.flops import step_flops  # noqa: E402
from facecam_jax.perf.report import Compiled  # noqa: E402
from facecam_jax.runtime.config_file import load_config  # noqa: E402
from facecam_jax.sampling import program as sp

FULL = "nersemble,model.dit=wan2.1-t2v-1.3b,num_steps=50"
A14B = "nersemble,num_steps=50"  # wan2.2-i2v-a14b: two experts
TINY = "mini,frames=9,num_steps=3"


def run(config, *, with_vae: bool = True, experts: int | None = None) -> dict:
    """Builds random experts (``experts``, default two for A14B), compiles the loop of
    ``sample.num_steps`` steps, runs it once (and the VAE around it); returns the numbers."""
    mesh, rules = build.mesh_and_rules(config)
    d, s = config.data, config.sample
    n_experts = experts or build.num_experts(config)
    replicated = NamedSharding(mesh, PartitionSpec())
    out: dict = {"config": f"{n_experts} x {config.model.dit}, {d.frames} x {d.height} x {d.width}, {s.num_steps} "
                           f"steps, CFG {s.cfg_scale}, {config.model.compute_dtype}, attention {config.model.attention}",
                 "mesh": dict(mesh.shape), "experts": n_experts}
    with sh.use_mesh(mesh, rules):
        start = time.perf_counter()
        models = [build.build_dit(config, mesh, rules, seed=config.seed + 1000 * i) for i in range(n_experts)]
        jax.block_until_ready(nnx.state(models[-1]))
        out["build_s"] = time.perf_counter() - start
        out["params"] = n_experts * wan_dit.param_count(models[0])
        states = tuple(nnx.state(m) for m in models)
        vae = build.build_vae(config, mesh)
        rng = np.random.default_rng(0)
        if with_vae:
            video = jnp.asarray(rng.uniform(-1, 1, (2, d.frames, d.height, d.width, 3)), jnp.float32)  # source, camera
            start = time.perf_counter()
            latents = vae.encode(video).block_until_ready()
            out["vae_encode_first_s"] = time.perf_counter() - start
            start = time.perf_counter()
            latents = vae.encode(video).block_until_ready()
            out["vae_encode_s"] = time.perf_counter() - start
        else:
            shape = build.latent_shape(vae.config, d.frames, d.height, d.width, batch=2)
            latents = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        dit_cfg = models[0].config
        ctx = jnp.asarray(0.1 * rng.standard_normal((2, 1, dit_cfg.text_len, dit_cfg.text_dim)), jnp.float32)
        noise = sampler.noise_for(0, latents[:1].shape)
        condition = {k: latents[1:] for k in conditioning.of(config).batch_videos}  # the camera kind's videos
        call = jax.device_put(sampler.SampleInputs(latents[:1], condition, ctx[0], ctx[1], noise), replicated)
        fn = sp.sample_program(nnx.graphdef(models[0]), sp.SampleOptions.of(config, n_experts)).fn
        start = time.perf_counter()
        compiled = fn.lower(states, call).compile()
        plan = Compiled.of("sample loop", compiled, time.perf_counter() - start)
        start = time.perf_counter()
        result = compiled(states, call).block_until_ready()
        out["loop_s"] = time.perf_counter() - start
        if with_vae:
            vae.decode(result).block_until_ready()  # compile
            start = time.perf_counter()
            vae.decode(result).block_until_ready()
            out["vae_decode_s"] = time.perf_counter() - start
    flops = step_flops(config, "sample")
    per_step = out["loop_s"] / s.num_steps
    peak = chips.peak_flops(mesh.devices.flat[0], config.train.peak_tflops)
    out.update(flops=flops, steps=s.num_steps, step_s=per_step, compile_s=plan.seconds, plan_bytes=plan.total,
               plan=plan.line(), peak_bytes=peak_bytes(),
               tflops_per_device=flops["forward"] / out["loop_s"] / mesh.size / 1e12)
    if peak:
        out["mfu"] = flops["forward"] / out["loop_s"] / mesh.size / peak
    out["video_50_steps_s"] = 50 * per_step + out.get("vae_encode_s", 0.0) + out.get("vae_decode_s", 0.0)
    return out


def report(r: dict) -> str:
    f = r["flops"]
    lines = [f"config: {r['config']}; mesh {r['mesh']}; {r['experts']} x {r['params'] / r['experts'] / 1e9:.2f} B "
             f"parameters (built in {r['build_s']:.1f} s)",
             f"FLOPs: {si(f['forward'])} for the loop ({si(f['forward'] / r['steps'])} per step), VAE encode + decode "
             f"{si(f['vae'])}"]
    line = (f"loop: {r['loop_s']:.2f} s, {r['step_s']:.3f} s per step (compile {r['compile_s']:.1f} s), "
            f"{r['tflops_per_device']:.1f} TFLOP/s per device")
    if "mfu" in r:
        line += f", MFU {100 * r['mfu']:.1f}%"
    lines.append(line)
    if "vae_encode_s" in r:
        lines.append(f"VAE: encode {r['vae_encode_s']:.2f} s (first call {r['vae_encode_first_s']:.1f} s), "
                     f"decode {r['vae_decode_s']:.2f} s")
    lines.append(f"a 50-step video: {r['video_50_steps_s']:.1f} s (the loop's time per step x 50, plus the VAE)")
    peak = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "n/a on " + jax.default_backend()
    lines.append(f"memory per device: {r['plan']}; measured peak {peak}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"config variant and overrides (default {FULL!r})")
    p.add_argument("--a14b", action="store_true", help=f"both Wan2.2-A14B-shaped experts ({A14B!r})")
    p.add_argument("--tiny", action="store_true", help=f"the CPU smoke config ({TINY!r})")
    p.add_argument("--steps", type=int, default=None, help="steps to time (default: sample.num_steps); the loop "
                   "is one scan, so the time per step does not depend on the count")
    p.add_argument("--no-vae", action="store_true", help="skip the VAE encode/decode timing (latents are random)")
    args = p.parse_args(argv)
    config = load_config(args.config or (TINY if args.tiny else A14B if args.a14b else FULL))
    if args.steps:
        config.sample.num_steps = args.steps
    print(f"machine: {machine()}")
    print(report(run(config, with_vae=not args.no_vae)))


if __name__ == "__main__":
    main()
