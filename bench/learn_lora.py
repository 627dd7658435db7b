"""Does LoRA fine-tuning learn through the real trainer? The shipped mini FaceCam, fine-tuned
on one camera it never saw, with LoRA and in full, scored on held-out windows of that camera.

    python bench/learn_lora.py                      # ~30-40 min on a 2-core CPU
    python bench/learn_lora.py --steps 50 --pairs 7 # a quick look

Start: the shipped `learn` DiT (data/learned_mini: the `small` DiT trained from scratch with
camera 4 and time windows 36-44, 72-80 and 108-116 held out). Fine-tuning data: the training
windows only (data.holdout_windows unchanged), with camera 4 as the target of every sample
(data.target_cameras=(4,), sources from the other cameras; no in-the-wild samples). Two runs
of the same steps, batch, seed and data stream: LoRA (train.lora_rank, adapters on the
self-attention, patch embedding and q/k norm scales in full) and the full fine-tune of the
same selection (the paper's trainable subset). Both go through `facecam_jax.training.trainer.train`,
export, and are loaded back with `sampler.load_experts` (the LoRA merged at strength 1).

Scored: held-out windows x the 7 other cameras as source -> camera 4 (the fine-tuned camera),
and as a forgetting check the same windows -> another camera (the source's next one), PSNR /
SSIM to the truth, 20 Euler steps, the same noise for every model. Also: trained parameters,
optimizer-state bytes and the compiled train step's per-device memory (`facecam_jax.fit` on
the local device). Prints the tables and writes them to <out>/summary.md and summary.json.
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

TARGET = 4  # the camera `learn` holds out: yaw 12, pitch -9


def configs(args) -> dict:
    """The fine-tuning config of each run by its name (also its folder under --out)."""
    from facecam_jax.runtime.config_file import load_config

    common = (f"learn,steps={args.steps},log_every=10,checkpoint_every={args.steps},preview_every={10 * args.steps}"
              f",batch_size={args.batch},wild_ratio=0.0,seed={args.seed},num_steps={args.sample_steps}")
    runs = {f"lora_r{args.rank}_lr{args.lora_lr:g}": f",train.lora_rank={args.rank},optimizer.lr={args.lora_lr}"}
    runs.update({f"full_lr{lr:g}": f",optimizer.lr={lr}" for lr in map(float, args.full_lr.split(","))})
    out = {}
    for name, extra in runs.items():
        config = load_config(common + extra)
        config.train.trainable = tuple(args.trainable.split("+"))
        config.data.holdout_cameras = ()  # camera 4 takes part, as the only target
        config.data.target_cameras = (TARGET,)
        config.model.dit_checkpoint = args.base
        out[name] = config
    return out


def label(config) -> str:
    t = config.train
    return f"LoRA rank {t.lora_rank}" if t.lora_rank else "full fine-tune"


def base_export(out: str) -> str:
    """The shipped DiT as an Orbax export, which `load_dit` reads with its own (already
    widened, 36-channel) architecture, so `model.dit_checkpoint` can start training from it."""
    from facecam_jax import build
    from facecam_jax.checkpoints.dit import overlay_dit, save_dit_orbax
    from facecam_jax.runtime.config_file import load_config

    path = os.path.join(out, "base_orbax")
    if not os.path.exists(path):
        config = load_config("learn")
        mesh, rules = build.mesh_and_rules(config)
        model = build.build_dit(config, mesh, rules)
        overlay_dit(model, os.path.join(config.sample.weights, "facecam.safetensors"))  # data/learned_mini
        save_dit_orbax(model, path)
    return path


def memory(config) -> dict:
    """Trained parameters, optimizer-state bytes and the compiled step's per-device plan."""
    from facecam_jax.fit import programs as fit
    report = fit.analyze(config, "train", None, config_name="learn_lora")
    return {"trainable": report.trainable, "optimizer_bytes": report.optimizer_bytes,
            "memory": report.memory, "arguments": report.peak.arguments, "temporaries": report.peak.temporaries}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/learn-lora", help="runs, exports and the summary")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora_lr", type=float, default=1e-3)
    parser.add_argument("--full_lr", default="1e-4", help="the full fine-tune's lr; several (1e-4,1e-3): one run each")
    parser.add_argument("--trainable", default="self_attn+patch_embedding", help="train.trainable, '+'-separated")
    parser.add_argument("--pairs", type=int, default=0, help="score only the first N pairs per group (0: all)")
    parser.add_argument("--sample_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="", help="the starting DiT (default: the shipped one, exported to --out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.time()

    from facecam_jax import build
    from facecam_jax import sampling as sampler
    from facecam_jax import sharding as sh
    from facecam_jax.data import heldout, pipeline
    from facecam_jax.evaluation.scores import psnr, ssim
    from facecam_jax.training import trainer

    os.makedirs(args.out, exist_ok=True)
    args.base = os.path.abspath(args.base or base_export(args.out))  # Orbax reads absolute paths only
    runs = configs(args)
    print(f"{machine()} | load {os.getloadavg()[0]:.1f}")

    # Fine-tune both, through the trainer (checkpoints, export), from the same start.
    results = {}
    for name, config in runs.items():
        workdir = os.path.join(args.out, name)
        result = trainer.train(config, workdir)  # a finished run in --out is reused (nothing to do)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            logged = list(map(json.loads, f))
        losses = [m["loss"] for m in logged]
        fifth = max(1, len(losses) // 5)  # the flow loss of one step is noisy: means of the first and last fifth
        minutes = args.steps * float(np.mean([m["step_time"] for m in logged])) / 60  # steps x mean logged step
        results[name] = {"workdir": workdir, "minutes": minutes,
                         "first_loss": float(np.mean(losses[:fifth])), "last_loss": float(np.mean(losses[-fifth:])),
                         "exported": [result.exported, result.exported_lora], **memory(config)}
        r = results[name]
        print(f"{name}: {result.step} steps, {r['minutes']:.1f} min, loss {r['first_loss']:.3f} -> "
              f"{r['last_loss']:.3f} (means of the first and last {fifth} logged)", flush=True)

    # Held-out windows (never read by either run): sources -> camera 4, and -> another camera.
    config = next(iter(runs.values()))
    d = config.data
    source = pipeline.heldout_source(d)
    cameras = range(len(source[0]["sequence"].cameras))
    others = [c for c in cameras if c != TARGET]
    groups = {f"held-out camera {TARGET} (fine-tuned on)": [(i, TARGET) for i in others],
              "other cameras (forgetting check)": [(i, others[(k + 1) % len(others)]) for k, i in enumerate(others)]}
    mesh, rules = build.mesh_and_rules(config)
    eval_config = config.copy_and_resolve_references()
    eval_config.train.lora_rank = 0
    scores: dict = {}
    with sh.use_mesh(mesh, rules):
        vae = build.build_vae(config, mesh)
        models = {"shipped (start)": sampler.Experts([build.build_dit(eval_config, mesh, rules)])}
        for name, c in runs.items():
            model = f"{label(c)}, lr {c.optimizer.lr:g}"
            models[model] = sampler.load_experts(eval_config, mesh, rules, results[name]["workdir"])
        for group, pairs_ in groups.items():
            pairs = heldout.heldout_pairs(source, pairs_, d.height, d.width, seed=args.seed)
            pairs = pairs[: args.pairs] if args.pairs else pairs
            src, cond = np.stack([p.source for p in pairs]), np.stack([p.condition for p in pairs])
            seeds = [args.seed * 100_000 + k for k in range(len(pairs))]
            start_psnr = None
            for name, experts in models.items():
                out = sampler.render(eval_config, experts, vae, src, cond, seeds, mesh=mesh, show_progress=False)
                per_pair = np.array([psnr(o, p.target) for o, p in zip(out, pairs)])
                start_psnr = per_pair if start_psnr is None else start_psnr  # the first model is the start
                gain = per_pair - start_psnr  # paired: the same source, condition and noise
                scores[(group, name)] = {"pairs": len(pairs), "psnr": float(per_pair.mean()),
                                         "ssim": float(np.mean([ssim(o, p.target) for o, p in zip(out, pairs)])),
                                         "gain": float(gain.mean()), "improved": float(np.mean(gain > 0)),
                                         "per_pair_psnr": per_pair.tolist()}
            print(f"scored {len(pairs)} pairs of '{group}' for {len(models)} models", flush=True)

    windows = sorted({p.start for p in heldout.heldout_pairs(source, [(0, TARGET)], d.height, d.width)})
    gib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    lines = [f"`{machine()}`; start: the shipped `learn` DiT; {args.steps} steps at batch {args.batch}, "
             f"camera {TARGET} as every target of the training windows; held-out windows start at {windows}; "
             f"trainable {args.trainable.replace('+', ', ')}.", "",
             "| run | lr | trained parameters | optimizer state | train step memory (local plan) | "
             "loss, first -> last fifth | steps x step time |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        c = runs[name]
        lines.append(f"| {label(c)} | {c.optimizer.lr:g} | {r['trainable']:,} | {gib(r['optimizer_bytes'])} | "
                     f"{gib(r['memory'])} (arguments {gib(r['arguments'])}) | {r['first_loss']:.3f} -> "
                     f"{r['last_loss']:.3f} | {r['minutes']:.1f} min |")
    lines += ["", "| target | model | pairs | PSNR (dB) | SSIM | PSNR gain over the start, paired | pairs improved |",
              "|---|---|---|---|---|---|---|"]
    for (group, name), s in scores.items():
        gain = "-" if name == "shipped (start)" else f"{s['gain']:+.2f} dB"
        improved = "-" if name == "shipped (start)" else f"{100 * s['improved']:.0f}%"
        lines.append(f"| {group} | {name} | {s['pairs']} | {s['psnr']:.2f} | {s['ssim']:.4f} | {gain} | {improved} |")
    lines += ["", f"Took {(time.time() - start) / 60:.1f} min (load average {os.getloadavg()[0]:.1f})."]
    summary = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"runs": results, "scores": {f"{g} | {m}": s for (g, m), s in scores.items()}, "args": vars(args)},
                  f, indent=1)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
