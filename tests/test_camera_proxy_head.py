"""The shipped proxy head: reproducible from the astronaut photo, frontal, symmetric, at FaceLift scale."""

import numpy as np
import pytest

from facecam_jax.camera import landmarks, proxy_head

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")


def test_shipped_head_is_reproducible():
    head = proxy_head.load_proxy_head()
    image = skimage_data.astronaut()
    rebuilt = proxy_head.build_proxy_head(landmarks.detect_one(image), *image.shape[:2])
    err = np.abs(rebuilt - head).max()
    print(f"rebuilt vs shipped proxy head max abs err {err:.2e}")
    assert err < 1e-4


def test_head_frame_scale_and_placement():
    shipped = proxy_head.load_proxy_head()
    assert shipped.shape == (478, 3) and shipped.dtype == np.float32 and not shipped.flags.writeable
    head = shipped.astype(np.float64)
    iod = np.linalg.norm(head[landmarks.LEFT_IRIS_CENTER] - head[landmarks.RIGHT_IRIS_CENTER])
    assert iod == pytest.approx(proxy_head.INTER_PUPIL_DISTANCE, rel=1e-5)
    np.testing.assert_allclose(head.mean(0), proxy_head.FACE_CENTROID, atol=1e-5)
    # Upright and facing -y: forehead above chin, nose tip in front of the eyes.
    assert head[proxy_head.FOREHEAD, 2] > head[proxy_head.CHIN, 2] + 0.5
    assert head[landmarks.NOSE_TIP, 1] < head[landmarks.LEFT_IRIS_CENTER, 1] - 0.05
    # Mirror pairs straddle the x = 0 symmetry plane at matching heights and depths.
    left = head[[l for l, _ in proxy_head.MIRROR_PAIRS]]
    right = head[[r for _, r in proxy_head.MIRROR_PAIRS]]
    assert (left[:, 0] > 0).all() and (right[:, 0] < 0).all()
    asym = np.abs(left * [1, 1, 1] - right * [-1, 1, 1]).mean()
    print(f"mean mirror asymmetry {asym:.3f} units (inter-pupil {iod:.3f})")
    assert asym < 0.1 * iod


def test_missing_asset_has_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_proxy_head"):
        proxy_head.load_proxy_head(tmp_path / "nope.npy")
    np.save(tmp_path / "bad.npy", np.zeros((468, 3), np.float32))
    with pytest.raises(ValueError, match="478"):
        proxy_head.load_proxy_head(tmp_path / "bad.npy")


def test_projected_depth_follows_mediapipe_convention():
    from facecam_jax.camera import trajectories

    image = skimage_data.astronaut()
    detected = landmarks.detect_one(image)
    projected = trajectories.condition_landmarks(trajectories.Trajectory.linear(1))[0]  # frontal, 704x480
    # Closer is smaller: the nose tip is in front of the face's mean depth, the oval behind it.
    assert projected[landmarks.NOSE_TIP, 2] < 0 < projected[proxy_head.MIRROR_PAIRS[7][0], 2]
    # z is on the scale of x (image-width units): its spread relative to x matches MediaPipe's.
    ratio_projected = projected[:, 2].std() / projected[:, 0].std()
    ratio_detected = detected[:, 2].std() / detected[:, 0].std()
    print(f"z/x spread: projected {ratio_projected:.3f}, MediaPipe on the photo {ratio_detected:.3f}")
    assert ratio_projected == pytest.approx(ratio_detected, rel=0.1)
