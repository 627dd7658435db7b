"""Plücker ray maps: ray_map against an explicit per-pixel loop and CameraCtrl's ray_condition,
grid intrinsics, training-pair and sampled-path maps, numpy and jax.numpy alike."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from facecam_jax.camera import plucker
from facecam_jax.data.mini_dataset import make_cameras


def _reference(k, c2w, height, width):
    """The formula pixel by pixel, in plain Python: ``[height, width, 6]`` float64."""
    fx, fy, cx, cy = (float(a) for a in k)
    rotation, o = np.asarray(c2w, np.float64)[:3, :3], np.asarray(c2w, np.float64)[:3, 3]
    out = np.zeros((height, width, 6))
    for v in range(height):
        for u in range(width):
            dc = [(u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1.0]
            n = math.sqrt(sum(c * c for c in dc))
            dc = [c / n for c in dc]
            d = [sum(rotation[i, j] * dc[j] for j in range(3)) for i in range(3)]
            m = [o[1] * d[2] - o[2] * d[1], o[2] * d[0] - o[0] * d[2], o[0] * d[1] - o[1] * d[0]]
            out[v, u] = m + d
    return out


def _rotation(axis, degrees):
    """Rodrigues: a 3x3 rotation about ``axis``."""
    a = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    s, c = math.sin(math.radians(degrees)), math.cos(math.radians(degrees))
    cross = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return c * np.eye(3) + s * cross + (1 - c) * np.outer(a, a)


def _pose(axis=(0, 1, 0), degrees=0.0, t=(0.0, 0.0, 0.0)):
    p = np.eye(4)
    p[:3, :3], p[:3, 3] = _rotation(axis, degrees), t
    return p


def _random_poses(rng, shape):
    poses = np.empty((*shape, 4, 4))
    for i in np.ndindex(*shape):
        poses[i] = _pose(rng.standard_normal(3), rng.uniform(-60, 60), rng.uniform(-2, 2, 3))
    return poses


# ------------------------------------------------------------------ ray_map


def test_ray_map_identity_camera():
    height, width = 5, 7
    k = np.array([6.0, 6.0, width / 2, height / 2])  # principal point at the grid's centre
    out = plucker.ray_map(k, np.eye(4), height, width)
    assert out.shape == (height, width, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference(k, np.eye(4), height, width), atol=1e-7)
    assert np.all(out[..., :3] == 0.0)  # a camera at the origin: every moment is exactly zero
    np.testing.assert_allclose(np.linalg.norm(out[..., 3:], axis=-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(out[2, 3, 3:], [0.0, 0.0, 1.0])
    # u is the column, v the row: right of centre looks +x, below looks +y (OpenCV).
    assert out[2, 6, 3] > 0 and abs(out[2, 6, 4]) < 1e-7
    assert out[4, 3, 4] > 0 and abs(out[4, 3, 3]) < 1e-7


def test_ray_map_translated_camera():
    height, width = 4, 6
    k = np.array([5.0, 5.0, 2.7, 1.9])
    c2w = _pose(t=(0.3, -0.2, 1.5))
    out = plucker.ray_map(k, c2w, height, width)
    np.testing.assert_allclose(out, _reference(k, c2w, height, width), atol=1e-6)
    moment, d = out[..., :3].astype(np.float64), out[..., 3:].astype(np.float64)
    np.testing.assert_allclose(moment, np.cross(c2w[:3, 3], d), atol=1e-6)
    np.testing.assert_allclose(np.sum(moment * d, axis=-1), 0.0, atol=1e-6)
    assert np.abs(moment).max() > 0.1
    # A pure translation leaves the directions as the identity camera's.
    np.testing.assert_allclose(d, plucker.ray_map(k, np.eye(4), height, width)[..., 3:], atol=1e-7)


def test_ray_map_rotated_translated_batched_non_square_pixels():
    rng = np.random.default_rng(0)
    height, width = 3, 5
    c2w = _random_poses(rng, (2, 3))
    k = np.stack([rng.uniform(3, 6, (2, 3)), rng.uniform(7, 9, (2, 3)),  # fx != fy
                  rng.uniform(1, 4, (2, 3)), rng.uniform(0.5, 2.5, (2, 3))], axis=-1)
    out = plucker.ray_map(k, c2w, height, width)
    assert out.shape == (2, 3, height, width, 6) and out.dtype == np.float32
    for i in np.ndindex(2, 3):
        np.testing.assert_allclose(out[i], _reference(k[i], c2w[i], height, width), atol=2e-6)
    # Shared intrinsics broadcast against batched poses.
    shared = plucker.ray_map(k[0, 0], c2w, height, width)
    np.testing.assert_allclose(shared[1, 2], _reference(k[0, 0], c2w[1, 2], height, width), atol=2e-6)


def test_ray_map_matches_cameractrl_ray_condition_parity(torch):
    """CameraCtrl's ``ray_condition`` (inference.py), fp32, with ``torch.cross(..., dim=-1)``: exactly
    3 views is where their ``torch.cross`` without ``dim`` crosses the wrong axis. Tolerance 1e-6."""
    rng = np.random.default_rng(1)
    height, width, views = 4, 6, 3
    c2w = _random_poses(rng, (1, views)).astype(np.float32)
    k = np.array([[[5.0, 7.0, 3.2, 1.7]] * views], np.float32)

    K, c2w_t = torch.from_numpy(k), torch.from_numpy(c2w)
    j, i = torch.meshgrid(torch.linspace(0, height - 1, height), torch.linspace(0, width - 1, width), indexing="ij")
    i = i.reshape([1, 1, height * width]).expand([1, views, height * width]) + 0.5
    j = j.reshape([1, 1, height * width]).expand([1, views, height * width]) + 0.5
    fx, fy, cx, cy = K.chunk(4, dim=-1)
    zs = torch.ones_like(i)
    directions = torch.stack(((i - cx) / fx * zs, (j - cy) / fy * zs, zs), dim=-1)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    rays_d = directions @ c2w_t[..., :3, :3].transpose(-1, -2)
    rays_o = c2w_t[..., :3, 3][:, :, None].expand_as(rays_d)
    want = torch.cat([torch.cross(rays_o, rays_d, dim=-1), rays_d], dim=-1).reshape(1, views, height, width, 6)

    np.testing.assert_allclose(plucker.ray_map(k, c2w, height, width), want.numpy(), atol=1e-6)


# ------------------------------------------------------------------ grid_intrinsics


def test_grid_intrinsics_stride_one_keeps_the_centre():
    height, width = 5, 7
    K = np.array([[6.0, 0.0, (width - 1) / 2], [0.0, 4.0, (height - 1) / 2], [0.0, 0.0, 1.0]])
    k = plucker.grid_intrinsics(K, 1)
    np.testing.assert_array_equal(k, [6.0, 4.0, width / 2, height / 2])
    out = plucker.ray_map(k, np.eye(4), height, width)
    np.testing.assert_array_equal(out[height // 2, width // 2, 3:], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(plucker.grid_intrinsics(K, 8), [0.75, 0.5, 0.4375, 0.3125])


def test_grid_intrinsics_coarse_pixel_centres_are_full_resolution_rays():
    """A coarse cell's centre is full-resolution point (u + 0.5) * s - 0.5 (centres at integers)."""
    s, height, width = 4, 16, 24
    K = np.array([[30.0, 0.0, 11.0], [0.0, 26.0, 8.5], [0.0, 0.0, 1.0]])
    out = plucker.ray_map(plucker.grid_intrinsics(K, s), np.eye(4), height // s, width // s)
    for v, u in [(0, 0), (2, 5), (3, 1)]:
        d = np.linalg.inv(K) @ [(u + 0.5) * s - 0.5, (v + 0.5) * s - 0.5, 1.0]
        np.testing.assert_allclose(out[v, u, 3:], d / np.linalg.norm(d), atol=1e-7)


def test_grid_intrinsics_batched_and_nan():
    K = np.tile(np.eye(3), (2, 3, 1, 1))
    K[1, 2] = np.nan
    k = plucker.grid_intrinsics(K, 8)
    assert k.shape == (2, 3, 4)
    assert np.isnan(k[1, 2]).all() and np.isfinite(k[:1]).all()
    np.testing.assert_allclose(np.asarray(plucker.grid_intrinsics(jnp.asarray(K), 8, xp=jnp)), k)


# ------------------------------------------------------------------ latent_ray_maps


def _training_batch(batch=2, frames=9, height=32, width=48, seed=2):
    rng = np.random.default_rng(seed)
    w2c, K = make_cameras(4, height, width)
    source = w2c[rng.integers(0, 4, batch)]
    target = np.linalg.inv(_random_poses(rng, (batch, frames)))
    target_K = np.broadcast_to(K, (batch, frames, 3, 3)).copy()
    return source, target, target_K


def test_latent_ray_maps_shapes_and_frames():
    source, target, K = _training_batch()
    out = plucker.latent_ray_maps(source, target, K, 32, 48)
    assert out.shape == (2, 3, 4, 6, 6) and out.dtype == np.float32  # ceil(9 / 4) latent frames
    for b in range(2):
        for f, t in enumerate((0, 4, 8)):
            rel = source[b] @ np.linalg.inv(target[b, t])
            want = _reference(plucker.grid_intrinsics(K[b, t], 8), rel, 4, 6)
            np.testing.assert_allclose(out[b, f], want, atol=2e-6)


def test_latent_ray_maps_source_as_target_is_the_identity_camera():
    source, _, K = _training_batch()
    target = np.broadcast_to(source[:, None], (2, 5, 4, 4))
    out = plucker.latent_ray_maps(source, target, K[:, :5], 32, 48, stride=4)
    assert out.shape == (2, 2, 8, 12, 6)
    np.testing.assert_allclose(out[..., :3], 0.0, atol=1e-6)
    identity = plucker.ray_map(plucker.grid_intrinsics(K[0, 0], 4), np.eye(4), 8, 12)
    np.testing.assert_allclose(out[..., 3:], np.broadcast_to(identity[..., 3:], out[..., 3:].shape), atol=1e-6)


@pytest.mark.parametrize("where", ["source", "target_frame", "intrinsics"])
def test_latent_ray_maps_non_finite_camera_gives_zeros(where):
    source, target, K = _training_batch()
    if where == "source":
        source[1] = np.nan
    elif where == "target_frame":
        target[1, 5] = np.nan  # not even a latent frame: the sample has no trustworthy cameras
    else:
        K[1] = np.nan
    with np.errstate(all="raise"):
        out = plucker.latent_ray_maps(source, target, K, 32, 48)
    assert np.all(out[1] == 0.0)
    assert np.isfinite(out).all() and np.abs(out[0]).max() > 0.5


def test_latent_ray_maps_jax_matches_numpy():
    source, target, K = _training_batch()
    source[1] = np.nan
    want = plucker.latent_ray_maps(source, target, K, 32, 48)
    got = plucker.latent_ray_maps(*(jnp.asarray(a, jnp.float32) for a in (source, target, K)), 32, 48, xp=jnp)
    assert isinstance(got, jnp.ndarray) and got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# ------------------------------------------------------------------ trajectory_ray_maps


def test_trajectory_ray_maps_relative_to_first_and_world_invariant():
    rng = np.random.default_rng(3)
    c2w = _random_poses(rng, (9,))
    K = np.broadcast_to(np.array([[40.0, 0, 23.5], [0, 40.0, 15.5], [0, 0, 1]]), (9, 3, 3))
    out = plucker.trajectory_ray_maps(c2w, K, 32, 48)
    assert out.shape == (3, 4, 6, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, ..., :3], 0.0, atol=1e-6)  # the first camera is the origin
    want = _reference(plucker.grid_intrinsics(K[4], 8), np.linalg.inv(c2w[0]) @ c2w[4], 4, 6)
    np.testing.assert_allclose(out[1], want, atol=2e-6)
    # Moving the whole path in the world changes nothing.
    moved = plucker.trajectory_ray_maps(_pose((1, 2, 3), 40.0, (5.0, -1.0, 2.0)) @ c2w, K, 32, 48)
    np.testing.assert_allclose(moved, out, atol=1e-5)


def test_trajectory_ray_maps_rejects_bad_input():
    c2w = np.tile(np.eye(4), (5, 1, 1))
    with pytest.raises(ValueError, match=r"K \[T, 3, 3\]"):
        plucker.trajectory_ray_maps(c2w, np.eye(3), 32, 48)
    c2w[2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        plucker.trajectory_ray_maps(c2w, np.tile(np.eye(3), (5, 1, 1)), 32, 48)
