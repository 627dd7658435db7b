"""Head pose from landmarks (PnP against the proxy head) and the camera-correctness metric of paper 4.3.

The paper judges camera control on in-the-wild videos by detecting landmarks on the last frame
of the input and of the generated video and comparing head poses: under Pan Left the face
should move right in the image, under Arc Left the head should end up facing image right, and
so on; the label is binary per video. Here: `measure_motion` turns two landmark sets into
the observable changes (face shift, face scale, head yaw and pitch), `judge_motion` gives the
binary label for an intended canonical motion, and `classify_motion` names the motion the
change looks like.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from facecam_jax.camera import trajectories
from facecam_jax.camera.geometry import checked_landmarks, solve_pnp

# Decision thresholds, about a third of the canonical magnitudes (trajectories: arcs of 30 and
# 20 degrees, a 1.4x zoom, a pan that moves the face ~1.4 face radii): big enough that landmark
# noise on a static camera stays below them, small enough that a weakened but correct motion
# still passes.
ANGLE_THRESHOLD = 7.0  # degrees of head yaw or pitch change
SCALE_THRESHOLD = 1.12  # face-size ratio (or its inverse)
SHIFT_THRESHOLD = 0.3  # face-centroid move, in units of the source face's RMS radius


def head_angles(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of the head as the camera sees it, from a world-to-camera rotation.

    yaw > 0: the face turns toward image right; pitch > 0: the face turns up; roll > 0: the top
    of the head tilts toward image right. All zero for the frontal official camera.
    """
    forward = rotation @ np.array([0.0, -1.0, 0.0])  # the face's direction in camera axes
    up = rotation @ np.array([0.0, 0.0, 1.0])
    yaw = math.degrees(math.atan2(forward[0], -forward[2]))
    pitch = math.degrees(math.atan2(-forward[1], math.hypot(forward[0], forward[2])))
    roll = math.degrees(math.atan2(up[0], -up[1]))
    return yaw, pitch, roll


def apparent_rotation(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """The head's rotation [3, 3] relative to the ray along which the camera sees the head centre.

    This is the pose a viewer perceives: a face moved across the image by a 2D shift (a pan, as
    FaceCam's training data makes them) or a zoom about an off-centre point looks the same, but
    PnP with fixed intrinsics explains its new place by turning the head toward it. Rotating
    the head-centre ray onto the optical axis removes that.
    """
    ray = np.asarray(translation, np.float64) / np.linalg.norm(translation)
    axis = np.cross(ray, [0.0, 0.0, 1.0])
    angle = math.atan2(np.linalg.norm(axis), ray[2])
    if np.linalg.norm(axis) < 1e-12:
        return np.asarray(rotation, np.float64)
    align, _ = cv2.Rodrigues(axis / np.linalg.norm(axis) * angle)
    return align @ rotation


@dataclasses.dataclass(frozen=True)
class MotionMeasure:
    """Change from a source face to an output face, as the camera sees it."""

    shift_x: float  # face-centroid move to image right, in source face radii
    shift_y: float  # face-centroid move to image bottom, in source face radii
    scale: float  # output face size / source face size
    yaw: float  # change of apparent head yaw, degrees (> 0: faces more to image right)
    pitch: float  # change of apparent head pitch, degrees (> 0: faces more upward)


def measure_motion(source: np.ndarray, output: np.ndarray, height: int, width: int, *,
                   intrinsics: np.ndarray | None = None, head: np.ndarray | None = None) -> MotionMeasure:
    """The observable change between two faces' landmarks [478, 2|3] (normalized to H x W).

    Head angles are apparent ones (`apparent_rotation`), so a pan or zoom alone leaves them
    near zero and an arc alone shows up in them.
    """
    source, output = checked_landmarks(source), checked_landmarks(output)
    size = np.array([width, height], np.float64)
    src_px, out_px = source[:, :2] * size, output[:, :2] * size  # [478, 2]
    src_centroid, out_centroid = src_px.mean(0), out_px.mean(0)
    src_radius = np.sqrt(((src_px - src_centroid) ** 2).sum(-1).mean())
    out_radius = np.sqrt(((out_px - out_centroid) ** 2).sum(-1).mean())
    shift = (out_centroid - src_centroid) / src_radius
    src_yaw, src_pitch, _ = head_angles(apparent_rotation(
        *solve_pnp(source, height, width, intrinsics=intrinsics, head=head)))
    out_yaw, out_pitch, _ = head_angles(apparent_rotation(
        *solve_pnp(output, height, width, intrinsics=intrinsics, head=head)))
    return MotionMeasure(shift_x=float(shift[0]), shift_y=float(shift[1]), scale=float(out_radius / src_radius),
                         yaw=out_yaw - src_yaw, pitch=out_pitch - src_pitch)


def _signals(m: MotionMeasure) -> dict[str, float]:
    """Each canonical motion's evidence, in units of its threshold (>= 1 means present)."""
    log_scale = math.log(m.scale) / math.log(SCALE_THRESHOLD)
    return {
        # The camera moving left makes the scene (the face) move right, and so on.
        "pan_left": m.shift_x / SHIFT_THRESHOLD, "pan_right": -m.shift_x / SHIFT_THRESHOLD,
        "pan_up": m.shift_y / SHIFT_THRESHOLD, "pan_down": -m.shift_y / SHIFT_THRESHOLD,
        "zoom_in": log_scale, "zoom_out": -log_scale,
        # Circling to the left turns the head toward image right; circling up shows it from
        # above, so it faces more downward.
        "arc_left": m.yaw / ANGLE_THRESHOLD, "arc_right": -m.yaw / ANGLE_THRESHOLD,
        "arc_up": -m.pitch / ANGLE_THRESHOLD, "arc_down": m.pitch / ANGLE_THRESHOLD,
    }


def judge_motion(motion: str, measure: MotionMeasure) -> bool:
    """Paper 4.3's binary camera-correctness label: did the intended motion happen?

    True when the motion's own evidence passes its threshold in the intended direction (the
    face moved the right way for a pan, grew or shrank for a zoom, turned the right way for an
    arc).
    """
    return _signals(measure)[trajectories.motion_name(motion)] >= 1.0


def classify_motion(measure: MotionMeasure) -> str | None:
    """The canonical motion a change looks like, or None when nothing passes its threshold.

    Rotation is checked first because an arc around the head centre also moves the face in the
    image (the face sits in front of the pivot), then zoom, then pan; within a group the
    strongest evidence wins.
    """
    signals = _signals(measure)
    for group in (("arc_left", "arc_right", "arc_up", "arc_down"), ("zoom_in", "zoom_out"),
                  ("pan_left", "pan_right", "pan_up", "pan_down")):
        best = max(group, key=signals.__getitem__)
        if signals[best] >= 1.0:
            return best
    return None


def camera_correctness(source_last: np.ndarray, output_last: np.ndarray, motion: str,
                       height: int, width: int, **kwargs) -> tuple[bool, MotionMeasure]:
    """The per-video label of paper 4.3 from last-frame landmarks of input and output, with the measure."""
    measure = measure_motion(source_last, output_last, height, width, **kwargs)
    return judge_motion(motion, measure), measure
