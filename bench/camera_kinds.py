"""The camera kinds side by side: what each costs (``cost``), and FaceCam's claim tested (``evaluate``).

    python bench/camera_kinds.py cost                 # small DiT, 17 x 96 x 128, batch 1, CPU-sized
    python bench/camera_kinds.py cost --base nersemble,model.dit=wan2.1-t2v-1.3b,batch_size=1   # on a GPU
    python -m facecam_jax.train --config configs/facecam.py:scale-landmarks --workdir runs/scale-landmarks
    python bench/camera_kinds.py ship                 # runs/scale-* -> data/scale_kinds (bfloat16)
    python bench/camera_kinds.py evaluate --seed 0 --out result.json     # the shipped models

``cost``: each kind's config is the base plus ``camera.kind`` (and its own input width):
FaceCam's ``landmarks`` (a third video VAE-encoded, 36 input channels) and ReCamMaster's
``recammaster`` (camera layers in every block, 16 channels, its poses from the batch's cameras).
The steps are ``train_step.build_program``'s on random videos (and random rotations for the
cameras), timed in turn (A B A B ...) so that drift on a shared machine falls on both. Reported
per kind: median step time, the analytic FLOPs of the DiT and the VAE (``perf.flops``), and the
compiled plan's per-device memory; then the ratios recammaster / landmarks.

``evaluate``: the ``scale-<kind>`` models (one recipe on the scale-ambiguous mini dataset, only
``camera.kind`` changed: configs/facecam.py), shipped in data/scale_kinds/<kind> (``--weights``
another folder of ``<kind>/`` runs), re-render the same held-out pairs with the same noise
(seed ``--seed`` plus the pair's view: the same noise for a view at every scale): every held-out time window (data.holdout_windows) of
every participant (scene scale) of the training data, and of a scale no training sample had
(``UNSEEN_SCALES``), for the camera pairs ``PAIRS`` (the held-out camera 4 among the targets).
Scores per pair against the true target view: PSNR, SSIM (``facecam_jax.evaluation.scores``;
LPIPS needs network weights that cannot be fetched here) and the camera error of
``facecam_jax.evaluation.placement`` (where and how big the output draws the face), split by
subject scale (near: scale < 1, far: > 1, unseen). The source frames themselves are scored as a
row too (no re-rendering). Paired differences between kinds come with 95% bootstrap intervals
over pairs; so does each kind's near - far difference view by view (same pixels and noise at
every scale: what the camera's scale alone changes; exactly 0 for a kind that cannot see it). Writes ``--out`` (JSON: ``{"kinds": {kind: {"psnr", "ssim", "camera_error",
"camera_error_near", "camera_error_far", ...}}, "differences": ..., "pairs": [...]}``), a
Markdown table beside it, and ``--picture``.
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

from bench.common import bootstrap, machine, ship_bf16, si, write_report  # noqa: E402
from facecam_jax import build  # noqa: E402
from facecam_jax import sharding as sh  # noqa: E402
from facecam_jax.perf.flops import step_flops  # noqa: E402
from facecam_jax.perf.report import Compiled  # noqa: E402
from facecam_jax.runtime.config_file import load_config  # noqa: E402
from facecam_jax.training import train_step  # noqa: E402

BASE = "mini,model.dit=small,frames=17,height=96,width=128,batch_size=1"
KINDS = {"landmarks": "camera.kind=landmarks", "recammaster": "camera.kind=recammaster,model.in_dim=16"}


def _batch(program, rng):
    """Random uint8 videos, and world-to-camera matrices (random rotations, metres) for camera arrays."""
    out = {}
    for key, spec in program.batch.items():
        if spec.dtype == np.uint8:
            value = rng.integers(0, 256, spec.shape, np.uint8)
        else:
            q = np.linalg.qr(rng.standard_normal((*spec.shape[:-2], 3, 3)))[0]
            value = np.broadcast_to(np.eye(4), spec.shape).copy()
            value[..., :3, :3], value[..., :3, 3] = q, rng.standard_normal((*spec.shape[:-2], 3))
            value = value.astype(np.float32)
        out[key] = jax.device_put(value, program.batch_sharding)
    return out


def prepare(config):
    mesh, rules = build.mesh_and_rules(config)
    with sh.use_mesh(mesh, rules):
        program = train_step.build_program(config, mesh, rules)
        batch = _batch(program, np.random.default_rng(0))
        start = time.perf_counter()
        compiled = program.lower().compile()
        plan = Compiled.of("train step", compiled, time.perf_counter() - start)
    state = [program.state]

    def step():
        with sh.use_mesh(mesh, rules):
            t0 = time.perf_counter()
            state[0], metrics = compiled(state[0], program.frozen, program.vae_state, program.context, batch)
            jax.block_until_ready(metrics)
            return time.perf_counter() - t0

    step()  # warm-up
    return step, plan


def cost(args):
    print(f"machine: {machine()}; base config {args.base}")
    runs = {}
    for kind, overrides in KINDS.items():
        config = load_config(f"{args.base},{overrides}")
        step, plan = prepare(config)
        runs[kind] = dict(step=step, plan=plan, flops=step_flops(config, "train"), times=[],
                          tokens=build.token_counts(config)[0])
    for _ in range(args.steps):
        for r in runs.values():
            r["times"].append(r["step"]())
    rows = ["| kind | tokens | step (median) | DiT FLOPs | VAE FLOPs | per-device memory (plan) |",
            "|---|---|---|---|---|---|"]
    for kind, r in runs.items():
        r["median"] = statistics.median(r["times"])
        dit = r["flops"]["forward"] + r["flops"]["backward"] + r["flops"]["remat"]
        r["dit"] = dit
        rows.append(f"| {kind} | {r['tokens']} | {r['median'] * 1000:.0f} ms | {si(dit)} | {si(r['flops']['vae'])} | "
                    f"{r['plan'].total / 2**20:.1f} MiB |")
    print("\n".join(rows))
    a, b = runs["recammaster"], runs["landmarks"]
    print(f"recammaster / landmarks: step time {a['median'] / b['median']:.2f}x, DiT FLOPs {a['dit'] / b['dit']:.3f}x, "
          f"VAE FLOPs {a['flops']['vae'] / b['flops']['vae']:.2f}x, memory {a['plan'].total / b['plan'].total:.2f}x")


# ------------------------------------------------------------------ evaluate

COMPARED = ("landmarks", "recammaster", "plucker", "none")
# (source camera, target camera) of each held-out window: small and large yaw changes, pitch
# changes, and the held-out camera 4 (never a source or target in training) from three sources.
PAIRS = ((0, 1), (1, 2), (2, 0), (3, 6), (7, 5), (0, 4), (1, 4), (2, 4))
UNSEEN_SCALES = (1.0,)
METRICS = ("psnr", "ssim", "camera_error")


def scale_group(scale: float, trained: tuple[float, ...]) -> str:
    if scale not in trained:
        return "unseen"
    return "near" if scale < 1.0 else "far"


def hash_view(start: int, source: int, target: int) -> int:
    """A pair's view (window start, source and target camera) as a small number: its noise seed
    offset, the same at every scale, so the scales of one view are sampled alike."""
    return start * len(PAIRS) + PAIRS.index((source, target))


def heldout_pairs(config, scales: tuple[float, ...]) -> list[dict]:
    """The held-out pairs of the scale-ambiguous build with ``scales``: uint8 source, truth and
    landmark map, the cameras as a training batch carries them, the truth's face boxes."""
    from facecam_jax.data import augment, heldout, pipeline
    from facecam_jax.evaluation import placement

    config = config.copy_and_resolve_references()
    config.data.mini.scales = tuple(scales)
    d = config.data
    source = pipeline.heldout_source(d)
    pairs = []
    for index in range(len(source)):
        record = source[index]
        seq = record["sequence"]
        participant = int(str(seq.name).split("/")[0]) if "/" in str(seq.name) else 0
        start, frames = int(record["start"]), int(record["frames"])
        times = start + record["stride"] * np.arange(frames)
        for i, j in PAIRS:
            colour = tuple(int(c) for c in np.random.default_rng([0, start, i, j]).integers(0, 256, size=3))
            target = seq.cameras[j]
            crop = augment.cover_crop_params(target.height, target.width, d.height, d.width)
            points, _ = target.store.read_landmarks(times)
            points = augment.cover_crop_points(points, crop, d.height, d.width)[..., :2] * [d.width, d.height]
            k = augment.cover_crop_intrinsics(seq.intrinsics[j], target.height, target.width, crop)
            pairs.append({
                "view": hash_view(start, i, j), "sequence": str(seq.name), "scale": float(scales[participant]),
                "start": start, "source_camera": i,
                "target_camera": j,
                "source": heldout.window_video(seq.cameras[i], times, d.height, d.width, colour),
                "target": heldout.window_video(target, times, d.height, d.width, colour),
                "camera": heldout.anchor_condition(target, start, frames, d.height, d.width),
                "source_world_2_cam": seq.world_2_cam[i].astype(np.float32),
                "target_world_2_cam": np.repeat(seq.world_2_cam[j][None], frames, 0).astype(np.float32),
                "target_intrinsics": np.repeat(k[None], frames, 0).astype(np.float32),
                "boxes": [placement.face_box(p) for p in points]})
    return pairs


def render_kind(kind_name: str, pairs: list[dict], seed: int, weights: str | None) -> np.ndarray:
    """Every pair re-rendered by the ``scale-<kind>`` model: uint8 [N, T, H, W, 3]."""
    import jax.numpy as jnp

    from facecam_jax import conditioning
    from facecam_jax import sampling as sampler

    config = load_config(f"scale-{kind_name}")
    kind = conditioning.of(config)
    mesh, rules = build.mesh_and_rules(config)
    workdir = os.path.join(weights, kind_name) if weights else None
    with sh.use_mesh(mesh, rules):
        experts = sampler.load_experts(config, mesh, rules, sampler.experts.weights_dir(config, workdir))
        vae = build.build_vae(config, mesh)
        batch = {k: np.stack([p[k] for p in pairs]) for k in kind.batch_keys()}
        raw = {k: batch[k] for k in kind.batch_videos}
        raw.update(kind.condition({}, {k: jnp.asarray(v) for k, v in batch.items()}))
        seeds = [seed + p["view"] for p in pairs]  # one noise per view, the same at every scale
        return sampler.render(config, experts, vae, batch["source"], raw, seeds, mesh=mesh, batch=8,
                              show_progress=False)


def score(video: np.ndarray, pair: dict) -> dict:
    from facecam_jax.evaluation import placement, scores

    return {"psnr": scores.psnr(video, pair["target"]), "ssim": scores.ssim(video, pair["target"]),
            "camera_error": placement.video_error(video, pair["target"], pair["boxes"])}


def summarise(rows: list[dict], kinds: tuple[str, ...], trained: tuple[float, ...], seed: int) -> dict:
    out = {"kinds": {}, "differences": {}}
    groups = {"near": [], "far": [], "unseen": []}
    for n, r in enumerate(rows):
        groups[scale_group(r["scale"], trained)].append(n)
    for kind in kinds:
        entry = {m: float(np.mean([r[kind][m] for r in rows])) for m in METRICS}
        for group, members in groups.items():
            for m in METRICS:
                if members:
                    entry[f"{m}_{group}"] = float(np.mean([rows[n][kind][m] for n in members]))
        out["kinds"][kind] = entry
    rng = np.random.default_rng(seed)
    # Each kind against itself across scales, view by view: the same pixels and noise at every
    # scale, so a difference is the camera's scale alone (0 for a kind that cannot see it).
    views = sorted({r["view"] for r in rows})
    for kind in kinds:
        near, far = [], []
        for v in views:
            by = {g: [r[kind] for n, r in enumerate(rows) if r["view"] == v and n in set(groups[g])]
                  for g in ("near", "far")}
            if by["near"] and by["far"]:
                near.append({m: np.mean([x[m] for x in by["near"]]) for m in METRICS})
                far.append({m: np.mean([x[m] for x in by["far"]]) for m in METRICS})
        if near:
            out["differences"][f"{kind}: near - far"] = {
                m: bootstrap(np.array([a[m] - b[m] for a, b in zip(near, far)]), rng) for m in METRICS}
    for a in kinds:
        for b in kinds:
            if a == b or a not in ("landmarks", "none") or b == "source" or (a == "none" and b == "landmarks"):
                continue
            name = f"{a} - {b}"
            out["differences"][name] = {
                f"{m}{'_' + g if g else ''}": bootstrap(np.array([rows[n][a][m] - rows[n][b][m] for n in members]), rng)
                for m in METRICS for g, members in (("", range(len(rows))), *groups.items()) if len(members)}
    return out


def table(result: dict, kinds: tuple[str, ...]) -> str:
    lines = ["| kind | PSNR | SSIM | camera error | near | far | unseen scale |", "|---|---|---|---|---|---|---|"]
    for kind in kinds:
        e = result["kinds"][kind]
        lines.append(f"| {kind} | {e['psnr']:.2f} | {e['ssim']:.3f} | {e['camera_error']:.3f} | "
                     f"{e.get('camera_error_near', float('nan')):.3f} | {e.get('camera_error_far', float('nan')):.3f} | "
                     f"{e.get('camera_error_unseen', float('nan')):.3f} |")
    lines += ["", "| paired difference (mean [95% CI]) | PSNR | SSIM | camera error | camera error near | "
              "camera error far |", "|---|---|---|---|---|---|"]
    for name, d in result["differences"].items():
        cells = [f"{d[k][0]:+.3f} [{d[k][1]:+.3f}, {d[k][2]:+.3f}]" if k in d else "-"
                 for k in ("psnr", "ssim", "camera_error", "camera_error_near", "camera_error_far")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def picture(path: str, pairs: list[dict], videos: dict, kinds: tuple[str, ...], picks: list[int]) -> None:
    """Rows: picked pairs (middle frame); columns: source | truth | each kind."""
    import cv2

    rows = []
    for n in picks:
        f = pairs[n]["target"].shape[0] // 2
        rows.append(np.concatenate([pairs[n]["source"][f], pairs[n]["target"][f]] + [videos[k][n][f] for k in kinds],
                                   axis=1))
    image = np.concatenate(rows, axis=0)
    image = cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def evaluate(args):

    t0 = time.perf_counter()
    base = load_config("scale-landmarks")
    trained = tuple(base.data.mini.scales)
    pairs = heldout_pairs(base, trained) + heldout_pairs(base, UNSEEN_SCALES)
    if args.limit:  # a quick check: every k-th pair (all scales still present)
        pairs = pairs[::max(1, len(pairs) // args.limit)][:args.limit]
    kinds = tuple(args.kinds.split(","))
    videos = {"source": np.stack([p["source"] for p in pairs])}
    for kind in kinds:
        print(f"{kind}: rendering {len(pairs)} held-out pairs", flush=True)
        videos[kind] = render_kind(kind, pairs, args.seed, args.weights)
    names = ("source", *kinds)
    rows = []
    for n, pair in enumerate(pairs):
        rows.append({"view": pair["view"], "sequence": pair["sequence"], "scale": pair["scale"], "start": pair["start"],
                     "source_camera": pair["source_camera"], "target_camera": pair["target_camera"],
                     **{k: score(videos[k][n], pair) for k in names}})
    result = summarise(rows, names, trained, args.seed)
    result.update(seed=args.seed, pairs=rows, machine=machine(), seconds=time.perf_counter() - t0,
                  weights=args.weights or "data/scale_kinds (shipped)", trained_scales=list(trained),
                  unseen_scales=list(UNSEEN_SCALES))
    text = table(result, names)
    print(text)
    write_report(args.out, result, text)
    if args.picture:
        near = [n for n, r in enumerate(rows) if r["scale"] == min(trained) and r["start"] == rows[0]["start"]]
        far = [n for n, r in enumerate(rows) if r["scale"] == max(trained) and r["start"] == rows[0]["start"]]
        picture(args.picture, pairs, videos, kinds, near[:4] + far[:4])
    print(f"{len(pairs)} pairs, {time.perf_counter() - t0:.0f} s on {machine()}")


def ship(args):
    """Each run's trained weights (``<runs>/scale-<kind>/facecam.safetensors``) -> the shipped folder
    (``SCALE_DIR/<kind>``), in bfloat16 (``common.ship_bf16``)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import facecam as configs  # noqa: E402

    for kind in args.kinds.split(","):
        src = os.path.join(args.runs, f"scale-{kind}", "facecam.safetensors")
        if not os.path.exists(src):
            raise SystemExit(f"error: {src} does not exist: train it first (python -m facecam_jax.train "
                             f"--config configs/facecam.py:scale-{kind} --workdir {args.runs}/scale-{kind})")
        ship_bf16(src, os.path.join(configs.SCALE_DIR, kind, "facecam.safetensors"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    h = sub.add_parser("ship", help="copy the trained scale-* runs into the shipped folder (bfloat16)")
    h.add_argument("--runs", default="runs")
    h.add_argument("--kinds", default=",".join(COMPARED))
    c = sub.add_parser("cost", help="each kind's train step, side by side")
    c.add_argument("--base", default=BASE, help="the config both kinds share")
    c.add_argument("--steps", type=int, default=5, help="timed steps per kind, in turn")
    e = sub.add_parser("evaluate", help="the scale-* models on the held-out pairs")
    e.add_argument("--seed", type=int, default=0, help="noise seed of pair 0 (pair n: seed + n)")
    e.add_argument("--out", default="runs/camera_kinds/result.json")
    e.add_argument("--weights", default=None, help="a folder of <kind>/ training runs (default: the shipped models)")
    e.add_argument("--kinds", default=",".join(COMPARED))
    e.add_argument("--picture", default=None, help="also write a picture (source | truth | each kind) here")
    e.add_argument("--limit", type=int, default=0, help="evaluate only this many pairs (a quick check; 0: all)")
    args = p.parse_args(argv)
    if args.command == "evaluate":
        evaluate(args)
    elif args.command == "ship":
        ship(args)
    else:
        if args.command is None:
            args = p.parse_args(["cost", *(argv or sys.argv[1:])])
        cost(args)


if __name__ == "__main__":
    main()
