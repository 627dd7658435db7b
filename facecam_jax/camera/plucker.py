"""Plücker ray maps as CameraCtrl II conditions on them: per pixel of a grid, the ray through its
centre as (o x d, d), 6 channels (SPEC 12; CameraCtrl's ``ray_condition``).

Conventions follow ``camera.extrinsics``: OpenCV cameras (x right, y down, z forward), one map
per latent frame at video frames 0, 4, 8, ... (``extrinsics.latent_frame_indices``), training
pairs relative to the source camera, sampled paths relative to their first camera. Intrinsics on
a map's grid are (fx, fy, cx, cy) in its pixels with pixel centres at (u + 0.5, v + 0.5);
``grid_intrinsics`` converts the data's full-resolution OpenCV matrices (centres at integers).
``ray_map``, ``grid_intrinsics`` and ``latent_ray_maps`` take ``xp``: numpy or ``jax.numpy``.
"""

from __future__ import annotations

import numpy as np

from facecam_jax.camera.extrinsics import latent_frame_indices, relative_to_first

RAY_CHANNELS = 6  # moment o x d, then direction d


def _float_dtype(xp, *arrays):
    """The arrays' floating dtype, at least float32 (float64 stays float64 in numpy)."""
    return xp.result_type(*(a.dtype for a in arrays), xp.float32)


def ray_map(intrinsics, cam_to_world, height: int, width: int, xp=np):
    """Plücker rays of a ``height x width`` grid: intrinsics ``[..., 4]`` (fx, fy, cx, cy in the
    grid's pixels, centres at u + 0.5), OpenCV ``cam_to_world [..., 4, 4]`` -> float32
    ``[..., height, width, 6]`` = (o x d, d), d the unit direction through each pixel centre
    in world axes, o the camera centre. Leading dims broadcast against each other."""
    intrinsics, cam_to_world = xp.asarray(intrinsics), xp.asarray(cam_to_world)
    dtype = _float_dtype(xp, intrinsics, cam_to_world)
    intrinsics, cam_to_world = intrinsics.astype(dtype), cam_to_world.astype(dtype)
    fx, fy, cx, cy = (intrinsics[..., i, None, None] for i in range(4))  # [..., 1, 1]
    u = xp.arange(width, dtype=dtype) + 0.5
    v = xp.arange(height, dtype=dtype) + 0.5
    x = (u[None, :] - cx) / fx  # [..., 1, W]
    y = (v[:, None] - cy) / fy  # [..., H, 1]
    x, y = xp.broadcast_arrays(x, y)  # [..., H, W]
    d_cam = xp.stack([x, y, xp.ones_like(x)], axis=-1)  # [..., H, W, 3]
    d_cam = d_cam / xp.linalg.norm(d_cam, axis=-1, keepdims=True)
    rotation_t = xp.swapaxes(cam_to_world[..., :3, :3], -1, -2)[..., None, :, :]  # [..., 1, 3, 3]
    d = d_cam @ rotation_t  # [..., H, W, 3], row vectors: R @ d_cam per pixel
    o = cam_to_world[..., None, None, :3, 3]  # [..., 1, 1, 3]
    o, d = xp.broadcast_arrays(o, d)
    moment = xp.cross(o, d, axis=-1)  # CameraCtrl's torch.cross without dim is wrong for 3 views
    return xp.concatenate([moment, d], axis=-1).astype(xp.float32)


def grid_intrinsics(K, stride: int, xp=np):
    """Full-resolution OpenCV intrinsics ``[..., 3, 3]`` (pixel centres at integers) -> ``[..., 4]``
    (fx, fy, cx, cy) on a grid ``stride`` times coarser in ``ray_map``'s convention (centres at
    u + 0.5): fx/s, fy/s, (cx + 0.5)/s, (cy + 0.5)/s. Skew is ignored; NaN stays NaN."""
    K = xp.asarray(K)
    return xp.stack([K[..., 0, 0], K[..., 1, 1], K[..., 0, 2] + 0.5, K[..., 1, 2] + 0.5], axis=-1) / stride


def frame_fractions(K, height: int, width: int, xp=np):
    """OpenCV intrinsics ``[..., 3, 3]`` of a ``height x width`` frame -> ``[..., 4]`` fractions of it
    (fx / W, fy / H, cx / W, cy / H in ``ray_map``'s pixel-centre convention): resolution-free,
    so a camera kind's condition can be turned into rays on any latent grid."""
    grid = grid_intrinsics(K, 1, xp=xp)  # (fx, fy, cx + 0.5, cy + 0.5) in pixels
    return grid / xp.asarray([width, height, width, height], grid.dtype)


def training_cameras(source_w2c, target_w2c, target_K, xp=np):
    """Training pairs' cameras at the latent frames' video frames: each target camera relative to
    the source camera (camera-to-world ``source_w2c @ inv(target_w2c_t)``) ``[B, F, 4, 4]``, its
    intrinsics ``[B, F, 3, 3]`` and whether the sample has cameras at all ``[B]`` (a NaN anywhere,
    as an in-the-wild video has, is no camera: its cameras are the identity, never NaN)."""
    source_w2c, target_w2c, target_K = (xp.asarray(a) for a in (source_w2c, target_w2c, target_K))
    dtype = _float_dtype(xp, source_w2c, target_w2c, target_K)
    known = (xp.all(xp.isfinite(source_w2c), axis=(-2, -1))
             & xp.all(xp.isfinite(target_w2c), axis=(-3, -2, -1))
             & xp.all(xp.isfinite(target_K), axis=(-3, -2, -1)))  # [B]
    idx = latent_frame_indices(target_w2c.shape[1])
    # Unknown samples compute on identity cameras (no NaN through inv).
    eye4, eye3 = xp.eye(4, dtype=dtype), xp.eye(3, dtype=dtype)
    source = xp.where(known[:, None, None], source_w2c.astype(dtype), eye4)  # [B, 4, 4]
    target = xp.where(known[:, None, None, None], target_w2c[:, idx].astype(dtype), eye4)  # [B, F, 4, 4]
    K = xp.where(known[:, None, None, None], target_K[:, idx].astype(dtype), eye3)  # [B, F, 3, 3]
    return source[:, None] @ xp.linalg.inv(target), K, known


def latent_ray_maps(source_w2c, target_w2c, target_K, height: int, width: int, stride: int = 8, xp=np):
    """Training pairs' ray maps (``training_cameras``) on the latent grid: ``source_w2c [B, 4, 4]``,
    ``target_w2c [B, T, 4, 4]`` (OpenCV world-to-camera), ``target_K [B, T, 3, 3]`` (full
    resolution, ``height x width``) -> float32 ``[B, ceil(T / 4), height // stride, width // stride, 6]``.
    A sample without cameras gets an all-zero map, CameraCtrl II's null camera."""
    c2w, K, known = training_cameras(source_w2c, target_w2c, target_K, xp)
    maps = ray_map(grid_intrinsics(K, stride, xp), c2w, height // stride, width // stride, xp)
    return xp.where(known[:, None, None, None, None], maps, xp.zeros((), maps.dtype))


def trajectory_ray_maps(c2w, K, height: int, width: int, stride: int = 8) -> np.ndarray:
    """A sampled camera path's ray maps (numpy): OpenCV camera-to-world ``c2w [T, 4, 4]`` (metres)
    and full-resolution intrinsics ``K [T, 3, 3]`` of a ``height x width`` video -> float32
    ``[ceil(T / 4), height // stride, width // stride, 6]``, poses relative to the first
    (``inv(c2w_0) @ c2w_i``)."""
    c2w, K = np.asarray(c2w, np.float64), np.asarray(K, np.float64)
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or K.shape != (len(c2w), 3, 3):
        raise ValueError(f"expected c2w [T, 4, 4] and K [T, 3, 3] with the same T, got {c2w.shape} and {K.shape}")
    if not (np.all(np.isfinite(c2w)) and np.all(np.isfinite(K))):
        raise ValueError("the camera path has non-finite poses or intrinsics; a path to sample needs every camera")
    idx = latent_frame_indices(len(c2w))
    return ray_map(grid_intrinsics(K[idx], stride), relative_to_first(c2w[idx]), height // stride, width // stride)
