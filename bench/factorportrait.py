"""FactorPortrait at the mini scale: held-out self-reenactment against two baselines, and the
paper's C2 ablation (no normal maps) at the same budget (issue 33; bench/RESULTS.md).

    python -m facecam_jax.train --config configs/facecam.py:factorportrait-mini --workdir runs/factorportrait-mini
    python -m facecam_jax.train --config configs/facecam.py:factorportrait-mini-no-normals \
        --workdir runs/factorportrait-mini-no-normals
    python bench/factorportrait.py ship --runs runs        # -> data/factorportrait_mini (bfloat16)
    python bench/factorportrait.py evaluate --seed 0 --out fp.json --picture fp.png   # the shipped models

``evaluate``: every held-out time window of the mini dataset (data.holdout_windows; camera 4 is
held out too) and every ordered pair of its cameras: the reference is the source camera's first
frame, the truth the target camera over the window, and the driving signals are the target
clip's own (self-reenactment, as in training: its landmarks' normal maps and expression codes,
the target cameras relative to the source). Rows, each scored against the truth (PSNR, SSIM over
every frame, ``facecam_jax.evaluation.scores``; and PSNR inside the truth's mouth box, where the
expression shows):

  full            factorportrait-mini
  no expression   the same model with the expression codes zeroed (baseline)
  no normals      factorportrait-mini-no-normals, trained at the same budget (the C2 ablation)
  reference       the reference image repeated (baseline: no animation, no new view)

with paired differences (95% bootstrap intervals over pairs), split by whether camera 4 (never
trained on) is in the pair. ``--weights DIR``: runs in ``DIR/<variant>`` instead of the shipped ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from bench.common import bootstrap, machine, ship_bf16, write_report  # noqa: E402
from facecam_jax import build  # noqa: E402
from facecam_jax import sharding as sh  # noqa: E402
from facecam_jax.runtime.config_file import load_config  # noqa: E402

VARIANTS = {"full": "factorportrait-mini", "no normals": "factorportrait-mini-no-normals"}
ROWS = ("full", "no expression", "no normals", "reference")
METRICS = ("psnr", "ssim", "mouth_psnr")
LABELS = {"psnr": "PSNR", "ssim": "SSIM", "mouth_psnr": "mouth PSNR"}
HELD_CAMERA = 4
LIPS = (0, 13, 14, 17, 37, 40, 61, 78, 84, 91, 146, 181, 267, 270, 291, 308, 314, 321, 375, 405)  # MediaPipe lip points


def mouth_psnr(video: np.ndarray, truth: np.ndarray, landmarks: np.ndarray) -> float:
    """PSNR (dB) inside the truth's mouth box per frame (the lips' landmarks' box, grown by half
    its size each way), averaged over frames: where expression shows."""
    from facecam_jax.evaluation import scores

    height, width = truth.shape[1:3]
    values = []
    for t in range(len(truth)):
        xy = landmarks[t, LIPS, :2] * [width, height]
        lo, hi = xy.min(0), xy.max(0)
        pad = 0.5 * (hi - lo) + 1.0
        (x0, y0), (x1, y1) = np.floor(lo - pad).astype(int), np.ceil(hi + pad).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        values.append(scores.psnr(video[t:t + 1, y0:y1, x0:x1], truth[t:t + 1, y0:y1, x0:x1]))
    return float(np.mean(values))


def heldout_pairs(config) -> list[dict]:
    """Every held-out window and ordered camera pair: the source video (its first frame is the
    reference), the truth, and the target's per-frame landmarks and cameras as a training batch
    carries them."""
    from facecam_jax.data import augment, heldout, pipeline

    d = config.data
    source = pipeline.heldout_source(d)
    pairs = []
    for index in range(len(source)):
        record = source[index]
        seq = record["sequence"]
        start, frames = int(record["start"]), int(record["frames"])
        times = start + record["stride"] * np.arange(frames)
        cameras = range(len(seq.cameras))
        for i in cameras:
            for j in cameras:
                if i == j:
                    continue
                colour = tuple(int(c) for c in np.random.default_rng([0, start, i, j]).integers(0, 256, size=3))
                target = seq.cameras[j]
                points, _ = target.store.read_landmarks(times)
                crop = augment.cover_crop_params(target.height, target.width, d.height, d.width)
                source_crop = augment.cover_crop_params(seq.cameras[i].height, seq.cameras[i].width, d.height, d.width)
                k_target = augment.cover_crop_intrinsics(seq.intrinsics[j], target.height, target.width, crop)
                k_source = augment.cover_crop_intrinsics(seq.intrinsics[i], seq.cameras[i].height,
                                                         seq.cameras[i].width, source_crop)
                pairs.append({
                    "start": start, "source_camera": i, "target_camera": j,
                    "source": heldout.window_video(seq.cameras[i], times, d.height, d.width, colour),
                    "target": heldout.window_video(target, times, d.height, d.width, colour),
                    "target_landmarks": augment.cover_crop_points(points, crop, d.height, d.width).astype(np.float32),
                    "source_world_2_cam": seq.world_2_cam[i].astype(np.float32),
                    "source_intrinsics": k_source.astype(np.float32),
                    "target_world_2_cam": np.repeat(seq.world_2_cam[j][None], frames, 0).astype(np.float32),
                    "target_intrinsics": np.repeat(k_target[None], frames, 0).astype(np.float32)})
    return pairs


def render(variant: str, pairs: list[dict], seed: int, weights: str | None, *, zero_expression: bool = False):
    """Every pair animated by ``variant``'s model: uint8 [N, T, H, W, 3]."""
    import jax.numpy as jnp

    from facecam_jax import conditioning
    from facecam_jax import sampling as sampler
    from facecam_jax.data.transforms import NormalMaps

    config = load_config(variant)
    kind = conditioning.of(config)
    mesh, rules = build.mesh_and_rules(config)
    workdir = os.path.join(weights, variant) if weights else None
    with sh.use_mesh(mesh, rules):
        experts = sampler.load_experts(config, mesh, rules, sampler.experts.weights_dir(config, workdir))
        vae = build.build_vae(config, mesh)
        batch = {k: np.stack([p[k] for p in pairs]) for k in kind.batch_keys() if k != "normals"}
        if "normals" in kind.batch_videos:  # the target's own meshes, as the data pipeline draws them
            batch["normals"] = np.stack([NormalMaps().map({"target": p["target"],
                                                           "target_landmarks": p["target_landmarks"]})["normals"]
                                         for p in pairs])
        videos = {k: batch[k] for k in kind.batch_videos}
        raw = {**videos, **kind.condition(videos, {k: jnp.asarray(v) for k, v in batch.items()})}
        raw = {k: np.asarray(v) for k, v in raw.items()}
        if zero_expression:
            raw["expression"] = np.zeros_like(raw["expression"])
        seeds = [seed + n for n in range(len(pairs))]
        return sampler.render(config, experts, vae, batch["source"], raw, seeds, mesh=mesh, batch=8,
                              show_progress=False)


def summarise(rows: list[dict], seed: int) -> dict:
    groups = {"all": list(range(len(rows))),
              "camera 4 in the pair": [n for n, r in enumerate(rows)
                                       if HELD_CAMERA in (r["source_camera"], r["target_camera"])]}
    groups["trained cameras"] = sorted(set(groups["all"]) - set(groups["camera 4 in the pair"]))
    out = {"rows": {}, "differences": {}}
    for name in ROWS:
        out["rows"][name] = {f"{m} ({g})": float(np.mean([rows[n][name][m] for n in members]))
                             for g, members in groups.items() for m in METRICS if members}
    rng = np.random.default_rng(seed)
    for other in ROWS[1:]:
        out["differences"][f"full - {other}"] = {
            f"{m} ({g})": bootstrap(np.array([rows[n]["full"][m] - rows[n][other][m] for n in members]), rng)
            for g, members in groups.items() for m in METRICS if members}
    return out


def table(result: dict) -> str:
    groups = ("all", "trained cameras", "camera 4 in the pair")
    lines = ["| row | " + " | ".join(f"{LABELS[m]} ({g})" for g in groups for m in METRICS) + " |",
             "|---|" + "---|" * (len(groups) * len(METRICS))]
    for name, e in result["rows"].items():
        digits = {"psnr": 2, "ssim": 3, "mouth_psnr": 2}
        lines.append(f"| {name} | " + " | ".join(f"{e.get(f'{m} ({g})', float('nan')):.{digits[m]}f}" for g in groups
                                                 for m in METRICS)
                     + " |")
    lines += ["", "| paired difference (mean [95% CI]) | " + " | ".join(f"{LABELS[m]} ({g})" for g in groups
                                                                        for m in METRICS) + " |",
              "|---|" + "---|" * (len(groups) * len(METRICS))]
    for name, d in result["differences"].items():
        lines.append(f"| {name} | " + " | ".join(
            "{:+.3f} [{:+.3f}, {:+.3f}]".format(*d[f"{m} ({g})"]) if f"{m} ({g})" in d else "-"  # a group without pairs
            for g in groups for m in METRICS) + " |")
    return "\n".join(lines)


def picture(path: str, pairs: list[dict], videos: dict, picks: list[int]) -> None:
    """Rows: picked pairs; columns: reference | truth (last frame) | each row's last frame."""
    import cv2

    lines = []
    for n in picks:
        cells = [pairs[n]["source"][0], pairs[n]["target"][-1]] + [videos[r][n][-1] for r in ROWS[:3]]
        lines.append(np.concatenate(cells, axis=1))
    image = np.concatenate(lines, axis=0)
    image = cv2.resize(image, (image.shape[1] * 3, image.shape[0] * 3), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def evaluate(args):
    from facecam_jax.evaluation import scores

    t0 = time.perf_counter()
    pairs = heldout_pairs(load_config(VARIANTS["full"]))
    if args.limit:
        pairs = pairs[::max(1, len(pairs) // args.limit)][:args.limit]
    print(f"{len(pairs)} held-out pairs", flush=True)
    videos = {"full": render(VARIANTS["full"], pairs, args.seed, args.weights),
              "no expression": render(VARIANTS["full"], pairs, args.seed, args.weights, zero_expression=True),
              "no normals": render(VARIANTS["no normals"], pairs, args.seed, args.weights),
              "reference": np.stack([np.repeat(p["source"][:1], len(p["source"]), 0) for p in pairs])}
    rows = [{"start": p["start"], "source_camera": p["source_camera"], "target_camera": p["target_camera"],
             **{name: {"psnr": scores.psnr(videos[name][n], p["target"]), "ssim": scores.ssim(videos[name][n], p["target"]),
                       "mouth_psnr": mouth_psnr(videos[name][n], p["target"], p["target_landmarks"])}
                for name in ROWS}} for n, p in enumerate(pairs)]
    result = summarise(rows, args.seed)
    result.update(seed=args.seed, pairs=rows, machine=machine(), seconds=time.perf_counter() - t0,
                  weights=args.weights or "data/factorportrait_mini (shipped)")
    text = table(result)
    print(text)
    write_report(args.out, result, text)
    if args.picture:
        picks = [n for n, r in enumerate(rows) if r["start"] == rows[-1]["start"] and r["source_camera"] == 0][:6]
        picture(args.picture, pairs, videos, picks or list(range(min(6, len(rows)))))
    print(f"{len(pairs)} pairs, {time.perf_counter() - t0:.0f} s on {machine()}")


def ship(args):
    """Each run's trained weights (``<runs>/<variant>/facecam.safetensors``) -> the shipped folder
    (``FACTORPORTRAIT_DIR``, the ablation in ``no_normals/``), in bfloat16 (``common.ship_bf16``)."""
    for variant in VARIANTS.values():
        src = os.path.join(args.runs, variant, "facecam.safetensors")
        if not os.path.exists(src):
            raise SystemExit(f"error: {src} does not exist: train it first (python -m facecam_jax.train "
                             f"--config configs/facecam.py:{variant} --workdir {args.runs}/{variant})")
        ship_bf16(src, os.path.join(load_config(variant).sample.weights, "facecam.safetensors"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default="factorportrait_eval.json")
    e.add_argument("--picture", default="")
    e.add_argument("--weights", default=None, help="a folder of <variant>/ runs instead of the shipped models")
    e.add_argument("--limit", type=int, default=0, help="every k-th pair only, this many (a quick check)")
    s = sub.add_parser("ship")
    s.add_argument("--runs", default="runs")
    args = p.parse_args(argv)
    {"evaluate": evaluate, "ship": ship}[args.command](args)


if __name__ == "__main__":
    main()
