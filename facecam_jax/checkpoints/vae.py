"""Wan VAE checkpoints -> :class:`facecam_jax.models.wan_vae.WanVAE`.

Reads the original files (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``: torch pickles, read by
the restricted unpickler in :mod:`facecam_jax.checkpoints.pth`, no torch needed) and
diffusers ``AutoencoderKLWan`` safetensors (file or ``save_pretrained`` directory).

Both namings are generated from the JAX module tree itself (``checkpoint_names``), so a
checkpoint loads only if every tensor has a place and a matching shape; anything else is
one :class:`CheckpointError` listing missing, unexpected and mis-shaped keys. When no
config is given it is inferred from the checkpoint's keys and shapes (tiny test files too).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax.checkpoints.io import (
    CheckpointError,
    format_key_problems,
    open_checkpoint,
    strip_prefix,
    write_safetensors,
)
from facecam_jax.checkpoints.tensor_ref import TensorRef, check_finite
from facecam_jax.models import wan_vae as wv
from facecam_jax.runtime import progress as progress_lib

log = logging.getLogger(__name__)

ORIGINAL, DIFFUSERS = "original", "diffusers"
_PREFIXES = ("vae.", "first_stage_model.", "model.")

# ------------------------------------------------------------------------------- naming


def _resblock(prefix: str, block: wv.ResidualBlock, naming: str) -> Iterator[tuple[str, Any, str]]:
    names = (
        ("residual.0", "residual.2", "residual.3", "residual.6", "shortcut")
        if naming == ORIGINAL
        else ("norm1", "conv1", "norm2", "conv2", "conv_shortcut")
    )
    layers = (block.norm1, block.conv1, block.norm2, block.conv2, block.shortcut)
    for name, layer in zip(names, layers):
        if layer is not None:
            yield f"{prefix}.{name}", layer, "vector" if isinstance(layer, wv.RMSNorm) else "conv3d"


def _resample(prefix: str, layer: wv.Resample) -> Iterator[tuple[str, Any, str]]:
    yield f"{prefix}.resample.1", layer.conv, "conv2d"
    if layer.time_conv is not None:
        yield f"{prefix}.time_conv", layer.time_conv, "conv3d"


def _mid(prefix: str, mid: wv.MidBlock, naming: str) -> Iterator[tuple[str, Any, str]]:
    p0, pa, p1 = (
        (f"{prefix}.middle.0", f"{prefix}.middle.1", f"{prefix}.middle.2")
        if naming == ORIGINAL
        else (f"{prefix}.mid_block.resnets.0", f"{prefix}.mid_block.attentions.0", f"{prefix}.mid_block.resnets.1")
    )
    yield from _resblock(p0, mid.res0, naming)
    yield f"{pa}.norm", mid.attn.norm, "image_vector"
    yield f"{pa}.to_qkv", mid.attn.to_qkv, "conv2d"
    yield f"{pa}.proj", mid.attn.proj, "conv2d"
    yield from _resblock(p1, mid.res1, naming)


def _head(prefix: str, norm, conv, naming: str) -> Iterator[tuple[str, Any, str]]:
    if naming == ORIGINAL:
        yield f"{prefix}.head.0", norm, "vector"
        yield f"{prefix}.head.2", conv, "conv3d"
    else:
        yield f"{prefix}.norm_out", norm, "vector"
        yield f"{prefix}.conv_out", conv, "conv3d"


def _layers(vae: wv.WanVAE, naming: str) -> Iterator[tuple[str, Any, str]]:
    """(checkpoint prefix, JAX layer, torch layout kind) for every parametric layer."""
    cfg = vae.config
    orig = naming == ORIGINAL
    enc, dec = vae.encoder, vae.decoder
    yield ("encoder.conv1" if orig else "encoder.conv_in"), enc.conv_in, "conv3d"
    flat = 0  # Wan2.1 lists resblocks and resamples of all stages in one sequence
    for i, stage in enumerate(enc.stages):
        for j, block in enumerate(stage.resnets):
            if cfg.is_residual:
                prefix = f"encoder.downsamples.{i}.downsamples.{j}" if orig else f"encoder.down_blocks.{i}.resnets.{j}"
            else:
                prefix = f"encoder.downsamples.{flat}" if orig else f"encoder.down_blocks.{flat}"
                flat += 1
            yield from _resblock(prefix, block, naming)
        if stage.downsample is not None:
            if cfg.is_residual:
                n = len(stage.resnets)
                prefix = f"encoder.downsamples.{i}.downsamples.{n}" if orig else f"encoder.down_blocks.{i}.downsampler"
            else:
                prefix = f"encoder.downsamples.{flat}" if orig else f"encoder.down_blocks.{flat}"
                flat += 1
            yield from _resample(prefix, stage.downsample)
    yield from _mid("encoder", enc.mid, naming)
    yield from _head("encoder", enc.norm_out, enc.conv_out, naming)
    yield ("conv1" if orig else "quant_conv"), vae.quant_conv, "conv3d"
    yield ("conv2" if orig else "post_quant_conv"), vae.post_quant_conv, "conv3d"
    yield ("decoder.conv1" if orig else "decoder.conv_in"), dec.conv_in, "conv3d"
    yield from _mid("decoder", dec.mid, naming)
    flat = 0
    for i, stage in enumerate(dec.stages):
        for j, block in enumerate(stage.resnets):
            if orig and cfg.is_residual:
                prefix = f"decoder.upsamples.{i}.upsamples.{j}"
            elif orig:
                prefix = f"decoder.upsamples.{flat}"
                flat += 1
            else:
                prefix = f"decoder.up_blocks.{i}.resnets.{j}"
            yield from _resblock(prefix, block, naming)
        if stage.upsample is not None:
            if orig and cfg.is_residual:
                prefix = f"decoder.upsamples.{i}.upsamples.{len(stage.resnets)}"
            elif orig:
                prefix = f"decoder.upsamples.{flat}"
                flat += 1
            else:
                prefix = f"decoder.up_blocks.{i}." + ("upsampler" if cfg.is_residual else "upsamplers.0")
            yield from _resample(prefix, stage.upsample)
    yield from _head("decoder", dec.norm_out, dec.conv_out, naming)


def _entries(layer, kind: str) -> list[tuple[str, nnx.Param, tuple[int, ...]]]:
    """(suffix, JAX variable, torch shape) of one layer's tensors."""
    if isinstance(layer, wv.RMSNorm):
        c = layer.gamma.get_value().shape[0]
        return [("gamma", layer.gamma, (c, 1, 1) if kind == "image_vector" else (c, 1, 1, 1))]
    k = layer.kernel.get_value().shape
    if isinstance(layer, wv.Pointwise):  # torch 1x1 Conv2d (attention) or 1x1x1 Conv3d
        torch_shape = (k[1], k[0], 1, 1) if kind == "conv2d" else (k[1], k[0], 1, 1, 1)
    else:  # [*spatial, Ci, Co] -> torch [Co, Ci, *spatial]
        torch_shape = (k[-1], k[-2], *k[:-2])
    return [("weight", layer.kernel, torch_shape), ("bias", layer.bias, (k[-1],))]


def checkpoint_names(vae: wv.WanVAE, naming: str = ORIGINAL) -> dict[str, tuple[nnx.Param, tuple[int, ...]]]:
    """``checkpoint key -> (JAX variable, torch shape)`` for the original or diffusers naming."""
    if naming not in (ORIGINAL, DIFFUSERS):
        raise ValueError(f"naming must be {ORIGINAL!r} or {DIFFUSERS!r}, got {naming!r}")
    table = {}
    for prefix, layer, kind in _layers(vae, naming):
        for suffix, var, shape in _entries(layer, kind):
            table[f"{prefix}.{suffix}"] = (var, shape)
    return table


def to_jax_layout(tensor: np.ndarray, jax_shape: tuple[int, ...]) -> np.ndarray:
    """torch layout (``[Co, Ci, *kernel]`` / ``[C, 1, ...]``) -> this module's layout."""
    if tensor.ndim >= 3 and len(jax_shape) >= 2:  # conv weights: move (Co, Ci) to the end as (Ci, Co)
        tensor = np.transpose(tensor, (*range(2, tensor.ndim), 1, 0))
    return np.ascontiguousarray(tensor.reshape(jax_shape))


def to_torch_layout(array: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_jax_layout` (for writing checkpoints)."""
    array = np.asarray(array)
    if len(torch_shape) >= 3 and array.ndim >= 2:
        spatial = torch_shape[2:]
        array = array.reshape(*spatial, torch_shape[1], torch_shape[0])
        array = np.transpose(array, (array.ndim - 1, array.ndim - 2, *range(array.ndim - 2)))
    return np.ascontiguousarray(array.reshape(torch_shape))


def export_state_dict(vae: wv.WanVAE, naming: str = ORIGINAL) -> dict[str, np.ndarray]:
    """The VAE's weights as a torch-layout ``name -> array`` dict in either naming."""
    return {k: to_torch_layout(np.asarray(var.get_value()), shape) for k, (var, shape) in checkpoint_names(vae, naming).items()}


# ----------------------------------------------------------------------------- inference


def detect_naming(keys) -> str:
    keys = set(keys)
    if "encoder.conv1.weight" in keys:
        return ORIGINAL
    if "encoder.conv_in.weight" in keys:
        return DIFFUSERS
    sample = sorted(keys)[:8]
    raise CheckpointError(
        "not a Wan VAE checkpoint: found neither 'encoder.conv1.weight' (original Wan naming) nor "
        f"'encoder.conv_in.weight' (diffusers AutoencoderKLWan); first keys: {sample}"
    )


def _shape(refs, key) -> tuple[int, ...]:
    if key not in refs:
        raise CheckpointError(f"cannot infer the VAE config: key {key!r} is missing from the checkpoint")
    return tuple(refs[key].shape)


def infer_config(refs: Mapping[str, Any], *, stats: Mapping[str, Any] | None = None) -> wv.VAEConfig:
    """A :class:`VAEConfig` from a checkpoint's keys and shapes (either naming).

    ``stats`` may carry ``latents_mean``/``latents_std`` (e.g. a diffusers config.json);
    otherwise z 16 (Wan2.1) and z 48 (Wan2.2) get the published constants and other
    widths get none (``normalize=True`` is then refused with a clear error).
    """
    naming = detect_naming(refs)
    orig = naming == ORIGINAL
    conv_in = _shape(refs, "encoder.conv1.weight" if orig else "encoder.conv_in.weight")
    dim, video_channels = conv_in[0], conv_in[1]
    patch = {3: 1, 12: 2}.get(video_channels)
    if patch is None:
        raise CheckpointError(f"encoder input has {video_channels} channels; Wan VAEs take 3 (2.1) or 12 (2.2)")
    z_dim = _shape(refs, "conv2.weight" if orig else "post_quant_conv.weight")[0]
    root = "encoder.downsamples" if orig else "encoder.down_blocks"
    residual_marker = "downsamples" if orig else "resnets"
    is_residual = any(k.startswith(f"{root}.0.{residual_marker}.") for k in refs)

    # Group the encoder's blocks into stages: [(resnet prefixes, resample prefix or None)].
    stages: list[tuple[list[str], str | None]] = []
    if is_residual:
        n_stages = 1 + max(int(k.split(".")[2]) for k in refs if k.startswith(root + "."))
        for i in range(n_stages):
            items = sorted(
                {int(m.group(1)) for k in refs if (m := re.match(rf"{re.escape(root)}\.{i}\.{residual_marker}\.(\d+)\.", k))}
            )
            resnets = [f"{root}.{i}.{residual_marker}.{j}" for j in items]
            resample = None
            if orig and resnets and f"{resnets[-1]}.resample.1.weight" in refs:
                resample = resnets.pop()
            elif not orig and f"{root}.{i}.downsampler.resample.1.weight" in refs:
                resample = f"{root}.{i}.downsampler"
            stages.append((resnets, resample))
    else:
        items = sorted({int(k.split(".")[2]) for k in refs if k.startswith(root + ".")})
        current: list[str] = []
        for j in items:
            prefix = f"{root}.{j}"
            if f"{prefix}.resample.1.weight" in refs:
                stages.append((current, prefix))
                current = []
            elif f"{prefix}.to_qkv.weight" in refs:
                raise CheckpointError(f"{prefix}: attention inside the down stages (attn_scales) is not supported")
            else:
                current.append(prefix)
        stages.append((current, None))
    if not stages or not stages[0][0]:
        raise CheckpointError("cannot infer the VAE config: no encoder residual blocks found")
    conv1 = "residual.2" if orig else "conv1"
    num_res_blocks = len(stages[0][0])
    dim_mult = tuple(_shape(refs, f"{s[0][0]}.{conv1}.weight")[0] // dim for s in stages)
    temperal_downsample = tuple(f"{s[1]}.time_conv.weight" in refs for s in stages[:-1])
    dec_out = _shape(refs, "decoder.head.2.weight" if orig else "decoder.conv_out.weight")
    dec_dim = dec_out[1] // dim_mult[0]

    mean = std = None
    if stats and stats.get("latents_mean") is not None:
        mean, std = tuple(stats["latents_mean"]), tuple(stats["latents_std"])
    elif z_dim == 16 and not is_residual:
        mean, std = wv.WAN21_LATENTS_MEAN, wv.WAN21_LATENTS_STD
    elif z_dim == 48 and is_residual:
        mean, std = wv.WAN22_LATENTS_MEAN, wv.WAN22_LATENTS_STD
    try:
        return wv.VAEConfig(
            dim=dim,
            z_dim=z_dim,
            dim_mult=dim_mult,
            num_res_blocks=num_res_blocks,
            temperal_downsample=temperal_downsample,
            dec_dim=None if dec_dim == dim else dec_dim,
            is_residual=is_residual,
            patch_size=patch,
            latents_mean=mean,
            latents_std=std,
        )
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's shapes give an invalid VAE config: {e}") from None


# ----------------------------------------------------------------------------- loading


def diffusers_config(cfg: wv.VAEConfig) -> dict:
    """diffusers ``AutoencoderKLWan`` constructor arguments (its config.json) for this architecture."""
    kwargs = {
        "base_dim": cfg.dim,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "temperal_downsample": list(cfg.temperal_downsample),
        "latents_mean": list(cfg.latents_mean) if cfg.latents_mean is not None else None,
        "latents_std": list(cfg.latents_std) if cfg.latents_std is not None else None,
    }
    if cfg.is_residual:
        kwargs.update(decoder_base_dim=cfg.decoder_dim, is_residual=True, in_channels=12, out_channels=12,
                      patch_size=2, scale_factor_spatial=16)  # fmt: skip
    return kwargs


def _diffusers_stats(path: str) -> dict | None:
    """latents_mean/std from a diffusers ``config.json`` beside (or inside) ``path``, if any."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        return None
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable %s: %s", cfg_path, e)
        return None
    if cfg.get("_class_name") != "AutoencoderKLWan":
        return None
    return {"latents_mean": cfg.get("latents_mean"), "latents_std": cfg.get("latents_std")}


def load_vae_state_dict(
    tensors: Mapping[str, Any],
    *,
    config: wv.VAEConfig | None = None,
    dtype=jnp.float32,
    source: str = "state dict",
    stats: Mapping[str, Any] | None = None,
) -> wv.WanVAE:
    """Builds a :class:`WanVAE` from ``name -> tensor`` (numpy arrays or ``TensorRef``s).

    Either naming is accepted; the config is inferred when None. Every tensor must have a
    place of the right shape, else one :class:`CheckpointError` lists all problems.
    A NaN or Inf in a tensor is a :class:`CheckpointError` naming it.
    """
    refs = strip_prefix(tensors, _PREFIXES)
    naming = detect_naming(refs)
    if config is None:
        config = infer_config(refs, stats=stats)
        log.info("%s: inferred %s", source, config)
    vae = nnx.eval_shape(lambda: wv.WanVAE(config, dtype=dtype, rngs=nnx.Rngs(0)))
    table = checkpoint_names(vae, naming)
    missing = sorted(set(table) - set(refs))
    unexpected = sorted(set(refs) - set(table))
    mismatched = [
        f"{k}: {tuple(refs[k].shape)} vs {shape}" for k, (_, shape) in table.items() if k in refs and tuple(refs[k].shape) != shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source} does not fit the Wan VAE config {config} ({naming} naming):"
            + format_key_problems(missing, unexpected, mismatched)
        )
    for key, (var, _) in progress_lib.bar(table.items(), total=len(table), desc="loading VAE", unit="tensor",
                                          delay=progress_lib.DELAY):
        ref = refs[key]
        array = ref.load_finite(key) if isinstance(ref, TensorRef) else check_finite(np.asarray(ref), source, key)
        var.set_value(jnp.asarray(to_jax_layout(np.asarray(array, np.float32), var.get_value().shape), dtype))
    return vae


def load_vae(path: str | os.PathLike, *, config: wv.VAEConfig | None = None, dtype=jnp.float32) -> wv.WanVAE:
    """Loads a Wan VAE: original ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` or diffusers safetensors.

    ``path`` may be a file, a sharded index, or a directory (diffusers ``vae/`` folder: its
    ``config.json`` supplies the latent statistics). ``config`` overrides inference.
    ``.pth`` files are read without torch and without executing pickle code.
    """
    path = os.fspath(path)
    refs = open_checkpoint(path)
    return load_vae_state_dict(refs, config=config, dtype=dtype, source=path, stats=_diffusers_stats(path))


# ----------------------------------------------------------------------------- saving


def save_vae(vae: wv.WanVAE, path: str | os.PathLike) -> str:
    """Writes ``vae`` as a diffusers ``AutoencoderKLWan`` folder (``config.json`` with its latent
    statistics + ``diffusion_pytorch_model.safetensors``, fp32); ``load_vae(path)`` reads it
    back with the same architecture and statistics (any width: the config is inferred from
    the shapes). Returns the folder."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = {"_class_name": "AutoencoderKLWan", **diffusers_config(vae.config)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: v.astype(np.float32) for k, v in export_state_dict(vae, DIFFUSERS).items()}
    write_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"), tensors, metadata={"format": "pt"})
    return path
