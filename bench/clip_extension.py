"""A long video sampled in joint windows or clip by clip (CameraCtrl II's clip extension), side by side.

    python bench/clip_extension.py                      # 33 frames, windows / clips of 17, plucker kind
    python bench/clip_extension.py --frames 65 --base plucker-mini,model.dit=small,frames=9

Both modes re-render the same random source along the same trajectory with the same model
(``--base``: a plucker config with a random DiT) through ``sampling.render``, the path the
sample CLI takes: ``sample.extend=joint`` (the windows overlap by ``sample.window_overlap``,
denoised together in one program) against ``sample.extend=clip`` (one program run per clip,
each after the one before, continuing from ``sample.context_frames`` latent frames; the
shared frames decoded and encoded again). Each render runs once to compile, then ``--repeats``
times alternately (A B A B ...); reported per mode: windows or clips, DiT forwards per step,
new latent frames per window, the median render time, the compiled sampling program's
memory plan (arguments + outputs + temporaries), and the ratio clip / joint.
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

from bench.common import machine  # noqa: E402
from facecam_jax import build, conditioning  # noqa: E402
from facecam_jax import sampling as sampler  # noqa: E402
from facecam_jax import sharding as sh  # noqa: E402
from facecam_jax.runtime.config_file import load_config  # noqa: E402
from facecam_jax.sampling import program as sp  # noqa: E402
from facecam_jax.sampling.inputs import abstract_inputs  # noqa: E402


def plan_bytes(config, experts, mesh, frames: int) -> int:
    """The compiled sampling program's memory plan (arguments + outputs + temporaries) for one video."""
    from flax import nnx

    options, windows = sp.options_for(config, 1, frames)
    kind = conditioning.of(config)
    inputs = abstract_inputs(config, kind, experts.models[0].config, mesh,
                             config.data.frames if options.context else frames, options.windows,
                             context=options.context)
    program = sp.sample_program(nnx.graphdef(experts.models[0]), options)
    mem = program.fn.lower(tuple(nnx.state(m) for m in experts.models), inputs).compile().memory_analysis()
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="plucker-mini,model.dit=small,frames=17,height=96,width=128,sample.num_steps=8")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--overlap", type=int, default=2, help="latent frames: window_overlap and context_frames")
    p.add_argument("--trajectory", default="arc_left")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    modes = {m: load_config(f"{args.base},sample.extend={m},sample.window_overlap={args.overlap},"
                            f"sample.context_frames={args.overlap}") for m in ("joint", "clip")}
    config = modes["joint"]
    d = config.data
    mesh, rules = build.mesh_and_rules(config)
    source = np.random.default_rng(0).integers(0, 255, (args.frames, d.height, d.width, 3), dtype=np.uint8)
    rows = {}
    with sh.use_mesh(mesh, rules):
        experts = sampler.load_experts(config, mesh, rules, None)
        vae = build.build_vae(config, mesh)
        kind = conditioning.of(config)
        raw = kind.make_condition(kind.load_trajectory(args.trajectory, args.frames), height=d.height,
                                  width=d.width, framing=config.sample.framing, source_frames=source)
        raw = {k: v[None] for k, v in raw.items()}

        def render(mode):
            return sampler.render(modes[mode], experts, vae, source[None], raw, [0], mesh=mesh, show_progress=False)

        times = {m: [] for m in modes}
        for mode in modes:  # compile
            render(mode)
        for _ in range(args.repeats):
            for mode in modes:
                t0 = time.perf_counter()
                jax.block_until_ready(render(mode))
                times[mode].append(time.perf_counter() - t0)
        guidance = sampler.contexts(config, experts)[2]
        for mode, cfg in modes.items():
            options, windows = sp.options_for(cfg, 1, args.frames, guidance=guidance)
            new = [windows.length] + [windows.length - (windows.starts[k - 1] + windows.length - windows.starts[k])
                                      for k in range(1, windows.count)]
            rows[mode] = {"windows": windows.count, "starts": windows.starts, "new": new,
                          "passes": options.passes, "seconds": statistics.median(times[mode]),
                          "plan": plan_bytes(cfg, experts, mesh, args.frames)}
    print(f"# clip extension vs joint windows: {args.frames} frames, windows of {d.frames} frames, overlap / "
          f"context {args.overlap} latent frames, {config.sample.num_steps} steps, {config.model.dit} DiT at "
          f"{d.height}x{d.width}; {machine()}")
    print("| mode | windows (latent starts) | new latent frames per window | DiT forwards per step | "
          "render (median) | program plan |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        forwards = r["windows"] * r["passes"]
        print(f"| {mode} | {r['windows']} {r['starts']} | {r['new']} | {forwards} "
              f"({'one batch' if mode == 'joint' else 'one per clip, in turn'}) | {r['seconds']:.2f} s | "
              f"{r['plan'] / 2**20:.1f} MiB |")
    j, c = rows["joint"], rows["clip"]
    print(f"clip / joint: render time {c['seconds'] / j['seconds']:.2f}x, program plan {c['plan'] / j['plan']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
