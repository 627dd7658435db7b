"""Converts a Wan DiT checkpoint (original/DiffSynth, diffusers or ComfyUI naming) for fast reloads.

    python tools/convert_wan_checkpoint.py --checkpoint Wan2.2-I2V-A14B/high_noise_model \
        --out ckpt/i2v_high --dtype bfloat16 [--overlay facecam_high.safetensors] [--format orbax|diffusers]

``orbax`` (default) writes an orbax checkpoint plus ``facecam_dit.json``; ``load_dit(out)``
restores it directly onto a mesh. ``diffusers`` writes diffusers-format safetensors and a
config.json. Overlays (the released FaceCam expert weights) are applied before writing.
"""

from __future__ import annotations

import argparse
import logging
import time

from facecam_jax.runtime import cli, paths


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help=".safetensors file, sharded index, directory or .pth")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", default=None, help="preset name (default: inferred from the shapes)")
    parser.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--overlay", action="append", default=[], help="partial state dict to apply (repeatable)")
    parser.add_argument("--format", choices=["orbax", "diffusers"], default="orbax")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Before the (minutes-long) load: --out can be written and overwrites none of the inputs.
    one_file = args.format == "diffusers" and args.out.endswith(".safetensors")  # else a directory
    paths.check_outputs({"--out": args.out} if one_file else None,
                        {"--checkpoint": args.checkpoint, "--overlay": args.overlay},
                        directories=None if one_file else {"--out": args.out})

    from facecam_jax.checkpoints import dit

    start = time.time()
    model = dit.load_dit(args.checkpoint, config=args.config, dtype=args.dtype, overlay=args.overlay or None, progress=True)
    out = dit.save_dit_orbax(model, args.out) if args.format == "orbax" else dit.save_dit(model, args.out)
    print(f"wrote {args.format} checkpoint of {model.config} to {out} in {time.time() - start:.1f}s")
    return out


if __name__ == "__main__":
    cli.run_script(main)
