"""Does the assembled system learn? Held-out evaluation of the `learn` run against two baselines.

    python tools/train_mini_vae.py                                                  # stage 1
    python -m facecam_jax.train --config configs/facecam.py:learn --workdir runs/learn   # stage 2
    python bench/learn_mini.py --workdir runs/learn                                 # this

Held-out re-rendering (static multi-view, paper 4.2): for every held-out time window of the
mini dataset (data.holdout_windows: frames no training step read) and every ordered pair of
cameras (i, j), i a training camera: source = camera i's video of the window, condition =
camera j's landmark map at the window start (drawn as in training, held, no zoom/pan), truth
= camera j's video of the window, both composited onto one background colour as every
multi-view training sample is. Camera j is a training camera, or the held-out camera
(data.holdout_cameras: never a source or target in training). Three outputs are scored
against the truth with `facecam_jax.evaluation` (PSNR, SSIM, identity):
  - the source frames themselves (baseline a: "no re-rendering"),
  - the untrained model (baseline b: the run's own random initialisation, same trained VAE),
  - the trained model,
and the trained VAE's reconstruction of the truth (the ceiling the DiT cannot pass).
Camera ablation: the trained model again, same source and noise, with the source camera's
own map instead of the target's; the paired PSNR gain of the target map says whether the
output follows the camera condition (no face detector needed, unlike camera correctness).
Camera control on the canonical motions (paper 4.3): a held-out window of cameras 0, 1, 2 as
source, each of the ten canonical trajectories through `sampler.generate` (the proxy-head
condition), camera correctness by `facecam_jax.evaluation` for the trained and untrained model.

Every video is written losslessly (FFV1 .avi) with a manifest per method under --out, so
`python -m facecam_jax.evaluate --manifest <out>/<manifest>.json` reproduces each number.
Writes <out>/summary.md (the tables) and --picture (source | condition | output | truth).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine  # noqa: E402

MOTION_SOURCE_CAMERAS = (0, 1, 2)  # frontal, yaw -25, yaw +25
# (source, target) camera pairs in the picture: small and large yaw changes, a pitch change,
# and the held-out camera 4.
PICTURE_PAIRS = ((0, 1), (1, 2), (2, 0), (3, 6), (7, 5), (0, 4))
CONTROL = "control (trained, the source camera's own map)"


def write_lossless(path: str, frames: np.ndarray, fps: float = 24.0) -> str:
    """uint8 RGB [T, H, W, 3] -> FFV1 .avi (read back bit-exactly by video_io.read_video)."""
    import cv2

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"FFV1"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write FFV1 to {path}")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def evaluate(rows: list[dict], out: str, name: str, identity: bool) -> dict:
    """Writes the manifest <out>/<name>.json and evaluates it as `python -m facecam_jax.evaluate` does."""
    from facecam_jax.evaluation.report import default_outputs, evaluate_manifest

    manifest = os.path.join(out, f"{name}.json")
    with open(manifest, "w") as f:
        json.dump(rows, f, indent=1)
    report = evaluate_manifest(manifest, identity=identity)
    report.write(*default_outputs(manifest))
    return report.overall() | {"manifest": os.path.relpath(manifest)}


def picture(pairs, outputs: np.ndarray, path: str, scale: int = 3) -> list[str]:
    """PNG: for each PICTURE_PAIRS pair (windows in turn), its first and last frame as rows of
    source | condition | output | truth. Returns the rows' captions."""
    import cv2

    windows = sorted({p.start for p in pairs})
    index = {(p.start, p.source_camera, p.target_camera): k for k, p in enumerate(pairs)}
    rows, captions = [], []
    for n, (i, j) in enumerate(PICTURE_PAIRS):
        k = index.get((windows[n % len(windows)], i, j))
        if k is None:
            continue
        p = pairs[k]
        for t in (0, len(p.source) - 1):
            rows.append(np.concatenate([p.source[t], p.condition[t], outputs[k][t], p.target[t]], axis=1))
            captions.append(f"window {p.start}, camera {i} -> {j}, frame {t}")
    grid = np.concatenate(rows, axis=0)
    grid = cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return captions


def motion_picture(results: dict, path: str, scale: int = 3) -> None:
    """PNG: per canonical motion, the condition and the output at the first and last frame."""
    import cv2

    rows = []
    for motion, r in results.items():
        cells = [r.source[0], r.condition[0], r.condition[-1], r.video[0], r.video[-1]]
        rows.append(np.concatenate(cells, axis=1))
    grid = cv2.resize(np.concatenate(rows, axis=0), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def camera_ablation(with_target_map: np.ndarray, with_source_map: np.ndarray, truth: np.ndarray,
                    groups: list[str]) -> str:
    """Paired comparison, per held-out pair: PSNR to the truth of the trained model's output
    under the target camera's map minus under the source camera's map (same source, same
    noise). Positive: the camera condition moved the output towards the target view."""
    from facecam_jax.evaluation.scores import psnr

    gain = np.array([psnr(a, t) - psnr(b, t) for a, b, t in zip(with_target_map, with_source_map, truth)])
    lines = ["Camera ablation (trained model, same source and noise; PSNR to the truth with the target "
             "camera's map minus with the source camera's own map):", "",
             "| target cameras | pairs | mean gain (dB) | median gain (dB) | pairs with gain > 0 |", "|---|---|---|---|---|"]
    for group in ("training cameras", "held-out camera"):
        g = gain[[k for k, name in enumerate(groups) if name == group]]
        if g.size:
            lines.append(f"| {group} | {g.size} | {g.mean():+.2f} | {np.median(g):+.2f} | "
                         f"{100 * np.mean(g > 0):.0f}% |")
    return "\n".join(lines)


def _fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="learn")
    parser.add_argument("--workdir", default="runs/learn", help="the stage-2 run (its facecam.safetensors)")
    parser.add_argument("--out", default="runs/learn-eval", help="videos, manifests, reports")
    parser.add_argument("--picture", default="bench/learn_mini.png")
    parser.add_argument("--motion_picture", default="bench/learn_mini_motions.png")
    parser.add_argument("--no_identity", action="store_true", help="skip the dlib identity score")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.time()

    from facecam_jax import build
    from facecam_jax import sampling as sampler
    from facecam_jax import sharding as sh
    from facecam_jax.camera import trajectories
    from facecam_jax.data import heldout, pipeline
    from facecam_jax.runtime.config_file import load_config

    config = load_config(args.config)
    d = config.data
    mesh, rules = build.mesh_and_rules(config)
    source = pipeline.heldout_source(d)
    num_cameras = len(source[0]["sequence"].cameras)
    held_cams = tuple(int(c) for c in d.holdout_cameras)
    train_cams = [c for c in range(num_cameras) if c not in held_cams]
    pairs = heldout.heldout_pairs(source, heldout.all_pairs(num_cameras, sources=train_cams), d.height, d.width,
                                  seed=args.seed)
    windows = sorted({p.start for p in pairs})
    print(f"{machine()} | load {os.getloadavg()[0]:.1f}")
    print(f"{len(pairs)} held-out pairs: windows starting at {windows} ({d.frames} frames at stride {d.stride}), "
          f"source cameras {train_cams}, held-out camera(s) {list(held_cams)}")

    with sh.use_mesh(mesh, rules):
        vae = build.build_vae(config, mesh)
        models = {"untrained": sampler.Experts([build.build_dit(config, mesh, rules)]),
                  "trained": sampler.load_experts(config, mesh, rules, args.workdir)}
        src = np.stack([p.source for p in pairs])
        cond = np.stack([p.condition for p in pairs])
        truth = np.stack([p.target for p in pairs])
        seeds = [args.seed * 100_000 + k for k in range(len(pairs))]
        outputs = {"source frames": src}
        for name, experts in models.items():
            t0 = time.time()
            outputs[name] = sampler.render(config, experts, vae, src, cond, seeds, mesh=mesh)
            print(f"sampled {len(pairs)} re-renders with the {name} model in {time.time() - t0:.0f} s")
        # The camera ablation: the trained model, the same source and noise, but the source
        # camera's own landmark map ("keep the camera"). Only a model that reads the camera
        # condition comes closer to the truth with the target camera's map than with this one.
        stay = {(p.start, p.source_camera): p.condition
                for p in heldout.heldout_pairs(source, [(i, i) for i in train_cams], d.height, d.width)}
        stay_cond = np.stack([stay[(p.start, p.source_camera)] for p in pairs])
        outputs[CONTROL] = sampler.render(config, models["trained"], vae, src, stay_cond, seeds, mesh=mesh)
        from facecam_jax.training.vae_training import reconstruct

        outputs["VAE reconstruction of the truth (ceiling)"] = reconstruct(vae, truth)

        # Canonical motions through the sampler's own path (proxy-head trajectories).
        motion_results = {name: {} for name in models}
        motion_rows = {name: [] for name in models}
        window = windows[0]
        times = window + d.stride * np.arange(d.frames)
        seq = source[0]["sequence"]
        for cam in MOTION_SOURCE_CAMERAS:
            frames = heldout.window_video(seq.cameras[cam], times, d.height, d.width, background=(128, 128, 128))
            src_path = write_lossless(os.path.join(args.out, "videos", f"motion_w{window}_c{cam}_source.avi"), frames)
            for motion in trajectories.CANONICAL_MOTIONS:
                path = trajectories.canonical(motion, d.frames)
                for name, experts in models.items():
                    result = sampler.generate(config, frames, path, experts=experts, vae=vae, mesh=mesh,
                                              seed=args.seed)
                    out_path = write_lossless(
                        os.path.join(args.out, "videos", f"motion_w{window}_c{cam}_{motion}_{name}.avi"), result.video)
                    motion_rows[name].append({"output": os.path.relpath(out_path, args.out),
                                              "source": os.path.relpath(src_path, args.out), "motion": motion})
                    if cam == 0:
                        motion_results[name][motion] = result
        print(f"generated {len(motion_rows['trained'])} canonical-motion videos per model")

    # Write everything and evaluate with facecam_jax.evaluation (the CLI's code path).
    group_of = ["held-out camera" if p.target_camera in held_cams else "training cameras" for p in pairs]
    reports: dict[tuple[str, str], dict] = {}
    for method, videos in outputs.items():
        key = method.split(" ")[0].lower()  # source | untrained | trained | vae | control
        rows_by_group: dict[str, list] = {}
        for k, p in enumerate(pairs):
            stem = os.path.join(args.out, "videos", f"w{p.start}_s{p.source_camera}_t{p.target_camera}")
            if method == "source frames":
                write_lossless(stem + "_source.avi", p.source)
                write_lossless(stem + "_truth.avi", p.target)
                write_lossless(stem + "_condition.avi", p.condition)
                out_path = stem + "_source.avi"
            else:
                out_path = write_lossless(f"{stem}_{key}.avi", videos[k])
            rows_by_group.setdefault(group_of[k], []).append(
                {"output": os.path.relpath(out_path, args.out), "source": os.path.relpath(stem + "_source.avi", args.out),
                 "target": os.path.relpath(stem + "_truth.avi", args.out)})
        for group, rows in rows_by_group.items():
            name = f"heldout_{key}_{'heldout_camera' if group == 'held-out camera' else 'train_cameras'}"
            reports[(method, group)] = evaluate(rows, args.out, name, identity=not args.no_identity)
    camera_reports = {name: evaluate(rows, args.out, f"motions_{name}", identity=False)
                      for name, rows in motion_rows.items()}
    captions = picture(pairs, outputs["trained"], args.picture)
    motion_picture(motion_results["trained"], args.motion_picture)

    lines = [f"Held-out windows start at frames {windows} ({d.frames} frames, stride {d.stride}); "
             f"{len(pairs)} (source, target) pairs; `{machine()}`.", "",
             "| target cameras | output | pairs | PSNR (dB) | SSIM | identity (dlib cos) | no face |",
             "|---|---|---|---|---|---|---|"]
    for group in ("training cameras", "held-out camera"):
        for method in outputs:
            o = reports.get((method, group))
            if o is None:
                continue
            lines.append(f"| {group} | {method} | {o['psnr_videos']} | {_fmt(o['psnr_mean'], 2)} | "
                         f"{_fmt(o['ssim_mean'], 4)} | {_fmt(o['identity_mean'], 3)} | "
                         f"{o['psnr_videos'] - o['identity_videos'] if o['identity_mean'] is not None else '-'} |")
    lines += ["", camera_ablation(outputs["trained"], outputs[CONTROL], truth, group_of)]
    lines += ["", f"Canonical motions (source: held-out window at frame {window}, cameras "
                  f"{list(MOTION_SOURCE_CAMERAS)}; 10 motions each):", "",
              "| model | videos | camera correct (change) | camera correct (last frame) | errors (no face) |",
              "|---|---|---|---|---|"]
    for name, o in camera_reports.items():
        acc = "-" if o["camera_accuracy"] is None else f"{100 * o['camera_accuracy']:.0f}% ({o['camera_correct']}/{o['camera_judged']})"
        last = "-" if o["camera_accuracy_last"] is None else f"{100 * o['camera_accuracy_last']:.0f}%"
        lines.append(f"| {name} | {o['videos']} | {acc} | {last} | {o['errors']} |")
    lines += ["", "Manifests (re-evaluate with `python -m facecam_jax.evaluate --manifest <file>`): "
              + ", ".join(f"`{o['manifest']}`" for o in [*reports.values(), *camera_reports.values()]),
              "", f"`{args.picture}` rows (source | condition | trained output | truth): " + "; ".join(captions) + ".",
              f"`{args.motion_picture}` rows ({', '.join(trajectories.CANONICAL_MOTIONS)}): source frame 0 | "
              "condition first | condition last | output first | output last.",
              "", f"Evaluation took {(time.time() - start) / 60:.1f} min (load average {os.getloadavg()[0]:.1f})."]
    summary = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"heldout": {f"{m} | {g}": o for (m, g), o in reports.items()}, "motions": camera_reports},
                  f, indent=1)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
