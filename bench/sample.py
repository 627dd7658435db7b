"""FaceCam sampling on random weights: seconds per Euler step against the analytic FLOP time,
the VAE encode / decode around it, and peak memory.

    python bench/sample.py                     # GPU: wan2.1-t2v-1.3b, 81 x 704 x 480, 50 steps, CFG 5
    python bench/sample.py --a14b --steps 2    # H200: two Wan2.2-A14B-shaped random experts, both resident
    python bench/sample.py --tiny              # CPU smoke run: the mini config, 3 steps

The loop is ``sampler.sample_program`` (one jitted Euler scan, cond and uncond in one batch of
2, ``lax.cond`` between the experts), the VAE calls are those of ``sampler.generate``. FLOPs are
``facecam_jax.flops.step_flops(config, "sample")``; the analytic time is FLOPs over the devices'
dense bf16 peak (H100/H200 989 TFLOP/s). Peak memory is ``memory_stats()["peak_bytes_in_use"]``
next to the compiled loop's own plan (``memory_analysis()``, what ``python -m facecam_jax.aot
--program sample`` reports).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine  # noqa: E402  (bench/ is the script directory)

FULL = "nersemble,model.dit=wan2.1-t2v-1.3b,num_steps=50"
A14B = "nersemble,num_steps=50"  # wan2.2-i2v-a14b: two experts
TINY = "mini,num_steps=3"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"config variant and overrides (default {FULL!r})")
    p.add_argument("--a14b", action="store_true", help=f"both Wan2.2-A14B-shaped experts ({A14B!r})")
    p.add_argument("--tiny", action="store_true", help=f"the CPU smoke config ({TINY!r})")
    p.add_argument("--steps", type=int, default=None,
                   help="Euler steps to time (default: sample.num_steps); the loop is one scan, so the time per "
                        "step does not depend on the count")
    p.add_argument("--no-vae", action="store_true", help="skip the VAE encode/decode timing (latents are random)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from facecam_jax import build, chips, fit, sampler
    from facecam_jax import flops as flops_lib
    from facecam_jax import sharding as sh
    from facecam_jax.config_file import load_config

    spec = args.config or (TINY if args.tiny else A14B if args.a14b else FULL)
    config = load_config(spec)
    if args.steps:
        config.sample.num_steps = args.steps
    target = chips.make_target(None)
    mesh, rules = build.mesh_and_rules(config)
    d, s = config.data, config.sample
    flops = flops_lib.step_flops(config, "sample")
    n_experts = build.num_experts(config)
    print(f"machine: {machine()}")
    print(f"config: {spec}: {n_experts} x {config.model.dit}, {d.frames} x {d.height} x {d.width}, "
          f"{s.num_steps} steps, CFG {s.cfg_scale}, {config.model.compute_dtype}, attention {config.model.attention}; "
          f"mesh {dict(mesh.shape)}")

    replicated = NamedSharding(mesh, PartitionSpec())
    with sh.use_mesh(mesh, rules):
        models = [build.build_dit(config, mesh, rules, seed=config.seed + 1000 * i) for i in range(n_experts)]
        states = tuple(nnx.state(m) for m in models)  # placed by build_dit
        vae = build.build_vae(config, mesh)
        rng = np.random.default_rng(0)
        encode_s = encode_first = decode_s = None
        if args.no_vae:
            shape = build.latent_shape(vae.config, d.frames, d.height, d.width, batch=2)
            latents = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        else:
            video = jnp.asarray(rng.uniform(-1, 1, (2, d.frames, d.height, d.width, 3)), jnp.float32)  # source, camera
            start = time.perf_counter()
            latents = vae.encode(video).block_until_ready()
            encode_first = time.perf_counter() - start
            start = time.perf_counter()
            latents = vae.encode(video).block_until_ready()
            encode_s = time.perf_counter() - start
        print(f"models built ({n_experts} x {_si_params(models[0])} parameters)", flush=True)

        dit_cfg = models[0].config
        ctx = jnp.asarray(0.1 * rng.standard_normal((2, 1, dit_cfg.text_len, dit_cfg.text_dim)), jnp.float32)
        noise = jax.random.normal(jax.random.key(0), latents[:1].shape, jnp.float32)
        call = jax.device_put((latents[:1], latents[1:], ctx[0], ctx[1], noise), replicated)
        fn = sampler.sample_program(nnx.graphdef(models[0]), sampler.SampleOptions.of(config, n_experts)).fn
        start = time.perf_counter()
        compiled = fn.lower(states, *call).compile()
        compile_s = time.perf_counter() - start
        plan = fit.Compiled.of("sample loop", compiled, compile_s)
        print(f"loop compiled in {compile_s:.1f} s", flush=True)
        start = time.perf_counter()
        out = compiled(states, *call).block_until_ready()  # compiled already: no warm-up needed
        loop_s = time.perf_counter() - start

        if not args.no_vae:
            vae.decode(out).block_until_ready()  # compile
            start = time.perf_counter()
            vae.decode(out).block_until_ready()
            decode_s = time.perf_counter() - start

    per_step = loop_s / s.num_steps
    step_flops = flops["forward"] / s.num_steps
    print(f"FLOPs: {_si(flops['forward'])} for the loop ({_si(step_flops)} per step), VAE encode + decode "
          f"{_si(flops['vae'])}")
    line = (f"loop: {loop_s:.2f} s, {per_step:.3f} s per step (compile {compile_s:.1f} s), "
            f"{_si(step_flops / per_step / len(jax.devices()))}/s per device")
    if target.peak_flops:
        ideal = step_flops / target.peak_flops
        line += f"; analytic at the bf16 peak {ideal:.3f} s per step (MFU {100 * ideal / per_step:.1f}%)"
    print(line)
    print(f"50 Euler steps: {50 * per_step:.1f} s")
    if encode_s is not None:
        print(f"VAE: encode {encode_s:.2f} s (first call {encode_first:.1f} s), decode {decode_s:.2f} s")
    try:
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001
        peak = None
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"memory per device: compiled loop plan {gib(plan.total)} (arguments {gib(plan.arguments)}, temporaries "
          f"{gib(plan.temporaries)}); measured peak {gib(peak) if peak else 'n/a on ' + jax.default_backend()}")


def _si(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops / 1e6:.2f} MFLOP"


def _si_params(model) -> str:
    from facecam_jax.models.wan_dit import param_count

    n = param_count(model)
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


if __name__ == "__main__":
    main()
