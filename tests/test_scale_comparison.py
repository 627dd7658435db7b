"""FaceCam's claim tested (bench/camera_kinds.py): the scale-ambiguous mini dataset (the same
pixels at every scene scale, metric cameras times the scale), the face-placement camera measure,
and the paired bootstrap of the comparison."""

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest

from facecam_jax.evaluation import placement


def _bench():
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "camera_kinds.py")
    spec = importlib.util.spec_from_file_location("camera_kinds_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_scale_is_the_same_pixels_with_scaled_metric_cameras(tmp_path):
    from facecam_jax.data import mini_dataset
    from facecam_jax.video_io import read_video

    built = mini_dataset.build(64, 48, 3, scales=(0.5, 2.0), cache_dir=str(tmp_path))
    params = []
    for p in (0, 1):
        with open(built.camera_params_of(p)) as f:
            params.append({k: np.asarray(v) for k, v in json.load(f)["world_2_cam"].items()})
    for serial in mini_dataset.serials(3):
        videos = [read_video(built.video_path(serial, p))[0] for p in (0, 1)]
        np.testing.assert_array_equal(videos[0], videos[1])  # nothing in the pixels tells the scale
        a, b = params[0][serial], params[1][serial]
        np.testing.assert_allclose(a[:3, :3], b[:3, :3])
        np.testing.assert_allclose(4.0 * a[:3, 3], b[:3, 3])  # the cameras: 4x farther at scale 2 than at 0.5
    w2c, k = mini_dataset.make_cameras(3, 64, 48, rig=True)
    centres = [np.linalg.norm(-w2c[c, :3, :3].T @ w2c[c, :3, 3]) for c in range(3)]
    np.testing.assert_allclose(centres, np.hypot(mini_dataset.RIG_DISTANCE_FACTORS[:3],
                                                 np.hypot(*np.transpose(mini_dataset.RIG_AIM_OFFSETS_M[:3]))),
                               rtol=1e-6)  # each camera's distance, moved off the head by its aim offset
    with pytest.raises(ValueError, match="scales must be in"):
        mini_dataset.build(64, 48, 3, scales=(10.0,), cache_dir=str(tmp_path))


def _face():
    """A synthetic frame with a textured 'face' disc and its box."""
    rng = np.random.default_rng(0)
    frame = np.full((64, 48, 3), 90, np.uint8)
    texture = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
    texture = cv2.GaussianBlur(texture, (3, 3), 1)
    frame[20:40, 14:34] = texture
    return frame, placement.FaceBox(24.0, 30.0, 20.0)


def test_placement_finds_where_and_how_big_the_face_is():
    frame, box = _face()
    assert placement.frame_error(frame, frame, box) == pytest.approx(0.0, abs=1e-6)
    shifted = np.roll(frame, (4, -3), axis=(0, 1))
    x, y, s = placement.locate(shifted, frame, box)
    assert (x, y, s) == (pytest.approx(21.0, abs=0.6), pytest.approx(34.0, abs=0.6), pytest.approx(1.0))
    zoom = cv2.warpAffine(frame, cv2.getRotationMatrix2D((box.x, box.y), 0, 1.25), (48, 64),
                          borderMode=cv2.BORDER_REPLICATE)
    assert placement.locate(zoom, frame, box)[2] == pytest.approx(1.25, rel=0.05)
    errors = [placement.frame_error(np.roll(frame, (0, d), axis=(0, 1)), frame, box) for d in (0, 2, 5)]
    assert errors[0] < errors[1] < errors[2]  # farther off, larger error
    with pytest.raises(ValueError, match="do not match"):
        placement.video_error(frame[None], frame[None], [box, box])


def test_paired_bootstrap_and_the_summary():
    bench = _bench()
    rng = np.random.default_rng(0)
    diff = rng.normal(1.0, 0.5, 400)
    mean, lo, hi = bench.bootstrap(diff, np.random.default_rng(1))
    assert lo < mean < hi and lo > 0.9 and hi < 1.1 and mean == pytest.approx(diff.mean())
    rows = [{"view": 0, "scale": s, **{k: {"psnr": p + (k == "landmarks"), "ssim": 0.5, "camera_error": e}
                            for k, p, e in (("landmarks", 20.0, 0.1), ("recammaster", 20.0, 0.3 if s < 1 else 0.2),
                                            ("none", 19.0, 0.5))}}
            for s in (0.6, 1.6, 1.0)]
    result = bench.summarise(rows, ("landmarks", "recammaster", "none"), (0.6, 1.6), seed=0)
    assert result["kinds"]["recammaster"]["camera_error_near"] == pytest.approx(0.3)
    assert result["kinds"]["recammaster"]["camera_error_far"] == pytest.approx(0.2)
    assert result["kinds"]["landmarks"]["psnr"] == pytest.approx(21.0)
    assert result["differences"]["landmarks - recammaster"]["psnr"][0] == pytest.approx(1.0)
    assert result["differences"]["landmarks - recammaster"]["camera_error_near"][0] == pytest.approx(-0.2)
    assert "recammaster - landmarks" not in result["differences"]
    assert result["differences"]["recammaster: near - far"]["camera_error"][0] == pytest.approx(0.1)
    assert result["differences"]["landmarks: near - far"]["camera_error"] == (0.0, 0.0, 0.0)
