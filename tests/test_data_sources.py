"""Sources, video decoding, the prepared-annotation store and dataset preparation."""

import json
import os

import cv2
import numpy as np
import pytest

from facecam_jax import video_io
from facecam_jax.data import mini_dataset, prepare, sources
from facecam_jax.data import store as store_lib
from facecam_jax.data import transforms as tr


@pytest.fixture(scope="module")
def built():
    return mini_dataset.build()


def test_read_frames_decodes_exactly_the_requested_frames(built):
    path = os.path.join(built.wild_root, "carphone.mp4")
    every = video_io.read_video(path)[0]  # [120, 144, 176, 3]
    wanted = [50, 3, 3, 118, 40]  # any order, repeats; 40+ uses a seek
    np.testing.assert_array_equal(video_io.read_frames(path, wanted), every[wanted])
    np.testing.assert_array_equal(video_io.read_frames(path, [64, 67, 70]), every[[64, 67, 70]])
    with pytest.raises(video_io.VideoDecodeError, match="ended at frame 120"):
        video_io.read_frames(path, [119, 121])
    with pytest.raises(video_io.VideoDecodeError, match="does not exist"):
        video_io.probe(path + ".missing")


def test_window_starts():
    assert sources.window_starts(120, 17, 3, None) == [0, 49]
    assert sources.window_starts(120, 17, 3, 8) == list(range(0, 72, 8))
    assert sources.window_starts(48, 17, 3, None) == []


def test_store_roundtrip_and_status(tmp_path):
    store = store_lib.StreamStore(str(tmp_path / "cam"))
    points = np.random.default_rng(0).random((2, 478, 3)).astype(np.float32)
    store.write_landmarks([1, 3], points, np.array([True, False]), num_frames=5)
    read, status = store.read_landmarks([0, 1, 3])
    assert status.tolist() == [store_lib.NOT_COMPUTED, store_lib.FOUND, store_lib.NO_FACE]
    np.testing.assert_array_equal(read[1:], points)
    assert np.isnan(read[0]).all()
    with pytest.raises(store_lib.MissingAnnotationError, match="prepare_dataset"):
        store.read_masks([0])
    store.write_masks([2], np.full((1, 6, 4), 7, np.uint8), num_frames=5)
    np.testing.assert_array_equal(store.read_masks([2]), 7)
    with pytest.raises(store_lib.MissingAnnotationError, match=r"frames \[0\]"):
        store.read_masks([0, 2])


def _fake_nersemble(root, built, layout):
    """A NeRSemble v2 tree pointing at the mini videos: {sequence: [camera indices]}."""
    (seq,), _ = sources.discover_nersemble(built.nersemble_root)
    serials = [c.name for c in seq.cameras]
    calibration = os.path.join(root, "017", "calibration")
    os.makedirs(calibration)
    with open(os.path.join(built.camera_params_path)) as f:
        params = json.load(f)
    # Intrinsics calibrated at twice the video size (a downscaled release): rescaled on load.
    params["intrinsics"] = (np.diag([2.0, 2.0, 1.0]) @ (np.asarray(params["intrinsics"])
                            + [[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]]) - [[0, 0, 0.5], [0, 0, 0.5],
                                                                      [0, 0, 0]]).tolist()
    with open(os.path.join(calibration, "camera_params.json"), "w") as f:
        json.dump(params, f)
    for name, cams in layout.items():
        images = os.path.join(root, "017", "sequences", name, "images")
        os.makedirs(images)
        for k in cams:
            os.symlink(seq.cameras[k].path, os.path.join(images, f"cam_{serials[k]}.mp4"))
    return seq


def test_nersemble_discovery(built, tmp_path):
    """BACKGROUND plates are never samples; a sequence with one camera is skipped, listed."""
    seq = _fake_nersemble(str(tmp_path), built, {"BACKGROUND": [0, 1], "EXP-1-head": [0, 2, 5],
                                                 "EXP-2-eyes": [3]})
    found, skipped = sources.discover_nersemble(str(tmp_path))
    assert [s.name for s in found] == ["017/EXP-1-head"]
    assert len(skipped) == 1 and skipped[0][0].endswith("EXP-2-eyes")
    np.testing.assert_allclose(found[0].intrinsics, seq.intrinsics[[0, 2, 5]], atol=1e-9)
    np.testing.assert_array_equal(found[0].world_2_cam, seq.world_2_cam[[0, 2, 5]])
    # Prepared annotations go beside the sequence, or under prepared_root for read-only data.
    assert found[0].cameras[0].prepared == os.path.join(
        str(tmp_path), "017", "sequences", "EXP-1-head", "facecam", f"cam_{seq.cameras[0].name}")
    mirrored, _ = sources.discover_nersemble(str(tmp_path), prepared_root="/prep")
    assert mirrored[0].cameras[0].prepared.startswith("/prep/017/sequences/EXP-1-head/facecam/")


def test_processed_layout_and_resumable_prepare(built, tmp_path):
    """The processed layout (jpg frames + png masks) is read with its own masks; preparing it
    computes only anchor landmarks, and a second run computes nothing."""
    (seq,), _ = sources.discover_nersemble(built.nersemble_root)
    root = tmp_path / "processed"
    sequence_dir = root / "subject_a" / "seq_1"
    for cam in seq.cameras[:3]:
        frames = cam.read(range(20))
        rgb, masks = sequence_dir / "rgb_images" / f"cam_{cam.name}", sequence_dir / "masks" / f"cam_{cam.name}"
        rgb.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i, frame in enumerate(frames):
            cv2.imwrite(str(rgb / f"frame_{i:06d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            mask = np.zeros(frame.shape[:2], np.uint8)
            mask[:, : frame.shape[1] // 2] = 255  # left half is "foreground"
            cv2.imwrite(str(masks / f"mask_{i:06d}.png"), mask)
    found, skipped = sources.discover_processed(str(root))
    assert not skipped and [s.name for s in found] == ["subject_a/seq_1"]
    assert found[0].world_2_cam is None and found[0].num_frames == 20

    summary = prepare.prepare_multiview("processed", str(root), frames=5, stride=3, progress=False)
    assert (summary.streams, summary.landmark_frames, summary.mask_frames) == (3, 3, 0)
    assert not summary.failed
    again = prepare.prepare_multiview("processed", str(root), frames=5, stride=3, progress=False)
    assert (again.landmark_frames, again.mask_frames) == (0, 0)

    source = sources.multiview_source("processed", str(root), frames=5, stride=3)
    clip = tr.MultiShotStitch(32, 32, max_shots=2).random_map(source[0], np.random.default_rng(0))
    clip = tr.ScaleAndColour((1.0, 1.0)).random_map(clip, np.random.default_rng(1))
    # The dataset's masks were used: the right half shows only the background colour.
    assert np.all(clip["target"][:, :, 20:] == clip["background"])
    assert not np.all(clip["target"][:, :, :12] == clip["background"])


def test_unprepared_data_is_skipped_or_annotated_on_the_fly(built, tmp_path):
    """Without prepared annotations a sample is dropped (counted) unless detect_missing asks
    for MediaPipe landmarks and selfie-segmentation masks on the fly."""
    _fake_nersemble(str(tmp_path), built, {"EXP-1-head": [0, 1, 2]})
    source = sources.multiview_source("nersemble", str(tmp_path), frames=9, stride=3)
    before = tr.skip_counts().get("missing landmarks", 0)
    assert tr.MultiShotStitch(32, 32).random_map(source[0], np.random.default_rng(0)) is None
    assert tr.skip_counts().get("missing landmarks", 0) == before + 1
    stitch = tr.MultiShotStitch(32, 32, detect_missing=True)
    clip = stitch.random_map(source[0], np.random.default_rng(0))
    assert clip["source_mask"].shape == (9, 32, 32)
    assert clip["source_mask"].max() > 200 and clip["source_mask"].min() < 50
    assert np.isfinite(clip["target_landmarks"]).all()
