"""The real FaceCam train step on random weights: step time, TFLOP/s, MFU, peak memory.

    python bench/train_step.py                 # GPU: wan2.1-t2v-1.3b, 81 x 704 x 480 (55,440 tokens), bf16,
                                               #      cuDNN attention, full remat, batch 1, AdamW
    python bench/train_step.py --tiny          # CPU smoke run: the mini config
    python bench/train_step.py --config nersemble,model.dit=wan2.1-t2v-1.3b,remat=dots

The step is ``train_step.build_program``'s jitted step (frozen VAE encode of source, target and
camera videos, flow-matching loss, FaceCam's trainable subset, AdamW), on random uint8 videos.
FLOPs are ``facecam_jax.flops.step_flops`` (analytic DiT forward + backward + remat, the VAE's
convs); MFU is against the chip's dense bf16 peak (H100/H200 989 TFLOP/s). The VAE encode is
also timed alone, so the DiT's share of the step is printed. Peak memory is the device's
``memory_stats()["peak_bytes_in_use"]`` next to the compiled program's own plan
(``memory_analysis()``, what ``python -m facecam_jax.aot`` reports).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine  # noqa: E402  (bench/ is the script directory)

FULL = "nersemble,model.dit=wan2.1-t2v-1.3b,batch_size=1,mesh.fsdp=-1"
TINY = "mini,batch_size=1"


def _si(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops / 1e6:.2f} MFLOP"


def _peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  not every backend reports it
        return None
    return (stats or {}).get("peak_bytes_in_use")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"config variant and overrides (default {FULL!r})")
    p.add_argument("--tiny", action="store_true", help=f"the CPU smoke config ({TINY!r})")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from facecam_jax import build, chips, fit, flops as flops_lib, train_step
    from facecam_jax import sharding as sh
    from facecam_jax.models.wan_vae import to_unit_range
    from facecam_jax.config_file import load_config

    spec = args.config or (TINY if args.tiny else FULL)
    config = load_config(spec)
    target = chips.make_target(None)
    mesh, rules = build.mesh_and_rules(config)
    flops = flops_lib.step_flops(config, "train")
    d = config.data
    print(f"machine: {machine()}")
    print(f"config: {spec}: {config.model.dit}, {d.frames} x {d.height} x {d.width}, batch {d.batch_size}, "
          f"{config.model.compute_dtype}, attention {config.model.attention}, remat {config.model.remat}; "
          f"mesh {dict(mesh.shape)}")

    with sh.use_mesh(mesh, rules):
        program = train_step.build_program(config, mesh, rules)
        rng = np.random.default_rng(0)
        batch = {k: jax.device_put(rng.integers(0, 256, v.shape, np.uint8), program.batch_sharding)
                 for k, v in program.batch.items()}
        start = time.perf_counter()
        compiled = program.lower().compile()
        compile_s = time.perf_counter() - start
        plan = fit.Compiled.of("train step", compiled, compile_s)
        print(f"step compiled in {compile_s:.1f} s", flush=True)
        state = program.state

        def step(state):
            state, metrics = compiled(state, program.frozen, program.vae_state, program.context, batch)
            jax.block_until_ready(metrics)
            return state

        state = step(state)  # warm-up
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            state = step(state)
            times.append(time.perf_counter() - start)

        # The frozen VAE encode alone (the same shapes; a second random VAE of the same config).
        vae = build.build_vae(config, mesh)
        videos = jax.jit(lambda b: jax.numpy.concatenate(
            [to_unit_range(b[k]) for k in train_step.VIDEO_KEYS]))(batch)
        vae.encode(videos).block_until_ready()  # compile
        vae_times = []
        for _ in range(max(1, args.steps // 2)):
            start = time.perf_counter()
            vae.encode(videos).block_until_ready()
            vae_times.append(time.perf_counter() - start)

    step_s, vae_s = statistics.median(times), statistics.median(vae_times)
    n = len(jax.devices())
    rate = flops["total"] / step_s
    dit_flops = flops["total"] - flops["vae"]
    print(f"FLOPs per step: {_si(flops['total'])} (DiT forward {_si(flops['forward'])}, backward "
          f"{_si(flops['backward'])}, remat {_si(flops['remat'])}; VAE encode {_si(flops['vae'])})")
    line = f"step: {step_s:.3f} s (median of {args.steps}; compile {compile_s:.1f} s), {_si(rate / n)}/s per device"
    if target.peak_flops:
        line += f", MFU {100 * rate / target.peak_flops:.1f}% of {_si(target.peak_flops / target.chips)}/s"
    print(line)
    line = f"  of which VAE encode alone {vae_s:.3f} s"
    if step_s > vae_s:
        dit_s = step_s - vae_s
        line += f"; DiT + optimizer {dit_s:.3f} s, {_si(dit_flops / dit_s / n)}/s per device"
        if target.peak_flops:
            line += f", MFU {100 * dit_flops / dit_s / target.peak_flops:.1f}%"
    print(line)
    peak = _peak_bytes(jax.devices()[0])
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"memory per device: compiled plan {gib(plan.total)} (arguments {gib(plan.arguments)}, temporaries "
          f"{gib(plan.temporaries)}); measured peak {gib(peak) if peak else 'n/a on ' + jax.default_backend()}")


if __name__ == "__main__":
    main()
