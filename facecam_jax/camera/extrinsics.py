"""Camera extrinsics as ReCamMaster conditions on them: one 3x4 pose per latent frame, relative
to the first camera, flattened row-major -> ``[F, 12]`` (SPEC 12).

Three sources of poses:
- ReCamMaster's own ``camera_extrinsics.json`` format (also MultiCamVideo's): per frame
  (``"frame<i>"``) and camera (``"cam<NN>"``) a 4x4 matrix string in Unreal Engine units,
  stored transposed. ``recammaster_poses`` reads it as their inference dataset does: every 4th
  frame, the columns reordered to OpenCV's (x right, y down, z forward), centimetres to metres,
  each pose relative to the first (``w2c_0 @ c2w_i``).
- The project's trajectories (canonical motions, keyframe JSON; ``camera.trajectories``):
  their orbit around the proxy head, in metres by the proxy head's measured inter-pupil
  distance (``trajectory_poses``).
- Training data: the dataset's OpenCV ``world_2_cam`` matrices, each target frame's camera
  relative to the source camera (``relative_poses``, numpy or JAX).

``PRESETS`` are the project's own ten camera motions in ReCamMaster's format (pan, tilt, zoom,
translate, arc, as its ``cam01``..``cam10`` name them); ``write_recammaster_json`` writes
poses in that format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from facecam_jax.camera import proxy_head, trajectories
from facecam_jax.options import TEMPORAL_STRIDE, latent_frames

POSE_SIZE = 12  # a 3x4 pose, row-major
UNREAL_UNITS_PER_METRE = 100.0
# The proxy head's units in metres: its inter-pupil distance is an adult's 63 mm.
METRES_PER_ORBIT_UNIT = 0.063 / proxy_head.INTER_PUPIL_DISTANCE
_MATRIX = re.compile(r"\[([^\[\]]*)\]")


def flatten(poses: np.ndarray) -> np.ndarray:
    """4x4 (or 3x4) poses ``[..., 4, 4]`` -> their top 3x4 rows flattened row-major ``[..., 12]``."""
    return np.asarray(poses)[..., :3, :4].reshape(*np.shape(poses)[:-2], POSE_SIZE).astype(np.float32)


def relative_to_first(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world poses ``[T, 4, 4]`` relative to the first: ``inv(c2w_0) @ c2w_i`` (the first
    becomes the identity)."""
    c2w = np.asarray(c2w, np.float64)
    return np.linalg.inv(c2w[0]) @ c2w


def latent_frame_indices(frames: int) -> np.ndarray:
    """The video frames whose cameras stand for the latent frames: 0, 4, 8, ... (``ceil(frames / 4)``)."""
    return np.arange(0, frames, TEMPORAL_STRIDE)


def _parse_matrix(text: str, where: str) -> np.ndarray:
    rows = [[float(v) for v in row.split()] for row in _MATRIX.findall(text)]
    if len(rows) != 4 or any(len(r) != 4 for r in rows):
        raise ValueError(f"{where}: expected a 4x4 matrix string '[a b c d] [e f g h] ...', got {text[:80]!r}")
    return np.asarray(rows, np.float64)


def recammaster_c2w(path: str | os.PathLike, camera: int, frames: int | None = None) -> np.ndarray:
    """Camera ``camera``'s OpenCV camera-to-world poses ``[T, 4, 4]`` (metres, the file's world) in a
    ``camera_extrinsics.json``-format file: every frame (the first ``frames``), from Unreal axes
    and centimetres."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a ReCamMaster camera file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a ReCamMaster camera file (a JSON object of frame<i> entries expected)")
    key = f"cam{int(camera):02d}"
    count = sum(1 for k in data if re.fullmatch(r"frame\d+", k)) if frames is None else frames
    c2w = []
    for i in range(count):
        entry = data.get(f"frame{i}")
        if not isinstance(entry, dict) or key not in entry:
            have = sorted(data["frame0"]) if isinstance(data.get("frame0"), dict) else []
            raise ValueError(f"{path}: no {key} at frame{i} (it has {len(data)} frames; cameras "
                             f"{', '.join(have) or 'none'})")
        c2w.append(unreal_to_opencv(_parse_matrix(entry[key], f"{path} frame{i} {key}").T))
    return np.stack(c2w)


def recammaster_poses(path: str | os.PathLike, camera: int, frames: int = 81) -> np.ndarray:
    """ReCamMaster's poses of camera ``camera`` (the N of its ``camNN`` keys) in a
    ``camera_extrinsics.json``-format file: float32 ``[ceil(frames / 4), 12]``, every 4th frame,
    converted from Unreal (x forward, y right, z up, centimetres) to OpenCV axes in metres and
    made relative to the first."""
    c2w = recammaster_c2w(path, camera, frames)
    return flatten(relative_to_first(c2w[latent_frame_indices(frames)]))


def unreal_to_opencv(c2w: np.ndarray) -> np.ndarray:
    """An Unreal camera-to-world 4x4 (columns forward, right, up, position in cm) -> OpenCV's
    (right, down, forward, position in m), the world axes as they were."""
    out = np.asarray(c2w, np.float64)[:, [1, 2, 0, 3]].copy()
    out[:3, 1] *= -1.0
    out[:3, 3] /= UNREAL_UNITS_PER_METRE
    return out


def opencv_to_unreal(c2w: np.ndarray) -> np.ndarray:
    """``unreal_to_opencv``'s inverse."""
    c = np.asarray(c2w, np.float64).copy()
    c[:3, 1] *= -1.0
    c[:3, 3] *= UNREAL_UNITS_PER_METRE
    out = np.empty_like(c)
    out[:, [1, 2, 0, 3]] = c
    return out


def write_recammaster_json(path: str | os.PathLike, cameras: dict[int, np.ndarray]) -> None:
    """Writes OpenCV camera-to-world poses ``{camera number: [T, 4, 4] in metres}`` in ReCamMaster's
    ``camera_extrinsics.json`` format (every frame, Unreal units, transposed matrix strings)."""
    frames = {len(c) for c in cameras.values()}
    if len(frames) != 1:
        raise ValueError(f"every camera needs the same number of frames, got {sorted(frames)}")
    data = {}
    for i in range(frames.pop()):
        data[f"frame{i}"] = {
            f"cam{n:02d}": " ".join("[" + " ".join(f"{v:.6f}" for v in row) + "]"
                                    for row in opencv_to_unreal(c2w[i]).T)
            for n, c2w in sorted(cameras.items())}
    with open(path, "w") as f:
        json.dump(data, f)


# ------------------------------------------------------------------ the ten presets

PRESET_FRAMES = 81
SUBJECT_DISTANCE_M = 3.0  # the subject the arcs circle, in front of the first camera
_PAN_DEG, _TILT_DEG, _ARC_DEG = 30.0, 20.0, 30.0
_DOLLY_M, _RISE_M = 1.0, 1.0


def _rotation(axis: str, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _translation(x: float = 0.0, y: float = 0.0, z: float = 0.0) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = (x, y, z)
    return t


def preset_c2w(name: str, frames: int = PRESET_FRAMES) -> np.ndarray:
    """OpenCV camera-to-world poses ``[frames, 4, 4]`` (metres; the first camera at the origin
    looking along +z) of one of the ten presets, eased from rest to the full motion."""
    s = 0.5 - 0.5 * np.cos(np.pi * np.linspace(0.0, 1.0, frames))  # 0 -> 1, smooth at both ends
    pivot = _translation(z=SUBJECT_DISTANCE_M)

    def one(k: float) -> np.ndarray:
        if name in ("pan_right", "pan_left"):
            return _rotation("y", (1 if name == "pan_right" else -1) * _PAN_DEG * k)
        if name in ("tilt_up", "tilt_down"):
            return _rotation("x", (1 if name == "tilt_up" else -1) * _TILT_DEG * k)  # +x turns the view up (y down)
        if name in ("zoom_in", "zoom_out"):
            return _translation(z=(1 if name == "zoom_in" else -1) * _DOLLY_M * k)
        if name in ("translate_up", "translate_down"):  # rise (or sink) while turning to keep the subject
            dy = (-1 if name == "translate_up" else 1) * _RISE_M * k
            return _translation(y=dy) @ _rotation("x", math.degrees(math.atan2(dy, SUBJECT_DISTANCE_M)))
        if name in ("arc_left", "arc_right"):  # orbit the subject
            return pivot @ _rotation("y", (1 if name == "arc_left" else -1) * _ARC_DEG * k) @ np.linalg.inv(pivot)
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")

    return np.stack([one(float(k)) for k in s])


# ReCamMaster's order of its ten cameras (cam01 .. cam10).
PRESETS = ("pan_right", "pan_left", "tilt_up", "tilt_down", "zoom_in", "zoom_out", "translate_up",
           "translate_down", "arc_left", "arc_right")


def preset_number(spec: str) -> int | None:
    """1..10 for ``"cam01"``..``"cam10"`` or a preset's name, else None."""
    m = re.fullmatch(r"cam(\d\d)", spec)
    if m and 1 <= int(m.group(1)) <= len(PRESETS):
        return int(m.group(1))
    return PRESETS.index(spec) + 1 if spec in PRESETS else None


def preset_poses(spec: str, frames: int) -> np.ndarray:
    """``[ceil(frames / 4), 12]`` relative poses of a preset (``cam03`` or ``tilt_up``) over ``frames`` frames."""
    number = preset_number(spec)
    if number is None:
        raise ValueError(f"unknown preset {spec!r}: cam01..cam10 or {', '.join(PRESETS)}")
    c2w = preset_c2w(PRESETS[number - 1], frames)
    return flatten(relative_to_first(c2w[latent_frame_indices(frames)]))


@dataclasses.dataclass(frozen=True)
class Poses:
    """A camera path as relative poses: ``poses [ceil(num_frames / 4), 12]`` (3x4, row-major)."""

    poses: np.ndarray
    num_frames: int


def load_poses(spec, frames: int) -> Poses | None:
    """ReCamMaster's presets (``cam01``..``cam10`` or their names) and camera files (``path.json:N``)
    as ``Poses`` over ``frames`` frames; None for anything else (a project trajectory)."""
    text = str(spec)
    if preset_number(text) is not None:
        return Poses(preset_poses(text, frames), frames)
    path, sep, camera = text.rpartition(":")
    if sep and path.endswith(".json") and camera.isdigit():
        return Poses(recammaster_poses(path, int(camera), frames), frames)
    return None


# ------------------------------------------------------------------ the project's trajectories


def trajectory_poses(trajectory: trajectories.Trajectory) -> np.ndarray:
    """A project trajectory (orbit around the proxy head) as relative poses ``[ceil(T / 4), 12]``,
    translations in metres (``METRES_PER_ORBIT_UNIT``). Pans (2D shifts of the render, no 3D
    motion) are not poses and are dropped, as extrinsics cannot express them."""
    c2w, _ = trajectories.orbit_cameras(trajectory)
    c2w = c2w[latent_frame_indices(trajectory.num_frames)].copy()
    c2w[:, :3, 3] *= METRES_PER_ORBIT_UNIT
    return flatten(relative_to_first(c2w))


def relative_poses(source_w2c, target_w2c, xp=np):
    """Training pairs' poses: each target frame's camera relative to the source camera,
    ``source_w2c @ inv(target_w2c_t)``, at the latent frames' video frames. ``source_w2c [B, 4, 4]``,
    ``target_w2c [B, T, 4, 4]`` (OpenCV world-to-camera) -> ``[B, ceil(T / 4), 12]``; a sample
    without cameras (NaN, in-the-wild video) gets identity poses. ``xp``: numpy or ``jax.numpy``."""
    idx = latent_frame_indices(target_w2c.shape[1])
    target = target_w2c[:, idx]
    rel = xp.einsum("bij,btjk->btik", source_w2c, xp.linalg.inv(target))
    flat = rel[..., :3, :4].reshape(*rel.shape[:2], POSE_SIZE)
    identity = xp.asarray(np.eye(4)[:3].reshape(POSE_SIZE), flat.dtype)
    known = xp.all(xp.isfinite(flat), axis=-1, keepdims=True)
    return xp.where(known, flat, identity)


def num_poses(frames: int) -> int:
    """Poses of a ``frames``-frame video: one per latent frame."""
    return latent_frames(frames)
