"""Camera trajectories around the proxy head and their landmark conditions (paper 3.5, eq. 7; SPEC 5).

The official release moves a camera on a sphere of radius 2.7 around the head (orbit frame:
head centre at the origin, +z up, face looking along -y; see `proxy_head`). Per frame it
interpolates azimuth, elevation and horizontal field of view linearly from start to end; the
azimuth is added to a base of 270 degrees, which puts the frontal camera at (0, -2.7, 0). The
camera looks at the origin and is an OpenCV camera-to-world matrix with columns
(right, -up, forward); fx = fy = S / (2 tan(hfov / 2)) with the principal point at the centre of
the square S x S render (S = min(H, W)); the render is padded with white to H x W on the bottom
and right before MediaPipe runs, which is how a 704x480 condition holds its face in the top
480x480 square.

We add one thing the orbit cannot express: a pan (`shift`). FaceCam's training data makes
its pans as 2D shifts of the frame and the landmark map (SPEC 6), so that is what `shift` is:
the render moves as if the camera moved right / up by shift x S pixels (the principal point
moves the opposite way), with no parallax. The canonical Pan motions use it. All other
parameters keep the official meaning.

Instead of rendering a Gaussian head and detecting its landmarks we project the 3D proxy
landmarks: u = fx x_c / z_c + cx, v = fy y_c / z_c + cy with x_c = R x + t (eq. 7).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from facecam_jax.camera import geometry, proxy_head
from facecam_jax.camera.geometry import BASE_FOV, project
from facecam_jax.options import FRAMINGS, MAX_FRAMES

# Official orbit constants (`get_proxy_video_cameras` in the release).
RADIUS = 2.7
BASE_AZIMUTH = 270.0
BASE_ELEVATION = 0.0
UP = np.array([0.0, 0.0, 1.0])
NUM_FRAMES = 81
HEIGHT, WIDTH = 704, 480

# Documented magnitudes of the canonical motions (paper 4.1, after ReCamMaster's basic
# trajectories). Arc: the camera circles the head by 30 degrees of azimuth (left/right) or 20 of
# elevation (up/down), inside the official random ranges (45 and 30). Zoom: the focal length
# grows or shrinks by 1.4x (hfov 40 -> 29.1 or 54.0 degrees, inside the official 25..55).
# Pan: the view shifts by 18% of the render size (86 px of the 480-px square), about 1.4 radii
# of the frontal face at hfov 40; the official training pans are random 2D shifts of this kind.
ARC_AZIMUTH = 30.0
ARC_ELEVATION = 20.0
ZOOM_FACTOR = 1.4
PAN_SHIFT = 0.18


def _zoomed_fov(fov: float, factor: float) -> float:
    """The hfov whose focal length is `factor` times that of `fov`."""
    return math.degrees(2 * math.atan(math.tan(math.radians(fov) / 2) / factor))


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Per-frame camera parameters in the official parametrisation (degrees; shift in render sizes).

    azimuth and elevation are relative to the official base (270, 0); fov is the horizontal
    field of view of the square render; shift [T, 2] pans the view right and up by that
    fraction of the render size S (the image content moves left and down).
    """

    azimuth: np.ndarray  # [T]
    elevation: np.ndarray  # [T]
    fov: np.ndarray  # [T]
    shift: np.ndarray  # [T, 2]
    radius: float = RADIUS

    def __post_init__(self):
        num = len(self.azimuth)
        for name in ("elevation", "fov"):
            if len(getattr(self, name)) != num:
                raise ValueError(f"trajectory {name} has {len(getattr(self, name))} frames, azimuth has {num}")
        if np.shape(self.shift) != (num, 2):
            raise ValueError(f"trajectory shift must be [T, 2] = [{num}, 2], got {np.shape(self.shift)}")
        if num == 0:
            raise ValueError("a trajectory needs at least one frame")
        for name in ("azimuth", "elevation", "fov", "shift", "radius"):
            bad = ~np.isfinite(np.asarray(getattr(self, name), np.float64))
            if np.any(bad):
                frames = np.flatnonzero(bad.reshape(num, -1).any(-1)) if name != "radius" else []
                where = f" at frame(s) {frames[:5].tolist()}" if len(frames) else ""
                raise ValueError(f"trajectory {name} is not finite{where} (NaN or inf): every camera value "
                                 "must be a finite number")
        if np.any(np.abs(BASE_ELEVATION + np.asarray(self.elevation)) >= 89.0):
            raise ValueError("elevation must stay within (-89, 89) degrees: the orbit camera is "
                             "undefined when it looks straight down or up the z axis")
        if np.any((np.asarray(self.fov) <= 1.0) | (np.asarray(self.fov) >= 170.0)):
            raise ValueError(f"fov must be in (1, 170) degrees, got {np.min(self.fov)}..{np.max(self.fov)}")
        if self.radius <= 0:
            raise ValueError(f"radius must be positive, got {self.radius}")

    @property
    def num_frames(self) -> int:
        return len(self.azimuth)

    @classmethod
    def linear(cls, num_frames: int = NUM_FRAMES, *, start_azimuth=0.0, end_azimuth=0.0,
               start_elevation=0.0, end_elevation=0.0, start_fov=BASE_FOV, end_fov=BASE_FOV,
               start_shift=(0.0, 0.0), end_shift=(0.0, 0.0), radius=RADIUS) -> Trajectory:
        """Every parameter linear from start to end, as the official `get_proxy_video_cameras`."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return cls(
            azimuth=np.linspace(start_azimuth, end_azimuth, num_frames),
            elevation=np.linspace(start_elevation, end_elevation, num_frames),
            fov=np.linspace(start_fov, end_fov, num_frames),
            shift=np.linspace(np.asarray(start_shift, float), np.asarray(end_shift, float), num_frames),
            radius=float(radius))

    @classmethod
    def from_official(cls, camera_params: Mapping[str, float], num_frames: int = NUM_FRAMES) -> Trajectory:
        """From the release's `camera_params` dict (start/end _azimuth, _elevation, _fov)."""
        keys = [f"{e}_{p}" for p in ("azimuth", "elevation", "fov") for e in ("start", "end")]
        missing = [k for k in keys if k not in camera_params]
        if missing:
            raise ValueError(f"official camera params lack {missing}; expected keys {keys}")
        for k in keys:
            if not isinstance(camera_params[k], (int, float)) or not math.isfinite(camera_params[k]):
                raise ValueError(f"official camera param {k!r} is {camera_params[k]!r}; it must be a finite number")
        return cls.linear(num_frames, **{k: float(camera_params[k]) for k in keys})


def orbit_cameras(trajectory: Trajectory, render_size: int = min(HEIGHT, WIDTH)) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV cameras of a trajectory: c2w float64 [T, 4, 4] and intrinsics K float64 [T, 3, 3].

    The official construction: camera on the sphere at (base + azimuth, base + elevation),
    looking at the origin with world up +z; columns (right, -up, forward, position). A shift
    moves the principal point from the centre by (-shift_x, +shift_y) x S pixels.
    """
    azimuth = np.radians(BASE_AZIMUTH + np.asarray(trajectory.azimuth, np.float64))
    elevation = np.radians(BASE_ELEVATION + np.asarray(trajectory.elevation, np.float64))
    position = trajectory.radius * np.stack(
        [np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)], -1)  # [T, 3]
    forward = -position / np.linalg.norm(position, axis=-1, keepdims=True)
    right = np.cross(forward, UP)
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    up = np.cross(right, forward)
    up /= np.linalg.norm(up, axis=-1, keepdims=True)
    c2w = np.zeros((trajectory.num_frames, 4, 4))
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, -up, forward, position
    c2w[:, 3, 3] = 1.0
    focal = render_size / (2 * np.tan(np.radians(np.asarray(trajectory.fov, np.float64)) / 2))
    intrinsics = np.zeros((trajectory.num_frames, 3, 3))
    intrinsics[:, 0, 0] = intrinsics[:, 1, 1] = focal
    shift = np.asarray(trajectory.shift, np.float64)
    intrinsics[:, 0, 2] = render_size * (0.5 - shift[:, 0])
    intrinsics[:, 1, 2] = render_size * (0.5 + shift[:, 1])
    intrinsics[:, 2, 2] = 1.0
    return c2w, intrinsics


def pixels_to_landmarks(pixels: np.ndarray, depth: np.ndarray, height: int, width: int,
                         focal: np.ndarray) -> np.ndarray:
    """Pixel projections -> MediaPipe-style normalized landmarks [T, N, 3] of an H x W frame.

    z follows MediaPipe's convention (relative depth, smaller is closer, on the scale of x):
    the depth offset from the face's mean depth, seen at that mean depth through focal
    length `focal` [T] (pixels), in units of the frame width.
    """
    xy = pixels / np.array([width, height], np.float64)
    mean_depth = depth.mean(axis=-1, keepdims=True)  # [T, 1]
    z = (depth - mean_depth) / mean_depth * np.asarray(focal, np.float64)[:, None] / width
    return np.concatenate([xy, z[..., None]], axis=-1).astype(np.float32)


def condition_landmarks(trajectory: Trajectory, *, head: np.ndarray | None = None,
                        height: int = HEIGHT, width: int = WIDTH, framing: str = "official",
                        source_landmarks: np.ndarray | None = None,
                        source_fov: float = BASE_FOV) -> np.ndarray:
    """Per-frame landmarks of the proxy head along a trajectory: float32 [T, 478, 3], normalized to H x W.

    framing="official": as the release: a square render of side S = min(H, W) in the top-left
      of the frame (white padding bottom and right), camera exactly as the trajectory says.
    framing="source": the condition starts where the source face is. The source camera is
      estimated from `source_landmarks` (frame-0 landmarks [478, 2|3] of the source video,
      normalized to H x W) by PnP against the proxy head with an assumed hfov `source_fov` over
      the full frame width and a centred principal point; the trajectory's motion, relative to
      its own first frame, is then applied to that camera (`relative_cameras`: rotations pivot
      about the head centre), the focal length scales by the ratio of the trajectory's focal
      lengths, and the principal point moves by the trajectory's pan in pixels.
    Feed the result to `draw.draw_landmark_maps(landmarks, height, width)`.
    """
    head = proxy_head.load_proxy_head() if head is None else np.asarray(head, np.float64)
    if framing == "official":
        size = min(height, width)
        c2w, intrinsics = orbit_cameras(trajectory, render_size=size)
        pixels, depth = project(head, np.linalg.inv(c2w), intrinsics)
        return pixels_to_landmarks(pixels, depth, height, width, intrinsics[:, 0, 0])
    if framing != "source":
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    if source_landmarks is None:
        raise ValueError("framing='source' needs source_landmarks: the frame-0 landmarks of the source "
                         "video (facecam_jax.camera.landmarks.detect), normalized to the condition size")
    w2c, scaled_k = source_cameras(trajectory, source_landmarks, height=height, width=width, head=head,
                                   source_fov=source_fov)
    pixels, depth = project(head, w2c, scaled_k)
    return pixels_to_landmarks(pixels, depth, height, width, scaled_k[:, 0, 0])


def source_cameras(trajectory: Trajectory, source_landmarks: np.ndarray, *, height: int, width: int,
                   head: np.ndarray | None = None, source_fov: float = BASE_FOV) -> tuple[np.ndarray, np.ndarray]:
    """The cameras of ``framing="source"`` (``condition_landmarks``): world-to-camera ``[T, 4, 4]``
    in the orbit frame (``w2c[0]``: the source camera, by PnP of ``source_landmarks`` against
    ``head``) and intrinsics ``[T, 3, 3]`` (the source's, zoomed and panned as the trajectory)."""
    head = proxy_head.load_proxy_head() if head is None else np.asarray(head, np.float64)
    source_k = geometry.camera_matrix(height, width, fov=source_fov)
    rotation, translation = geometry.solve_pnp(source_landmarks, height, width, intrinsics=source_k, head=head)
    source_w2c = np.eye(4)
    source_w2c[:3, :3], source_w2c[:3, 3] = rotation, translation
    c2w, intrinsics = orbit_cameras(trajectory, render_size=min(height, width))
    w2c = geometry.relative_cameras(np.linalg.inv(c2w), source_w2c)
    scaled_k = np.repeat(source_k[None], trajectory.num_frames, 0)
    scaled_k[:, :2, :2] *= (intrinsics[:, 0, 0] / intrinsics[0, 0, 0])[:, None, None]
    scaled_k[:, :2, 2] += intrinsics[:, :2, 2] - intrinsics[0, :2, 2]
    return w2c, scaled_k


# ---------------------------------------------------------------------------------------------
# Canonical motions, the official random sampler, and a JSON format for custom trajectories.

def _canonical() -> dict[str, dict[str, Any]]:
    zoom_in, zoom_out = _zoomed_fov(BASE_FOV, ZOOM_FACTOR), _zoomed_fov(BASE_FOV, 1 / ZOOM_FACTOR)
    return {
        # Pan left: the view moves left, so the face moves right in the image.
        "pan_left": {"end_shift": (-PAN_SHIFT, 0.0)},
        "pan_right": {"end_shift": (PAN_SHIFT, 0.0)},
        "pan_up": {"end_shift": (0.0, PAN_SHIFT)},
        "pan_down": {"end_shift": (0.0, -PAN_SHIFT)},
        "zoom_in": {"end_fov": zoom_in},
        "zoom_out": {"end_fov": zoom_out},
        # Arc left: the camera circles to its left (toward the subject's right), so the head
        # ends up facing image right.
        "arc_left": {"end_azimuth": -ARC_AZIMUTH},
        "arc_right": {"end_azimuth": ARC_AZIMUTH},
        "arc_up": {"end_elevation": ARC_ELEVATION},
        "arc_down": {"end_elevation": -ARC_ELEVATION},
    }


CANONICAL_MOTIONS = tuple(_canonical())
STATIC = "static"  # not a motion: the camera held where it starts (``load_trajectory``)
OPPOSITE = {"pan_left": "pan_right", "pan_right": "pan_left", "pan_up": "pan_down", "pan_down": "pan_up",
            "zoom_in": "zoom_out", "zoom_out": "zoom_in", "arc_left": "arc_right", "arc_right": "arc_left",
            "arc_up": "arc_down", "arc_down": "arc_up"}


def motion_name(name: str) -> str:
    """Canonical key of a motion name: 'Pan Left', 'pan-left' and 'pan_left' are the same."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in CANONICAL_MOTIONS:
        raise ValueError(f"unknown camera motion {name!r}; the canonical motions are "
                         f"{', '.join(CANONICAL_MOTIONS)} (or pass a trajectory JSON file)")
    return key


def canonical(name: str, num_frames: int = NUM_FRAMES) -> Trajectory:
    """One of the ten canonical evaluation motions, starting frontal at hfov 40."""
    return Trajectory.linear(num_frames, **_canonical()[motion_name(name)])


def random_camera_params(rng: np.random.Generator, *, large_pose: bool = True, max_azimuth: float = 45.0,
                         max_elevation: float = 30.0, max_fov: float = 15.0,
                         base_fov: float = BASE_FOV) -> dict[str, float]:
    """The official inference sampler (`random_camera_params` of the release), as its dict.

    large_pose=True (the release's default) sweeps across the face: the azimuth starts in
    [-45, -30] and ends in [30, 45] degrees, or the mirror of that, with even odds; otherwise
    both ends are uniform in [-45, 45]. Elevation ends are uniform in [-30, 30] and hfov ends
    in [25, 55].
    """
    def uniform(low: float, high: float) -> float:
        # The release calls np.random.uniform, which also takes low > high.
        return float(low + (high - low) * rng.random())

    if large_pose:
        direction = 1.0 if rng.random() < 0.5 else -1.0
        start_azimuth = uniform(-direction * max_azimuth, -direction * (max_azimuth - 15))
        end_azimuth = uniform(direction * max_azimuth, direction * (max_azimuth - 15))
    else:
        start_azimuth = uniform(-max_azimuth, max_azimuth)
        end_azimuth = uniform(-max_azimuth, max_azimuth)
    return {
        "start_azimuth": start_azimuth, "end_azimuth": end_azimuth,
        "start_elevation": uniform(-max_elevation, max_elevation),
        "end_elevation": uniform(-max_elevation, max_elevation),
        "start_fov": uniform(base_fov - max_fov, base_fov + max_fov),
        "end_fov": uniform(base_fov - max_fov, base_fov + max_fov),
    }


def random_trajectory(rng: np.random.Generator, num_frames: int = NUM_FRAMES, *,
                      large_pose: bool = True) -> Trajectory:
    """A trajectory from the official random sampler."""
    return Trajectory.from_official(random_camera_params(rng, large_pose=large_pose), num_frames)


# `--trajectory random`: the official sampler per video, drawn from that video's seed. The
# generator is seeded with (RANDOM_STREAM, seed), a stream of its own: the noise of the same
# seed (jax.random) and the camera are unrelated draws.
RANDOM = "random"
RANDOM_STREAM = 0xFACECA


def seeded_random(seed: int, num_frames: int = NUM_FRAMES) -> tuple[Trajectory, dict[str, float]]:
    """`--trajectory random` for the video of noise seed `seed`: the official sampler's
    parameters (`random_camera_params`, large_pose as the release) and their trajectory. The
    parameters, written to a JSON file, are a trajectory `load_trajectory` reads back exactly."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"a random trajectory needs a seed >= 0 (an integer), got {seed!r}")
    params = random_camera_params(np.random.default_rng([RANDOM_STREAM, int(seed)]))
    return Trajectory.from_official(params, num_frames), params


_KEY_FIELDS = ("azimuth", "elevation", "fov", "shift_x", "shift_y")
_DEFAULTS = {"azimuth": 0.0, "elevation": 0.0, "fov": BASE_FOV, "shift_x": 0.0, "shift_y": 0.0}
INTERPOLATIONS = ("linear", "ease")


def from_keyframes(keyframes: Sequence[Mapping[str, float]], num_frames: int = NUM_FRAMES, *,
                   interpolation: str = "linear", radius: float = RADIUS) -> Trajectory:
    """A trajectory through keyframes.

    Each keyframe has "t" (time as a fraction of the clip, 0..1) and any of "azimuth",
    "elevation", "fov" (degrees, official meaning) and "shift_x", "shift_y" (pan right / up in
    fractions of the render size). A
    field a keyframe leaves out keeps its previous value (the first keyframe starts from
    azimuth 0, elevation 0, fov 40, no shift). Between keyframes the values move linearly
    ("linear", as the official orbit) or with a cosine ease-in-out ("ease"); before the first
    and after the last keyframe they hold.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not keyframes:
        raise ValueError("a keyframed trajectory needs at least one keyframe")
    times, rows, current = [], [], dict(_DEFAULTS)
    for i, key in enumerate(keyframes):
        unknown = set(key) - set(_KEY_FIELDS) - {"t"}
        if unknown or "t" not in key:
            raise ValueError(f"keyframe {i} ({dict(key)}) needs 't' in [0, 1] and only the fields "
                             f"{_KEY_FIELDS}; unknown: {sorted(unknown)}")
        for k, v in key.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"keyframe {i} field {k!r} is {v!r}; it must be a finite number")
        current.update({k: float(v) for k, v in key.items() if k != "t"})
        times.append(float(key["t"]))
        rows.append([current[k] for k in _KEY_FIELDS])
    times = np.asarray(times)
    if np.any(np.diff(times) <= 0) or times[0] < 0 or times[-1] > 1:
        raise ValueError(f"keyframe times must increase strictly within [0, 1], got {times.tolist()}")
    rows = np.asarray(rows)  # [K, 5]
    frame_t = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    segment = np.clip(np.searchsorted(times, frame_t, side="right") - 1, 0, max(len(times) - 2, 0))
    if len(times) == 1:
        values = np.repeat(rows, num_frames, 0)
    else:
        t0, t1 = times[segment], times[segment + 1]
        alpha = np.clip((frame_t - t0) / (t1 - t0), 0.0, 1.0)
        if interpolation == "ease":
            alpha = 0.5 - 0.5 * np.cos(np.pi * alpha)
        values = rows[segment] + alpha[:, None] * (rows[segment + 1] - rows[segment])  # [T, 5]
    return Trajectory(azimuth=values[:, 0], elevation=values[:, 1], fov=values[:, 2],
                      shift=values[:, 3:5], radius=float(radius))


def load_trajectory(spec: str | os.PathLike | Mapping[str, Any], num_frames: int | None = None) -> Trajectory:
    """A trajectory from a canonical name, ``static`` (the camera held still: frontal, hfov 40),
    a JSON file path, or an already parsed JSON dict.

    JSON format (all fields but "keyframes" optional):
      {"num_frames": 81, "interpolation": "linear" | "ease", "radius": 2.7,
       "keyframes": [{"t": 0.0, "azimuth": 0, "elevation": 0, "fov": 40},
                     {"t": 1.0, "azimuth": -30, "shift_x": 0.1}]}
    or the official dict {"start_azimuth": .., "end_azimuth": .., "start_elevation": ..,
    "end_elevation": .., "start_fov": .., "end_fov": ..}. `num_frames` overrides the file's.
    """
    if isinstance(spec, str) and spec == STATIC and not os.path.exists(spec):
        return Trajectory.linear(num_frames or NUM_FRAMES)
    if isinstance(spec, (str, os.PathLike)) and not os.path.exists(spec) and not str(spec).endswith(".json"):
        return canonical(str(spec), num_frames or NUM_FRAMES)
    if isinstance(spec, (str, os.PathLike)):
        try:
            with open(spec) as f:
                spec = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"could not read trajectory JSON {spec}: {err}") from err
    if not isinstance(spec, Mapping):
        raise ValueError(f"trajectory JSON must hold an object, got {type(spec).__name__}")
    frames = num_frames or spec.get("num_frames", NUM_FRAMES)
    if isinstance(frames, float) and frames.is_integer():
        frames = int(frames)
    if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"trajectory num_frames is {frames!r}; it must be an integer in 1..{MAX_FRAMES}")
    if "keyframes" in spec:
        return from_keyframes(spec["keyframes"], frames, interpolation=spec.get("interpolation", "linear"),
                              radius=float(spec.get("radius", RADIUS)))
    return Trajectory.from_official(spec, frames)


def trajectory_to_json(trajectory: Trajectory, stride: int = 1) -> dict[str, Any]:
    """A JSON-able keyframe dict that reproduces the trajectory exactly at every `stride`-th frame."""
    num = trajectory.num_frames
    index = np.unique(np.r_[np.arange(0, num, stride), num - 1])
    times = index / max(num - 1, 1)
    keyframes = [{"t": float(t), "azimuth": float(trajectory.azimuth[i]), "elevation": float(trajectory.elevation[i]),
                  "fov": float(trajectory.fov[i]), "shift_x": float(trajectory.shift[i, 0]),
                  "shift_y": float(trajectory.shift[i, 1])} for t, i in zip(times, index)]
    return {"num_frames": num, "interpolation": "linear", "radius": trajectory.radius, "keyframes": keyframes}
