"""The generic proxy head: 478 MediaPipe landmarks in 3D, placed where the official orbit expects a head.

At inference the official release renders a FaceLift 3D Gaussian head along the target orbit
and runs MediaPipe on each render (paper 3.5). We skip rendering: we project a fixed 3D
landmark set of a generic head (paper eq. 7). The set is built reproducibly by
`tools/make_proxy_head.py` from `skimage.data.astronaut()` (a frontal portrait that ships with
scikit-image) and stored in `data/proxy_head.npy`.

Coordinates ("orbit frame", the world frame of the official `get_proxy_video_cameras`): origin
at the head centre, which the orbit circles; +z up; the face looks along -y (the official base
azimuth 270 puts the frontal camera at (0, -2.7, 0)); +x is the subject's left, which is image
right in the frontal view. Units are those of FaceLift's reconstructions (the orbit radius 2.7
is in them). The scale and placement are measurements, not guesses: triangulating MediaPipe
landmarks over the 11 face-visible views of FaceLift's released training sample
(weijielyu/FaceLift data_sample/gslrm/sample_000, known cameras, mean reprojection error
3.1 px at 512 px) gives an inter-pupil distance of 0.286 units and a landmark centroid
0.41 units in front of the orbit centre and 0.10 below it. The height agrees with FaceLift's
face-crop statistics (its MTCNN face centre sits 24 px below the image centre of its 512-px,
50-degree frontal input view, i.e. 0.10 units at the face's depth). With the official base
field of view (40 degrees at 480 px) the frontal landmarks span rows 170-376 and columns
159-320 of the top 480x480 square, as in the official renders.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from facecam_jax.camera.landmarks import LEFT_IRIS_CENTER, NUM_LANDMARKS, RIGHT_IRIS_CENTER

# Measured in FaceLift's world units (see the module docstring).
INTER_PUPIL_DISTANCE = 0.286
FACE_CENTROID = (0.0, -0.41, -0.10)

FOREHEAD = 10  # top of the face-oval midline
CHIN = 152  # bottom of the face-oval midline
# (subject's left, subject's right) landmark pairs that mirror each other: the face oval,
# the eye corners, the mouth corners and the iris centres. They fix the symmetry plane.
MIRROR_PAIRS = (
    (338, 109), (297, 67), (332, 103), (284, 54), (251, 21), (389, 162), (356, 127), (454, 234),
    (323, 93), (361, 132), (288, 58), (397, 172), (365, 136), (379, 150), (378, 149),
    (400, 176), (377, 148), (263, 33), (362, 133), (291, 61), (LEFT_IRIS_CENTER, RIGHT_IRIS_CENTER),
)

ENV_DATA_DIR = "FACECAM_DATA_DIR"


def data_dir() -> Path:
    """The shipped-assets folder: $FACECAM_DATA_DIR, else `data/` at the repository root."""
    return Path(os.environ.get(ENV_DATA_DIR, Path(__file__).resolve().parents[2] / "data"))


def lift_landmarks(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalized MediaPipe landmarks of one image -> 3D points [478, 3] in the orbit frame's axes.

    MediaPipe's (x, y, z) is a weak-perspective 3D shape: x, y in image fractions, z in units of
    the image width. In pixels it is a camera-frame shape (x right, y down, z away from the
    camera); mapping it through the frontal orbit camera gives world axes x right, y forward
    (into the scene), z up. Scale and orientation are still those of the photo.
    """
    x = landmarks[:, 0].astype(np.float64) * width
    y = landmarks[:, 1].astype(np.float64) * height
    z = landmarks[:, 2].astype(np.float64) * width
    return np.stack([x, z, -y], axis=-1)  # [478, 3]


def canonical_rotation(points: np.ndarray) -> np.ndarray:
    """Rotation [3, 3] (rows: new x, y, z axes) that turns a lifted head to face -y, upright.

    x: the direction that best explains the mirror pairs (the leading eigenvector of the sum of
    outer products of left-minus-right vectors), i.e. the normal of the face's symmetry plane.
    z: chin to forehead (landmark 152 -> 10) within that plane; FaceLift's training heads hold
    this line vertical (1 degree off in the triangulated sample). y = z cross x points into the
    head.
    """
    left = points[[l for l, _ in MIRROR_PAIRS]]
    right = points[[r for _, r in MIRROR_PAIRS]]
    diffs = left - right  # [P, 3]
    _, vecs = np.linalg.eigh(diffs.T @ diffs)
    x_axis = vecs[:, -1]
    if np.dot(x_axis, diffs.sum(0)) < 0:
        x_axis = -x_axis
    up = points[FOREHEAD] - points[CHIN]
    z_axis = up - np.dot(up, x_axis) * x_axis
    z_axis /= np.linalg.norm(z_axis)
    y_axis = np.cross(z_axis, x_axis)
    return np.stack([x_axis, y_axis, z_axis])


def build_proxy_head(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """The proxy head [478, 3] (float32, orbit frame) from one frontal photo's MediaPipe landmarks.

    Lift, rotate to the canonical pose, scale to the FaceLift inter-pupil distance, and move the
    landmark centroid to FACE_CENTROID.
    """
    landmarks = np.asarray(landmarks)
    if landmarks.shape != (NUM_LANDMARKS, 3) or not np.isfinite(landmarks).all():
        raise ValueError(f"expected finite landmarks [478, 3] of one face, got shape {landmarks.shape}")
    points = lift_landmarks(landmarks, height, width)
    points = points @ canonical_rotation(points).T
    points *= INTER_PUPIL_DISTANCE / np.linalg.norm(points[LEFT_IRIS_CENTER] - points[RIGHT_IRIS_CENTER])
    points += np.asarray(FACE_CENTROID) - points.mean(0)
    return points.astype(np.float32)


@functools.cache
def _load(path: str) -> np.ndarray:
    head = np.load(path)
    if head.shape != (NUM_LANDMARKS, 3):
        raise ValueError(f"{path} holds an array of shape {head.shape}, expected [478, 3]; "
                         "regenerate it with `python tools/make_proxy_head.py`")
    head.setflags(write=False)
    return head


def load_proxy_head(path: str | os.PathLike | None = None) -> np.ndarray:
    """The shipped proxy head, float32 [478, 3] in the orbit frame (read-only, cached)."""
    path = Path(path) if path is not None else data_dir() / "proxy_head.npy"
    if not path.is_file():
        raise FileNotFoundError(
            f"proxy head landmarks not found at {path}; run from a source checkout (pip install -e .), "
            f"set {ENV_DATA_DIR} to the folder holding proxy_head.npy, or regenerate it with "
            "`python tools/make_proxy_head.py`")
    return _load(str(path))
