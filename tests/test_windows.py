"""Long videos: the window layout and its blending weights, the output's frames and size, and joint
denoising of overlapping windows through the sampling program (1 device and 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import sampling as sampler
from facecam_jax import sharding as sh
from facecam_jax.camera import source as source_lib
from facecam_jax.diffusion.windows import Windows, latent_frames, video_frames
from facecam_jax.models import wan_dit as W
from facecam_jax.runtime.config_file import load_config
from facecam_jax.sampling import plan
from facecam_jax.sampling import program as sp
from facecam_jax.sampling.inputs import SampleInputs

CFG = W.PRESETS["tiny"].replace(in_dim=36)


def test_windows_cover_the_video_and_their_weights_add_up_to_one():
    w = Windows.cover(9, 4, 2)  # 33 frames in windows of 13 frames overlapping by 2 latent frames
    assert w.starts == (0, 2, 4, 5) and w.count == 4 and (latent_frames(33), video_frames(9)) == (9, 33)
    assert Windows.cover(9, 3, 2).starts == tuple(range(7))  # the last window ends at the video's end
    assert Windows.cover(3, 3, 1).starts == (0,) and Windows.cover(2, 3, 1).length == 2
    for layout in (w, Windows.cover(9, 3, 2), Windows.cover(21, 6, 3)):
        total = np.zeros(layout.total)
        for k, s in enumerate(layout.starts):
            total[s:s + layout.length] += layout.weights()[k]
        np.testing.assert_allclose(total, 1.0, atol=1e-6)
        # A later window's latent 0 is its own (the VAE's image latent of its first frame, not
        # the timeline's 4-frame latent there): no weight on the timeline.
        assert (layout.weights()[1:, 0] == 0).all() and (layout.weights()[:, 1:] > 0).all()
        frames = np.zeros(video_frames(layout.total))  # the decoded windows' cross-fade, likewise
        for k in range(layout.count):
            a, b = layout.frame_range(k)
            frames[a:b] += layout.frame_weights()[k]
        np.testing.assert_allclose(frames, 1.0, atol=1e-6)
        assert (layout.frame_weights()[1:, 0] == 0).all()
    # Blending per-window copies of one timeline gives the timeline back; gather is its inverse.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, w.state_frames, 3)), jnp.float32)
    assert w.state_frames == 9 + 3  # the timeline, then the own latent 0 of windows 1, 2, 3
    np.testing.assert_allclose(w.blend(w.gather(x)), x, atol=1e-6)
    with pytest.raises(ValueError, match="window_overlap"):
        Windows.cover(9, 3, 3)


def test_output_frames_and_sizes_for_odd_sources(caplog):
    video = sampler.default_source_video()  # carphone: 120 frames at 30 fps, 176 x 144 (landscape)
    assert source_lib.available_frames(video) == 120
    assert source_lib.frame_count(video, None, 9, 481) == 117  # every frame, cut to 4k + 1
    assert source_lib.frame_count(video, None, 9, 33) == 33  # at most sample.max_frames
    with caplog.at_level("WARNING", logger="facecam_jax.camera.source"):
        assert source_lib.frame_count(video, 129, 9, 481) == 129  # longer than the source: padded, said
    assert "fewer than the 129" in caplog.text
    with pytest.raises(ValueError, match="not 4k \\+ 1.*pass 33 or 37"):
        source_lib.frame_count(video, 34, 9, 481)
    with pytest.raises(ValueError, match="max_frames"):
        source_lib.frame_count(video, 485, 9, 481)
    with pytest.raises(ValueError, match="multiple of 16; use 48 or 64"):
        source_lib.check_size(50, 48)
    assert source_lib.fit_aspect(144, 176, 64, 48) == (48, 64)  # the landscape source stays landscape
    assert source_lib.fit_aspect(176, 144, 48, 64) == (64, 48)  # and a portrait one portrait
    config = load_config("mini,frames=9")
    planned, frames = plan.plan_output(config, video, frames=17, height=48, width=80)
    assert (planned.data.height, planned.data.width, frames) == (48, 80, 17) and config.data.width == 48
    planned, _ = plan.plan_output(config, video, aspect="source")
    assert (planned.data.height, planned.data.width) == (48, 64)
    with pytest.raises(ValueError, match="drop --height"):
        plan.plan_output(config, video, aspect="source", height=64)


def _windowed(model, windows, mesh, options_kw=None):
    rng = np.random.default_rng(1)
    k = 1 if windows is None else windows.count
    length = 3 if windows is None else windows.length
    state = length if windows is None else windows.state_frames
    source, camera = (jnp.asarray(rng.standard_normal((k, length, 4, 4, 16)), jnp.float32) for _ in range(2))
    noise = jnp.asarray(rng.standard_normal((1, state, 4, 4, 16)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 3, CFG.text_dim)), jnp.float32)
    options = sp.SampleOptions(3, 5.0, 1.0, windows=windows, **(options_kw or {}))
    with sh.use_mesh(mesh, sh.DEFAULT_RULES):
        fn = jax.jit(sp.make_sample_fn(nnx.graphdef(model), options))
        state = sampler.on_mesh(nnx.state(model), mesh, sh.DEFAULT_RULES)
        return np.asarray(fn((state,), SampleInputs(source, {"camera": camera}, ctx, ctx, noise))), (source, camera, noise, ctx)


def test_overlapping_windows_are_denoised_jointly_without_seams():
    model = W.WanDiT(CFG, rngs=nnx.Rngs(3))
    one = sh.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    # One window as long as the video is exactly the unwindowed program.
    single, _ = _windowed(model, Windows(3, 3, (0,)), one)
    plain, _ = _windowed(model, None, one)
    np.testing.assert_array_equal(single, plain)
    # Four windows of 4 latent frames over 9: at every latent frame the blend is continuous. Seam
    # metric: the mean absolute change between consecutive timeline frames where a window ends
    # (frames 3 | 4, 5 | 6, 7 | 8) against the same inside windows; a seam shows as a jump.
    layout = Windows.cover(9, 4, 2)
    out, _ = _windowed(model, layout, one)
    steps = np.abs(np.diff(layout.timeline(out)[0], axis=0)).mean(axis=(1, 2, 3))  # [8]
    seams = [s + layout.length - 1 for s in layout.starts[:-1]]  # frame g -> g + 1 across a window end
    inside = [g for g in range(8) if g not in seams]
    ratio = steps[seams].mean() / steps[inside].mean()
    print(f"\nlatent frame-to-frame change at seams / inside windows: {ratio:.2f}")
    assert ratio < 1.5
    # Windows in chunks of 2 per forward pass, and 8 devices, sample the same video.
    chunked, _ = _windowed(model, layout, one, {"window_batch": 2})
    np.testing.assert_allclose(chunked, out, atol=1e-5)
    eight, _ = _windowed(model, layout, sh.make_mesh(1, 8, 1, 1))
    np.testing.assert_allclose(eight, out, atol=1e-4)
