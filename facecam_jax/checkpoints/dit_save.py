"""Writing a Wan DiT: diffusers-format (or original-naming) safetensors, with a diffusers
``config.json`` when given a directory, one tensor at a time (``save_dit``). A weight-only
quantized model cannot be written (no Wan checkpoint format holds it).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import numpy as np
from flax import nnx

from facecam_jax.checkpoints.dit_naming import (
    named_variables,
    original_to_diffusers,
    slots_of,
    to_torch_layout,
)
from facecam_jax.checkpoints.io import (
    write_safetensors,
)
from facecam_jax.models import quant
from facecam_jax.models.wan_dit import DiTConfig, WanDiT

log = logging.getLogger(__name__)


def _named_tensors(model: WanDiT, naming: str, keys=None) -> dict[str, Callable[[], np.ndarray]]:
    """name -> callable producing the torch-layout tensor (streams one tensor at a time). Of a
    quantized model only float tensors can be written (``keys``: e.g. a QLoRA run's trained
    patch embedding and norms)."""
    variables = dict(named_variables(nnx.state(model)))
    slots = slots_of(model)
    if keys is not None:
        unknown = sorted(set(keys) - set(slots))
        if unknown:
            raise ValueError(f"not parameters of this model (original naming expected): {unknown[:10]}")
        slots = {k: slots[k] for k in keys}
    quantized = [k for k, slot in slots.items() if np.dtype(variables[slot.path].get_value().dtype).itemsize == 1]
    if quantized:
        refuse_quantized(model, f" ({quantized[0]} and {len(quantized) - 1} more)")
    out = {}
    for name, slot in slots.items():
        var = variables[slot.path]

        def get(var=var, slot=slot):
            x = var.get_value() if slot.layer is None else var.get_value()[slot.layer]
            return np.ascontiguousarray(to_torch_layout(slot.kind, np.asarray(x)))

        out[original_to_diffusers(name) if naming == "diffusers" else name] = get
    return out


def refuse_quantized(model: WanDiT, which: str = ""):
    mode = quant.quantization_mode(model)
    if mode != "none":
        raise ValueError(
            f"this model's block linears are {mode}-quantized{which}, which no Wan checkpoint format holds; save the "
            "float model and quantize when loading it (load_dit(..., quantize=...))"
        )


def diffusers_config(cfg: DiTConfig) -> dict:
    """A diffusers ``WanTransformer3DModel`` config.json for this architecture."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
        "eps": cfg.eps,
    }


def save_dit(model: WanDiT, path: str | os.PathLike, *, naming: str = "diffusers", keys=None) -> str:
    """Writes the model as diffusers (default) or original-naming safetensors; returns the file.

    ``path`` ending in ``.safetensors`` is the file; otherwise a directory is created holding
    ``diffusion_pytorch_model.safetensors`` and a diffusers ``config.json``. ``keys``
    (original naming) writes only those tensors: a partial state dict for ``overlay=``.
    """
    if naming not in ("diffusers", "original"):
        raise ValueError(f"naming must be 'diffusers' or 'original', got {naming!r}")
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        file = path
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "diffusion_pytorch_model.safetensors")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(diffusers_config(model.config), f, indent=2)
    write_safetensors(file, _named_tensors(model, naming, keys), metadata={"format": "pt"})
    return file


