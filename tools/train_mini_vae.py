"""Stage 1 of the learning proof: trains the mini VAE for reconstruction and saves it.

    python tools/train_mini_vae.py                       # ~35 min on 2 CPU cores
    python tools/train_mini_vae.py --steps 100 --decoder_steps 20 --out /tmp/vae
    python tools/train_mini_vae.py --finetune_decoder data/learned_mini/vae --frames 9 --steps 250 --lr 3e-4

The Wan2.1 VAE architecture at toy width (dim 8, z 16; `build.vae_config("mini")`) learns
to reconstruct clips of the `learn` config's training stream (source, target and landmark-map
videos with FaceCam's augmentation; held-out windows and cameras never enter it), then its
latent statistics are measured and stored as its normalisation. The clips are short (5
frames: two latent frames, for speed), so a second, decoder-only phase trains on clips of the
config's full length (9 frames): without it the third latent frame, which the decoder never
saw, decodes green (13 dB instead of 19 dB on the last frames). `--finetune_decoder` runs
that phase alone on a trained VAE (the encoder, its statistics and any DiT trained on its
latents stay valid). Saved as a diffusers
AutoencoderKLWan folder (default: the config's vae.checkpoint, data/learned_mini/vae) with a
training.json of the run; prints the reconstruction PSNR on the held-out windows of every
camera. Stage 2: `python -m facecam_jax.train --config configs/facecam.py:learn --workdir runs/learn`.
The logic lives in facecam_jax.training.vae_training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from facecam_jax import options
from facecam_jax.runtime import cli, paths


def main(argv=None) -> int:
    from facecam_jax.training.vae_training import VAETraining

    defaults = VAETraining()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="learn",
                        help="config spec whose data section feeds the VAE (default: learn)")
    parser.add_argument("--out", default=None, help="output folder (default: the config's vae.checkpoint)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--clips", type=int, default=defaults.clips, help="clips per step")
    parser.add_argument("--frames", type=int, default=defaults.frames, help="frames per clip (1 + 4k)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--decoder_steps", type=int, default=250,
                        help="then this many decoder-only steps on clips of the config's full length "
                             "(data.frames): the short clips never show the decoder a third latent frame")
    parser.add_argument("--decoder_lr", type=float, default=3e-4)
    parser.add_argument("--finetune_decoder", default=None, metavar="VAE_DIR",
                        help="start from this trained VAE and train only its decoder (the encoder, its "
                             "latent statistics and so any DiT trained on them stay valid)")
    parser.add_argument("--stats_batches", type=int, default=16,
                        help="training batches whose latents set the normalisation")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)

    import jax
    import numpy as np
    from flax import nnx

    from facecam_jax import build
    from facecam_jax.checkpoints.vae import save_vae
    from facecam_jax.data import heldout, pipeline
    from facecam_jax.models.wan_vae import WanVAE
    from facecam_jax.runtime.config_file import config_path, load_config
    from facecam_jax.training import vae_training as vt

    problem = options.frames_flag_problem("--frames", args.frames)  # the rule of data.frames
    if problem:
        raise ValueError(problem)
    config = load_config(args.config)
    out = args.out or config.vae.checkpoint
    if not out:
        raise ValueError("no output folder: pass --out or use a config with vae.checkpoint set")
    # Before the data pipeline starts: --out holds none of the inputs. The VAE the config names
    # is what this tool writes (by default), and it lives in the folder of the shipped weights;
    # --finetune_decoder may be --out itself (it is read whole before anything is written).
    in_place = args.finetune_decoder and os.path.realpath(args.finetune_decoder) == os.path.realpath(out)
    paths.check_outputs(directories={"--out": out}, inputs=paths.read_paths(
        config, config_path(args.config), {"--finetune_decoder": None if in_place else args.finetune_decoder},
        skip=("vae.checkpoint", "sample.weights")))
    settings = vt.VAETraining(steps=args.steps, clips=args.clips, frames=args.frames, lr=args.lr, seed=args.seed,
                              trainable="decoder" if args.finetune_decoder else "all")
    start = time.time()
    if args.finetune_decoder:
        from facecam_jax.checkpoints.vae import load_vae

        vae = load_vae(args.finetune_decoder)
    else:
        vae = vt.zero_residual_branches(WanVAE(build.vae_config("mini"), rngs=nnx.Rngs(args.seed)))
    batches = pipeline.make_train_iterator(config)
    clips = vt.clip_stream(batches, settings.clips, settings.frames, seed=settings.seed)
    print(f"training the mini VAE ({sum(x.size for x in jax.tree.leaves(nnx.state(vae))):,} "
          f"parameters) for {settings.steps} steps of {settings.clips} x {settings.frames} frames")
    log = lambda r: print(  # noqa: E731
        f"step {r['step']:5d}  loss {r['loss']:.4f}  psnr {r['psnr']:.2f} dB  {r['seconds']:.0f} s", flush=True)
    history = vt.train(vae, clips, settings, on_log=log).history
    if not args.finetune_decoder and args.decoder_steps > 0:
        frames = config.data.frames
        decoder = vt.VAETraining(steps=args.decoder_steps, clips=args.clips, frames=frames, lr=args.decoder_lr,
                                 seed=args.seed, trainable="decoder")
        print(f"decoder only: {decoder.steps} steps of {decoder.clips} x {frames} frames")
        clips = vt.clip_stream(batches, decoder.clips, frames, seed=decoder.seed + 1)
        history += [r | {"stage": "decoder"} for r in vt.train(vae, clips, decoder, on_log=log).history]
    stats_videos = np.concatenate([np.concatenate([next(batches)[k] for k in vt.CLIP_KEYS])
                                   for _ in range(args.stats_batches)])
    if args.finetune_decoder:  # the encoder is unchanged: keep its statistics
        mean, std = np.asarray(vae.config.latents_mean), np.asarray(vae.config.latents_std)
    else:
        mean, std = vt.latent_stats(vae, stats_videos)
        vt.set_latent_stats(vae, mean, std)
    heldout_videos = None
    if config.data.get("holdout_windows"):
        source = pipeline.heldout_source(config.data)
        heldout_videos = heldout.camera_windows(source, config.data.height, config.data.width)
    psnr = vt.reconstruction_psnr(vae, heldout_videos) if heldout_videos is not None else None
    save_vae(vae, out)
    seconds = time.time() - start
    summary = {"settings": vars(args) | {"out": out}, "history": history, "seconds": seconds,
               "heldout_psnr": psnr, "heldout_videos": None if heldout_videos is None else len(heldout_videos),
               "latents_mean": mean.tolist(), "latents_std": std.tolist(), "load_average": os.getloadavg()}
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if psnr is not None:
        print(f"held-out reconstruction PSNR {psnr:.2f} dB over {len(heldout_videos)} videos "
              "(every camera, held-out windows)")
    print(f"saved {out} ({seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    cli.run_script(main)
