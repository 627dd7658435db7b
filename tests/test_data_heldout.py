"""Held-out windows and cameras: the training stream never touches them, evaluation gets them."""

import numpy as np
import pytest

from facecam_jax.camera import draw
from facecam_jax.data import augment, heldout, pipeline, sources
from facecam_jax.runtime.config_file import load_config


def _data(**overrides):
    config = load_config("learn")
    for key, value in overrides.items():
        config.data[key] = value
    return config.data


def test_heldout_starts_index_the_non_overlapping_windows():
    # 120 frames, 9 at stride 1: windows start at 0, 9, ..., 108 (13 of them).
    assert sources.heldout_starts(120, 9, 1, (4, 8, -1)) == [36, 72, 108]
    assert sources.heldout_starts(120, 17, 3, (0, -1)) == [0, 49]
    with pytest.raises(ValueError, match="13 non-overlapping windows"):
        sources.heldout_starts(120, 9, 1, (13,))


def test_training_split_shares_no_frame_or_camera_with_the_heldout_split():
    data = _data()
    train, _ = pipeline.build_sources(data)
    held = pipeline.heldout_source(data)
    span = (data.frames - 1) * data.stride + 1
    train_frames = {f for i in range(len(train)) for f in range(train[i]["start"], train[i]["start"] + span)}
    held_frames = {f for i in range(len(held)) for f in range(held[i]["start"], held[i]["start"] + span)}
    assert [held[i]["start"] for i in range(len(held))] == [36, 72, 108]
    assert train_frames and not train_frames & held_frames
    assert len(train) == 15  # windows every 4 frames that stay clear of the held-out ones
    serials = [c.name for c in held.sequences[0].cameras]
    assert len(serials) == 8 and serials[4] not in [c.name for c in train.sequences[0].cameras]
    assert len(train.sequences[0].cameras) == 7 and train.sequences[0].world_2_cam.shape == (7, 4, 4)
    # The training stream draws only training cameras (cameras are positions in the 7 kept).
    batch = next(pipeline.make_train_iterator(load_config("learn,batch_size=4")))
    assert set(batch["frame_index"][batch["kind"] == 0].ravel()) <= train_frames


def test_heldout_windows_must_not_overlap_the_mini_wild_clip():
    with pytest.raises(ValueError, match="in-the-wild clip"):
        pipeline.build_sources(_data(holdout_windows=(0,)))
    with pytest.raises(ValueError, match="holdout_windows"):
        pipeline.heldout_source(_data(holdout_windows=()))


def test_heldout_pairs_are_one_shot_training_samples_with_their_truth():
    data = _data()
    held = pipeline.heldout_source(data)
    pairs = heldout.heldout_pairs(held, [(0, 2), (2, 0)], data.height, data.width, seed=3)
    assert len(pairs) == 6 and [p.start for p in pairs] == [36, 36, 72, 72, 108, 108]
    p = pairs[0]
    seq = held[0]["sequence"]
    times = 36 + np.arange(9)
    shape = (9, data.height, data.width, 3)
    assert p.source.shape == p.target.shape == p.condition.shape == shape
    # Source and truth share the background colour: where both masks are empty, both show it.
    crop = augment.cover_crop_params(seq.cameras[0].height, seq.cameras[0].width, data.height, data.width)
    empty = (augment.apply_cover_crop(seq.cameras[0].read_masks(times), crop, data.height, data.width) == 0) & (
        augment.apply_cover_crop(seq.cameras[2].read_masks(times), crop, data.height, data.width) == 0)
    assert empty.any()
    assert (p.source[empty] == p.background).all() and (p.target[empty] == p.background).all()
    # Truth = camera 2's frames of the window; condition = its frame-36 landmarks, drawn and held.
    raw = augment.apply_cover_crop(seq.cameras[2].read(times), crop, data.height, data.width)
    full = ~empty & (augment.apply_cover_crop(seq.cameras[2].read_masks(times), crop, data.height,
                                              data.width) == 255)
    assert (p.target[full] == raw[full]).all()
    points, _ = seq.cameras[2].store.read_landmarks([36])
    anchor = augment.cover_crop_points(points[0], crop, data.height, data.width)
    np.testing.assert_array_equal(p.condition, np.repeat(draw.draw_landmark_map(anchor, data.height, data.width)[None], 9, 0))
    # The colour depends on (seed, window, pair) only.
    again = heldout.heldout_pairs(held, [(2, 0), (0, 2)], data.height, data.width, seed=3)
    assert again[1].background == p.background and again[0].background == pairs[1].background
