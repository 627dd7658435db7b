"""Landmark maps: the rasterised face mesh FaceCam uses as its camera condition (SPEC 5).

The official release (`get_mediapipe_cond`) draws on a white canvas with MediaPipe's
`drawing_utils.draw_landmarks` in three passes and no points: the tessellation in gray
(thickness 1), the contours in MediaPipe's default face-mesh contour style (thickness 2), and
the irises (thickness 2). The released weights were trained on exactly those images, so this
module reproduces them pixel for pixel, including MediaPipe's rules: a landmark maps to pixel
`min(floor(x * W), W - 1)`, and a connection is drawn only when both endpoints have x and y in
[0, 1]. The colour tuples are MediaPipe's (meant as BGR), written unchanged into an RGB canvas,
as the official code does.

Speed: each pass is one `cv2.polylines` call over all its two-point segments (one call per run
of equal colour for the contours, to keep MediaPipe's drawing order). An open two-point polyline
is rasterised by the same OpenCV routine, with the same end caps, as `cv2.line`, so the result
equals MediaPipe's one `cv2.line` call per connection.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from facecam_jax.camera import mesh_topology as topo

NUM_LANDMARKS = 478


@functools.cache
def _passes() -> tuple[tuple[np.ndarray, tuple[int, int, int], int], ...]:
    """The drawing passes as (edges [E, 2], colour, thickness), in MediaPipe's order."""
    passes = [(np.asarray(topo.TESSELATION, np.int32).reshape(-1, 2), topo.GRAY,
               topo.TESSELATION_THICKNESS)]
    for flat, colors, thickness in ((topo.CONTOURS, topo.CONTOUR_COLORS, topo.CONTOUR_THICKNESS),
                                    (topo.IRISES, topo.IRIS_COLORS, topo.IRIS_THICKNESS)):
        edges = np.asarray(flat, np.int32).reshape(-1, 2)  # [E, 2]
        colors = np.asarray(colors)
        # Split into runs of consecutive edges with one colour; drawing run after run keeps
        # MediaPipe's overlap order while batching the lines of each run in one call.
        starts = np.flatnonzero(np.r_[True, colors[1:] != colors[:-1]])
        ends = np.r_[starts[1:], len(colors)]
        for s, e in zip(starts, ends):
            passes.append((edges[s:e], topo.PALETTE[colors[s]], thickness))
    return tuple(passes)


def _check(landmarks: np.ndarray, height: int, width: int, batched: bool) -> np.ndarray:
    landmarks = np.asarray(landmarks)
    expected = "[T, 478, 2 or 3]" if batched else "[478, 2 or 3]"
    if landmarks.ndim != (3 if batched else 2) or landmarks.shape[-2] != NUM_LANDMARKS \
            or landmarks.shape[-1] not in (2, 3):
        raise ValueError(
            f"expected landmarks of shape {expected} (MediaPipe face mesh with refine_landmarks=True, "
            f"478 points including the irises), got {landmarks.shape}")
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    return landmarks


def _pixel_coords(landmarks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's normalized-to-pixel mapping: pixels int32 [..., 478, 2] and valid [..., 478].

    The values are first rounded to float32 (MediaPipe's landmark protos store float32) and then
    scaled in float64 like MediaPipe's Python code. A float32 value is "close to" 0 or 1 in
    MediaPipe's `math.isclose` test only when it equals it, so validity is 0 <= v <= 1; NaN is
    invalid, so a NaN row draws nothing.
    """
    xy = landmarks[..., :2].astype(np.float32).astype(np.float64)  # [..., 478, 2]
    with np.errstate(invalid="ignore"):
        valid = np.all((xy >= 0.0) & (xy <= 1.0), axis=-1)  # [..., 478]
    size = np.array([width, height], np.float64)
    pixels = np.minimum(np.floor(np.where(valid[..., None], xy, 0.0) * size), size - 1)
    return pixels.astype(np.int32), valid


def _draw_into(canvas: np.ndarray, pixels: np.ndarray, valid: np.ndarray) -> None:
    """Draws one face mesh into a white [H, W, 3] uint8 canvas, in place."""
    for edges, color, thickness in _passes():
        keep = valid[edges[:, 0]] & valid[edges[:, 1]]
        if not keep.any():
            continue
        segments = pixels[edges[keep]]  # [E, 2 points, 2 coords]
        cv2.polylines(canvas, segments, False, color, thickness)


def draw_landmark_map(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """One landmark map, uint8 RGB [H, W, 3], equal to the official `get_mediapipe_cond` drawing.

    Args:
      landmarks: [478, 2 or 3] normalized landmarks (z is ignored).
      height, width: the canvas size in pixels.
    """
    landmarks = _check(landmarks, height, width, batched=False)
    canvas = np.full((int(height), int(width), 3), 255, np.uint8)
    pixels, valid = _pixel_coords(landmarks, int(height), int(width))
    _draw_into(canvas, pixels, valid)
    return canvas


def draw_landmark_maps(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Landmark maps of a video, uint8 RGB [T, H, W, 3]; a NaN row gives a plain white frame.

    Args:
      landmarks: [T, 478, 2 or 3] normalized landmarks (z is ignored).
      height, width: the frame size in pixels.
    """
    landmarks = _check(landmarks, height, width, batched=True)
    canvas = np.full((landmarks.shape[0], int(height), int(width), 3), 255, np.uint8)
    pixels, valid = _pixel_coords(landmarks, int(height), int(width))  # [T, 478, 2], [T, 478]
    for t in range(landmarks.shape[0]):
        _draw_into(canvas[t], pixels[t], valid[t])
    return canvas
