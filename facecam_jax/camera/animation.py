"""FactorPortrait's driving signals at sampling time: a reference image's face animated by a
driving video's expressions and head motion, seen along a camera trajectory (paper 4.1).

The driving video's landmarks are retargeted onto the reference face (``retarget``): each frame's
similarity fit to the canonical head (``expression.similarity_fit``) splits it into a head pose
(rotation, scale, position) and a canonical shape. The output keeps the reference's face and
pose and adds the driver's changes since the driving video's first frame: the canonical shape
``C_ref + (C_t - C_0)`` (the driver's expression change on the reference's face shape), the head
turned by the driver's rotation since frame 0, moved and scaled by the driver's motion in face
sizes. So the driving video may show another person, and in self-reenactment (the driver is
the reference's own clip from the reference's time) it gives back the driver's own landmarks.
Its expression codes are those of the retargeted shape (the codes training saw were the
target's own shape: identity plus expression).

The camera: the reference camera is estimated as ``framing="source"``
does (``trajectories.source_cameras``: PnP of the reference landmarks against the proxy head);
the retargeted face, lifted from the reference's pixels at the head's depth, is seen from each
trajectory camera and drawn as landmark normal maps (``normals.landmark_normal_maps``, the
renderer training used); the ray maps are each camera relative to the reference, in metres.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from facecam_jax.camera import expression, landmarks, trajectories
from facecam_jax.camera.extrinsics import METRES_PER_ORBIT_UNIT
from facecam_jax.camera.geometry import project
from facecam_jax.camera.source import official_stride
from facecam_jax.errors import NoFaceError
from facecam_jax.video_io import probe, read_video

NUM_LANDMARKS = landmarks.NUM_LANDMARKS


@dataclasses.dataclass(frozen=True)
class Driving:
    """A driving video: its frames (uint8 ``[T, h, w, 3]``, for the compare video) and each frame's
    landmarks ``[T, 478, 3]`` normalized to ``h x w``."""

    frames: np.ndarray
    landmarks: np.ndarray

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]


@dataclasses.dataclass(frozen=True)
class Animation:
    """What FactorPortrait samples along: a camera trajectory and a driving video of its length."""

    trajectory: trajectories.Trajectory
    driving: Driving

    def __post_init__(self):
        if len(self.driving.landmarks) != self.trajectory.num_frames:
            raise ValueError(f"the driving video has {len(self.driving.landmarks)} frames, the trajectory "
                             f"{self.trajectory.num_frames}")

    @property
    def num_frames(self) -> int:
        return self.trajectory.num_frames


def load_driving(path: str | os.PathLike, frames: int) -> Driving:
    """The first ``frames`` frames of a driving video (at the official ~24 fps stride, as a source
    video is read) and their landmarks. A video with fewer frames, or a frame without a detectable
    face, is a one-line error naming it."""
    path = os.fspath(path)
    info = probe(path)
    stride = official_stride(info.fps)
    video, _ = read_video(path, max_frames=frames, stride=stride)
    if len(video) < frames:
        raise ValueError(f"driving video {path!r} has {len(video)} frames (every {stride}. of its {info.num_frames} "
                         f"at {info.fps:.0f} fps); the output needs {frames}: give a longer driving video or fewer "
                         "--frames")
    try:
        points, found = landmarks.detect(video)
    except NoFaceError:
        raise NoFaceError(f"driving video {path!r} shows no face MediaPipe can detect: its expressions and head "
                          "motion drive the portrait") from None
    if not found.all():
        missing = np.flatnonzero(~found)
        raise NoFaceError(f"driving video {path!r} has no detectable face in {len(missing)} of its first {frames} "
                          f"frames (frame(s) {', '.join(map(str, missing[:5].tolist()))}"
                          f"{', ...' if len(missing) > 5 else ''}): every driving frame must show the face")
    return Driving(video, points)


def retarget(reference: np.ndarray, height: int, width: int, driving: Driving) -> tuple[np.ndarray, np.ndarray]:
    """The reference face (landmarks ``[478, 3]`` normalized to ``height x width``) moved by the
    driving video (the module docstring): the face per frame in the reference's weak-perspective
    pixels ``[T, 478, 3]`` (x, y pixels; z relative depth in pixels) and its canonical shape
    ``[T, 478, 3]`` (``expression.canonical_landmarks``' frame)."""
    ref_centre, ref_scale, ref_rotation = expression.similarity_fit(np.asarray(reference, np.float64), height, width)
    ref_shape = expression.canonical_landmarks(np.asarray(reference, np.float64), height, width).astype(np.float64)
    points = np.asarray(driving.landmarks, np.float64)
    centre, scale, rotation = expression.similarity_fit(points, driving.height, driving.width)  # per frame
    shape = expression.canonical_landmarks(points, driving.height, driving.width).astype(np.float64)
    out_shape = ref_shape + (shape - shape[:1])  # the driver's expression change on the reference's face
    # Row vectors: a frame's centred pixels are shape @ R^T / scale; the driver's rotation since
    # frame 0 is R_0 R_t^T, applied after the reference's own orientation R_ref^T.
    orientation = ref_rotation.T @ rotation[0] @ np.swapaxes(rotation, -1, -2)  # [T, 3, 3]
    size = scale[0] / scale  # the driver's face size relative to frame 0
    move = (centre - centre[:1]) * (scale[0] / ref_scale)  # in reference pixels
    move[..., 2] = 0.0  # MediaPipe's z is relative to the face: no depth position to follow
    pixels = ref_centre + move + (size / ref_scale)[:, None, None] * (out_shape @ orientation)
    return pixels, out_shape


def seen_along(pixels: np.ndarray, w2c: np.ndarray, intrinsics: np.ndarray, height: int, width: int) -> np.ndarray:
    """A face per frame in the first camera's weak-perspective pixels ``[T, N, 3]`` (``retarget``)
    -> its landmarks ``[T, N, 3]`` normalized to ``height x width`` as camera t sees it: lifted to
    3D at the head's depth in camera 0 (the orbit frame's origin), moved into the world, projected
    by camera t."""
    k0 = intrinsics[0]
    depth0 = w2c[0, 2, 3]  # the head centre's depth in camera 0
    z = depth0 + pixels[..., 2] * depth0 / k0[0, 0]
    x = (pixels[..., 0] - k0[0, 2]) * z / k0[0, 0]
    y = (pixels[..., 1] - k0[1, 2]) * z / k0[1, 1]
    camera0 = np.stack([x, y, z], axis=-1)  # [T, N, 3]
    world = (camera0 - w2c[0, :3, 3]) @ w2c[0, :3, :3]  # R^T (p - t) as row vectors
    out = np.empty_like(world)
    for t in range(len(world)):
        uv, depth = project(world[t], w2c[t:t + 1], intrinsics[t:t + 1])
        out[t] = trajectories.pixels_to_landmarks(uv, depth, height, width, intrinsics[t:t + 1, 0, 0])[0]
    return out


def relative_c2w(w2c: np.ndarray) -> np.ndarray:
    """Each camera's pose relative to the first (camera-to-world with the first camera as the
    world: ``w2c_0 @ inv(w2c_t)``) ``[T, 4, 4]``, translations in metres (the proxy head's scale)."""
    c2w = w2c[0] @ np.linalg.inv(w2c)
    c2w[:, :3, 3] *= METRES_PER_ORBIT_UNIT
    return c2w


def pixel_centre_intrinsics(intrinsics: np.ndarray) -> np.ndarray:
    """Intrinsics in continuous pixel coordinates -> OpenCV's (pixel centres at integers)."""
    k = np.array(intrinsics, np.float64)
    k[..., :2, 2] -= 0.5
    return k
