"""Sampling: the jitted Euler program, guidance, A14B expert switching, the end-to-end script."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import build
from facecam_jax import sampling as sampler
from facecam_jax import sharding as sh
from facecam_jax.diffusion import flow
from facecam_jax.models import wan_dit as W
from facecam_jax.runtime.config_file import load_config as get_config
from facecam_jax.sampling import program as sp
from facecam_jax.sampling.inputs import SampleInputs

CFG = W.PRESETS["tiny"].replace(in_dim=36)


@pytest.fixture(scope="module")
def toy():
    """Two different tiny FaceCam DiTs and latents [1, 2, 4, 4, 16]."""
    a, b = W.WanDiT(CFG, rngs=nnx.Rngs(1)), W.WanDiT(CFG, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(0)
    source, camera, noise = (jnp.asarray(rng.standard_normal((1, 2, 4, 4, 16)), jnp.float32) for _ in range(3))
    ctx_c, ctx_u = (jnp.asarray(rng.standard_normal((1, 3, CFG.text_dim)), jnp.float32) for _ in range(2))
    return a, b, source, camera, noise, ctx_c, ctx_u


def _run(models, boundary, guidance, steps, toy_inputs):
    source, camera, noise, ctx_c, ctx_u = toy_inputs
    fn = jax.jit(sp.make_sample_fn(nnx.graphdef(models[0]), sp.SampleOptions(steps, 5.0, guidance, len(models), boundary)))
    return np.asarray(fn(tuple(nnx.state(m) for m in models), SampleInputs(source, {"camera": camera}, ctx_c, ctx_u, noise)))


def test_one_euler_step_is_the_guided_facecam_velocity(toy):
    a, _, source, camera, noise, ctx_c, ctx_u = toy
    got = _run([a], None, 5.0, 1, (source, camera, noise, ctx_c, ctx_u))
    t = jnp.array([1000.0])
    v_c = W.facecam_velocity(a, noise, camera, source, t, ctx_c)
    v_u = W.facecam_velocity(a, noise, camera, source, t, ctx_u)
    want = noise + (v_u + 5.0 * (v_c - v_u)) * (0.0 - 1.0)  # one step from sigma 1 to 0
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


def test_expert_switching_follows_the_boundary(toy):
    a, b, *inputs = toy
    # Two steps: sigmas 1 -> shift(0.5) = 0.833 -> 0, i.e. t = 1000 then 833.
    both = _run([a, b], 0.9, 1.0, 2, inputs)  # high expert a at t=1000, low expert b at t=833
    sig = flow.inference_sigmas(2, 5.0)
    source, camera, noise, ctx_c, _ = inputs
    x = noise
    for model, (s, s_next) in zip((a, b), zip(sig[:-1], sig[1:])):
        x = x + W.facecam_velocity(model, x, camera, source, jnp.array([1000.0 * s]), ctx_c) * (s_next - s)
    np.testing.assert_allclose(both, np.asarray(x), atol=1e-5)
    only_a = _run([a], None, 1.0, 2, inputs)
    assert np.abs(both - only_a).max() > 1e-3  # the low-noise expert really ran


def test_sampling_script_end_to_end_on_the_mini_config(tmp_path):
    from facecam_jax.camera import source, trajectories

    config = get_config("mini,frames=9,sample.num_steps=2")
    mesh = sh.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    frames = source.load_source(sampler.default_source_video(), 9, 64, 48)
    path = trajectories.load_trajectory("arc_left", 9)
    experts = sampler.Experts([W.WanDiT(CFG, rngs=nnx.Rngs(0))])
    vae = build.build_vae(config, mesh)
    kw = dict(experts=experts, vae=vae, mesh=mesh)
    first = sampler.generate(config, frames, path, seed=0, **kw)
    again = sampler.generate(config, frames, path, seed=0, **kw)
    other = sampler.generate(config, frames, path, seed=1, **kw)
    assert first.video.shape == (9, 64, 48, 3) and first.video.dtype == np.uint8
    assert first.condition.shape == (9, 64, 48, 3) and (first.condition != 255).any()
    np.testing.assert_array_equal(first.video, again.video)
    assert np.abs(first.video.astype(int) - other.video.astype(int)).max() > 0
    assert sampler.side_by_side(first).shape == (9, 64, 144, 3)
    with pytest.raises(ValueError, match="config expects"):
        sampler.generate(config, frames[:5], path, **kw)
    with pytest.raises(FileNotFoundError, match="no trained weights"):
        sampler.load_experts(config, mesh, sh.DEFAULT_RULES, workdir=str(tmp_path))


def test_sampling_on_8_devices_equals_one_device():
    """fsdp 4 x context 2 (weights sharded, the sequence split, chunked attention per device)
    renders the same video as one device, within one grey level. (fsdp 8 alone renders on 8
    devices in the offload test below and in tests/test_windows.py.)"""
    from facecam_jax.camera import source, trajectories

    config = get_config("mini,frames=9,sample.num_steps=2")
    frames = source.load_source(sampler.default_source_video(), 9, 64, 48)
    path = trajectories.load_trajectory("zoom_in", 9)
    experts = sampler.Experts([W.WanDiT(CFG, rngs=nnx.Rngs(0), attention="chunked")])
    one = sh.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    vae = build.build_vae(config, one)
    want, got = (sampler.generate(config, frames, path, seed=0, experts=experts, vae=vae, mesh=mesh).video
                 for mesh in (one, sh.make_mesh(1, 4, 2, 1)))
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    print(f"fsdp 4 x context 2 vs 1 device: max {diff} grey levels")
    assert diff <= 1


def _options(steps, guidance=5.0, **kw):
    return sp.SampleOptions(steps, 5.0, guidance, **kw)


def _latents(models, options, toy_inputs):
    source, camera, noise, ctx_c, ctx_u = toy_inputs
    fn = jax.jit(sp.make_sample_fn(nnx.graphdef(models[0]), options))
    return np.asarray(fn(tuple(nnx.state(m) for m in models), SampleInputs(source, {"camera": camera}, ctx_c, ctx_u, noise)))


def test_solvers_and_the_step_cache_inside_the_program(toy):
    from facecam_jax.diffusion.step_cache import MagCache

    a, _, *inputs = toy
    euler = _latents([a], _options(4), inputs)
    # A multistep solver's first step has no history: it is Euler's.
    for solver in ("unipc", "dpmpp_2m"):
        np.testing.assert_allclose(_latents([a], _options(1, solver=solver), inputs), _latents([a], _options(1), inputs),
                                   atol=1e-5)
    assert np.abs(_latents([a], _options(4, solver="unipc"), inputs) - euler).max() > 1e-4
    # Threshold 0: every step runs the blocks, the same numbers as no cache at all.
    ratios = (1.0, 1.01, 1.02, 1.0)
    zero = MagCache(ratios, threshold=0.0, retention=0.0)
    assert _options(4, cache=zero).evaluations() == (4, 4)
    np.testing.assert_array_equal(_latents([a], _options(4, cache=zero), inputs), euler)
    # A loose threshold skips steps 1 and 2 (the last always runs): fewer evaluations, another sample.
    loose = MagCache(ratios, threshold=10.0, max_skips=2, retention=0.0)
    assert _options(4, cache=loose).evaluations() == (2, 4)
    assert np.abs(_latents([a], _options(4, cache=loose), inputs) - euler).max() > 1e-4
    # Guidance's two passes one after the other: the same sample, with and without the cache.
    np.testing.assert_allclose(_latents([a], _options(4, cfg="sequential"), inputs), euler, atol=1e-5)
    np.testing.assert_allclose(_latents([a], _options(4, cache=loose, cfg="sequential"), inputs),
                               _latents([a], _options(4, cache=loose), inputs), atol=1e-5)


def _placed_pair(config, mesh, offload, a, b):
    """(config with ``sample.offload``, experts a and b placed on ``mesh`` as that offload says);
    call inside ``sh.use_mesh(mesh)``."""
    config = config.copy_and_resolve_references()
    config.sample.offload = offload
    experts = sampler.Experts([nnx.merge(nnx.graphdef(m), sampler.on_mesh(nnx.state(m), mesh, sh.DEFAULT_RULES))
                               for m in (a, b)], 0.9)
    return config, sampler.place_experts(experts, mesh, sh.DEFAULT_RULES, offload)


def _render_pair(config, mesh, offload, a, b, vae, frames, condition):
    with sh.use_mesh(mesh, sh.DEFAULT_RULES):
        config, experts = _placed_pair(config, mesh, offload, a, b)
        return sampler.render(config, experts, build.replicate(nnx.merge(*nnx.split(vae)), mesh), frames[None],
                              condition[None], [0], mesh=mesh, show_progress=False)[0]


def _sample_pair(config, mesh, offload, a, b, toy_inputs):
    """The sampling program alone (no VAE) of experts a and b on ``mesh`` -> latents."""
    source, camera, noise, ctx_c, ctx_u = toy_inputs
    with sh.use_mesh(mesh, sh.DEFAULT_RULES):
        config, experts = _placed_pair(config, mesh, offload, a, b)
        program = sp.sample_program(nnx.graphdef(experts.models[0]), sp.SampleOptions.of(config, 2, guidance=5.0))
        inputs = jax.device_put(SampleInputs(source, {"camera": camera}, ctx_c, ctx_u, noise),
                                NamedSharding(mesh, PartitionSpec()))
        return np.asarray(program.fn(tuple(nnx.state(m) for m in experts.models), inputs))


def test_offloaded_experts_and_streamed_blocks_sample_the_same_video(toy):
    """On the CPU host and device memory are one, so offloading must change nothing but the
    program's structure: one program per expert phase, or layers copied in inside the scan.
    Whole renders on one device; on 8 devices the sampling program alone (its latents)."""
    from facecam_jax.camera import condition, source, trajectories

    a, b = toy[:2]
    config = get_config("mini,frames=9,sample.num_steps=2")
    frames = source.load_source(sampler.default_source_video(), 9, 64, 48)
    maps = condition.build_condition(trajectories.load_trajectory("zoom_in", 9), height=64, width=48,
                                     framing="official")
    one = sh.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    vae = build.build_vae(config, one)
    want = _render_pair(config, one, "none", a, b, vae, frames, maps)
    assert sp.SampleOptions.of(config, 2).phases() == ((None, 0, 2),)
    config.sample.offload = "experts"
    assert sp.SampleOptions.of(config, 2).phases() == ((0, 0, 1), (1, 1, 2))  # t = 1000, then 833 < 900
    for offload in ("experts", "blocks"):
        got = _render_pair(config, one, offload, a, b, vae, frames, maps)
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        print(f"offload {offload} on 1 device: max {diff} grey levels from none")
        assert diff <= 1, offload
    resident = _sample_pair(config, one, "none", a, b, toy[2:])
    streamed = _sample_pair(config, sh.make_mesh(1, 8, 1, 1), "blocks", a, b, toy[2:])
    print(f"offload blocks on 8 devices: latents max {np.abs(streamed - resident).max():.1e} from none on 1 device")
    np.testing.assert_allclose(streamed, resident, atol=1e-4)
    with pytest.raises(ValueError, match="one expert"):
        sampler.place_experts(sampler.Experts([a]), one, sh.DEFAULT_RULES, "experts")


def test_bad_sampling_options_fail_before_any_weight_loads(tmp_path):
    one = sh.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    frames = np.zeros((9, 64, 48, 3), np.uint8)
    from facecam_jax.camera import trajectories

    path = trajectories.load_trajectory("zoom_in", 9)
    for override in ("sample.offload=disk", "sample.solver=heun", "model.quantize=int4"):  # where the config loads
        with pytest.raises(ValueError, match=override.split("=")[0]):
            get_config(f"mini,frames=9,{override}")
    missing = str(tmp_path / "no-run")  # load_experts would fail on it: these checks come first
    for override, match in (("sample.offload=experts", "has one expert"),
                            ("sample.cache=magcache", "cache_calibration")):
        config = get_config(f"mini,frames=9,{override}")
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            sampler.generate(config, frames, path, workdir=missing, mesh=one)


def test_a_non_finite_render_is_an_error_not_a_black_video(toy):
    """Weights that blow the model up (a NaN, as a broken LoRA or a huge strength leaves) end in
    a clear error instead of an all-black video."""
    from facecam_jax.camera import trajectories

    a = toy[0]
    broken = nnx.merge(*nnx.split(a))
    kernel = broken.head.head.kernel
    kernel.set_value(kernel.get_value().at[0, 0].set(jnp.nan))
    config = get_config("mini,frames=9,sample.num_steps=1")
    frames = np.zeros((9, 64, 48, 3), np.uint8)
    with pytest.raises(ValueError, match="not finite"):
        sampler.generate(config, frames, trajectories.load_trajectory("zoom_in", 9),
                         experts=sampler.Experts([broken]), mesh=sh.make_mesh(1, 1, 1, 1, devices=jax.devices()[:1]))
