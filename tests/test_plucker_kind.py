"""CameraCtrl II's camera kind: the zero-initialised camera patchify, camera guidance in the
sampling program, joint training (camera dropout, clip-extension context) on 1 and 8 devices,
sampling with clip extension on 1 and 8 devices and from the CLI, FLOPs as traced."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import conditioning
from facecam_jax import sharding as sh
from facecam_jax.models import wan_dit as W
from facecam_jax.runtime.config_file import load_config
from facecam_jax.sampling import program as sp
from facecam_jax.sampling.inputs import SampleInputs

TINY = W.PRESETS["tiny"]
KIND = conditioning.get("plucker")


def _condition(batch=1, frames=2, seed=0):
    rng = np.random.default_rng(seed)
    c2w = np.tile(np.eye(4), (batch, frames, 1, 1))
    c2w[:, :, :3, 3] = rng.standard_normal((batch, frames, 3))
    k = np.tile([0.9, 1.1, 0.5, 0.5], (batch, frames, 1))
    return {"c2w": jnp.asarray(c2w, jnp.float32), "k": jnp.asarray(k, jnp.float32), "has": jnp.ones((batch,))}


def _latents(batch=1, frames=2, seed=1):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, frames, 4, 6, 16)), jnp.float32) for _ in range(2))


def test_the_zero_camera_patchify_starts_as_the_base_model_and_rays_then_matter():
    base = W.WanDiT(TINY, rngs=nnx.Rngs(0))
    noisy, source = _latents()
    t, ctx = jnp.array([500.0]), jnp.ones((1, 3, TINY.text_dim))
    want = base(jnp.concatenate([noisy, source], axis=1), t, ctx, out_frames=2)
    model = W.add_camera_patch(nnx.merge(*nnx.split(base)))
    got = KIND.velocity(model, noisy, source, _condition(), t, ctx)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    rays = KIND.rays(noisy, _condition())
    assert rays.shape == (1, 4, 4, 6, 7) and not np.asarray(rays[:, 2:]).any()  # zero on the source half
    assert not np.asarray(rays[..., 6]).any()  # no context mask: no frame is context
    kernel = model.camera_patch.kernel
    kernel.set_value(0.1 * jax.random.normal(jax.random.key(0), kernel.get_value().shape))
    moved = KIND.velocity(model, noisy, source, _condition(), t, ctx)
    assert float(jnp.abs(moved - want).max()) > 1e-3
    null = KIND.velocity(model, noisy, source, KIND.null_camera(_condition()), t, ctx)
    np.testing.assert_array_equal(np.asarray(null), np.asarray(want))  # the null camera is no camera


def test_camera_guidance_in_the_sampling_program():
    model = W.add_camera_patch(W.WanDiT(TINY, rngs=nnx.Rngs(0)))
    kernel = model.camera_patch.kernel
    kernel.set_value(0.1 * jax.random.normal(jax.random.key(1), kernel.get_value().shape))
    source, noise = _latents()
    ctx_c, ctx_u = jnp.ones((1, 3, TINY.text_dim)), jnp.zeros((1, 3, TINY.text_dim))
    inputs = SampleInputs(source, _condition(), ctx_c, ctx_u, noise)

    def run(guidance, camera_guidance, cfg="batch"):
        options = sp.SampleOptions(2, 5.0, guidance, camera="plucker", camera_guidance=camera_guidance, cfg=cfg)
        return np.asarray(jax.jit(sp.make_sample_fn(nnx.graphdef(model), options))((nnx.state(model),), inputs))

    for text in (1.0, 5.0):
        off = run(text, 1.0)
        np.testing.assert_array_equal(run(text, 1.0), off)  # 1.0: no camera pass, the same program
        on = run(text, 4.0)
        assert np.abs(on - off).max() > 1e-4  # a scale > 1 moves the output
        np.testing.assert_allclose(run(text, 4.0, "sequential"), on, atol=1e-5)
    # One step by hand: v(0t,0c) + w_t (v(t,0c) - v(0t,0c)) + w_c (v(t,c) - v(t,0c)), sigma 1 -> 0.
    options = sp.SampleOptions(1, 5.0, 5.0, camera="plucker", camera_guidance=4.0)
    got = np.asarray(jax.jit(sp.make_sample_fn(nnx.graphdef(model), options))((nnx.state(model),), inputs))
    t, null = jnp.array([1000.0]), KIND.null_camera(_condition())
    v_cc = KIND.velocity(model, noise, source, _condition(), t, ctx_c)
    v_c0 = KIND.velocity(model, noise, source, null, t, ctx_c)
    v_00 = KIND.velocity(model, noise, source, null, t, ctx_u)
    want = noise - (v_00 + 5.0 * (v_c0 - v_00) + 4.0 * (v_cc - v_c0))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4)
    with pytest.raises(ValueError, match="no null camera"):
        sp.SampleOptions.of(load_config("mini,frames=9,sample.camera_guidance=2.0"), 1)


def test_plucker_trains_alike_on_one_and_eight_devices_with_camera_dropout_and_context(tmp_path):
    from facecam_jax.training import trainer

    config = load_config("plucker-mini,frames=9,batch_size=2,steps=2,checkpoint_every=2,optimizer.lr=1e-2,"
                         "train.camera_dropout=0.5,train.context_prob=0.5")
    losses = []
    for name, shape in (("one", (1, 1, 1, 1)), ("eight", (2, 2, 1, 2))):
        result = trainer.train(config, str(tmp_path / name),
                               mesh=sh.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))]))
        with open(tmp_path / name / "metrics.jsonl") as f:
            losses.append([m["loss"] for m in map(json.loads, f)])
    print(f"\nplucker losses, 1 device {losses[0]}, 8 devices {losses[1]}")
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    trained = result.model.camera_patch.kernel.get_value()
    assert float(jnp.abs(trained).max()) > 0  # trained from zero
    # The exported weights hold the camera patchify, and sampling from the run loads it.
    from facecam_jax import sampling
    from facecam_jax.checkpoints.io import open_checkpoint

    assert {"camera_patch.weight", "camera_patch.bias"} <= set(open_checkpoint(result.exported))
    mesh = sh.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    (loaded,) = sampling.load_experts(config, mesh, sh.DEFAULT_RULES, str(tmp_path / "eight")).models
    np.testing.assert_allclose(np.asarray(loaded.camera_patch.kernel.get_value()), np.asarray(trained), rtol=1e-6)
    with pytest.raises(ValueError, match="no null camera"):
        trainer.train(load_config("mini,frames=9,steps=1,train.camera_dropout=0.5"), str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="no context mask"):
        trainer.train(load_config("mini,frames=9,steps=1,train.context_prob=0.5"), str(tmp_path / "bad"))


def test_flops_count_the_camera_patchify_as_traced():
    from facecam_jax import build
    from facecam_jax.perf import flops as flops_lib

    model = nnx.eval_shape(lambda: W.add_camera_patch(W.WanDiT(TINY, rngs=nnx.Rngs(0))))
    trainable = KIND.trainable_names(("self_attn",))
    graphdef, params, frozen = nnx.split(model, nnx.All(nnx.Param, build.trainable_filter(trainable)), ...)
    lat = jax.ShapeDtypeStruct((1, 2, 4, 4, 16), jnp.float32)
    cond = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _condition())
    args = (lat, lat, cond, jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1, 16, 32), jnp.float32))

    def velocity(p, f, noisy, source, c, t, ctx):
        return KIND.velocity(nnx.merge(graphdef, p, f), noisy, source, c, t, ctx)

    loss = lambda *a: (velocity(*a) ** 2).sum()  # noqa: E731
    traced_forward = flops_lib.jaxpr_flops(jax.make_jaxpr(velocity)(params, frozen, *args))
    traced_step = flops_lib.jaxpr_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params, frozen, *args))
    # The ray maps themselves (a 3x3 rotation per latent pixel) are the camera's geometry, not the
    # DiT's: left out of the count, and out of the comparison.
    rays = flops_lib.jaxpr_flops(jax.make_jaxpr(KIND.rays)(lat, cond))
    flops = flops_lib.dit_flops(TINY, 1, 16, 8, trainable, camera_linears=KIND.block_linears(TINY), frames=4)
    assert 0 < rays < 1e-3 * traced_forward
    assert flops["forward"] == traced_forward - rays > flops_lib.dit_flops(TINY, 1, 16, 8)["forward"]
    assert flops["forward"] + flops["backward"] == traced_step - rays


def test_plucker_samples_alike_on_one_and_eight_devices_and_from_the_cli(tmp_path):
    """Camera guidance and clip extension in the rendered program: fsdp 8 renders what one
    device renders (within one grey level), and the sample command line runs the kind with
    both (17 frames in clips of 9)."""
    import forked_runs
    from camera_kind_checks import grey_levels_one_vs_eight_devices

    from facecam_jax.video_io import read_video

    config = load_config("plucker-mini,frames=9,sample.num_steps=2,sample.camera_guidance=3.0,sample.extend=clip,"
                         "sample.context_frames=1")
    diff = grey_levels_one_vs_eight_devices(config, "arc_left", frames=17)
    print(f"\nplucker render with camera guidance in extended clips, fsdp 8 vs 1 device: max {diff} grey levels")
    assert diff <= 1
    out = tmp_path / "out.mp4"
    run = forked_runs.run("-m", "facecam_jax.sample", "--config", "configs/facecam.py:plucker-mini,frames=9",
                          "--config.sample.num_steps=1", "--config.sample.camera_guidance=2.0",
                          "--config.sample.extend=clip", "--frames", "17", "--trajectory", "cam05", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "3 clips of 9 frames, each continuing from the last 2 latent frames" in run.stderr
    assert read_video(str(out))[0].shape == (17, 64, 48, 3)
