"""Orbit cameras, projection (paper eq. 7-8), canonical motions, the official sampler, keyframe JSON, framing."""

import json
import math

import numpy as np
import pytest

from facecam_jax.camera import geometry, pose, proxy_head
from facecam_jax.camera import trajectories as tr


def test_frontal_official_camera():
    c2w, k = tr.orbit_cameras(tr.Trajectory.linear(1), render_size=480)
    # Base azimuth 270: the camera at (0, -2.7, 0) looks along +y; columns (right, -up, forward).
    np.testing.assert_allclose(c2w[0, :3, 3], [0, -2.7, 0], atol=1e-12)
    np.testing.assert_allclose(c2w[0, :3, :3], [[1, 0, 0], [0, 0, 1], [0, -1, 0]], atol=1e-12)
    focal = 480 / (2 * math.tan(math.radians(20)))
    np.testing.assert_allclose(k[0], [[focal, 0, 240], [0, focal, 240], [0, 0, 1]])


def test_known_point_lands_on_known_pixel():
    c2w, k = tr.orbit_cameras(tr.Trajectory.linear(2, end_azimuth=90.0), render_size=480)
    focal = k[0, 0, 0]
    w2c = np.linalg.inv(c2w)
    points = np.array([[0.0, 0.0, 0.0], [0.27, 0.0, 0.54], [0.0, -1.35, 0.0]])
    pixels, depth = tr.project(points, w2c, k)
    # Frontal camera: the origin at the principal point; x right and z up in the image.
    np.testing.assert_allclose(pixels[0, 0], [240, 240], atol=1e-9)
    np.testing.assert_allclose(pixels[0, 1], [240 + focal * 0.27 / 2.7, 240 - focal * 0.54 / 2.7], atol=1e-9)
    np.testing.assert_allclose(depth[0], [2.7, 2.7, 1.35], atol=1e-12)
    # Azimuth +90 (360 absolute): the camera at (2.7, 0, 0) looking along -x, so the point in
    # front of the face (-y) is image left, 2.7 deep.
    np.testing.assert_allclose(c2w[1, :3, 3], [2.7, 0, 0], atol=1e-12)
    np.testing.assert_allclose(pixels[1, 2], [240 - focal * 1.35 / 2.7, 240], atol=1e-9)


def test_scale_invariance_eq8():
    head = proxy_head.load_proxy_head()
    c2w, k = tr.orbit_cameras(tr.random_trajectory(np.random.default_rng(1), 5), render_size=480)
    w2c = np.linalg.inv(c2w)
    base, _ = tr.project(head, w2c, k)
    for s in (0.01, 3.7, 250.0):
        scaled = w2c.copy()
        scaled[:, :3, 3] *= s  # t' = s t
        moved, _ = tr.project(s * head.astype(np.float64), scaled, k)  # x' = s x
        err = np.abs(moved - base).max()
        print(f"scale {s}: max pixel change {err:.2e}")
        assert err < 1e-9


def test_linear_trajectory_hits_start_and_end():
    params = {"start_azimuth": -40.0, "end_azimuth": 35.0, "start_elevation": 10.0, "end_elevation": -20.0,
              "start_fov": 25.0, "end_fov": 55.0}
    traj = tr.Trajectory.from_official(params, 81)
    assert traj.num_frames == 81
    for name in ("azimuth", "elevation", "fov"):
        values = getattr(traj, name)
        assert values[0] == params[f"start_{name}"] and values[-1] == params[f"end_{name}"]
        np.testing.assert_allclose(np.diff(values), (values[-1] - values[0]) / 80)
    c2w, k = tr.orbit_cameras(traj, render_size=480)
    for t, az, el in ((0, -40.0, 10.0), (80, 35.0, -20.0)):
        a, e = math.radians(270 + az), math.radians(el)
        np.testing.assert_allclose(c2w[t, :3, 3], 2.7 * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)]))
        np.testing.assert_allclose(c2w[t, :3, 2], -c2w[t, :3, 3] / 2.7, atol=1e-12)  # looks at the head centre
        np.testing.assert_allclose(c2w[t, :3, :3].T @ c2w[t, :3, :3], np.eye(3), atol=1e-12)
    assert k[0, 0, 0] == pytest.approx(240 / math.tan(math.radians(12.5)))
    assert k[-1, 0, 0] == pytest.approx(240 / math.tan(math.radians(27.5)))


@pytest.mark.parametrize("name, field, end", [
    ("Arc Left", "azimuth", -tr.ARC_AZIMUTH), ("arc-right", "azimuth", tr.ARC_AZIMUTH),
    ("arc_up", "elevation", tr.ARC_ELEVATION), ("arc_down", "elevation", -tr.ARC_ELEVATION),
    ("zoom_in", "fov", 29.1462), ("zoom_out", "fov", 54.0030)])
def test_canonical_motions_end_where_documented(name, field, end):
    traj = tr.canonical(name, 81)
    values = getattr(traj, field)
    assert values[0] == pytest.approx(40.0 if field == "fov" else 0.0)
    assert values[-1] == pytest.approx(end, abs=1e-4)
    if field == "fov":  # the documented 1.4x change of focal length
        ratio = math.tan(math.radians(values[0] / 2)) / math.tan(math.radians(values[-1] / 2))
        assert ratio == pytest.approx(1.4 if name == "zoom_in" else 1 / 1.4)


def test_pan_translates_the_view():
    traj = tr.canonical("pan_left", 11)
    c2w, k = tr.orbit_cameras(traj, render_size=480)
    np.testing.assert_allclose(c2w[-1], c2w[0])  # the camera stays; the view shifts (SPEC 6 pans)
    pixels, _ = tr.project(proxy_head.load_proxy_head(), np.linalg.inv(c2w), k)
    np.testing.assert_allclose(pixels[-1] - pixels[0], np.broadcast_to([tr.PAN_SHIFT * 480, 0], pixels[0].shape), atol=1e-9)
    up = tr.orbit_cameras(tr.canonical("pan_up", 3), render_size=480)[1]
    assert up[-1, 1, 2] - up[0, 1, 2] == pytest.approx(tr.PAN_SHIFT * 480)  # content moves down
    with pytest.raises(ValueError, match="unknown camera motion"):
        tr.canonical("dolly_zoom")


def test_official_random_sampler_ranges():
    rng = np.random.default_rng(0)
    large = [tr.random_camera_params(rng) for _ in range(400)]
    for p in large:
        start, end = p["start_azimuth"], p["end_azimuth"]
        assert 30 <= abs(start) <= 45 and 30 <= abs(end) <= 45 and np.sign(start) == -np.sign(end)
        assert -30 <= p["start_elevation"] <= 30 and -30 <= p["end_elevation"] <= 30
        assert 25 <= p["start_fov"] <= 55 and 25 <= p["end_fov"] <= 55
    assert 0.35 < np.mean([p["start_azimuth"] < 0 for p in large]) < 0.65
    small = [tr.random_camera_params(rng, large_pose=False) for _ in range(400)]
    assert min(p["start_azimuth"] for p in small) < -30 < 30 < max(p["end_azimuth"] for p in small)
    again = tr.random_camera_params(np.random.default_rng(5))
    assert again == tr.random_camera_params(np.random.default_rng(5))


def test_keyframes_interpolate_and_hold():
    keys = [{"t": 0.25, "azimuth": -20.0}, {"t": 0.5, "elevation": 10.0, "fov": 30.0}, {"t": 1.0, "shift_x": 0.2}]
    traj = tr.from_keyframes(keys, 9)  # frame t = i / 8
    np.testing.assert_allclose(traj.azimuth, -20.0)  # held before the first key, carried after
    np.testing.assert_allclose(traj.elevation, [0, 0, 0, 5, 10, 10, 10, 10, 10])
    np.testing.assert_allclose(traj.fov, [40, 40, 40, 35, 30, 30, 30, 30, 30])
    np.testing.assert_allclose(traj.shift[:, 0], [0, 0, 0, 0, 0, 0.05, 0.1, 0.15, 0.2])
    eased = tr.from_keyframes([{"t": 0.0}, {"t": 1.0, "azimuth": 40.0}], 5, interpolation="ease")
    np.testing.assert_allclose(eased.azimuth, 20 - 20 * np.cos(np.pi * np.linspace(0, 1, 5)))
    with pytest.raises(ValueError, match="increase strictly"):
        tr.from_keyframes([{"t": 0.5}, {"t": 0.5}], 5)
    with pytest.raises(ValueError, match="unknown"):
        tr.from_keyframes([{"t": 0.0, "yaw": 3}], 5)


def test_json_round_trip(tmp_path):
    traj = tr.random_trajectory(np.random.default_rng(3), 33)
    path = tmp_path / "traj.json"
    path.write_text(json.dumps(tr.trajectory_to_json(traj, stride=8)))
    loaded = tr.load_trajectory(str(path))
    for name in ("azimuth", "elevation", "fov", "shift"):
        np.testing.assert_allclose(getattr(loaded, name), getattr(traj, name), atol=1e-9)
    official = tmp_path / "official.json"
    official.write_text(json.dumps(tr.random_camera_params(np.random.default_rng(4))))
    assert tr.load_trajectory(str(official), 17).num_frames == 17
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="could not read"):
        tr.load_trajectory(str(tmp_path / "broken.json"))


def test_shipped_trajectory_examples_load():
    paths = sorted(proxy_head.data_dir().glob("trajectories/*.json"))
    assert len(paths) >= 3
    for path in paths:
        points = tr.condition_landmarks(tr.load_trajectory(str(path), 9))
        assert points.shape == (9, 478, 3) and np.all((points[..., :2] > 0) & (points[..., :2] < 1)), path


def test_official_framing_keeps_face_in_top_square():
    rng = np.random.default_rng(7)
    for _ in range(20):
        points = tr.condition_landmarks(tr.random_trajectory(rng, 9))
        rows, cols = points[..., 1] * 704, points[..., 0] * 480
        assert rows.min() > 0 and rows.max() < 480 and cols.min() > 0 and cols.max() < 480


def test_zoom_scales_the_face_by_its_factor():
    points = tr.condition_landmarks(tr.canonical("zoom_in", 5))
    spread = lambda p: np.sqrt(((p[:, :2] * [480, 704] - (p[:, :2] * [480, 704]).mean(0)) ** 2).sum(-1).mean())
    assert spread(points[-1]) / spread(points[0]) == pytest.approx(1.4, rel=1e-6)


def test_relative_cameras_with_own_anchor_is_identity():
    c2w, _ = tr.orbit_cameras(tr.random_trajectory(np.random.default_rng(2), 7))
    w2c = np.linalg.inv(c2w)
    np.testing.assert_allclose(geometry.relative_cameras(w2c, w2c[0]), w2c, atol=1e-12)


def test_source_framing_starts_at_the_source_camera():
    head = proxy_head.load_proxy_head()
    # A source "video" whose first frame is the proxy head seen by a known off-centre camera.
    k = geometry.camera_matrix(704, 480)
    c2w, _ = tr.orbit_cameras(tr.Trajectory.linear(1, start_azimuth=12.0, start_elevation=-8.0, radius=2.2))
    c2w[0, :3, 3] += 0.1 * c2w[0, :3, 0] + 0.05 * c2w[0, :3, 1]  # moved right and down: face off-centre
    pixels, _ = tr.project(head, np.linalg.inv(c2w), k[None])
    source = pixels[0] / [480, 704]
    points = tr.condition_landmarks(tr.canonical("arc_left", 9), framing="source", source_landmarks=source)
    err = np.abs(points[0, :, :2] - source).max() * 704
    print(f"source framing frame-0 max error {err:.2e} px")
    assert err < 1e-3
    turned = pose.measure_motion(points[0], points[-1], 704, 480)
    assert turned.yaw == pytest.approx(tr.ARC_AZIMUTH, abs=0.5)
    with pytest.raises(ValueError, match="source_landmarks"):
        tr.condition_landmarks(tr.canonical("arc_left", 3), framing="source")
    with pytest.raises(ValueError, match="framing"):
        tr.condition_landmarks(tr.canonical("arc_left", 3), framing="centred")


def test_invalid_trajectories_are_rejected():
    with pytest.raises(ValueError, match="elevation"):
        tr.Trajectory.linear(3, end_elevation=90.0)
    with pytest.raises(ValueError, match="fov"):
        tr.Trajectory.linear(3, end_fov=0.0)
    with pytest.raises(ValueError, match="lack"):
        tr.Trajectory.from_official({"start_azimuth": 0.0})


def test_non_finite_camera_values_are_rejected_naming_the_field():
    with pytest.raises(ValueError, match="keyframe 1 field 'azimuth' is nan"):
        tr.load_trajectory({"keyframes": [{"t": 0.0}, {"t": 1.0, "azimuth": float("nan")}]}, 5)
    with pytest.raises(ValueError, match="'end_fov' is inf"):
        tr.load_trajectory({"start_azimuth": 0, "end_azimuth": 0, "start_elevation": 0, "end_elevation": 0,
                            "start_fov": 40, "end_fov": float("inf")}, 5)
    with pytest.raises(ValueError, match=r"trajectory shift is not finite at frame\(s\) \[2\]"):
        shift = np.zeros((3, 2))
        shift[2, 1] = np.nan
        tr.Trajectory(np.zeros(3), np.zeros(3), np.full(3, 40.0), shift)
    with pytest.raises(ValueError, match="num_frames is 1000000; .* 1..1601"):
        tr.load_trajectory({"num_frames": 1_000_000, "keyframes": [{"t": 0.0}]})
