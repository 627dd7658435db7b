"""Pinhole camera geometry shared by the trajectories and the pose metric: intrinsics,
projection (paper eq. 7) and PnP against the proxy head."""

from __future__ import annotations

import math

import cv2
import numpy as np

from facecam_jax.camera import proxy_head
from facecam_jax.camera.landmarks import NUM_LANDMARKS

BASE_FOV = 40.0  # the official orbit's horizontal field of view, degrees


def camera_matrix(height: int, width: int, fov: float = BASE_FOV) -> np.ndarray:
    """Pinhole intrinsics [3, 3] for an H x W frame: hfov `fov` over the width, centred principal point."""
    focal = width / (2 * math.tan(math.radians(fov) / 2))
    return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], np.float64)


def checked_landmarks(landmarks: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape[0] != NUM_LANDMARKS or landmarks.ndim != 2 or landmarks.shape[1] not in (2, 3):
        raise ValueError(f"expected one face's landmarks [478, 2 or 3], got {landmarks.shape}")
    if not np.isfinite(landmarks[:, :2]).all():
        raise ValueError("landmarks contain NaN: that frame has no detected face, so its pose is undefined")
    return landmarks


def solve_pnp(landmarks: np.ndarray, height: int, width: int, *, intrinsics: np.ndarray | None = None,
              head: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera rotation [3, 3] and translation [3] that best project `head` onto `landmarks`.

    landmarks: [478, 2|3] normalized to the H x W frame. head: 3D points [478, 3] in the orbit
    frame (default: the shipped proxy head). intrinsics: K [3, 3] (default `camera_matrix(H, W)`).
    EPnP initialisation, then Levenberg-Marquardt refinement of the reprojection error.
    """
    landmarks = checked_landmarks(landmarks)
    head = proxy_head.load_proxy_head() if head is None else head
    head = np.ascontiguousarray(head, np.float64)
    k = camera_matrix(height, width) if intrinsics is None else np.asarray(intrinsics, np.float64)
    pixels = np.ascontiguousarray(landmarks[:, :2] * np.array([width, height], np.float64))
    ok, rvec, tvec = cv2.solvePnP(head, pixels, k, None, flags=cv2.SOLVEPNP_EPNP)
    if not ok:
        raise ValueError("PnP failed to find a head pose for these landmarks; check that they are one "
                         "face's 478 MediaPipe landmarks normalized to the given frame size")
    rvec, tvec = cv2.solvePnPRefineLM(head, pixels, k, None, rvec, tvec)
    rotation, _ = cv2.Rodrigues(rvec)
    return rotation, tvec.reshape(3)


def project(points: np.ndarray, w2c: np.ndarray, intrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole projection (eq. 7) of world points [N, 3] by cameras w2c [T, 4, 4] (or [T, 3, 4]), K [T, 3, 3].

    Returns pixel coordinates [T, N, 2] (NaN behind the camera) and camera depths z_c [T, N].
    """
    points = np.asarray(points, np.float64)
    w2c = np.asarray(w2c, np.float64)
    cam = np.einsum("tij,nj->tni", w2c[:, :3, :3], points) + w2c[:, None, :3, 3]  # [T, N, 3]
    depth = cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = cam[..., :2] / np.where(depth > 0, depth, np.nan)[..., None]  # [T, N, 2]
    pixels = (np.einsum("tij,tnj->tni", intrinsics[:, :2, :2], normalized)
              + intrinsics[:, None, :2, 2])
    return pixels, depth


def relative_cameras(w2c: np.ndarray, anchor_w2c: np.ndarray) -> np.ndarray:
    """Moves an anchor camera by a trajectory's motion relative to its first frame: w2c [T, 4, 4].

    In camera coordinates the trajectory's step from frame 0 to t maps a point p to
    R_t (p - c_0) + c_t: a rotation R_t about the head centre (the world origin, at c_0 in
    camera 0 and c_t in camera t) and a move of the head centre. The anchor camera, which sees
    the head centre at a, gets the same rotation about its own view of the head centre and the
    same head-centre move, rescaled by |a| / |c_0| so the face moves by the same fraction of
    the frame: p -> R_t (p - a) + a + (c_t - c_0) |a| / |c_0|.
    """
    w2c = np.asarray(w2c, np.float64)
    anchor_w2c = np.asarray(anchor_w2c, np.float64)
    rotations = w2c[:, :3, :3] @ w2c[0, :3, :3].T  # [T, 3, 3] camera 0 -> camera t
    centres = w2c[:, :3, 3]  # [T, 3] head centre in camera-t coordinates
    anchor_centre = anchor_w2c[:3, 3]
    scale = np.linalg.norm(anchor_centre) / np.linalg.norm(centres[0])
    out = np.zeros_like(w2c)
    out[:, :3, :3] = rotations @ anchor_w2c[:3, :3]
    out[:, :3, 3] = anchor_centre + (centres - centres[0]) * scale
    out[:, 3, 3] = 1.0
    return out


def look_at_world_2_cam(position: np.ndarray, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    """OpenCV world-to-camera [4, 4] of a camera at `position` looking at `target`, with image
    'down' along world +y (the source camera's down)."""
    position = np.asarray(position, np.float64)
    forward = np.asarray(target, np.float64) - position
    forward /= np.linalg.norm(forward)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    world_2_cam = np.eye(4)
    world_2_cam[:3, :3] = rotation
    world_2_cam[:3, 3] = -rotation @ position
    return world_2_cam
