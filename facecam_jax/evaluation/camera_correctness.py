"""Camera correctness (binary) of a re-rendered video: did the head move in the image as the intended motion asks?

Landmarks of the first and last frames of source and output, head pose by PnP against the proxy
head (`camera.pose`); the "change" and "last" references are described in the package docstring.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np

from facecam_jax.camera import landmarks as lm
from facecam_jax.camera import pose
from facecam_jax.camera import source as source_lib
from facecam_jax.camera import trajectories as tr

REFERENCES = ("change", "last")
MIN_FRAMES = 2  # camera correctness compares a first and a last frame
# The frame size `intended_motions` projects a trajectory's proxy head at: the official
# condition size, where pose's thresholds were set.
_INTENDED_HEIGHT, _INTENDED_WIDTH = tr.HEIGHT, tr.WIDTH


def intended_motions(motion: str | tr.Trajectory) -> tuple[str, ...]:
    """The canonical motions a motion spec asks for.

    A canonical name asks for itself. A trajectory (or its JSON file) asks for what the proxy
    head's landmarks show between its first and last frame, judged by the same thresholds
    (`pose.judge_motion`): every arc, zoom and pan that passes, except that pans are dropped
    when an arc is present (circling the head also moves the face in the image). A trajectory
    that ends where it started asks for no motion.
    """
    if isinstance(motion, str) and not (motion.lower().endswith(".json") or os.path.isfile(motion)):
        return (tr.motion_name(motion),)
    trajectory = motion if isinstance(motion, tr.Trajectory) else tr.load_trajectory(motion)
    ends = dataclasses.replace(trajectory, azimuth=trajectory.azimuth[[0, -1]],
                               elevation=trajectory.elevation[[0, -1]], fov=trajectory.fov[[0, -1]],
                               shift=np.asarray(trajectory.shift)[[0, -1]])
    points = tr.condition_landmarks(ends, height=_INTENDED_HEIGHT, width=_INTENDED_WIDTH)
    measure = pose.measure_motion(points[0], points[1], _INTENDED_HEIGHT, _INTENDED_WIDTH)
    present = [m for m in tr.CANONICAL_MOTIONS if pose.judge_motion(m, measure)]
    if any(m.startswith("arc_") for m in present):
        present = [m for m in present if not m.startswith("pan_")]
    return tuple(present)


def judge(intended: Sequence[str], measure: pose.MotionMeasure) -> bool:
    """Every intended motion happened (`pose.judge_motion`); with none intended, no motion happened."""
    if not intended:
        return pose.classify_motion(measure) is None
    return all(pose.judge_motion(m, measure) for m in intended)


def relative_measure(output: pose.MotionMeasure, source: pose.MotionMeasure) -> pose.MotionMeasure:
    """The output's own change with the source's own change taken out (the "change" reference)."""
    return pose.MotionMeasure(shift_x=output.shift_x - source.shift_x, shift_y=output.shift_y - source.shift_y,
                              scale=output.scale / source.scale, yaw=output.yaw - source.yaw,
                              pitch=output.pitch - source.pitch)


@dataclasses.dataclass(frozen=True)
class CameraResult:
    """Camera correctness of one video: the label by the chosen reference, and both measures."""

    correct: bool
    reference: str
    intended: tuple[str, ...]
    measure: pose.MotionMeasure  # output first->last change minus source first->last change
    measure_last: pose.MotionMeasure  # source last frame -> output last frame (the paper's)
    correct_change: bool
    correct_last: bool


def camera_from_landmarks(source_first: np.ndarray, source_last: np.ndarray, output_first: np.ndarray,
                          output_last: np.ndarray, height: int, width: int, motion: str | tr.Trajectory, *,
                          reference: str = "change") -> CameraResult:
    """Camera correctness from landmarks [478, 2|3] of the four frames, normalized to one H x W frame."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    intended = intended_motions(motion)
    change = relative_measure(pose.measure_motion(output_first, output_last, height, width),
                              pose.measure_motion(source_first, source_last, height, width))
    last = pose.measure_motion(source_last, output_last, height, width)
    correct_change, correct_last = judge(intended, change), judge(intended, last)
    return CameraResult(correct=correct_change if reference == "change" else correct_last, reference=reference,
                        intended=intended, measure=change, measure_last=last, correct_change=correct_change,
                        correct_last=correct_last)


def align_source(source_frames: np.ndarray, num_frames: int, height: int, width: int) -> np.ndarray:
    """Source frames in the output's framing: the sampler's preprocessing (nose-centred cover crop
    to H x W, cut or padded to `num_frames`); frames already of that shape pass through."""
    source_frames = np.asarray(source_frames)
    if source_frames.shape[:3] == (num_frames, height, width):
        return source_frames
    return source_lib.prepare_source(source_frames, num_frames, height, width)


def camera_from_detections(source_marks: Mapping[int, np.ndarray | None],
                           output_marks: Mapping[int, np.ndarray | None], last: int, height: int, width: int,
                           motion: str | tr.Trajectory, reference: str) -> CameraResult:
    """`camera_from_landmarks` from per-frame detections (`lm.detect_stills`) that include frames 0 and `last`;
    ValueError naming the end frames without a face."""
    videos = (("source", source_marks), ("output", output_marks))
    missing = [f"the {which} frame of the {name}" for name, marks in videos
               for which, i in (("first", 0), ("last", last)) if marks[i] is None]
    if missing:
        raise ValueError(f"no face found in {' and '.join(missing)}")
    return camera_from_landmarks(source_marks[0], source_marks[last], output_marks[0], output_marks[last],
                                 height, width, motion, reference=reference)


def camera_correct(source_frames: np.ndarray, output_frames: np.ndarray, motion: str | tr.Trajectory, *,
                   reference: str = "change") -> CameraResult:
    """Camera correctness of an output video [T, H, W, 3] made from `source_frames` along `motion`.

    The source is brought to the output's framing first (`align_source`). Raises ValueError
    when a video is too short or a first/last frame has no face.
    """
    output_frames = np.asarray(output_frames)
    num, height, width = output_frames.shape[:3]
    if num < MIN_FRAMES:
        raise ValueError(f"the output has {num} frame(s); camera correctness needs at least {MIN_FRAMES}")
    source_frames = align_source(source_frames, num, height, width)
    return camera_from_detections(lm.detect_stills(source_frames, [0, num - 1]),
                                  lm.detect_stills(output_frames, [0, num - 1]), num - 1, height, width, motion,
                                  reference)
