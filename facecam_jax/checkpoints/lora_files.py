"""Wan LoRA files: every common naming read, checked against a ``WanDiT`` and mapped to the
parameters each entry changes (``read_lora``), before anything is merged.

Namings read (prefixes ``transformer.``, ``diffusion_model.``, ``model.diffusion_model.``,
``base_model.model.`` or none; module names in diffusers or original Wan naming, mapped by
the tables of ``checkpoints.dit_naming``):

- diffusers / PEFT: ``blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` (+ ``.lora_B.bias``),
  alpha from the ``lora_adapter_metadata`` that diffusers writes (``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``) or from ``<module>.alpha`` tensors;
- ComfyUI / kohya: ``blocks.0.self_attn.q.lora_down.weight`` / ``.lora_up.weight`` + ``.alpha``,
  and the flat ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` style;
- full-weight ``<module>.diff`` (weights, norms, modulation) and ``<module>.diff_b`` (biases).

A LoRA of the patch embedding (a Conv3d LoRA: ``[r, Cin, pt, ph, pw]`` / ``[D, r, 1, 1, 1]``)
maps like the others. Without an alpha the scale is 1 (alpha = rank).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from facecam_jax.checkpoints.dit_naming import (
    COMFY_PREFIXES,
    diffusers_to_original,
    named_variables,
    original_to_diffusers,
    slots_of,
    to_jax_layout,
    torch_shape,
)
from facecam_jax.checkpoints.io import (
    CheckpointError,
    TensorRef,
    checkpoint_files,
    format_key_problems,
    open_checkpoint,
    read_safetensors_header,
)
from facecam_jax.models.wan_dit import WanDiT

PREFIXES = ("base_model.model.", "transformer.", *COMFY_PREFIXES)
FLAT_PREFIXES = ("lora_unet_", "lora_transformer_")  # kohya: module path with "." -> "_"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# Key suffix -> role; the longest suffix is tried first.
_ROLES = {
    ".lora_A.weight": "down",
    ".lora_down.weight": "down",
    ".lora_B.weight": "up",
    ".lora_up.weight": "up",
    ".lora_B.bias": "up_bias",
    ".lora_up.bias": "up_bias",
    ".alpha": "alpha",
    ".diff": "diff",
    ".diff_b": "diff_b",
}
_UNSUPPORTED = (".dora_scale", ".lora_magnitude_vector", ".hada_", ".lokr_")
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class LoraEntry:
    """One update of one model parameter (original-naming key ``target``)."""

    target: str
    keys: tuple[str, ...]  # the file's keys that make it
    scale: float  # alpha / rank (LoRA pairs and lora_B biases), 1 for diffs
    down: TensorRef | None = None  # [r, *in]: a LoRA pair when set
    up: TensorRef | None = None  # [out, r, 1...]
    diff: TensorRef | None = None  # a full-tensor difference (torch layout) otherwise


@dataclasses.dataclass
class LoraFile:
    source: str
    entries: list[LoraEntry]
    unmatched: list[str]


@dataclasses.dataclass
class LoraReport:
    source: str
    strength: float
    lora_pairs: int
    diffs: int
    skipped: int

    def summary(self) -> str:
        skipped = f", skipped {self.skipped} unmatched keys" if self.skipped else ""
        return (
            f"LoRA {self.source} at strength {self.strength:g}: merged {self.lora_pairs} low-rank updates "
            f"and {self.diffs} diffs{skipped}"
        )


# ------------------------------------------------------------------ reading


def _peft_config(path: str) -> dict:
    """The PEFT LoraConfig diffusers stores in safetensors metadata (``transformer.``-prefixed or not)."""
    meta: dict = {}
    for file in checkpoint_files(path):
        if file.endswith(".safetensors"):
            raw = read_safetensors_header(file)[1].get(METADATA_KEY)
            if raw:
                try:
                    meta.update(json.loads(raw))
                except json.JSONDecodeError as e:
                    raise CheckpointError(f"{file}: corrupt {METADATA_KEY} metadata ({e})") from None
    prefixed = {k[len("transformer.") :]: v for k, v in meta.items() if k.startswith("transformer.")}
    return prefixed or meta


def _peft_alpha(config: Mapping[str, Any], module: str) -> float | None:
    """PEFT's alpha for ``module``: the first matching ``alpha_pattern`` key, else ``lora_alpha``."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):  # peft.utils.other.get_pattern_key
            return float(alpha)
    return None if config.get("lora_alpha") is None else float(config["lora_alpha"])


def _flat_names(slots) -> dict[str, str]:
    """kohya's flattened module names (original and diffusers spelling) -> original module name."""
    out = {}
    for key in slots:
        module = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
        for name in (module, original_to_diffusers(module)):
            out[name.replace(".", "_")] = module
    return out


def _split_key(key: str, flat: Mapping[str, str]) -> tuple[str | None, str | None, str]:
    """``(module as written after the prefix, original-naming module, role)``; None when unknown."""
    name = key
    for p in PREFIXES:
        name = name.removeprefix(p)
    role = None
    for suffix in sorted(_ROLES, key=len, reverse=True):
        if name.endswith(suffix):
            name, role = name[: -len(suffix)], _ROLES[suffix]
            break
    if role is None:
        return None, None, "unsupported" if any(u in key for u in _UNSUPPORTED) else "unknown"
    for p in FLAT_PREFIXES:
        if name.startswith(p):
            local = name[len(p) :]
            if local not in flat and (m := re.match(r"blocks_(\d+)_", local)):
                return name, f"blocks.{m.group(1)}.{local}", role  # unknown: keeps its layer index
            return name, flat.get(local), role
    return name, diffusers_to_original(name), role


def _group(refs, flat, num_layers):
    """File keys by original-naming module and role, and the keys that cannot be grouped."""
    groups: dict[str, dict[str, str]] = collections.defaultdict(dict)  # module -> role -> key
    written: dict[str, str] = {}  # module -> its name as the file writes it (PEFT patterns match that)
    unmatched, unsupported, out_of_range = [], [], []
    for key in refs:
        written_name, module, role = _split_key(key, flat)
        if role == "unsupported":
            unsupported.append(key)
        elif module is None:
            unmatched.append(key)
        elif (m := _BLOCK_INDEX.match(module)) and int(m.group(1)) >= num_layers:
            out_of_range.append(key)
        elif role in groups[module]:
            raise CheckpointError(f"{key} and {groups[module][role]} both update {module} ({role})")
        else:
            groups[module][role] = key
            written[module] = written_name
    return groups, written, unmatched, unsupported, out_of_range


def _scale(source, refs, roles, peft, written_name, rank) -> float:
    """alpha / rank from the module's ``.alpha``, else PEFT metadata (rsLoRA: / sqrt(rank)); else 1."""
    if rank == 0:  # an empty pair adds nothing
        return 1.0
    if "alpha" in roles:
        key = roles["alpha"]
        alpha = np.asarray(refs[key].load_finite(key), np.float64).reshape(-1)
        if alpha.size != 1:
            raise CheckpointError(f"{refs[key].path}: {key} holds {alpha.size} values, not one alpha")
        return float(alpha[0]) / rank
    alpha = _peft_alpha(peft, written_name)
    if alpha is None:
        return 1.0
    if not math.isfinite(alpha):
        raise CheckpointError(f"{source}: the {METADATA_KEY} metadata gives {written_name} alpha {alpha}")
    return alpha / (math.sqrt(rank) if peft.get("use_rslora") else rank)


def _check_values(entries: list[LoraEntry]) -> None:
    """Reads every tensor of ``entries``, one at a time, so a NaN or Inf fails before a parameter changes.

    A LoRA file is small (its pairs are low rank), so reading it again to merge costs little.
    """
    for e in entries:
        for key, ref in zip(e.keys, (e.down, e.up) if e.down is not None else (e.diff,)):
            ref.load_finite(key)


def read_lora(path: str | os.PathLike, model: WanDiT) -> LoraFile:
    """Maps a LoRA file onto ``model``'s parameters and checks every shape and value.

    Raises one ``CheckpointError`` for a LoRA made for another model size, mis-shaped or
    incomplete entries, unsupported adapter kinds (DoRA, LoHa, LoKr), or a NaN or Inf in a
    tensor it maps (naming it; every mapped tensor is read once for this); keys that match no
    parameter are returned in ``unmatched`` for the caller to judge.
    """
    source = os.fspath(path)
    refs = open_checkpoint(source)
    cfg = model.config
    slots = slots_of(model)
    shapes = {p: tuple(np.shape(v.get_value())) for p, v in named_variables(nnx.state(model))}
    peft = _peft_config(source)
    if peft.get("use_dora"):
        raise CheckpointError(f"{source}: a DoRA adapter (use_dora in its metadata); only plain LoRA is supported")
    flat = _flat_names(slots)
    try:
        groups, written, unmatched, unsupported, out_of_range = _group(refs, flat, cfg.num_layers)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None

    def model_shape(key):  # torch-layout shape of a model parameter (one layer)
        slot = slots[key]
        return torch_shape(slot.kind, shapes[slot.path][1:] if slot.layer is not None else shapes[slot.path])

    def jax_shape(key, shape):
        return tuple(to_jax_layout(slots[key].kind, np.empty(shape, np.bool_)).shape)

    entries: list[LoraEntry] = []
    mismatched, incomplete = [], []

    def add_diff(target, key, scale):
        if target is None:
            unmatched.append(key)
        elif jax_shape(target, refs[key].shape) != jax_shape(target, model_shape(target)):
            mismatched.append(f"{key}: {tuple(refs[key].shape)} vs {model_shape(target)} of {target}")
        else:
            entries.append(LoraEntry(target, (key,), scale, diff=refs[key]))

    for module, roles in groups.items():
        weight = f"{module}.weight" if f"{module}.weight" in slots else module if module in slots else None
        bias = f"{module}.bias" if f"{module}.bias" in slots else None
        pair = [roles[r] for r in ("down", "up", "alpha", "up_bias") if r in roles]
        if pair and (weight is None or slots[weight].kind not in ("linear", "conv")):
            unmatched += pair
        elif pair and ("down" not in roles or "up" not in roles):
            incomplete += pair
        elif pair:
            down, up = refs[roles["down"]], refs[roles["up"]]
            rank = down.shape[0] if down.shape else 0
            want = model_shape(weight)
            if not (len(up.shape) >= 2 and up.shape[1] == rank and math.prod(up.shape[2:]) == 1
                    and (up.shape[0], *down.shape[1:]) == want):
                mismatched.append(f"{roles['down']} {tuple(down.shape)} / {roles['up']} {tuple(up.shape)}: "
                                  f"not a {want} update of {weight}")
            else:
                scale = _scale(source, refs, roles, peft, written[module], rank)
                entries.append(LoraEntry(weight, (roles["down"], roles["up"]), scale, down=down, up=up))
                if "up_bias" in roles:  # PEFT lora_bias: B's bias is scaled with the pair
                    add_diff(bias, roles["up_bias"], scale)
        if "diff" in roles:
            add_diff(weight, roles["diff"], 1.0)
        if "diff_b" in roles:
            add_diff(bias, roles["diff_b"], 1.0)

    if unsupported:
        raise CheckpointError(
            f"{source}: DoRA / LoHa / LoKr entries are not supported, only plain LoRA and diffs: {unsupported[:5]}"
        )
    if out_of_range or (mismatched and not entries):  # nothing fits: another model size
        raise CheckpointError(
            f"{source}: this LoRA was made for another model size than this DiT (dim {cfg.dim}, ffn_dim "
            f"{cfg.ffn_dim}, {cfg.num_layers} layers, in_dim {cfg.in_dim}); its tensors imply "
            f"{_implied_sizes(refs, flat)}. Load it on the model it was trained for."
            + format_key_problems(unexpected=out_of_range, mismatched=mismatched, limit=5)
        )
    if mismatched or incomplete:
        raise CheckpointError(
            f"{source}: LoRA does not fit the DiT:"
            + format_key_problems(mismatched=mismatched)
            + (f"\n  incomplete LoRA pairs (down without up or the reverse): {incomplete[:20]}" if incomplete else "")
        )
    _check_values(entries)
    return LoraFile(source, entries, sorted(unmatched))


def _implied_sizes(refs: Mapping[str, TensorRef], flat) -> str:
    """The model width, ffn width and depth a LoRA file's shapes imply (for the size error)."""
    dim = ffn = None
    layers = set()
    for key, ref in refs.items():
        _, module, role = _split_key(key, flat)
        if module is None:
            continue
        if m := _BLOCK_INDEX.match(module):
            layers.add(int(m.group(1)))
        if role == "down" and module.endswith("self_attn.q") and len(ref.shape) == 2:
            dim = ref.shape[1]
        if role == "up" and module.endswith("ffn.0") and len(ref.shape) >= 1:
            ffn = ref.shape[0]
    parts = [f"dim {dim}" if dim else None, f"ffn_dim {ffn}" if ffn else None,
             f"at least {max(layers) + 1} layers" if layers else None]
    return ", ".join(p for p in parts if p) or "other shapes"
