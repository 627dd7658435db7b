"""Wan DiT checkpoint naming: original/DiffSynth, diffusers and ComfyUI keys, the torch <-> JAX
tensor layouts, and where each checkpoint tensor lives in a ``WanDiT`` (its slot). Shared by
the DiT loader (``checkpoints.dit``) and the LoRA files (``checkpoints.lora_files``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from facecam_jax.checkpoints.io import CheckpointError, TensorRef, strip_prefix
from facecam_jax.models.wan_dit import PRESETS, DiTConfig

log = logging.getLogger(__name__)

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# ------------------------------------------------------------------ naming tables
# kind: how a torch tensor becomes the JAX parameter ("linear": transpose, "conv": [O,I,t,h,w] ->
# [t,h,w,I,O], "squeeze": drop the leading 1, "copy": as is).

_TOP: list[tuple[str, tuple[str, ...], str]] = [
    ("patch_embedding.weight", ("patch_embedding", "kernel"), "conv"),
    ("patch_embedding.bias", ("patch_embedding", "bias"), "copy"),
    ("head.modulation", ("head", "modulation"), "squeeze"),
]
for _orig, _mine in [
    ("text_embedding.0", ("text_embedding", "fc1")),
    ("text_embedding.2", ("text_embedding", "fc2")),
    ("time_embedding.0", ("time_embedding", "fc1")),
    ("time_embedding.2", ("time_embedding", "fc2")),
    ("time_projection.1", ("time_projection",)),
    ("head.head", ("head", "head")),
]:
    _TOP += [(f"{_orig}.weight", (*_mine, "kernel"), "linear"), (f"{_orig}.bias", (*_mine, "bias"), "copy")]

_BLOCK: list[tuple[str, tuple[str, ...], str]] = [
    ("modulation", ("modulation",), "squeeze"),
    ("norm3.weight", ("norm3", "scale"), "copy"),
    ("norm3.bias", ("norm3", "bias"), "copy"),
    ("ffn.0.weight", ("ffn", "fc1", "kernel"), "linear"),
    ("ffn.0.bias", ("ffn", "fc1", "bias"), "copy"),
    ("ffn.2.weight", ("ffn", "fc2", "kernel"), "linear"),
    ("ffn.2.bias", ("ffn", "fc2", "bias"), "copy"),
]
for _attn in ("self_attn", "cross_attn"):
    for _p in "qkvo":
        _BLOCK += [
            (f"{_attn}.{_p}.weight", (_attn, _p, "kernel"), "linear"),
            (f"{_attn}.{_p}.bias", (_attn, _p, "bias"), "copy"),
        ]
    _BLOCK += [(f"{_attn}.norm_{n}.weight", (_attn, f"norm_{n}", "scale"), "copy") for n in "qk"]

# ReCamMaster's per-block camera layers (``wan_dit.add_camera_layers``), in its DiffSynth naming.
_CAMERA_BLOCK: list[tuple[str, tuple[str, ...], str]] = []
for _layer in ("cam_encoder", "projector"):
    _CAMERA_BLOCK += [(f"{_layer}.weight", (_layer, "kernel"), "linear"), (f"{_layer}.bias", (_layer, "bias"), "copy")]
CAMERA_KEY_RE = re.compile(r"^blocks\.\d+\.(cam_encoder|projector)\.")

# CameraCtrl II's camera patchify (``wan_dit.add_camera_patch``): Plücker rays and the context
# mask, laid out like the patch embedding. This project's own layer: no released checkpoint names it.
_CAMERA_PATCH: list[tuple[str, tuple[str, ...], str]] = [
    ("camera_patch.weight", ("camera_patch", "kernel"), "conv"),
    ("camera_patch.bias", ("camera_patch", "bias"), "copy"),
]

# FactorPortrait's expression controller (``wan_dit.add_expression_layers``), named like torch
# modules of the same structure. This project's own layers: no released checkpoint names them.
_EXPRESSION: list[tuple[str, tuple[str, ...], str]] = []
for _mine in (("proj",), ("out",), *((f"layer{_i}", _p) for _i in range(2) for _p in "qkvo"),
              *((f"layer{_i}", "ffn", _fc) for _i in range(2) for _fc in ("fc1", "fc2"))):
    _name = "expression." + ".".join(_mine)
    _EXPRESSION += [(f"{_name}.weight", ("expression", *_mine, "kernel"), "linear"),
                    (f"{_name}.bias", ("expression", *_mine, "bias"), "copy")]
for _i in range(2):
    for _norm in ("norm1", "norm2"):
        _EXPRESSION += [(f"expression.layer{_i}.{_norm}.weight", ("expression", f"layer{_i}", _norm, "scale"), "copy"),
                        (f"expression.layer{_i}.{_norm}.bias", ("expression", f"layer{_i}", _norm, "bias"), "copy")]

_TOP_BY_PATH = {path: (name, kind) for name, path, kind in _TOP + _CAMERA_PATCH + _EXPRESSION}
_BLOCK_BY_PATH = {path: (name, kind) for name, path, kind in _BLOCK + _CAMERA_BLOCK}

# diffusers <-> original names (block-local and top-level).
_DIFFUSERS_BLOCK = {
    "scale_shift_table": "modulation",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
for _d, _o in (("attn1", "self_attn"), ("attn2", "cross_attn")):
    _DIFFUSERS_BLOCK.update(
        {
            f"{_d}.to_q": f"{_o}.q",
            f"{_d}.to_k": f"{_o}.k",
            f"{_d}.to_v": f"{_o}.v",
            f"{_d}.to_out.0": f"{_o}.o",
            f"{_d}.norm_q": f"{_o}.norm_q",
            f"{_d}.norm_k": f"{_o}.norm_k",
        }
    )
_DIFFUSERS_TOP = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
    "patch_embedding": "patch_embedding",
}
BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(name: str, block_map: Mapping[str, str], top_map: Mapping[str, str]) -> str:
    """Renames by the longest matching module prefix (``prefix`` or ``prefix.<param>``)."""

    def sub(local: str, table: Mapping[str, str]) -> str:
        for src in sorted(table, key=len, reverse=True):
            if local == src or local.startswith(src + "."):
                return table[src] + local[len(src) :]
        return local

    m = BLOCK_RE.match(name)
    if m:
        return f"blocks.{m.group(1)}.{sub(m.group(2), block_map)}"
    return sub(name, top_map)


def diffusers_to_original(name: str) -> str:
    return _rename(name, _DIFFUSERS_BLOCK, _DIFFUSERS_TOP)


def original_to_diffusers(name: str) -> str:
    inv_block = {v: k for k, v in _DIFFUSERS_BLOCK.items()}
    inv_top = {v: k for k, v in _DIFFUSERS_TOP.items()}
    return _rename(name, inv_block, inv_top)


def detect_naming(names: Iterable[str]) -> str:
    """'diffusers' or 'original' (Wan / DiffSynth naming), from the key names."""
    names = list(names)
    if any(n.startswith("condition_embedder.") or ".attn1." in n or n.startswith("proj_out.") for n in names):
        return "diffusers"
    return "original"


def to_original_naming(refs: Mapping[str, Any]) -> dict[str, Any]:
    """Strips a ComfyUI prefix and converts diffusers names, so keys are in original naming."""
    refs = strip_prefix(refs, COMFY_PREFIXES)
    if detect_naming(refs) == "diffusers":
        refs = {diffusers_to_original(k): v for k, v in refs.items()}
    return dict(refs)


# ------------------------------------------------------------------ layout transforms


def to_jax_layout(kind: str, x):
    """A torch-layout tensor (numpy, or jax inside a jitted update) in the JAX layout of ``kind``."""
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 4, 1, 0)
    if kind == "squeeze":
        return x.reshape(x.shape[1:]) if x.shape[:1] == (1,) else x
    return x


def to_torch_layout(kind: str, x):
    """A JAX-layout parameter of ``kind`` in the torch layout checkpoints hold."""
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(4, 3, 0, 1, 2)
    if kind == "squeeze":
        return x[None]
    return x


def torch_shape(kind: str, jax_shape) -> tuple[int, ...]:
    """The torch-layout shape of a parameter of ``kind`` whose JAX shape is ``jax_shape``."""
    return tuple(to_torch_layout(kind, np.empty(jax_shape, np.bool_)).shape)


def jax_shape(kind: str, torch_shape_) -> tuple[int, ...]:
    """The JAX-layout shape of a checkpoint tensor of ``kind`` whose torch shape is given."""
    return tuple(to_jax_layout(kind, np.empty(torch_shape_, np.bool_)).shape)


# ------------------------------------------------------------------ model <-> names


@dataclasses.dataclass(frozen=True)
class Slot:
    """One checkpoint tensor's place in the model: a variable path, optional layer index."""

    path: tuple[str, ...]
    layer: int | None
    kind: str


def _path_str(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def named_variables(state) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    """``(path of attribute names, variable)`` for every variable of an nnx state."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]
    return [(_path_str(p), v) for p, v in leaves]


def keys_of_paths(config: DiTConfig, paths) -> list[str]:
    """Original-naming keys of the model variables at ``paths`` (tuples of attribute names; camera
    layers included when the paths name them)."""
    paths = set(paths)
    slots = model_slots(config, camera_layers=True, camera_patch=True, expression=True)
    return [k for k, slot in slots.items() if slot.path in paths]


def slots_of(model) -> dict[str, Slot]:
    """``model_slots`` of a model as built: with its camera layers, camera patchify and expression
    controller when it has them."""
    return model_slots(model.config, camera_layers=model.has_camera_layers, camera_patch=model.camera_patch is not None,
                       expression=model.expression is not None)


def model_slots(config: DiTConfig, camera_layers: bool = False, camera_patch: bool = False,
                expression: bool = False) -> dict[str, Slot]:
    """Original-naming key -> slot, for every tensor a checkpoint of ``config`` must hold
    (``camera_layers``: also ReCamMaster's ``blocks.N.cam_encoder`` / ``projector``;
    ``camera_patch``: CameraCtrl II's ``camera_patch``; ``expression``: FactorPortrait's
    ``expression.*``)."""
    slots = {}
    for name, path, kind in _TOP + (_CAMERA_PATCH if camera_patch else []) + (_EXPRESSION if expression else []):
        slots[name] = Slot(path, None, kind)
    for i in range(config.num_layers):
        for name, path, kind in _BLOCK:
            if path[0] == "norm3" and not config.cross_attn_norm:
                continue
            if "norm_q" in path or "norm_k" in path:
                if not config.qk_norm:
                    continue
            slots[f"blocks.{i}.{name}"] = Slot(("blocks", *path), i, kind)
        for name, path, kind in _CAMERA_BLOCK if camera_layers else ():
            slots[f"blocks.{i}.{name}"] = Slot(("blocks", *path), i, kind)
    return slots


# ------------------------------------------------------------------ config inference


def infer_config(refs: Mapping[str, TensorRef], head_dim: int = 128) -> DiTConfig:
    """The architecture of an original-naming checkpoint from its shapes (a preset when one matches)."""
    need = ["patch_embedding.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight"]
    missing = [k for k in need if k not in refs]
    if missing:
        raise CheckpointError(f"cannot infer the DiT architecture: keys {missing} are missing; is this a Wan DiT?")
    pe = refs["patch_embedding.weight"].shape  # [D, Cin, pt, ph, pw]
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    if dim % head_dim:
        raise CheckpointError(f"dim {dim} is not a multiple of head_dim {head_dim}; pass config= explicitly")
    layers = 1 + max(int(m.group(1)) for k in refs if (m := BLOCK_RE.match(k)))
    cfg = DiTConfig(
        dim=dim,
        ffn_dim=refs["blocks.0.ffn.0.weight"].shape[0],
        num_heads=dim // head_dim,
        num_layers=layers,
        in_dim=in_dim,
        out_dim=refs["head.head.weight"].shape[0] // math.prod(patch),
        freq_dim=refs["time_embedding.0.weight"].shape[1],
        text_dim=refs["text_embedding.0.weight"].shape[1],
        patch_size=patch,
        qk_norm="blocks.0.self_attn.norm_q.weight" in refs,
        cross_attn_norm="blocks.0.norm3.weight" in refs,
    )
    for name, preset in PRESETS.items():
        if preset == cfg:
            log.info("checkpoint matches preset %s", name)
            return preset
    return cfg
