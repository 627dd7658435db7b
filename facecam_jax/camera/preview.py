"""Writes the camera-condition video of a trajectory, and its overlay on a source video when one is given.

    python -m facecam_jax.camera.preview --trajectory arc_left --out cond.mp4
    python -m facecam_jax.camera.preview --trajectory my_path.json --video in.mp4 --framing source --out cond.mp4
    python -m facecam_jax.camera.preview --random 0 --out cond.mp4      # the official random sampler

With --video the source is preprocessed as the release does (24 fps, cover-resize, nose-centred
crop, padded to the frame count) and `<out>_overlay.mp4` shows the landmark map drawn over it.
Videos are written as H.264. A bad trajectory or a missing/corrupt video ends in one `error:`
line (`--verbose` adds the traceback).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from facecam_jax import video_io as video
from facecam_jax.camera import source, trajectories
from facecam_jax.camera.condition import build_condition
from facecam_jax.options import MAX_FRAMES, MAX_SIZE
from facecam_jax.runtime import cli, paths


def overlay(frames: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Landmark maps [T, H, W, 3] drawn over frames [T, H, W, 3]: every non-white map pixel replaces the frame's."""
    drawn = np.any(maps != 255, axis=-1, keepdims=True)  # [T, H, W, 1]
    return np.where(drawn, maps, frames)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--trajectory", default="arc_left",
                        help=f"a canonical motion ({', '.join(trajectories.CANONICAL_MOTIONS)}) or a trajectory JSON file")
    choice.add_argument("--random", type=int, metavar="SEED", help="sample the official random trajectory with this seed")
    parser.add_argument("--video", help="source video to preprocess and overlay")
    parser.add_argument("--framing", choices=trajectories.FRAMINGS, default="official")
    parser.add_argument("--out", required=True, help="output .mp4 for the condition video")
    parser.add_argument("--frames", type=int, default=trajectories.NUM_FRAMES)
    parser.add_argument("--height", type=int, default=trajectories.HEIGHT)
    parser.add_argument("--width", type=int, default=trajectories.WIDTH)
    parser.add_argument("--fps", type=float, default=source.TARGET_FPS)
    parser.add_argument("--save-trajectory", help="also write the trajectory as keyframe JSON here")
    parser.add_argument("--require-face", action="store_true",
                        help="fail when the video's first frame has no detectable face (default: warn, crop the centre)")
    args = parser.parse_args(argv)
    for name, value, high in (("--frames", args.frames, MAX_FRAMES), ("--height", args.height, MAX_SIZE),
                              ("--width", args.width, MAX_SIZE)):
        if not 1 <= value <= high:
            raise ValueError(f"{name} {value} must be in 1..{high}")
    out = Path(args.out)
    overlay_path = out.with_name(out.stem + "_overlay" + out.suffix) if args.video else None
    paths.check_outputs({"--out": out, "the overlay video": overlay_path, "--save-trajectory": args.save_trajectory},
                        {"--video": args.video, "--trajectory": None if args.random is not None else args.trajectory})

    if args.random is not None:
        trajectory = trajectories.random_trajectory(np.random.default_rng(args.random), args.frames)
    else:
        trajectory = trajectories.load_trajectory(args.trajectory, args.frames)
    frames = None
    if args.video:
        frames = source.load_source(args.video, trajectory.num_frames, args.height, args.width,
                                    require_face=args.require_face)
    maps = build_condition(trajectory, height=args.height, width=args.width, framing=args.framing,
                           source_frames=frames)
    video.write_video(out, maps, args.fps)
    print(f"wrote {out} ({maps.shape[0]} frames, {args.height}x{args.width})")
    if frames is not None:
        video.write_video(overlay_path, overlay(frames, maps), args.fps)
        print(f"wrote {overlay_path}")
    if args.save_trajectory:
        Path(args.save_trajectory).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_trajectory).write_text(json.dumps(trajectories.trajectory_to_json(trajectory, stride=8), indent=1))
        print(f"wrote {args.save_trajectory}")


if __name__ == "__main__":
    cli.run_script(main)
