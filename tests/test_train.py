"""End-to-end training on the shipped mini dataset: one step, resume, NaN guard, export."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import build, flops, flow, trainer
from facecam_jax import sharding as sh
from facecam_jax.checkpoints.dit import overlay_dit
from facecam_jax.config_file import load_config as get_config
from facecam_jax.errors import TrainingDiverged

# Small and fast: 9 frames at 64x48 (3 latent frames of 8x6), one device, no worker processes.
BASE = "mini,frames=9,batch_size=2"


def one_device_mesh():
    """These runs use one device (the suite has 8 fake ones; CPU collectives are slow)."""
    return sh.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])


def train(config, workdir):
    return trainer.train(config, workdir, mesh=one_device_mesh())


def _trained_params(result):
    _, params = nnx.split(result.model, nnx.All(nnx.Param, build.trainable_filter(("self_attn", "patch_embedding"))), ...)[:2]
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f)}


def test_one_step_trains_and_exports_an_overlay(tmp_path):
    config = get_config(BASE + ",steps=1,checkpoint_every=1")
    result = train(config, str(tmp_path / "run"))
    m = result.last_metrics
    print(f"\n[mini 1 step] loss {m['loss']:.4f}, grad norm {m['grad_norm']:.4f}, step {m['step_time']:.2f}s")
    assert result.step == 1 and np.isfinite(m["loss"]) and m["loss"] > 0 and m["grad_norm"] > 0
    assert m["update_norm"] > 0
    assert m["tflops_per_device"] > 0 and "mfu" not in m  # no peak known for a CPU unless train.peak_tflops is set
    # TensorBoard's own reader parses the event file the run left in its workdir.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    (loss,) = events.Scalars("train/loss")
    assert loss.step == 1 and loss.value == pytest.approx(m["loss"], rel=1e-6)
    assert "batch/source_target_camera" in events.Tags()["images"]
    # The export is a partial state dict that overlays the base model into the trained one.
    base = build.build_dit(config, one_device_mesh(), sh.DEFAULT_RULES)
    report = overlay_dit(base, result.exported)
    assert report.replaced and all(".self_attn." in k or k.startswith("patch_embedding") for k in report.replaced)
    got = jax.tree.leaves(nnx.state(base, nnx.Param))
    want = jax.tree.leaves(nnx.state(result.model, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_steps_log_tflops_and_mfu_and_the_requested_steps_are_profiled(tmp_path):
    workdir = str(tmp_path / "run")
    config = get_config(BASE + ",steps=3,checkpoint_every=10,peak_tflops=2.0,profile_start_step=2,profile_steps=1")
    train(config, workdir)
    per_step = flops.step_flops(config, "train")["total"]
    logged = _metrics(workdir)
    assert sorted(logged) == [1, 2, 3]
    for m in logged.values():  # one device: TFLOP/s per device = analytic FLOPs / step time
        assert m["tflops_per_device"] > 0
        assert m["tflops_per_device"] == pytest.approx(per_step / m["step_time"] / 1e12, rel=1e-9)
        assert m["mfu"] == pytest.approx(m["tflops_per_device"] / 2.0, rel=1e-9)
    (trace,) = glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
    with open(trace, "rb") as f:
        data = f.read()
    assert b"train step 2" in data and b"train step 1" not in data and b"train step 3" not in data


def test_killed_run_resumes_exactly(tmp_path):
    """2 steps, 'killed', restarted to 3 == 3 uninterrupted steps (params, data and noise)."""
    interrupted = str(tmp_path / "interrupted")
    train(get_config(BASE + ",steps=2,checkpoint_every=1"), interrupted)
    resumed = train(get_config(BASE + ",steps=3,checkpoint_every=1"), interrupted)
    straight = train(get_config(BASE + ",steps=3,checkpoint_every=10"), str(tmp_path / "straight"))
    assert resumed.step == straight.step == 3
    for a, b in zip(_trained_params(resumed), _trained_params(straight)):
        np.testing.assert_array_equal(a, b)
    assert _metrics(interrupted)[3]["loss"] == _metrics(str(tmp_path / "straight"))[3]["loss"]
    # Finished runs do nothing more when started again.
    again = train(get_config(BASE + ",steps=3,checkpoint_every=1"), interrupted)
    assert again.step == 3


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    good = train(get_config(BASE + ",steps=1,checkpoint_every=1"), workdir)
    real_loss = flow.flow_loss
    monkeypatch.setattr(flow, "flow_loss", lambda pred, target, weight: real_loss(pred, target, weight) * jnp.nan)
    with pytest.raises(TrainingDiverged, match=r"step 1: loss nan .* not finite.*checkpointed"):
        train(get_config(BASE + ",steps=3,checkpoint_every=1"), workdir)
    monkeypatch.setattr(flow, "flow_loss", real_loss)
    # The checkpoint holds the last finite state: resuming from it with 0 more steps returns it.
    again = train(get_config(BASE + ",steps=1,checkpoint_every=1"), workdir)
    for a, b in zip(_trained_params(again), _trained_params(good)):
        np.testing.assert_array_equal(a, b)


def test_bad_trainable_names_are_a_clear_error(tmp_path):
    config = get_config(BASE + ",steps=1")
    config.train.trainable = ("selfattn",)
    with pytest.raises(ValueError, match="matches no DiT parameter"):
        train(config, str(tmp_path / "run"))
