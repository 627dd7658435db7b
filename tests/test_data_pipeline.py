"""The Grain training pipeline on the real carphone mini dataset: determinism, global batches
whatever the process count, mixing, iterator checkpointing, worker processes, skipping broken videos."""

import json
import os
import shutil

import numpy as np
import pytest

from facecam_jax import video_io
from facecam_jax.data import mini_dataset, pipeline, sources
from facecam_jax.data import transforms as tr
from facecam_jax.runtime.config_file import load_config as get_config


@pytest.fixture(scope="module")
def built():
    return mini_dataset.build()


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_config_variants_and_overrides():
    config = get_config()
    assert (config.data.frames, config.data.height, config.data.width) == (17, 64, 48)
    assert (config.data.frames - 1) % 4 == 0 and config.data.height % 16 == 0
    config = get_config("nersemble,frames=21,data.mini.num_cameras=6,wild_ratio=0.25")
    assert (config.data.frames, config.data.height, config.data.width) == (21, 704, 480)
    assert config.data.mini.num_cameras == 6 and config.data.wild_ratio == 0.25
    with pytest.raises(KeyError, match="no field"):
        get_config("mini,framez=3")
    with pytest.raises(ValueError, match="unknown config variant"):
        get_config("huge")


def test_batch_structure(built):
    config = get_config("mini,batch_size=2")
    batch = next(pipeline.make_train_iterator(config))
    t, h, w = config.data.frames, config.data.height, config.data.width
    for key in ("source", "target", "camera"):
        assert batch[key].shape == (2, t, h, w, 3) and batch[key].dtype == np.uint8
    assert batch["target_landmarks"].shape == (2, t, 478, 3)
    assert batch["target_intrinsics"].shape == (2, t, 3, 3)
    assert batch["shot_starts"].shape == (2, 4) and batch["cameras"].shape == (2, 5)


def test_same_seed_same_batches_and_state_restore(built):
    """Same seed: same batches. The state saved after n batches restores batch n + 1."""
    config = get_config("mini,batch_size=2")
    first = pipeline.make_train_iterator(config)
    batches = _take(first, 3)
    state = json.loads(json.dumps(first.get_state()))  # as it would be written to disk
    batch_4 = next(first)
    again = _take(pipeline.make_train_iterator(config), 3)
    for a, b in zip(batches, again):
        _assert_batches_equal(a, b)
    restored = pipeline.make_train_iterator(config)
    restored.set_state(state)
    _assert_batches_equal(next(restored), batch_4)
    other = next(pipeline.make_train_iterator(get_config("mini,batch_size=2,data.seed=1")))
    assert not np.array_equal(other["target"], batches[0]["target"])


def test_orbax_checkpoint_restores_the_stream(built, tmp_path):
    """The iterator saved with Orbax (grain.checkpoint) beside a training state resumes exactly."""
    import grain
    import orbax.checkpoint as ocp

    config = get_config("mini,batch_size=2")
    iterator = pipeline.make_train_iterator(config)
    _take(iterator, 2)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    batch_3 = next(iterator)
    resumed = pipeline.make_train_iterator(config)
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_batches_equal(next(resumed), batch_3)


def test_process_slices_make_the_same_global_batches(built):
    """Any process count loads the same global batches: the rows of 2 or 4 processes
    concatenate to the 1-process batch (samples and augmentation draws alike)."""
    config = get_config("mini,batch_size=4,window_step=8")
    whole = _take(pipeline.make_train_iterator(config), 2)
    for n in (2, 4):
        parts = [_take(pipeline.make_train_iterator(config, rows=(p * 4 // n, (p + 1) * 4 // n)), 2)
                 for p in range(n)]
        for step in range(2):
            joined = {k: np.concatenate([part[step][k] for part in parts]) for k in whole[step]}
            _assert_batches_equal(joined, whole[step])


def test_resume_position_is_the_global_batch_count(built):
    """`start_batch` continues the stream, for whatever slice of the batch a process loads."""
    config = get_config("mini,batch_size=2")
    straight = _take(pipeline.make_train_iterator(config), 3)
    _assert_batches_equal(next(pipeline.make_train_iterator(config, start_batch=2)), straight[2])
    second_row = next(pipeline.make_train_iterator(config, rows=(1, 2), start_batch=1))
    assert second_row["target"].shape[0] == 1
    np.testing.assert_array_equal(second_row["target"][0], straight[1]["target"][1])
    with pytest.raises(ValueError, match="not a slice of the global batch"):
        pipeline.make_train_iterator(config, rows=(1, 3))


def test_epochs_cover_the_dataset_and_reshuffle(built):
    config = get_config("mini,batch_size=1,window_step=8,wild_ratio=0.0")
    num_samples = len(pipeline.build_sources(config.data)[0])
    assert num_samples == 9  # windows of 49 frames every 8 frames in 120
    indices = [int(b["index"][0]) for b in _take(pipeline.make_train_iterator(config), 2 * num_samples)]
    assert sorted(indices[:num_samples]) == sorted(indices[num_samples:]) == list(range(num_samples))
    assert indices[:num_samples] != indices[num_samples:]  # reshuffled in the second epoch


def test_mixing_ratio(built):
    config = get_config("mini,batch_size=4,wild_ratio=0.25")
    kinds = np.concatenate([b["kind"] for b in _take(pipeline.make_train_iterator(config), 4)])
    assert (kinds == sources.WILD).sum() == 4  # Grain's mix is an exact interleave
    only_wild = get_config("mini,batch_size=2,wild_ratio=1.0")
    assert np.all(next(pipeline.make_train_iterator(only_wild))["kind"] == sources.WILD)
    no_multiview = get_config(f"mini,dataset='files',wild_root='{built.wild_root}',wild_ratio=0.5")
    with pytest.raises(ValueError, match="no multi-view samples"):
        pipeline.make_train_iterator(no_multiview)


def test_worker_processes_deterministic_and_restorable(built):
    """Two Grain worker processes: reproducible, and the state restores the next batch (here
    into a second iterator that has already moved on: its workers start over from the state)."""
    config = get_config("mini,batch_size=2,workers=2")
    first = pipeline.make_train_iterator(config)
    batches = _take(first, 2)
    state = first.get_state()
    batch_3 = next(first)
    again = pipeline.make_train_iterator(config)
    _assert_batches_equal(next(again), batches[0])
    again.set_state(state)
    _assert_batches_equal(next(again), batch_3)


def test_broken_and_short_videos_are_skipped_and_counted(built, tmp_path):
    """Index time: a corrupt and a too-short video are left out, logged and listed.
    Read time: a video that breaks after indexing drops its samples (counted), no crash."""
    folder = tmp_path / "wild"
    folder.mkdir()
    shutil.copyfile(os.path.join(built.wild_root, "carphone.mp4"), folder / "a_good.mp4")
    shutil.copyfile(os.path.join(built.wild_root, "carphone.mp4"), folder / "b_breaks_later.mp4")
    (folder / "c_corrupt.mp4").write_bytes(os.urandom(4096))
    frames = video_io.read_frames(os.path.join(built.wild_root, "carphone.mp4"), range(5))
    video_io.write_video(str(folder / "d_short.mp4"), frames, 30.0)
    source = sources.wild_source(str(folder), frames=17)
    reasons = {os.path.basename(p): r for p, r in source.skipped}
    print(f"skipped at index time: {reasons}")
    assert set(reasons) == {"c_corrupt.mp4", "d_short.mp4"}
    assert "fewer than 17" in reasons["d_short.mp4"]
    assert [s.name for s in source.streams] == ["a_good.mp4", "b_breaks_later.mp4"]

    before = tr.skip_counts().get("decode error", 0)
    config = get_config(f"mini,dataset='files',wild_root='{folder}',batch_size=2,"
                        "detect_missing=True")
    iterator = pipeline.make_train_iterator(config)  # indexes both good videos
    (folder / "b_breaks_later.mp4").write_bytes(os.urandom(4096))  # then one breaks
    batches = _take(iterator, 2)
    assert all(np.all(b["index"] == 0) for b in batches)  # only a_good.mp4 samples
    dropped = tr.skip_counts().get("decode error", 0) - before
    print(f"samples dropped at read time: {dropped}")
    assert dropped >= 1
    # Nothing readable left: one clear error instead of an endless search.
    later = pipeline.make_train_iterator(config, start_batch=5)
    (folder / "a_good.mp4").write_bytes(os.urandom(4096))
    with pytest.raises(RuntimeError, match="samples in a row could not be read"):
        next(later)


def test_target_cameras_restrict_the_training_targets(built):
    """data.target_cameras: every multi-view target shot is from those cameras, the source never
    (camera 4, as bench/learn_lora.py fine-tunes on it, and 4 again with camera 1 held out, where
    the training split's positions shift by one)."""
    for holdout, position in (((), 4), ((1,), 3)):
        config = get_config("mini,frames=9,batch_size=4,wild_ratio=0.0")
        config.data.target_cameras, config.data.holdout_cameras = (4,), holdout
        cameras = np.concatenate([b["cameras"] for b in _take(pipeline.make_train_iterator(config), 2)])
        targets = cameras[:, 1:]
        assert (cameras[:, 0] != position).all() and (cameras[:, 0] >= 0).all()
        assert set(targets[targets >= 0].tolist()) == {position}
    config.data.holdout_cameras = (4,)
    with pytest.raises(ValueError, match="overlap: a held-out camera is never a training target"):
        pipeline.make_dataset(config.data)
    config.data.target_cameras, config.data.holdout_cameras = (9,), ()
    with pytest.raises(ValueError, match=r"data.target_cameras \[9\] do not fit sequence"):
        pipeline.make_dataset(config.data)
