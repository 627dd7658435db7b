"""Where a re-rendered video puts the face, and how big, against the true target: a camera
measure that works where a face detector does not (blurry toy outputs at 64 x 48).

The true target's face is known (its landmarks: ``face_box``); its face patch is searched in the
output over positions and scales (normalised cross-correlation, OpenCV's ``matchTemplate``), and
the best match says where the output drew that face and at what size. The error of a frame is
the centre's distance in face widths plus the size's log ratio, ``|d centre| / width + |ln s|``:
0 when the output puts the face where the truth has it at the truth's size. Not a pose measure
(a head turned the wrong way at the right place scores well): it measures the framing a camera
change makes (the face's image position and size), which is what scale ambiguity gets wrong.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

_CHEEKS = (234, 454)
SCALES = tuple(np.geomspace(1 / 1.6, 1.6, 21))  # template sizes tried, relative to the truth's (1 among them)


@dataclasses.dataclass(frozen=True)
class FaceBox:
    """A face in pixels: centre (x, y) and width (cheek to cheek)."""

    x: float
    y: float
    width: float


def face_box(points: np.ndarray) -> FaceBox:
    """Landmarks in pixels ``[478, 2+]`` -> their face box (centre of the 468 mesh points, cheek width)."""
    mesh = np.asarray(points, np.float64)[:468, :2]
    x, y = mesh.mean(axis=0)
    return FaceBox(float(x), float(y), float(np.linalg.norm(mesh[_CHEEKS[0]] - mesh[_CHEEKS[1]])))


def _patch(frame: np.ndarray, box: FaceBox, margin: float) -> tuple[np.ndarray, tuple[float, float]]:
    """The face patch of ``frame`` (a square ``margin`` face widths wide, clipped to the frame) and
    the box centre's offset inside it."""
    half = 0.5 * margin * box.width
    h, w = frame.shape[:2]
    x0, x1 = int(max(0, np.floor(box.x - half))), int(min(w, np.ceil(box.x + half)))
    y0, y1 = int(max(0, np.floor(box.y - half))), int(min(h, np.ceil(box.y + half)))
    return frame[y0:y1, x0:x1], (box.x - x0, box.y - y0)


def locate(output: np.ndarray, truth: np.ndarray, box: FaceBox, margin: float = 1.3,
           scales=SCALES) -> tuple[float, float, float]:
    """The truth's face patch (``box``, ``margin`` face widths square) found in ``output`` (uint8
    ``[H, W, 3]`` frames): (centre x, centre y, scale) of the best match."""
    patch, (cx, cy) = _patch(truth, box, margin)
    image = output.astype(np.float32)
    best = (-np.inf, box.x, box.y, 1.0)
    for s in scales:
        ph, pw = max(3, round(patch.shape[0] * s)), max(3, round(patch.shape[1] * s))
        if ph > image.shape[0] or pw > image.shape[1]:
            continue
        template = cv2.resize(patch, (pw, ph), interpolation=cv2.INTER_AREA).astype(np.float32)
        if template.std() < 1e-3:
            continue
        score = cv2.matchTemplate(image, template, cv2.TM_CCOEFF_NORMED)
        _, top, _, (left, upper) = cv2.minMaxLoc(score)
        if top > best[0]:
            best = (top, left + cx * pw / patch.shape[1], upper + cy * ph / patch.shape[0], float(s))
    return best[1], best[2], best[3]


def frame_error(output: np.ndarray, truth: np.ndarray, box: FaceBox) -> float:
    """``|d centre| / width + |ln scale|`` of one frame (see the module)."""
    x, y, s = locate(output, truth, box)
    return float(np.hypot(x - box.x, y - box.y) / box.width + abs(np.log(s)))


def video_error(output: np.ndarray, truth: np.ndarray, boxes) -> float:
    """The mean ``frame_error`` over the frames of uint8 videos ``[T, H, W, 3]`` (one box per frame)."""
    if output.shape != truth.shape or len(boxes) != len(truth):
        raise ValueError(f"output {output.shape}, truth {truth.shape} and {len(boxes)} face boxes do not match")
    return float(np.mean([frame_error(o, t, b) for o, t, b in zip(output, truth, boxes)]))
