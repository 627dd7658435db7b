"""Loading Wan VAE checkpoints: original ``.pth`` naming, diffusers safetensors, clear errors.

The original-naming state dicts are made here from diffusers ones by an independent rename
(written from the official ``wan/modules/vae.py`` / ``vae2_2.py`` module layout; for 2.1 it
is cross-checked against diffusers' own original->diffusers converter), so a mistake in the
loader's naming tables cannot cancel out.
"""

import dataclasses
import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax.checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    load_vae,
    open_checkpoint,
)
from facecam_jax.checkpoints import vae as cv
from facecam_jax.models import wan_vae as wv


def _diffusers_vae(torch, cfg):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(1)
    kwargs = cv.diffusers_config(cfg)
    return AutoencoderKLWan(**kwargs).eval()


def to_original_name(key: str, cfg: wv.VAEConfig) -> str:
    """diffusers ``AutoencoderKLWan`` key -> the official Wan ``WanVAE_`` key."""
    n = cfg.num_res_blocks
    for new, old in (("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
                     ("conv2", "residual.6"), ("conv_shortcut", "shortcut")):  # fmt: skip
        key = re.sub(rf"(\d)\.{new}\.", rf"\1.{old}.", key)  # inside residual blocks only
    key = re.sub(r"^post_quant_conv\.", "conv2.", key)
    key = re.sub(r"^quant_conv\.", "conv1.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", key)
    key = re.sub(r"\.mid_block\.resnets\.0\.", ".middle.0.", key)
    key = re.sub(r"\.mid_block\.attentions\.0\.", ".middle.1.", key)
    key = re.sub(r"\.mid_block\.resnets\.1\.", ".middle.2.", key)
    if cfg.is_residual:  # Wan2.2: Down_ResidualBlock / Up_ResidualBlock wrap a `downsamples`/`upsamples` list
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsampler\.", rf"encoder.downsamples.\1.downsamples.{n}.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsampler\.", rf"decoder.upsamples.\1.upsamples.{n + 1}.", key)
    else:  # Wan2.1: one flat nn.Sequential per side; a decoder stage is n+1 resnets then a resample
        key = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.upsamples.{int(m[1]) * (n + 2) + int(m[2])}.", key)  # fmt: skip
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.upsamples.{int(m[1]) * (n + 2) + n + 1}.", key)  # fmt: skip
    return key


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def saved(request, torch, tmp_path_factory):
    """A tiny diffusers model, its diffusers state dict, and the same weights saved both ways."""
    cfg = wv.VAEConfig.tiny(request.param)
    ref = _diffusers_vae(torch, cfg)
    folder = tmp_path_factory.mktemp(f"vae{request.param}")
    ref.save_pretrained(folder / "diffusers", safe_serialization=True)
    diffusers_sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    original_sd = {to_original_name(k, cfg): v for k, v in diffusers_sd.items()}
    assert len(original_sd) == len(diffusers_sd)
    torch.save(original_sd, folder / "Wan_VAE.pth")
    return cfg, ref, diffusers_sd, original_sd, folder


def _params(vae):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(vae))}


def test_original_pth_loads_to_the_same_weights_and_outputs(saved, torch):
    """torch.save'd original naming -> load_vae (no torch used) == diffusers weights; outputs match."""
    cfg, ref, diffusers_sd, original_sd, folder = saved
    pth = str(folder / "Wan_VAE.pth")
    inferred = cv.infer_config(open_checkpoint(pth))
    assert inferred == dataclasses.replace(cfg, latents_mean=None, latents_std=None)  # tiny z: no published stats

    vae = load_vae(pth, config=cfg)
    reference = cv.load_vae_state_dict({k: v.numpy() for k, v in diffusers_sd.items()}, config=cfg)
    mine, theirs = _params(vae), _params(reference)
    assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    if not cfg.is_residual:  # Wan2.1: diffusers' own original->diffusers converter inverts our rename
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        converted = convert_wan_vae_to_diffusers(dict(original_sd))
        assert set(converted) == set(diffusers_sd) and all(converted[k] is diffusers_sd[k] for k in converted)
    exported = cv.export_state_dict(vae, cv.ORIGINAL)  # and back to the original layout
    assert exported.keys() == original_sd.keys()
    assert all(np.array_equal(exported[k], original_sd[k].numpy()) for k in exported)

    s = cfg.spatial_stride
    video = np.random.default_rng(5).uniform(-1, 1, (1, 5, 8 * s, 2 * s, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = ref.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist.mean
        expected_video = ref.decode(posterior).sample.permute(0, 2, 3, 4, 1).numpy()
    mean, std = np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)
    expected = (posterior.permute(0, 2, 3, 4, 1).numpy() - mean) / std
    latents = vae.encode(jnp.asarray(video))
    enc_err = float(np.abs(np.asarray(latents) - expected).max())
    dec_err = float(np.abs(np.asarray(vae.decode(latents)) - expected_video).max())
    print(f"wan{'2.2' if cfg.is_residual else '2.1'} .pth-loaded vs diffusers: encode {enc_err:.2e}, decode {dec_err:.2e}")
    assert enc_err <= 1e-4 and dec_err <= 1e-4


def test_diffusers_folder_loads_with_its_config_json(saved):
    """save_pretrained folder: config (latent statistics included) is inferred without being given."""
    cfg, _, diffusers_sd, _, folder = saved
    vae = load_vae(folder / "diffusers")
    assert vae.config == cfg
    reference = cv.load_vae_state_dict({k: v.numpy() for k, v in diffusers_sd.items()}, config=cfg)
    mine, theirs = _params(vae), _params(reference)
    assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    bf16 = load_vae(folder / "diffusers", dtype=jnp.bfloat16)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pth_is_refused_and_runs_nothing(torch, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(2, 3, 3, 3, 3), "payload": _Exploit(marker)}, path)
    assert b"system" in path.read_bytes()  # the pickle really carries the call
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
        load_vae(path)
    assert not marker.exists()
    with open(tmp_path / "plain.pth", "wb") as f:  # a bare (non-zip) pickle is refused before unpickling
        pickle.dump(_Exploit(marker), f)
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        load_vae(tmp_path / "plain.pth")
    assert not marker.exists()


def test_key_and_shape_problems_are_one_clear_error(saved):
    cfg, _, diffusers_sd, _, _ = saved
    broken = {k: v.numpy() for k, v in diffusers_sd.items()}
    del broken["decoder.conv_out.bias"]
    broken["encoder.extra.weight"] = np.zeros(3, np.float32)
    broken["quant_conv.bias"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointError) as info:
        cv.load_vae_state_dict(broken, config=cfg)
    message = str(info.value)
    for expected in ("missing keys (1)", "decoder.conv_out.bias", "unexpected keys (1)", "encoder.extra.weight",
                     "quant_conv.bias: (7,) vs"):  # fmt: skip
        assert expected in message
    other = wv.VAEConfig.tiny("2.2" if cfg.patch_size == 1 else "2.1")
    with pytest.raises(CheckpointError, match="does not fit the Wan VAE config"):
        cv.load_vae_state_dict({k: v.numpy() for k, v in diffusers_sd.items()}, config=other)
    with pytest.raises(CheckpointError, match="not a Wan VAE checkpoint"):
        cv.load_vae_state_dict({"blocks.0.self_attn.q.weight": np.zeros((2, 2), np.float32)})


class _Shape:
    def __init__(self, shape):
        self.shape = shape


@pytest.mark.parametrize("preset", ["wan21", "wan22"])
def test_full_size_configs_are_inferred_from_key_shapes(preset, torch):
    """Both namings of the real Wan2.1 / Wan2.2 VAEs (shapes only, nothing allocated)."""
    from diffusers import AutoencoderKLWan

    cfg = getattr(wv.VAEConfig, preset)()
    vae = nnx.eval_shape(lambda: wv.WanVAE(cfg))
    for naming in (cv.ORIGINAL, cv.DIFFUSERS):
        table = cv.checkpoint_names(vae, naming)
        assert cv.infer_config({k: _Shape(shape) for k, (_, shape) in table.items()}) == cfg
    kwargs = {}
    if cfg.is_residual:
        kwargs = {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "in_channels": 12,
                  "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
                  "latents_mean": list(cfg.latents_mean), "latents_std": list(cfg.latents_std)}  # fmt: skip
    with torch.device("meta"):
        reference = AutoencoderKLWan(**kwargs).state_dict()
    table = cv.checkpoint_names(vae, cv.DIFFUSERS)
    assert {k: tuple(v.shape) for k, v in reference.items()} == {k: shape for k, (_, shape) in table.items()}
    original = {to_original_name(k, cfg) for k in reference}
    assert original == set(cv.checkpoint_names(vae, cv.ORIGINAL))
