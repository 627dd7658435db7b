"""End-to-end training on the shipped mini dataset: one step, resume, preemption, damaged and
mismatched checkpoints, NaN guard, export, the run summary."""

import glob
import json
import os
import shutil
import signal

import forked_runs
import jax
import numpy as np
import pytest
from flax import nnx

from facecam_jax import build
from facecam_jax import sharding as sh
from facecam_jax.checkpoints.dit import overlay_dit
from facecam_jax.errors import CheckpointError, TrainingDiverged
from facecam_jax.perf import flops
from facecam_jax.runtime.config_file import load_config as get_config
from facecam_jax.training import metric_logger, trainer
from facecam_jax.training.run_state import Checkpoints
from facecam_jax.training.train_step import build_program

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


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """Two steps checkpointed after each: checkpoints 1 and 2 (copy before changing it)."""
    workdir = str(tmp_path_factory.mktemp("run2") / "run")
    train(get_config(BASE + ",steps=2,checkpoint_every=1"), workdir)
    return workdir


@pytest.fixture(scope="module")
def straight3(tmp_path_factory):
    """Three uninterrupted steps: the reference of every resumed run."""
    workdir = str(tmp_path_factory.mktemp("straight3") / "run")
    result = train(get_config(BASE + ",steps=3,checkpoint_every=10"), workdir)
    return _trained_params(result), _metrics(workdir)


def _copy(workdir, tmp_path):
    return shutil.copytree(workdir, str(tmp_path / "copy"))


def test_killed_run_resumes_exactly(run2, straight3, tmp_path):
    """2 steps, 'killed', restarted to 3 == 3 uninterrupted steps (params, data and noise)."""
    interrupted = _copy(run2, tmp_path)
    resumed = train(get_config(BASE + ",steps=3,checkpoint_every=1"), interrupted)
    params, metrics = straight3
    assert resumed.step == 3
    for a, b in zip(_trained_params(resumed), params):
        np.testing.assert_array_equal(a, b)
    assert _metrics(interrupted)[3]["loss"] == metrics[3]["loss"]
    # Finished runs do nothing more when started again.
    again = train(get_config(BASE + ",steps=3,checkpoint_every=1"), interrupted)
    assert again.step == 3
    # Each checkpoint keeps the config that wrote it.
    with open(os.path.join(interrupted, "checkpoints", "3", "config", "metadata")) as f:
        assert json.load(f)["train"]["steps"] == 3


def test_sigterm_finishes_the_step_checkpoints_and_resumes_like_an_uninterrupted_run(straight3, tmp_path,
                                                                                      monkeypatch):
    """SIGTERM during step 2 of 3 (no checkpoint due): step 2 finishes, is checkpointed, the
    run returns (exit 0 from the command line); the restart runs step 3 only and matches the
    uninterrupted run exactly."""
    workdir = str(tmp_path / "run")
    logged = metric_logger.Logger.__call__

    def log_then_preempt(self, step, metrics):
        logged(self, step, metrics)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a spot preemption or SLURM would

    monkeypatch.setattr(metric_logger.Logger, "__call__", log_then_preempt)
    config = get_config(BASE + ",steps=3,checkpoint_every=10")
    stopped = train(config, workdir)
    monkeypatch.undo()
    assert stopped.preempted and stopped.step == 2 and stopped.exported is None
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    assert not glob.glob(os.path.join(workdir, "*.safetensors"))  # an unfinished run exports nothing
    assert stopped.summary == ("run summary: steps 0 -> 2 of 3 (2 this run, preempted by SIGTERM); "
                               "no sample skipped; checkpoints written: 2")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone with the run
    resumed = train(config, workdir)
    params, metrics = straight3
    assert resumed.step == 3 and not resumed.preempted and resumed.exported
    assert sorted(_metrics(workdir)) == [1, 2, 3]
    assert [_metrics(workdir)[s]["loss"] for s in (1, 2, 3)] == [metrics[s]["loss"] for s in (1, 2, 3)]
    for a, b in zip(_trained_params(resumed), params):
        np.testing.assert_array_equal(a, b)


def test_a_second_signal_exits_at_once(tmp_path):
    script = ("import os, signal\n"
              "from facecam_jax.training.preemption import Preemption\n"
              "with Preemption() as p:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    print('stop after the step:', p.stop(), p.signal_name, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    print('still running', flush=True)\n")
    result = forked_runs.run("-c", script, timeout=120)
    assert result.returncode == -signal.SIGINT, result.stderr
    assert "stop after the step: True SIGINT" in result.stdout and "still running" not in result.stdout
    assert "SIGINT again: exiting at once" in result.stderr


@pytest.fixture(scope="module")
def program():
    config = get_config(BASE)
    with sh.use_mesh(one_device_mesh(), sh.DEFAULT_RULES):
        return config, build_program(config, one_device_mesh(), sh.DEFAULT_RULES)


def _largest_file(folder):
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    return max(files, key=os.path.getsize)


def _damage(step_dir, how):
    if how == "truncated":
        path = _largest_file(os.path.join(step_dir, "train"))
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "no_metadata":
        os.remove(os.path.join(step_dir, "train", "_METADATA"))
    elif how == "no_data_position":
        os.remove(os.path.join(step_dir, "data", "metadata"))
    elif how == "empty":
        shutil.rmtree(step_dir)
        os.mkdir(step_dir)


@pytest.mark.parametrize("how, name, what", [
    ("truncated", "unreadable-arrays", "its arrays cannot be read"),
    ("no_metadata", "no-train-metadata", "train/_METADATA is missing"),
    ("no_data_position", "no-data-position", "data/metadata (the data position) is missing"),
    ("empty", "empty", "its folder is empty"),
])
def test_a_damaged_newest_checkpoint_is_kept_aside_and_the_previous_step_restored(run2, program, tmp_path, caplog,
                                                                                   how, name, what):
    config, prog = program
    workdir = _copy(run2, tmp_path)
    _damage(os.path.join(workdir, "checkpoints", "2"), how)
    ckpt = Checkpoints(workdir, 3, config)
    with caplog.at_level("WARNING", logger="facecam_jax.training.run_state"), sh.use_mesh(one_device_mesh(), sh.DEFAULT_RULES):
        restored = ckpt.restore(prog.state)
    ckpt.close()
    assert (restored.step, restored.batches, int(restored.state.step)) == (1, 1, 1)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", f"2.damaged-{name}"]  # nothing deleted
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "facecam_jax.training.run_state"]
    assert "checkpoint step 2" in warning and what in warning and "resuming from step 1" in warning


def test_no_usable_checkpoint_and_a_half_written_save(run2, program, tmp_path):
    config, prog = program
    workdir = _copy(run2, tmp_path)
    checkpoints = os.path.join(workdir, "checkpoints")
    # A crash mid-save leaves Orbax's temporary folder: never listed, the previous steps intact.
    shutil.copytree(os.path.join(checkpoints, "2"), os.path.join(checkpoints, "3.orbax-checkpoint-tmp-1234"))
    os.remove(os.path.join(checkpoints, "3.orbax-checkpoint-tmp-1234", "train", "_METADATA"))
    with sh.use_mesh(one_device_mesh(), sh.DEFAULT_RULES):
        ckpt = Checkpoints(workdir, 3, config)
        assert ckpt.restore(prog.state).step == 2
        ckpt.close()
        for step in ("1", "2"):
            _damage(os.path.join(checkpoints, step), "no_metadata")
        ckpt = Checkpoints(workdir, 3, config)
        with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*step 2: train/_METADATA is missing; "
                                                  r"step 1: train/_METADATA is missing\. Nothing was renamed"):
            ckpt.restore(prog.state)
        ckpt.close()
    assert sorted(os.listdir(checkpoints)) == ["1", "2", "3.orbax-checkpoint-tmp-1234"]


def test_training_over_a_truncated_newest_checkpoint_resumes_from_the_previous_one(run2, tmp_path):
    workdir = _copy(run2, tmp_path)
    _damage(os.path.join(workdir, "checkpoints", "2"), "truncated")
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    result = train(get_config(BASE + ",steps=2,checkpoint_every=1"), workdir)
    assert result.step == 2 and list(_metrics(workdir)) == [2]  # step 2 again, from step 1's data position
    assert _metrics(workdir)[2]["loss"] == _metrics(run2)[2]["loss"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "2.damaged-unreadable-arrays"]


def test_a_changed_config_over_an_old_workdir_names_the_keys_that_differ(run2, tmp_path):
    workdir = _copy(run2, tmp_path)
    with pytest.raises(CheckpointError) as error:
        train(get_config(BASE + ",steps=3,checkpoint_every=1,model.in_dim=40,optimizer.grad_clip=0.0"), workdir)
    text = str(error.value)
    print(text)
    assert "\n" not in text and text.startswith("checkpoint step 2 in ")
    assert "does not fit this config" in text and "params.patch_embedding" in text
    assert ("config keys that differ from the run that wrote it: model.in_dim: 36 -> 40, "
            "optimizer.grad_clip: 1.0 -> 0.0, train.steps: 2 -> 3") in text
    assert "Use a new --workdir for this config" in text
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]  # a mismatch is not damage


def test_zero_steps_train_nothing_and_export_nothing(tmp_path):
    result = train(get_config(BASE + ",steps=0"), str(tmp_path / "run"))
    assert result.step == 0 and result.exported is None and not glob.glob(str(tmp_path / "run" / "*.safetensors"))
    assert result.summary == "run summary: steps 0 -> 0 of 0 (0 this run, finished); no sample skipped; " \
                             "checkpoints written: none"


def test_the_summary_counts_the_samples_skipped_during_the_run():
    loop = trainer._Loop(start=4, step=6, stopped_by="SIGTERM", skips_before={"no face": 1})
    line = trainer.run_summary(get_config(BASE), loop, [6], {"no face": 3, "decode error": 1, "odd": 1})
    assert line == ("run summary: steps 4 -> 6 of 30 (2 this run, preempted by SIGTERM); 4 skipped samples "
                    "(decode error: 1, no face: 2, other: 1); checkpoints written: 6")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(tmp_path, monkeypatch, caplog):
    workdir = str(tmp_path / "run")
    good = train(get_config(BASE + ",steps=1,checkpoint_every=1"), workdir)
    # A NaN text context (an input of the step, so the program is the one compiled above) makes
    # the loss and every gradient NaN inside the step.
    real_contexts = build.text_contexts
    monkeypatch.setattr(build, "text_contexts", lambda *a, **k: real_contexts(*a, **k) * np.nan)
    with pytest.raises(TrainingDiverged, match=r"step 1: loss nan .* not finite.*checkpointed"), \
            caplog.at_level("INFO", logger="facecam_jax.training.trainer"):
        train(get_config(BASE + ",steps=3,checkpoint_every=1"), workdir)
    assert "run summary: steps 1 -> 1 of 3 (0 this run, stopped: the loss diverged)" in caplog.text
    monkeypatch.setattr(build, "text_contexts", real_contexts)
    # The checkpoint holds the last finite state: resuming from it with 0 more steps returns it.
    again = train(get_config(BASE + ",steps=1,checkpoint_every=1"), workdir)
    for a, b in zip(_trained_params(again), _trained_params(good)):
        np.testing.assert_array_equal(a, b)


def test_bad_trainable_names_are_a_clear_error(tmp_path):
    config = get_config(BASE + ",steps=1")
    config.train.trainable = ("selfattn",)
    with pytest.raises(ValueError, match="matches no DiT parameter"):
        train(config, str(tmp_path / "run"))
