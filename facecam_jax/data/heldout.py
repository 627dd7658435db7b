"""Evaluation samples from held-out windows: (source camera i, target camera j) pairs with truth.

A training sample (transforms.py) draws cameras, shots, a background colour, a source scale
and a zoom/pan at random. An evaluation sample fixes them so that the true target exists:
one shot of camera j for the whole window, the condition is camera j's landmark map at the
window start (the anchor frame, drawn once and held, exactly as in training), source and
target composited onto one background colour (training composites every multi-view sample),
no source scale and no zoom/pan. The truth is camera j's video of the same window.

Windows come from `pipeline.heldout_source(config.data)`: frames the training stream never
reads (data.holdout_windows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from facecam_jax.camera import draw
from facecam_jax.data import augment
from facecam_jax.data import sources as sources_lib
from facecam_jax.data import store as store_lib


@dataclasses.dataclass(frozen=True)
class Pair:
    """One held-out evaluation sample: uint8 videos [T, H, W, 3] and where they come from."""

    sequence: str
    start: int  # first frame of the window
    source_camera: int  # camera positions in the sequence (serial order)
    target_camera: int
    background: tuple[int, int, int] | None  # composited colour (None: original backdrop)
    source: np.ndarray
    condition: np.ndarray  # landmark map of the target camera's anchor frame, held
    target: np.ndarray  # the true view


def _crop(stream: sources_lib.Stream, height: int, width: int) -> augment.CoverCrop:
    return augment.cover_crop_params(stream.height, stream.width, height, width)


def window_video(stream: sources_lib.Stream, times: np.ndarray, height: int, width: int,
                 background=None) -> np.ndarray:
    """A camera's frames at `times`, cover-cropped to [height, width] as in training, composited
    onto `background` (RGB) with its prepared masks when given."""
    crop = _crop(stream, height, width)
    frames = augment.apply_cover_crop(stream.read(times), crop, height, width)
    if background is None:
        return frames
    masks = augment.apply_cover_crop(stream.read_masks(times), crop, height, width)
    return augment.composite(frames, masks, background)


def anchor_condition(stream: sources_lib.Stream, start: int, num_frames: int, height: int,
                     width: int) -> np.ndarray:
    """The landmark-map video of a camera: its prepared landmarks at frame `start`, cover-cropped,
    drawn once and held for `num_frames` frames (a one-shot training condition, no zoom/pan)."""
    points, status = stream.store.read_landmarks([start])
    if status[0] != store_lib.FOUND:
        raise ValueError(f"{stream.path}: no prepared face landmarks at frame {start}; run "
                         "tools/prepare_dataset.py (the mini dataset prepares every frame)")
    anchor = augment.cover_crop_points(points[0], _crop(stream, height, width), height, width)
    return np.repeat(draw.draw_landmark_map(anchor, height, width)[None], num_frames, axis=0)


def all_pairs(num_cameras: int, sources: Sequence[int] | None = None,
              targets: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Ordered (source, target) camera pairs with source != target."""
    sources = range(num_cameras) if sources is None else sources
    targets = range(num_cameras) if targets is None else targets
    return [(int(i), int(j)) for i in sources for j in targets if i != j]


def heldout_pairs(source: sources_lib.MultiViewSource, pairs: Iterable[tuple[int, int]], height: int,
                  width: int, *, composite: bool = True, seed: int = 0) -> list[Pair]:
    """Evaluation samples of every held-out window of `source` (a `pipeline.heldout_source`)
    for each (source camera, target camera) of `pairs`. The background colour of each sample
    is drawn from `seed`, the window and the pair, so it does not depend on the other pairs."""
    pairs = list(pairs)
    out = []
    for index in range(len(source)):
        record = source[index]
        seq: sources_lib.MultiViewSequence = record["sequence"]
        start, stride, frames = record["start"], record["stride"], record["frames"]
        times = start + stride * np.arange(frames)
        for i, j in pairs:
            colour = None
            if composite:
                rng = np.random.default_rng([seed, start, i, j])
                colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            out.append(Pair(
                sequence=seq.name, start=int(start), source_camera=i, target_camera=j, background=colour,
                source=window_video(seq.cameras[i], times, height, width, colour),
                condition=anchor_condition(seq.cameras[j], int(start), frames, height, width),
                target=window_video(seq.cameras[j], times, height, width, colour)))
    return out


def camera_windows(source: sources_lib.MultiViewSource, height: int, width: int,
                   cameras: Sequence[int] | None = None) -> np.ndarray:
    """Every held-out window of every camera (or of `cameras`), uncomposited: uint8
    [N, T, H, W, 3] (e.g. for a VAE's held-out reconstruction)."""
    videos = []
    for index in range(len(source)):
        record = source[index]
        seq = record["sequence"]
        times = record["start"] + record["stride"] * np.arange(record["frames"])
        for k in (range(len(seq.cameras)) if cameras is None else cameras):
            videos.append(window_video(seq.cameras[k], times, height, width))
    return np.stack(videos)
