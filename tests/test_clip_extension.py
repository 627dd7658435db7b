"""CameraCtrl II's clip-level extension: context frames stay clean and out of the loss in
training, stay as given in the sampling program, and an extended render's clips start with
the context they were given (up to the VAE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import build, conditioning
from facecam_jax import sharding as sh
from facecam_jax.diffusion import flow
from facecam_jax.models import wan_dit as W
from facecam_jax.models.wan_vae import to_uint8, to_unit_range
from facecam_jax.runtime.config_file import load_config
from facecam_jax.sampling import program as sp
from facecam_jax.sampling.inputs import SampleInputs

KIND = conditioning.get("plucker")
TINY = W.PRESETS["tiny"]


def test_context_masks_loss_and_clean_frames():
    mask = np.asarray(flow.context_mask(jax.random.key(0), 512, 7, 0.5))
    counts = mask.sum(axis=1)
    assert mask.shape == (512, 7) and set(np.unique(mask)) == {0.0, 1.0}
    np.testing.assert_array_equal(mask, np.arange(7)[None] < counts[:, None])  # a prefix of each clip
    assert counts.max() == 3 and 0.4 < (counts > 0).mean() < 0.6  # 1 .. F // 2 frames, about half the samples
    assert not np.asarray(flow.context_mask(jax.random.key(0), 64, 7, 0.0)).any()
    assert (np.asarray(flow.context_mask(jax.random.key(0), 64, 7, 1.0)).sum(axis=1) >= 1).all()
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        flow.context_mask(jax.random.key(0), 2, 1, 0.5)

    rng = np.random.default_rng(0)
    pred, target = (jnp.asarray(rng.standard_normal((2, 3, 2, 2, 4)), jnp.float32) for _ in range(2))
    weight, keep = jnp.asarray([1.0, 2.0]), jnp.asarray([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    loss = flow.flow_loss(pred, target, weight, keep)
    moved = pred.at[0, 0].add(100.0)  # a context frame's prediction is not in the loss
    assert float(flow.flow_loss(moved, target, weight, keep)) == float(loss)
    assert float(flow.flow_loss(moved, target, weight)) > 10 * float(loss)
    np.testing.assert_allclose(flow.flow_loss(pred, target, weight, jnp.ones((2, 3))),
                               flow.flow_loss(pred, target, weight), rtol=1e-6)
    sq = np.square(np.asarray(pred - target))
    want = (sq[0, 1:].mean() * 1.0 + sq[1].mean() * 2.0) / 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)  # each sample: the mean over its kept frames
    kept = flow.keep_context(pred, target, keep)
    np.testing.assert_array_equal(kept[0, 0], pred[0, 0])
    np.testing.assert_array_equal(kept[0, 1:], target[0, 1:])


def test_the_mask_channel_starts_at_zero_and_then_marks_context():
    model = W.add_camera_patch(W.WanDiT(TINY, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    noisy, source = (jnp.asarray(rng.standard_normal((1, 2, 4, 6, 16)), jnp.float32) for _ in range(2))
    condition = {"c2w": jnp.tile(jnp.eye(4), (1, 2, 1, 1)), "k": jnp.tile(jnp.asarray([0.9, 1.1, 0.5, 0.5]), (1, 2, 1)),
                 "has": jnp.ones((1,))}
    marked = {**condition, "mask": jnp.asarray([[1.0, 0.0]])}
    t, ctx = jnp.array([500.0]), jnp.ones((1, 3, TINY.text_dim))
    np.testing.assert_array_equal(KIND.rays(noisy, marked)[0, :, 0, 0, 6], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(KIND.velocity(model, noisy, source, marked, t, ctx),
                                  KIND.velocity(model, noisy, source, condition, t, ctx))  # zero-initialised
    kernel = model.camera_patch.kernel
    mask_weights = 0.1 * jax.random.normal(jax.random.key(0), kernel.get_value()[..., 6, :].shape)
    kernel.set_value(kernel.get_value().at[..., 6, :].set(mask_weights))  # the mask's weights alone
    moved = KIND.velocity(model, noisy, source, marked, t, ctx)
    assert float(jnp.abs(moved - KIND.velocity(model, noisy, source, condition, t, ctx)).max()) > 1e-3


def test_training_keeps_context_clean_and_out_of_the_loss(monkeypatch):
    """The train step run eagerly with a spy on the kind's velocity: the DiT sees the clean target
    latents on the context frames, and what it predicts there does not change the loss."""
    from facecam_jax.training import train_step as ts

    config = load_config("plucker-mini,frames=9,batch_size=2,train.context_prob=1.0")
    mesh, rules = build.mesh_and_rules(config, devices=jax.devices()[:1])
    with sh.use_mesh(mesh, rules):
        program = ts.build_program(config, mesh, rules)
        step = ts.make_train_step(program.graphdef, program.vae_graphdef, ts.make_optimizer(config.optimizer), config)
        rng = np.random.default_rng(0)
        batch = {"source": rng.integers(0, 255, (2, 9, 64, 48, 3), dtype=np.uint8),
                 "target": rng.integers(0, 255, (2, 9, 64, 48, 3), dtype=np.uint8),
                 "source_world_2_cam": np.tile(np.eye(4, dtype=np.float32), (2, 1, 1)),
                 "target_world_2_cam": np.tile(np.eye(4, dtype=np.float32), (2, 9, 1, 1)),
                 "target_intrinsics": np.tile(np.diag([40.0, 40.0, 1.0]).astype(np.float32), (2, 9, 1, 1))}
        target = nnx.merge(program.vae_graphdef, program.vae_state).encode(to_unit_range(batch["target"]))
        seen, velocity = {}, type(KIND).velocity

        def spy(offset):
            def fn(self, model, noisy, source, condition, t, context):
                seen.update(noisy=noisy, mask=condition["mask"])
                v = velocity(self, model, noisy, source, condition, t, context)
                return v + offset * condition["mask"][:, :, None, None, None]
            return fn

        losses = []
        for offset in (0.0, 50.0):
            monkeypatch.setattr(type(KIND), "velocity", spy(offset))
            _, metrics = step(program.state, program.frozen, program.vae_state, program.context, batch)
            losses.append(float(metrics["loss"]))
    mask = np.asarray(seen["mask"]) > 0
    assert mask[:, 0].all() and not mask[:, -1].any()  # 3 latent frames: the first is context
    np.testing.assert_allclose(np.asarray(seen["noisy"])[mask], np.asarray(target)[mask], atol=1e-5)
    assert np.abs(np.asarray(seen["noisy"])[~mask] - np.asarray(target)[~mask]).max() > 0.1  # the rest noised
    assert losses[1] == losses[0]


def test_the_sampling_program_keeps_context_as_given():
    model = W.add_camera_patch(W.WanDiT(TINY, rngs=nnx.Rngs(0)))
    kernel = model.camera_patch.kernel
    kernel.set_value(0.1 * jax.random.normal(jax.random.key(1), kernel.get_value().shape))
    rng = np.random.default_rng(2)
    source, noise, clean = (jnp.asarray(rng.standard_normal((1, 3, 4, 6, 16)), jnp.float32) for _ in range(3))
    condition = {"c2w": jnp.tile(jnp.eye(4), (1, 3, 1, 1)), "k": jnp.tile(jnp.asarray([0.9, 1.1, 0.5, 0.5]), (1, 3, 1)),
                 "has": jnp.ones((1,)), "mask": jnp.asarray([[1.0, 1.0, 0.0]])}
    ctx = jnp.ones((1, 3, TINY.text_dim))

    def run(clean, solver):
        options = sp.SampleOptions(3, 5.0, 1.0, camera="plucker", context=True, solver=solver, camera_guidance=2.0)
        inputs = SampleInputs(source, {**condition, "clean": clean}, ctx, ctx, noise)
        return np.asarray(jax.jit(sp.make_sample_fn(nnx.graphdef(model), options))((nnx.state(model),), inputs))

    for solver in ("euler", "unipc"):
        out = run(clean, solver)
        np.testing.assert_array_equal(out[:, :2], np.asarray(clean)[:, :2])  # exactly as given
        other = run(clean.at[:, :2].multiply(-1.0), solver)
        assert np.abs(other[:, 2] - out[:, 2]).max() > 1e-4  # and the new frame is generated from it


def test_an_extended_render_continues_from_its_context():
    """Clip by clip (17 frames in clips of 9 continuing from 2 latent frames = 5 video frames):
    each clip's first frames are the context it was given, through the VAE; the video keeps
    the earlier clip's frames where they meet. The landmarks kind has no context mask."""
    from facecam_jax import sampling

    config = load_config("plucker-mini,frames=9,sample.num_steps=2,sample.extend=clip,sample.context_frames=2")
    mesh, rules = build.mesh_and_rules(config, devices=jax.devices()[:1])
    source = np.random.default_rng(3).integers(0, 255, (17, 64, 48, 3), dtype=np.uint8)
    with sh.use_mesh(mesh, rules):
        experts = sampling.load_experts(config, mesh, rules, None)
        vae = build.build_vae(config, mesh)
        d = config.data
        raw = KIND.make_condition(KIND.load_trajectory("arc_left", 17), height=d.height, width=d.width,
                                  framing="official", source_frames=source)
        options, clips = sp.options_for(config, 1, 17)
        assert options.context and options.windows is None and clips.starts == (0, 1, 2)
        program = sp.sample_program(nnx.graphdef(experts.models[0]), options)
        states = tuple(nnx.state(m) for m in experts.models)
        cond, uncond, _ = sampling.contexts(config, experts)
        video, decoded = sampling.sample_clips(KIND, vae, source[None], {k: v[None] for k, v in raw.items()}, [0],
                                               (cond, uncond), clips, mesh, lambda inputs, k: program.fn(states, inputs))
        rendered = sampling.render(config, experts, vae, source[None], {k: v[None] for k, v in raw.items()}, [0],
                                   mesh=mesh, show_progress=False)
        for k in (1, 2):
            given = video[:, 4 * k:4 * k + 5]  # the 5 frames clip k shares with the video so far
            through_vae = to_uint8(vae.decode(vae.encode(to_unit_range(given))))
            assert np.abs(decoded[k][:, :5].astype(int) - through_vae.astype(int)).max() <= 1
    np.testing.assert_array_equal(video[:, :9], decoded[0])
    np.testing.assert_array_equal(video[:, 9:13], decoded[1][:, 5:])
    np.testing.assert_array_equal(video[:, 13:], decoded[2][:, 5:])
    assert np.abs(rendered.astype(int) - video.astype(int)).max() <= 1  # render's path (its own compilation)
    with pytest.raises(ValueError, match="no context mask"):
        sp.SampleOptions.of(load_config("mini,frames=9,sample.extend=clip"), 1)
    with pytest.raises(ValueError, match=r"sample.context_frames must be in \[1, 2\]"):
        sp.window_layout(load_config("plucker-mini,frames=9,sample.extend=clip,sample.context_frames=3"), 17)


def test_the_fit_tool_sizes_one_clip_of_an_extended_video():
    """Extended clips run the program once per clip: the fit tool compiles one clip's program (with
    its context), whose plan does not grow with the video as the joint windows' does."""
    from facecam_jax.fit import programs as fit

    def loop(extend):
        config = load_config(f"plucker-mini,frames=9,sample.extend={extend},sample.context_frames=2")
        report = fit.analyze(config, "sample", None, with_vae=False, frames=33)
        (compiled,) = report.compiled
        return report, compiled.total

    clips, clip_bytes = loop("clip")
    joint, joint_bytes = loop("joint")
    assert "33 frames in 7 clips of 9" in clips.text() and "33 frames in 7 windows of 9" in joint.text()
    assert clip_bytes < joint_bytes
    assert clips.flops == joint.flops  # the same window forwards, in turn instead of at once
