"""Expression codes for FactorPortrait: a face's 478 MediaPipe landmarks with the head pose removed.

The paper extracts 128-d expression latents with a pretrained image encoder (its ref. [1]) that
is not public. The substitute built here is geometric: each frame's landmarks, lifted to
MediaPipe's weak-perspective 3D shape, are aligned to the shipped proxy head (a frontal,
canonical face) by a similarity Procrustes fit (rotation, scale, translation over all 478
points), so what remains is the face's shape in a canonical frame: its expression, plus the
identity's face shape and MediaPipe's noise. The code is that shape's offset from the proxy
head, ``[478 * 3]`` per frame in inter-pupil distances; the DiT's expression controller learns
the projection to 128-d (``wan_dit.ExpressionController.proj``).

How it differs from the paper's encoder: it sees only 478 sparse points, so no wrinkles, no
mouth interior, tongue or gaze beyond the iris points; identity is not factored out (a driver
with a wider face reads as an expression); pose removal is as good as a rigid fit to a moving
face. The paper's C3 ablation (2D landmarks instead of its latents) measured the weaker end of
this family; these are 3D and pose-free but still landmarks.
"""

from __future__ import annotations

import numpy as np

from facecam_jax.camera import proxy_head
from facecam_jax.camera.landmarks import NUM_LANDMARKS

CODES_DIM = NUM_LANDMARKS * 3


def canonical_head() -> np.ndarray:
    """The proxy head ``[478, 3]`` in camera axes (x right, y down, z away from a frontal camera),
    centred, in inter-pupil distances."""
    head = proxy_head.load_proxy_head().astype(np.float64)
    cam = np.stack([head[:, 0], -head[:, 2], head[:, 1]], axis=-1)
    return (cam - cam.mean(0)) / proxy_head.INTER_PUPIL_DISTANCE


def similarity_fit(landmarks, height: int, width: int, xp=np):
    """The similarity transform that best maps normalized landmarks ``[..., 478, 3]`` of an
    ``height x width`` image, as their weak-perspective shape ``P`` (x W, y H, z W; pixels), onto
    ``canonical_head`` (least squares, a proper rotation): ``(centre [..., 1, 3], scale [...],
    rotation [..., 3, 3])`` with ``canonical = scale * (P - centre) @ rotation`` (row vectors).
    ``xp``: numpy or ``jax.numpy``."""
    landmarks = xp.asarray(landmarks)
    dtype = xp.result_type(landmarks.dtype, xp.float32)
    target = xp.asarray(canonical_head(), dtype)
    points = landmarks.astype(dtype) * xp.asarray([width, height, width], dtype)
    centre = points.mean(-2, keepdims=True)
    points = points - centre
    cov = xp.swapaxes(points, -1, -2) @ target  # [..., 3, 3]
    u, s, vt = xp.linalg.svd(cov)
    d = xp.sign(xp.linalg.det(u @ vt))  # -1: a reflection, turned into the nearest rotation
    flip = xp.stack([xp.ones_like(d), xp.ones_like(d), d], axis=-1)  # [..., 3]
    rotation = (u * flip[..., None, :]) @ vt  # maps row vectors: points @ rotation ~ target
    scale = (s * flip).sum(-1) / (points * points).sum((-2, -1))
    return centre, scale, rotation


def canonical_landmarks(landmarks, height: int, width: int, xp=np):
    """Normalized landmarks ``[..., 478, 3]`` of an ``height x width`` image -> the face in the
    canonical frame ``[..., 478, 3]`` (float32): ``similarity_fit`` applied to them."""
    centre, scale, rotation = similarity_fit(landmarks, height, width, xp)
    points = xp.asarray(landmarks).astype(centre.dtype) * xp.asarray([width, height, width], centre.dtype)
    return (scale[..., None, None] * ((points - centre) @ rotation)).astype(xp.float32)


def expression_codes(landmarks, height: int, width: int, xp=np):
    """Per-frame expression codes ``[..., CODES_DIM]`` (float32): the canonical face's offset from
    the proxy head. Non-finite landmarks give non-finite codes: callers check for faces first."""
    return codes_of(canonical_landmarks(landmarks, height, width, xp), xp)


def codes_of(canonical, xp=np):
    """Expression codes ``[..., CODES_DIM]`` (float32) of faces in the canonical frame ``[..., 478, 3]``."""
    offset = xp.asarray(canonical, xp.float32) - xp.asarray(canonical_head(), xp.float32)
    return offset.reshape(*offset.shape[:-2], CODES_DIM)
