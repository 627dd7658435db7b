"""Normal maps of the MediaPipe face mesh: FactorPortrait's head-pose condition (paper 4.1).

The paper renders a tracked body mesh into normal maps; here the mesh is MediaPipe's 478
landmarks of the driving face with the project's face topology (``raster.face_triangles``:
the tessellation's faces, eyes and mouth closed by fans), rasterised with the mini dataset's
z-buffer. Only the face is drawn: no neck, hair or backdrop (the pixels it does not cover are
black), so head pose reaches the model through the face alone.

Colour code: the unit outward surface normal n in the rendering camera's OpenCV axes (x right,
y down, z forward) as ``rgb = 255 * (1 + (n_x, -n_y, -n_z)) / 2``, i.e. the usual normal-map
convention (red: right, green: up, blue: towards the viewer). A surface facing the camera is
(128, 128, 255); black (0, 0, 0), no unit normal's colour, is "no face".

Triangles are wound outwards once, on the shipped proxy head (``orientation``), so every mesh
with this topology gets outward normals; vertex normals are area-weighted and interpolated
per pixel with perspective-correct barycentrics.
"""

from __future__ import annotations

import functools

import numpy as np

from facecam_jax.camera import proxy_head
from facecam_jax.camera.raster import NUM_VERTICES, face_triangles, inner_lip_loop, project, rasterize


def with_mouth_centre(points: np.ndarray) -> np.ndarray:
    """Points ``[..., 478, 3]`` -> ``[..., 479, 3]``: the inner-lip loop's centre appended (the
    vertex the mouth's fan closes on)."""
    points = np.asarray(points)
    centre = points[..., inner_lip_loop(), :].mean(-2, keepdims=True)
    return np.concatenate([points, centre], axis=-2)


def proxy_head_camera() -> np.ndarray:
    """The shipped proxy head (479 vertices) in the OpenCV axes of a frontal camera: x right,
    y down, z away from the camera (the orbit frame's (x, -z, y)), centred at the origin."""
    head = proxy_head.load_proxy_head().astype(np.float64)
    cam = np.stack([head[:, 0], -head[:, 2], head[:, 1]], axis=-1)
    cam = with_mouth_centre(cam)
    return cam - cam[:478].mean(0)


@functools.cache
def oriented_triangles() -> np.ndarray:
    """``face_triangles`` wound so that ``(b - a) x (c - a)`` points out of the face: checked on
    the proxy head against the direction from a point behind the face (half a face width
    behind its centre) to each triangle (read-only)."""
    tris = face_triangles().copy()
    v = proxy_head_camera()
    a, b, c = v[tris[:, 0]], v[tris[:, 1]], v[tris[:, 2]]
    normal = np.cross(b - a, c - a)
    width = np.linalg.norm(v[234] - v[454])  # cheek to cheek
    inside = v[:478].mean(0) + np.array([0.0, 0.0, 0.5 * width])
    flip = np.einsum("fk,fk->f", normal, (a + b + c) / 3.0 - inside) < 0
    tris[flip] = tris[flip][:, [0, 2, 1]]
    tris.setflags(write=False)
    return tris


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray | None = None) -> np.ndarray:
    """Unit outward vertex normals ``[V, 3]`` (area-weighted face normals) of a mesh ``[V, 3]``."""
    triangles = oriented_triangles() if triangles is None else triangles
    v = np.asarray(vertices, np.float64)
    a, b, c = v[triangles[:, 0]], v[triangles[:, 1]], v[triangles[:, 2]]
    face = np.cross(b - a, c - a)  # length: twice the area
    out = np.zeros_like(v)
    for k in range(3):
        np.add.at(out, triangles[:, k], face)
    return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals ``[..., 3]`` in OpenCV camera axes -> uint8 colours (the module's convention)."""
    gl = np.asarray(normals) * np.array([1.0, -1.0, -1.0])
    return np.clip(np.round((gl + 1.0) * 127.5), 0, 255).astype(np.uint8)


def decode_normals(rgb: np.ndarray) -> np.ndarray:
    """uint8 colours -> unit normals ``[..., 3]`` in OpenCV camera axes (inverse of ``encode_normals``)."""
    gl = np.asarray(rgb, np.float64) / 127.5 - 1.0
    n = gl * np.array([1.0, -1.0, -1.0])
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


def _shade(pixels: np.ndarray, depth: np.ndarray, cam_vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """The normal map of a mesh at ``pixels [V, 2]`` (centres at integers), ``depth [V]``, whose
    camera-space vertices ``[V, 3]`` give the normals."""
    triangles = oriented_triangles()
    face, weights = rasterize(pixels, depth, triangles, height, width)
    covered = face >= 0
    normals = vertex_normals(cam_vertices, triangles)
    n = np.einsum("pk,pkc->pc", weights[covered], normals[triangles[face[covered]]])
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    image = np.zeros((height, width, 3), np.uint8)
    image[covered] = encode_normals(n)
    return image


def render_normal_map(vertices: np.ndarray, world_2_cam: np.ndarray, intrinsics: np.ndarray, height: int,
                      width: int) -> np.ndarray:
    """The normal map (uint8 ``[H, W, 3]``) of a face mesh ``[479, 3]`` (world, metres, or
    ``[478, 3]``: the mouth centre is added) seen by an OpenCV camera (``world_2_cam [4, 4]``,
    intrinsics ``[3, 3]`` with pixel centres at integers) under perspective."""
    vertices = np.asarray(vertices, np.float64)
    if vertices.shape[0] == NUM_VERTICES - 1:
        vertices = with_mouth_centre(vertices)
    if vertices.shape != (NUM_VERTICES, 3):
        raise ValueError(f"expected a face mesh [478 or 479, 3], got {vertices.shape}")
    w2c = np.asarray(world_2_cam, np.float64)
    uv, depth = project(vertices, w2c, np.asarray(intrinsics, np.float64))
    return _shade(uv, depth, vertices @ w2c[:3, :3].T + w2c[:3, 3], height, width)


def landmark_vertices(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalized MediaPipe landmarks ``[..., 478, 3]`` of an ``height x width`` image -> the face
    in that camera's pixels ``[..., 479, 3]``: (x W - 0.5, y H - 0.5, z W) (MediaPipe's
    weak-perspective shape; x right, y down, z away from the camera)."""
    points = np.asarray(landmarks, np.float64) * np.array([width, height, width])
    points[..., :2] -= 0.5
    return with_mouth_centre(points)


def landmark_normal_maps(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normal maps uint8 ``[T, H, W, 3]`` of per-frame landmarks ``[T, 478, 3]`` in the camera they
    were detected in: each vertex at its landmark's pixel (MediaPipe's weak perspective), so the
    map lies on the face in the frame."""
    landmarks = np.asarray(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_VERTICES - 1, 3):
        raise ValueError(f"expected landmarks [T, 478, 3], got {landmarks.shape}")
    if not np.isfinite(landmarks).all():
        raise ValueError("normal maps need a detected face in every frame (the landmarks hold NaN)")
    out = np.empty((len(landmarks), height, width, 3), np.uint8)
    for i, v in enumerate(landmark_vertices(landmarks, height, width)):
        depth = v[:, 2] - v[:, 2].min() + float(width)  # orthographic: any positive depth keeps the order
        out[i] = _shade(v[:, :2], depth, v, height, width)
    return out
