"""Geometry of the FaceCam augmentations (SPEC 6, Algorithms 1-3) and multi-shot stitching.

The pure-geometry tests use synthetic frames; the stitching tests run on the real carphone
mini dataset (built once and cached under $FACECAM_CACHE).
"""

import numpy as np
import pytest

from facecam_jax.camera import draw
from facecam_jax.data import augment, mini_dataset, sources
from facecam_jax.data import transforms as tr


def _dot_frame(height, width, x, y, background=(0, 0, 0)):
    """A frame with a 3x3 white square centred on pixel (x, y)."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:] = background
    frame[y - 1:y + 2, x - 1:x + 2] = 255
    return frame


def _centroid(frame):
    """Intensity-weighted centroid (x, y) in pixels of the bright pixels of a frame."""
    weight = frame.astype(np.float64).mean(-1)
    weight = np.where(weight > 20, weight, 0.0)
    ys, xs = np.mgrid[:frame.shape[0], :frame.shape[1]]
    return np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()


def test_zoom_moves_known_point():
    """A zoom from s0 to s1 at positions p0 -> p1 moves a point x to s x + (1 - s) p, per frame."""
    height, width, num_frames = 96, 64, 5
    x, y = 40, 30  # pixel centre -> normalized (x + 0.5) / W
    frames = np.stack([_dot_frame(height, width, x, y)] * num_frames)
    scales = augment.linear_motion(1.0, 1.25, num_frames)
    positions = augment.linear_motion([0.0, 0.0], [1.0, 0.5], num_frames)
    out = augment.apply_zoom_pan(frames, scales, positions, pad_color=(0, 0, 0))
    point = np.array([[[(x + 0.5) / width, (y + 0.5) / height]]] * num_frames)  # [T, 1, 2]
    expected = augment.zoom_pan_points(point, scales, positions)[:, 0] * [width, height] - 0.5
    errors = [np.abs(_centroid(out[t]) - expected[t]).max() for t in range(num_frames)]
    print(f"zoom/pan point error max {max(errors):.3f} px")
    assert max(errors) < 0.15
    # Hand-checked values: frame 0 is the identity; the last frame has s=1.25, p=(1, .5).
    np.testing.assert_allclose(expected[0], [x, y], atol=1e-6)
    np.testing.assert_allclose(expected[-1], [1.25 * 40.5 - 0.25 * 64 - 0.5,
                                              1.25 * 30.5 - 0.125 * 96 - 0.5], atol=1e-4)
    # The intrinsics follow the same motion: project a point, zoom, compare.
    intrinsics = np.array([[100.0, 0, 31.5], [0, 100.0, 47.5], [0, 0, 1]])
    moved = augment.zoom_pan_intrinsics(intrinsics, 1.25, (1.0, 0.5), height, width)
    uv = moved @ np.array([0.1, -0.05, 1.0])
    base = intrinsics @ np.array([0.1, -0.05, 1.0])
    norm = (base[:2] + 0.5) / [width, height]
    np.testing.assert_allclose((uv[:2] + 0.5) / [width, height],
                               1.25 * norm - 0.25 * np.array([1.0, 0.5]), atol=1e-9)


def test_landmark_maps_move_with_frames():
    """SyntheticCameraMotion warps target and landmark map identically, and the moved
    landmarks it reports land where the warped map's strokes are."""
    height, width, num_frames = 96, 64, 5
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.linspace(0.35, 0.65, 22), np.linspace(0.3, 0.7, 22)), -1)
    landmarks = np.concatenate([grid.reshape(-1, 2)[:478], np.zeros((478, 1))], 1)
    landmarks[:, :2] += rng.normal(0, 0.003, (478, 2))
    condition = draw.draw_landmark_map(landmarks, height, width)
    clip = {"target": np.stack([condition] * num_frames), "camera": np.stack([condition] * num_frames),
            "target_landmarks": np.stack([landmarks] * num_frames).astype(np.float32),
            "target_intrinsics": np.full((num_frames, 3, 3), np.nan)}
    out = tr.SyntheticCameraMotion((1.1, 1.25)).random_map(clip, np.random.default_rng(3))
    np.testing.assert_array_equal(out["target"], out["camera"])
    assert not np.array_equal(out["camera"][0], condition)  # it did move
    for t in range(num_frames):
        ink = 255 - out["camera"][t].min(-1).astype(np.float64)
        ys, xs = np.mgrid[:height, :width]
        ink_centre = np.array([(xs * ink).sum(), (ys * ink).sum()]) / ink.sum()
        redrawn = 255 - draw.draw_landmark_map(out["target_landmarks"][t], height, width).min(-1)
        redrawn_centre = np.array([(xs * redrawn).sum(), (ys * redrawn).sum()]) / redrawn.sum()
        err = np.abs(ink_centre - redrawn_centre).max()
        print(f"frame {t}: warped map vs map of moved landmarks, centroid err {err:.2f} px")
        assert err < 1.0


def test_pad_colour_from_top_corners():
    """A scale < 1 pads with the mean colour of the two 10x10 top corners."""
    height, width = 64, 48
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    frame[:10, :10] = (200, 10, 40)
    frame[:10, -10:] = (100, 50, 0)
    np.testing.assert_array_equal(augment.corner_color(frame), [150, 30, 20])
    out = augment.apply_zoom_pan(frame[None], [0.75], [[0.5, 0.5]])[0]
    # s = 0.75 centred: the image spans [6, 42) x [8, 56); outside it is padding.
    np.testing.assert_array_equal(out[2, 2], [150, 30, 20])
    np.testing.assert_array_equal(out[-2, -2], [150, 30, 20])
    np.testing.assert_array_equal(out[30, 2], [150, 30, 20])
    # ScaleAndColour: the source pad colour is its (composited) corner colour: the background.
    clip = {"source": np.stack([frame] * 3), "target": np.stack([frame] * 3),
            "source_mask": np.zeros((3, height, width), np.uint8),
            "target_mask": np.zeros((3, height, width), np.uint8),
            "source_intrinsics": np.full((3, 3), np.nan)}
    out = tr.ScaleAndColour((0.75, 0.8)).random_map(clip, np.random.default_rng(0))
    assert np.all(out["source"] == out["background"]) and np.all(out["target"] == out["background"])


def test_cover_crop_points_and_intrinsics():
    """The crop moves a pixel, its normalized landmark and its projection identically."""
    src_h, src_w, out_h, out_w = 180, 240, 64, 48
    x, y = 150, 100
    frame = _dot_frame(src_h, src_w, x, y)
    crop = augment.cover_crop_params(src_h, src_w, out_h, out_w, center=(0.6, 0.55))
    out = augment.apply_cover_crop(frame[None], crop, out_h, out_w)[0]
    point = augment.cover_crop_points(np.array([[(x + 0.5) / src_w, (y + 0.5) / src_h, 0.0]]), crop,
                                      out_h, out_w)[0]
    err = np.abs(_centroid(out) - (point[:2] * [out_w, out_h] - 0.5)).max()
    print(f"cover-crop point error {err:.3f} px")
    assert err < 0.15
    intrinsics = np.array([[300.0, 0, 119.5], [0, 300.0, 89.5], [0, 0, 1]])
    ray = np.array([(x - 119.5) / 300.0, (y - 89.5) / 300.0, 1.0])
    uv = augment.cover_crop_intrinsics(intrinsics, src_h, src_w, crop) @ ray
    np.testing.assert_allclose((uv[:2] + 0.5) / [out_w, out_h], point[:2], atol=1e-6)
    # The official nose-centred crop clamps inside the image.
    edge = augment.cover_crop_params(src_h, src_w, out_h, out_w, center=(0.99, 0.5))
    assert edge.left == edge.new_w - out_w


def test_composite():
    frames = np.full((2, 4, 4, 3), 200, np.uint8)
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[:, :2] = 255
    masks[:, 2, 0] = 128
    out = augment.composite(frames, masks, (10, 20, 30))
    np.testing.assert_array_equal(out[:, :2], 200)
    np.testing.assert_array_equal(out[:, 3], np.broadcast_to([10, 20, 30], (2, 4, 3)))
    expected = 128 / 255 * 200 + 127 / 255 * np.array([10, 20, 30])
    assert np.abs(out[0, 2, 0] - expected).max() <= 0.5 + 1e-3


def test_shot_starts():
    """Shot k covers [k L, (k+1) L), L = T // K + 1, truncated to T (SPEC 6)."""
    assert augment.shot_starts(81, 1).tolist() == [0]
    assert augment.shot_starts(81, 2).tolist() == [0, 41]
    assert augment.shot_starts(81, 3).tolist() == [0, 28, 56]
    assert augment.shot_starts(81, 4).tolist() == [0, 21, 42, 63]
    assert augment.shot_starts(17, 4).tolist() == [0, 5, 10, 15]
    assert augment.shot_starts(5, 4).tolist() == [0, 2, 4]  # a 4th shot would start past the end
    assert augment.shot_of_frame(17, np.array([0, 5, 10, 15])).tolist() == \
        [0] * 5 + [1] * 5 + [2] * 5 + [3] * 2


# ---------------------------------------------------------------------------------------------
# Stitching on the real mini dataset.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini_source():
    built = mini_dataset.build()
    return sources.multiview_source("nersemble", built.nersemble_root, frames=17, stride=3,
                                    window_step=24)


def test_multishot_stitch(mini_source):
    """Shot count in 1..4, boundaries, time alignment with the source, per-shot anchors."""
    height, width = 64, 48
    stitch = tr.MultiShotStitch(height, width, max_shots=4)
    seen_counts = set()
    for seed in range(10):
        record = mini_source[seed % len(mini_source)]
        clip = stitch.random_map(record, np.random.default_rng(seed))
        seq, start, num_frames = record["sequence"], record["start"], record["frames"]
        starts, shot = clip["shot_starts"], clip["shot_index"]
        num_shots = len(starts)
        seen_counts.add(num_shots)
        assert 1 <= num_shots <= 4
        np.testing.assert_array_equal(starts, augment.shot_starts(num_frames, num_shots))
        targets = clip["cameras"][1:]
        assert len(set(targets.tolist())) == num_shots  # distinct target cameras
        # Time alignment: output frame t is video frame start + 3 t in source and target.
        np.testing.assert_array_equal(clip["frame_index"], start + 3 * np.arange(num_frames))
        for k, cam in enumerate(targets):
            idx = np.flatnonzero(shot == k)
            stream = seq.cameras[cam]
            crop = augment.cover_crop_params(stream.height, stream.width, height, width)
            expected = augment.apply_cover_crop(stream.read(clip["frame_index"][idx]), crop, height, width)
            np.testing.assert_array_equal(clip["target"][idx], expected)
            # The condition of a shot is its camera's landmarks at the clip start, held.
            anchor, _status = stream.store.read_landmarks([start])
            anchor = augment.cover_crop_points(anchor[0], crop, height, width)
            np.testing.assert_allclose(clip["target_landmarks"][idx], np.broadcast_to(
                anchor, (len(idx),) + anchor.shape), atol=1e-6)
            np.testing.assert_array_equal(clip["camera"][idx], np.broadcast_to(
                draw.draw_landmark_map(anchor, height, width), (len(idx), height, width, 3)))
        source = seq.cameras[clip["cameras"][0]]
        crop = augment.cover_crop_params(source.height, source.width, height, width)
        np.testing.assert_array_equal(
            clip["source"], augment.apply_cover_crop(source.read(clip["frame_index"]), crop, height, width))
        # Cameras: per-frame target extrinsics are those of the shot's camera.
        np.testing.assert_array_equal(clip["target_world_2_cam"], seq.world_2_cam[targets][shot])
    print(f"shot counts seen: {sorted(seen_counts)}")
    assert len(seen_counts) >= 3


def test_in_the_wild_pairing_nose_centred():
    built = mini_dataset.build()
    wild = sources.wild_source(built.wild_root, frames=9)
    clip = tr.InTheWildPairing(64, 48).map(wild[0])
    np.testing.assert_array_equal(clip["source"], clip["target"])
    nose = clip["target_landmarks"][0, tr.NOSE_TIP, :2]
    # Carphone is landscape: the crop is horizontal, centred on the nose tip.
    assert abs(nose[0] - 0.5) < 0.05, nose
    assert np.all(clip["camera"] == clip["camera"][0])
