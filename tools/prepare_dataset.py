"""Prepares a FaceCam training dataset: face landmarks and foreground masks, stored beside it.

    python tools/prepare_dataset.py --multiview /data/nersemble --workers 8
    python tools/prepare_dataset.py --multiview /data/processed --layout processed
    python tools/prepare_dataset.py --wild /data/portrait_videos
    python tools/prepare_dataset.py --multiview /data/nersemble --prepared_root /scratch/prep

Landmarks (MediaPipe face mesh) of the anchor frame of every sample window of every
(sequence, camera), or of every frame with --all_frames; selfie-segmentation masks of every
frame a sample uses where the dataset has no masks (NeRSemble v2). --frames, --stride and
--window_step must match the training config's data section (their defaults match the
paper: 81 frames at stride 3, windows that do not overlap). Written as zarr with tensorstore
into <sequence>/facecam/cam_<serial>/ (or under --prepared_root); an interrupted run resumes
where it stopped, and work is spread over --workers processes with a progress bar.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from facecam_jax import options
from facecam_jax.runtime import cli, paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiview", default=None, help="root of a multi-view dataset")
    parser.add_argument("--layout", choices=["nersemble", "processed"], default="nersemble")
    parser.add_argument("--wild", default=None, help="folder of in-the-wild videos")
    parser.add_argument("--frames", type=int, default=81, help="frames per sample")
    parser.add_argument("--stride", type=int, default=3, help="multi-view temporal stride")
    parser.add_argument("--window_step", type=int, default=0,
                        help="frames between sample windows (0: windows do not overlap)")
    parser.add_argument("--all_frames", action="store_true",
                        help="landmarks (and masks) of every frame, not only what samples use")
    parser.add_argument("--no_masks", action="store_true", help="skip the foreground masks")
    parser.add_argument("--prepared_root", default=None,
                        help="write annotations here (mirroring the dataset) instead of beside it")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not args.multiview and not args.wild:
        parser.error("give --multiview and/or --wild")
    # Annotations go to new facecam/ folders, beside the data by default, mirrored under
    # --prepared_root otherwise (which may be the dataset's own root): never over a dataset
    # file, so --prepared_root is checked to be a folder that can be written, not against them.
    paths.check_outputs(directories={"--prepared_root": args.prepared_root})
    problem = options.frames_flag_problem("--frames", args.frames)  # the rule of data.frames, which it matches
    if problem:
        raise ValueError(problem)

    from facecam_jax.data import prepare

    start = time.time()
    failed = []
    if args.multiview:
        summary = prepare.prepare_multiview(
            args.layout, args.multiview, frames=args.frames, stride=args.stride,
            window_step=args.window_step or None, all_frames=args.all_frames,
            masks=not args.no_masks, prepared_root=args.prepared_root, num_workers=args.workers)
        print(f"multi-view: {summary.streams} streams, {summary.landmark_frames} new landmark "
              f"frames ({summary.faces_missing} without a face), {summary.mask_frames} new masks")
        failed += summary.failed
    if args.wild:
        summary = prepare.prepare_wild(args.wild, all_frames=args.all_frames,
                                       prepared_root=args.prepared_root, num_workers=args.workers)
        print(f"in-the-wild: {summary.streams} videos, {summary.landmark_frames} new landmark "
              f"frames ({summary.faces_missing} without a face)")
        failed += summary.failed
    for path, reason in failed:
        print(f"FAILED {path}: {reason}", file=sys.stderr)
    print(f"done in {time.time() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run_script(main)
