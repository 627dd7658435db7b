"""The face mesh's triangles and a z-buffer rasteriser: what draws a MediaPipe face mesh from a
camera (the mini dataset's renders, ``data.mini_dataset``; FactorPortrait's normal maps,
``camera.normals``). NumPy only.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np

from facecam_jax.camera import mesh_topology as topo

_LANDMARK_RIGHT_EYE_CORNER = 33  # on the subject's right-eye boundary loop
_LANDMARK_LEFT_EYE_CORNER = 263
_LANDMARK_INNER_LIP = 13
_RIGHT_IRIS_CENTER, _LEFT_IRIS_CENTER = 468, 473
MOUTH_CENTER = 478  # an extra vertex: centre of the inner-lip loop (fills the mouth hole)
NUM_VERTICES = 479


def face_triangles() -> np.ndarray:
    """int32 [F, 3] triangles over the 479 vertices (478 landmarks + the mouth centre).

    MediaPipe ships the tessellation as edges; its faces are the 3-cliques of the edge graph,
    minus two cliques that are not faces (all three of their edges already bound two faces).
    The eye and inner-lip openings are closed with fans around the iris centres and the mouth
    centre, so a rendered face has eyes and lips rather than holes.
    """
    edges = {tuple(sorted(e)) for e in np.asarray(topo.TESSELATION).reshape(-1, 2).tolist()}
    neighbours: dict[int, set[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    cliques = {tuple(sorted((a, b, c))) for a, b in edges for c in neighbours[a] & neighbours[b]}
    uses = Counter(e for t in cliques for e in itertools.combinations(t, 2))
    faces = sorted(t for t in cliques
                   if not all(uses[e] == 3 for e in itertools.combinations(t, 2)))
    uses = Counter(e for t in faces for e in itertools.combinations(t, 2))
    boundary: dict[int, list[int]] = {}
    for (a, b), n in uses.items():
        if n == 1:
            boundary.setdefault(a, []).append(b)
            boundary.setdefault(b, []).append(a)
    fans = []
    for member, centre in ((_LANDMARK_RIGHT_EYE_CORNER, _RIGHT_IRIS_CENTER),
                           (_LANDMARK_LEFT_EYE_CORNER, _LEFT_IRIS_CENTER),
                           (_LANDMARK_INNER_LIP, MOUTH_CENTER)):
        loop = _boundary_loop(boundary, member)
        fans += [(loop[i], loop[(i + 1) % len(loop)], centre) for i in range(len(loop))]
    return np.asarray(faces + fans, np.int32)


def _boundary_loop(boundary: dict[int, list[int]], start: int) -> list[int]:
    loop, previous, current = [start], None, start
    while True:
        step = [n for n in boundary[current] if n != previous]
        if step[0] == start or len(loop) > len(boundary):
            return loop
        previous, current = current, step[0]
        loop.append(current)


def inner_lip_loop() -> np.ndarray:
    """Landmark indices of the inner-lip boundary (averaged into the mouth-centre vertex)."""
    tris = face_triangles()
    return np.unique(tris[tris[:, 2] == MOUTH_CENTER][:, :2])


def project(points: np.ndarray, world_2_cam: np.ndarray, intrinsics: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """World points [..., 3] -> pixel coordinates [..., 2] (centres at integers), depth [...]."""
    cam = points @ world_2_cam[:3, :3].T + world_2_cam[:3, 3]  # [..., 3]
    depth = cam[..., 2]
    uv = cam[..., :2] / depth[..., None] * np.diag(intrinsics)[:2] + intrinsics[:2, 2]
    return uv, depth


def rasterize(points: np.ndarray, depth: np.ndarray, triangles: np.ndarray, height: int,
              width: int) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffered triangle coverage of an [H, W] image.

    Args:
      points: float [V, 2] pixel coordinates (pixel centres at integers).
      depth: float [V] camera-space depth (> 0 in front of the camera).
      triangles: int [F, 3].

    Returns:
      face: int32 [H, W], the nearest triangle at each pixel centre, -1 where none.
      weights: float32 [H, W, 3], perspective-correct barycentric weights of its vertices.

    Every (triangle, pixel-in-its-bounding-box) pair is tested at once; the nearest covering
    triangle per pixel wins (a sort by pixel, then depth).
    """
    tri_xy = points[triangles].astype(np.float64)  # [F, 3, 2]
    tri_z = depth[triangles].astype(np.float64)  # [F, 3]
    x0 = np.maximum(np.ceil(tri_xy[..., 0].min(1)), 0).astype(np.int64)
    x1 = np.minimum(np.floor(tri_xy[..., 0].max(1)), width - 1).astype(np.int64)
    y0 = np.maximum(np.ceil(tri_xy[..., 1].min(1)), 0).astype(np.int64)
    y1 = np.minimum(np.floor(tri_xy[..., 1].max(1)), height - 1).astype(np.int64)
    a, b, c = tri_xy[:, 0], tri_xy[:, 1], tri_xy[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    usable = (x1 >= x0) & (y1 >= y0) & (tri_z.min(1) > 1e-6) & (np.abs(area) > 1e-12)
    ids = np.flatnonzero(usable)
    face = np.full((height, width), -1, np.int32)
    weights = np.zeros((height, width, 3), np.float32)
    if ids.size == 0:
        return face, weights
    nx, ny = x1[ids] - x0[ids] + 1, y1[ids] - y0[ids] + 1
    counts = nx * ny
    owner = np.repeat(np.arange(ids.size), counts)  # [P] index into ids
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    px = x0[ids][owner] + local % nx[owner]
    py = y0[ids][owner] + local // nx[owner]
    f = ids[owner]

    def edge(p, q):  # signed area of (p, q, pixel), normalised by the triangle's
        return ((q[f, 0] - p[f, 0]) * (py - p[f, 1]) - (q[f, 1] - p[f, 1]) * (px - p[f, 0])) / area[f]

    w = np.stack([edge(b, c), edge(c, a), edge(a, b)], -1)  # [P, 3] screen-space barycentrics
    inside = (w >= -1e-9).all(-1)
    w, f, px, py = w[inside], f[inside], px[inside], py[inside]
    inv_z = w / tri_z[f]  # perspective-correct interpolation works on attribute / z
    depth_px = 1.0 / inv_z.sum(-1)
    pixel = py * width + px
    order = np.lexsort((depth_px, pixel))
    first = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]]
    face.reshape(-1)[pixel[first]] = f[first]
    weights.reshape(-1, 3)[pixel[first]] = inv_z[first] * depth_px[first, None]
    return face, weights
