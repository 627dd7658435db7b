"""Wan VAE (2.1 and 2.2 designs) against diffusers ``AutoencoderKLWan``, plus the JAX-only paths.

Tiny configs with the full Wan topology (4 stages, 2 res blocks, 2 temporal downsamples).
Every jitted path is compiled once per shape, so the tests share shapes on purpose:
video ``[B, T, 8s, 2s, 3]`` (s = spatial stride) gives latents ``[B, F, 8, 2, z]``.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import sharding
from facecam_jax.checkpoints import vae as cv
from facecam_jax.checkpoints.vae import export_state_dict, load_vae_state_dict
from facecam_jax.models import wan_vae as wv

PARITY_TOL = 1e-4  # fp32, max abs error vs diffusers
MEAN_TILE_TOL, MAX_TILE_TOL = 0.01, 0.1  # tiled vs untiled decode, random weights (see the test)
# One frame; one 4-frame chunk after it; three chunks with carried caches, batch 2 (9 frames,
# two chunks, was dropped: it compiles its own shapes and covers nothing 13 does not).
FRAMES = (1, 5, 13)


def _video(cfg, t, batch=1, seed=0):
    s = cfg.spatial_stride
    return np.random.default_rng(seed).uniform(-1, 1, (batch, t, 8 * s, 2 * s, 3)).astype(np.float32)


def _diffusers_vae(torch, cfg):
    """A diffusers AutoencoderKLWan with ``cfg``'s architecture; norm scales and biases randomised."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    kwargs = cv.diffusers_config(cfg)
    model = AutoencoderKLWan(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "bias")):
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def pair(request, torch):
    """(diffusers model, JAX WanVAE with the same weights, config)."""
    cfg = wv.VAEConfig.tiny(request.param)
    ref = _diffusers_vae(torch, cfg)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return ref, load_vae_state_dict(state, config=cfg), cfg


@pytest.fixture(scope="module")
def vae21(torch):
    cfg = wv.VAEConfig.tiny("2.1")
    state = {k: v.detach().numpy() for k, v in _diffusers_vae(torch, cfg).state_dict().items()}
    return load_vae_state_dict(state, config=cfg)


def cfg_name(cfg):
    return "2.2" if cfg.is_residual else "2.1"


def _to_torch(torch, x):  # [B, T, H, W, C] -> [B, C, T, H, W]
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3)


def _from_torch(x):
    return x.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("frames", FRAMES)
def test_encode_decode_parity(pair, torch, frames):
    ref, vae, cfg = pair
    batch = 2 if frames == 13 else 1
    video = _video(cfg, frames, batch)
    mean, std = np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)
    with torch.no_grad():
        expected = (_from_torch(ref.encode(_to_torch(torch, video)).latent_dist.mean) - mean) / std
    latents = np.asarray(vae.encode(jnp.asarray(video)))
    assert latents.shape == (batch, 1 + (frames - 1) // 4, 8, 2, cfg.z_dim)
    enc_err = np.abs(latents - expected).max()

    z = np.random.default_rng(frames).normal(size=latents.shape).astype(np.float32)
    with torch.no_grad():
        expected_video = _from_torch(ref.decode(_to_torch(torch, z * std + mean)).sample)
    decoded = np.asarray(vae.decode(jnp.asarray(z)))
    assert decoded.shape == video.shape
    dec_err = np.abs(decoded - expected_video).max()
    print(f"wan{cfg_name(cfg)} T={frames}: encode max abs err {enc_err:.2e}, decode max abs err {dec_err:.2e}")
    assert enc_err <= PARITY_TOL and dec_err <= PARITY_TOL


def test_chunked_scan_equals_unchunked(pair):
    """The lax.scan over 4-frame chunks with carried caches == the whole clip in one pass."""
    _, vae, cfg = pair
    video = jnp.asarray(_video(cfg, 13, batch=2))
    scanned = vae.encode(video)
    whole = vae.encode(video, chunked=False)
    enc_err = float(jnp.abs(scanned - whole).max())
    decoded = vae.decode(scanned)
    decoded_whole = vae.decode(scanned, chunked=False)
    dec_err = float(jnp.abs(decoded - decoded_whole).max())
    print(f"wan{cfg_name(cfg)} scan vs unchunked: encode {enc_err:.2e}, decode {dec_err:.2e}")
    assert enc_err <= 1e-5 and dec_err <= 1e-5


def test_chunked_memory_does_not_grow_with_clip_length():
    """XLA's own buffer plan: the scanned encode's scratch memory is the same for 13 and 41 frames.

    (Decode scratch grows only by the stacked output frames; the unchunked path grows ~3x.)
    """
    cfg = wv.VAEConfig.tiny("2.1")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: wv.WanVAE(cfg)))
    opts = wv._RunOptions(chunked=True, tile=None, tile_overlap=0, mesh=None, rules=None)
    temp = {}
    for t in (13, 41):
        video = jax.ShapeDtypeStruct((1, t, 64, 16, 3), jnp.float32)
        temp[t] = wv._encode_jit.lower(graphdef, state, video, True, opts).compile().memory_analysis()
    if temp[13] is None:
        pytest.skip("this backend gives no memory analysis")
    small, large = temp[13].temp_size_in_bytes, temp[41].temp_size_in_bytes
    print(f"encode scratch: {small} B at T=13, {large} B at T=41")
    assert large <= 1.05 * small


def test_tiling_blend_is_exact_for_pointwise_maps():
    """Tile placement, scaling and cross-fade weights: any per-pixel map is reproduced exactly."""

    def upsample_map(z):  # [..., h, w, c] -> [..., 8h, 8w, 2c], pointwise up to the upsampling
        z = jnp.repeat(jnp.repeat(z, 8, axis=-3), 8, axis=-2)
        return jnp.concatenate([jnp.tanh(z), z**2], axis=-1)

    z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 11, 7, 4)).astype(np.float32))
    tiled = wv._tiled(upsample_map, z, (4, 3), 2, 8)
    assert tiled.shape == (2, 3, 88, 56, 8)
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(upsample_map(z)), rtol=1e-6, atol=1e-6)
    x = jnp.repeat(jnp.repeat(z, 8, axis=2), 8, axis=3)  # and downscaling (encode direction)
    np.testing.assert_allclose(np.asarray(wv._tiled(lambda v: v[:, :, ::8, ::8], x, (32, 24), 16, 1 / 8)), z, atol=1e-6)


def test_tiled_decode_close_to_untiled(vae21):
    """Tiled decode of an 8x2-latent clip with 4-latent tiles overlapping by 2, along the height.

    The mid-block's whole-frame attention and the receptive field make tiles differ from the
    full frame near seams, so the tolerance is loose; it is stated from measurement with
    these random weights (mean abs error ~0.004, max ~0.03, signal mean |x| ~0.25).
    """
    z = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 8, 2, 4)).astype(np.float32))
    full = vae21.decode(z)  # the parity tests' decode shape: compiled once
    tiled = vae21.decode(z, tile=(32, 16), tile_overlap=16)
    assert tiled.shape == full.shape == (1, 5, 64, 16, 3)
    err = jnp.abs(tiled - full)
    print(f"tiled decode: mean abs err {float(err.mean()):.3f}, max {float(err.max()):.3f}, "
          f"mean |x| {float(jnp.abs(full).mean()):.3f}")
    assert float(err.mean()) < MEAN_TILE_TOL and float(err.max()) < MAX_TILE_TOL
    assert vae21.decode(z, tile=(64, 16)).shape == full.shape  # one tile covering the frame: no tiling


def test_spatially_sharded_equals_unsharded(vae21):
    """8 fake CPU devices: activations' height sharded over the fsdp mesh axis (ACT_HEIGHT).

    Weights stay replicated (a VAE is small next to its activations); ``shard_module`` on
    the VAE also works (its convs carry CONV_IN/CONV_OUT axes) but doubles the compile time.
    """
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    cfg = vae21.config
    video = jnp.asarray(_video(cfg, 5))
    latents = vae21.encode(video)
    decoded = vae21.decode(latents)

    mesh = sharding.make_mesh(fsdp=-1)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, sharding.FSDP))
    with sharding.use_mesh(mesh):
        latents_s = vae21.encode(jax.device_put(video, spec))
        decoded_s = vae21.decode(latents_s)
    enc_err = float(jnp.abs(latents_s - latents).max())
    dec_err = float(jnp.abs(decoded_s - decoded).max())
    shard_h = (latents_s.addressable_shards[0].data.shape[2], decoded_s.addressable_shards[0].data.shape[2])
    print(f"sharded vs unsharded: encode {enc_err:.2e}, decode {dec_err:.2e}; per-device heights {shard_h}")
    assert enc_err <= 1e-5 and dec_err <= 1e-5
    assert shard_h == (latents.shape[2] // 8, decoded.shape[2] // 8)  # really split over the 8 devices


def test_bad_inputs_are_refused_clearly(vae21):
    cfg = vae21.config
    good = _video(cfg, 9)
    with pytest.raises(ValueError, match=r"6 frames.*1 \+ 4k.*pad=True"):
        vae21.encode(jnp.asarray(good[:, :6]))
    with pytest.raises(ValueError, match="3 channels"):
        vae21.encode(jnp.asarray(good[..., :2]))
    with pytest.raises(ValueError, match="channels-first"):
        vae21.encode(jnp.asarray(good.transpose(0, 4, 1, 2, 3)))
    with pytest.raises(TypeError, match="float array"):
        vae21.encode(jnp.asarray(((good + 1) * 127.5).astype(np.uint8)))
    with pytest.raises(ValueError, match="batch axis"):
        vae21.encode(jnp.asarray(good[0]))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae21.encode(jnp.asarray(good[:, :, :60]))
    with pytest.raises(ValueError, match=r"latents must be \[B, F, h, w, 4\]"):
        vae21.decode(jnp.zeros((1, 2, 8, 2, 16)))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae21.decode(jnp.zeros((1, 2, 8, 2, 4)), tile=60)
    no_stats = load_vae_state_dict(
        export_state_dict(vae21, "diffusers"), config=dataclasses.replace(cfg, latents_mean=None, latents_std=None)
    )
    with pytest.raises(ValueError, match="normalize=False"):
        no_stats.encode(jnp.asarray(good))

    # pad=True repeats the last frame up to 1 + 4k instead of refusing.
    padded = vae21.encode(jnp.asarray(good[:, :6]), pad=True)
    manual = vae21.encode(jnp.asarray(np.concatenate([good[:, :6]] + [good[:, 5:6]] * 3, axis=1)))
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(manual))


def test_full_size_presets_match_reference_parameter_counts():
    """Real Wan2.1 / Wan2.2 VAE sizes via eval_shape (no allocation); counts from diffusers."""
    for cfg, expected, stride in ((wv.VAEConfig.wan21(), 126_892_531, 8), (wv.VAEConfig.wan22(), 704_688_668, 16)):
        vae = nnx.eval_shape(functools.partial(wv.WanVAE, cfg))
        assert wv.count_params(vae) == expected
        assert cfg.spatial_stride == stride
    with pytest.raises(ValueError, match="time by 4"):
        wv.VAEConfig(temperal_downsample=(True, True, True))
