"""Wan LoRA files: read every common naming, merge into a ``WanDiT`` (sharded), export PEFT.

Namings read (prefixes ``transformer.``, ``diffusion_model.``, ``model.diffusion_model.``,
``base_model.model.`` or none; module names in diffusers or original Wan naming, mapped by
the tables of ``checkpoints.dit``):

- diffusers / PEFT: ``blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` (+ ``.lora_B.bias``),
  alpha from the ``lora_adapter_metadata`` that diffusers writes (``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``) or from ``<module>.alpha`` tensors;
- ComfyUI / kohya: ``blocks.0.self_attn.q.lora_down.weight`` / ``.lora_up.weight`` + ``.alpha``,
  and the flat ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` style;
- full-weight ``<module>.diff`` (weights, norms, modulation) and ``<module>.diff_b`` (biases).

A LoRA of the patch embedding (a Conv3d LoRA: ``[r, Cin, pt, ph, pw]`` / ``[D, r, 1, 1, 1]``)
merges like the others, although this project's own adapters leave that layer to full training.

Without an alpha the scale is 1 (alpha = rank). ``apply_loras`` checks every key and shape
of every file before it changes a parameter, then adds ``strength * scale * B @ A`` (and
``strength * diff``) one layer at a time in a jitted update that keeps each parameter's
sharding, so no device ever holds more than its shard of a parameter. ``save_lora`` writes
a model's adapters as diffusers' ``save_lora_weights`` does, which ``load_lora_weights`` and
``apply_loras`` both read back.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import re
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import sharding as sh
from facecam_jax.models import quant
from facecam_jax.checkpoints.dit import (
    COMFY_PREFIXES,
    diffusers_to_original,
    keys_of_paths,
    model_slots,
    named_variables,
    original_to_diffusers,
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
    write_safetensors,
)
from facecam_jax.models.lora import adapted_linears, lora_rank_alpha
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


def _scale(refs, roles, peft, written_name, rank) -> float:
    """alpha / rank from the module's ``.alpha``, else PEFT metadata (rsLoRA: / sqrt(rank)); else 1."""
    if "alpha" in roles:
        return float(np.asarray(refs[roles["alpha"]].load(), np.float64).reshape(-1)[0]) / rank
    alpha = _peft_alpha(peft, written_name)
    if alpha is None:
        return 1.0
    return alpha / (math.sqrt(rank) if peft.get("use_rslora") else rank)


def read_lora(path: str | os.PathLike, model: WanDiT) -> LoraFile:
    """Maps a LoRA file onto ``model``'s parameters and checks every shape (reads only alphas).

    Raises one ``CheckpointError`` for a LoRA made for another model size, mis-shaped or
    incomplete entries, or unsupported adapter kinds (DoRA, LoHa, LoKr); keys that match no
    parameter are returned in ``unmatched`` for the caller to judge.
    """
    source = os.fspath(path)
    refs = open_checkpoint(source)
    cfg = model.config
    slots = model_slots(cfg)
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
                scale = _scale(refs, roles, peft, written[module], rank)
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


# ------------------------------------------------------------------ merging


def _add(w, layer, delta, stacked, qscale=None):
    """``w[layer] + delta`` (the whole ``w`` when not stacked). A quantized kernel comes with its
    per-channel ``qscale``: the sum is taken on the dequantized layer, which is quantized again
    (``quant.quantize_array``); returns ``(w, qscale)`` then."""
    row = w[layer] if stacked else w
    if qscale is None:
        new = (row.astype(jnp.float32) + delta).astype(w.dtype)
        return jax.lax.dynamic_update_index_in_dim(w, new, layer, 0) if stacked else new
    srow = qscale[layer] if stacked else qscale
    q, s = quant.quantize_array(quant.dequantize_array(row, srow) + delta, quant.storage_mode(w.dtype))
    if not stacked:
        return q, s
    return (jax.lax.dynamic_update_index_in_dim(w, q, layer, 0),
            jax.lax.dynamic_update_index_in_dim(qscale, s, layer, 0))


@functools.cache
def _lora_update(kind: str, shape: tuple[int, ...], stacked: bool, sharding, qsharding=None):
    """Jitted ``w[layer] += scale * (up @ down)`` in the JAX layout; w donated, sharding kept.
    ``qsharding``: w is quantized and the function takes and returns its scale too."""

    def update(w, qscale, layer, down, up, scale):
        delta = jnp.matmul(up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1),
                           precision=jax.lax.Precision.HIGHEST)  # [out, in...] torch layout
        return _add(w, layer, to_jax_layout(kind, delta.reshape(shape)) * scale, stacked, qscale)

    return _jit(update, sharding, qsharding)


@functools.cache
def _diff_update(stacked: bool, sharding, qsharding=None):
    """Jitted ``w[layer] += scale * diff`` (diff already in the JAX layout); w donated."""
    return _jit(lambda w, qscale, layer, d, scale: _add(w, layer, d * scale, stacked, qscale), sharding, qsharding)


def _jit(fn, sharding, qsharding=None):
    # Without a mesh the output stays uncommitted like load_dit's arrays, so a model's forward
    # compiles once whether or not LoRAs were merged into it.
    out = {} if sharding is None else {"out_shardings": sharding if qsharding is None else (sharding, qsharding)}
    return jax.jit(fn, donate_argnums=(0, 1), **out)


def _on(target: NamedSharding | None, spec):
    """Places host arrays on ``target``'s mesh with ``spec``; without a mesh they stay on the host."""
    if target is None:
        return lambda x: x
    return lambda x: jax.device_put(x, NamedSharding(target.mesh, spec))


def _merge(model: WanDiT, lora: LoraFile, strength: float, mesh, rules) -> None:
    slots = model_slots(model.config)
    state = nnx.state(model)
    variables = dict(named_variables(state))
    for e in lora.entries:
        slot = slots[e.target]
        var = variables[slot.path]
        w = var.get_value()
        if isinstance(w, jax.ShapeDtypeStruct):
            raise ValueError("apply_loras needs a model with values, not an abstract one")
        if mesh is not None:
            target = sh.logical_sharding(sh.variable_axes(var), w.shape, mesh, rules)
        else:
            target = w.sharding if isinstance(w.sharding, NamedSharding) else None
        if target is not None and w.sharding != target:
            w = jax.device_put(w, target)
        stacked = slot.layer is not None
        # A weight-only quantized kernel (load_dit(quantize=...)) has its scale beside it.
        qvar = variables.get((*slot.path[:-1], "scale")) if slot.path[-1] == "kernel" else None
        qscale = qsharding = None
        if qvar is not None:
            qscale = qvar.get_value()
            qsharding = quant.scale_sharding(target, w.ndim) if target is not None else None
        small = _on(target, PartitionSpec())  # factors and scalars: replicated
        layer, scale = small(np.int32(slot.layer or 0)), small(np.float32(strength * e.scale))
        if e.down is not None:
            shape = torch_shape(slot.kind, w.shape[1:] if stacked else w.shape)
            down, up = small(e.down.load().astype(np.float32)), small(e.up.load().astype(np.float32))
            out = _lora_update(slot.kind, shape, stacked, target, qsharding)(w, qscale, layer, down, up, scale)
        else:  # a full diff is placed like one layer of the parameter, never whole on one device
            row = _on(target, None if target is None else PartitionSpec(*target.spec[int(stacked):]))
            d = np.ascontiguousarray(to_jax_layout(slot.kind, e.diff.load().astype(np.float32)))
            out = _diff_update(stacked, target, qsharding)(w, qscale, layer, row(d), scale)
        if qvar is None:
            var.set_value(out)
        else:
            var.set_value(out[0])
            qvar.set_value(out[1])
    nnx.update(model, state)


def apply_loras(
    model: WanDiT,
    loras: Sequence[str | os.PathLike | tuple[str | os.PathLike, float]],
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sh.Rules = sh.DEFAULT_RULES,
    unmatched: str = "error",
) -> list[LoraReport]:
    """Merges LoRA files into ``model`` in place: ``W += strength * scale * B @ A`` and diffs.

    ``loras``: ``(file, strength)`` pairs, or files (strength 1). Every file is read and checked
    before any parameter changes. ``mesh``: parameters end on their logical sharding (else
    each keeps its current one). ``unmatched="error"`` raises a ``CheckpointError`` naming
    keys that match no layer; ``"warn"`` skips them with one warning per file that counts them.
    """
    if unmatched not in ("error", "warn"):
        raise ValueError(f"unmatched must be 'error' or 'warn', got {unmatched!r}")
    items = [(item, 1.0) if isinstance(item, (str, os.PathLike)) else (item[0], float(item[1])) for item in loras]
    files = []
    for path, strength in items:
        lora = read_lora(path, model)
        if lora.unmatched and unmatched == "error":
            raise CheckpointError(
                f"{lora.source}: LoRA keys match no layer of this DiT (pass unmatched='warn' to skip them):"
                + format_key_problems(unexpected=lora.unmatched)
            )
        if lora.unmatched:
            warnings.warn(
                f"{lora.source}: skipped {len(lora.unmatched)} LoRA keys that match no layer of this DiT "
                f"(e.g. {lora.unmatched[:3]})",
                stacklevel=2,
            )
        files.append((lora, strength))
    reports = []
    for lora, strength in files:
        _merge(model, lora, strength, mesh, rules)
        pairs = sum(e.down is not None for e in lora.entries)
        reports.append(LoraReport(lora.source, strength, pairs, len(lora.entries) - pairs, len(lora.unmatched)))
    return reports


# ------------------------------------------------------------------ export


def save_lora(
    model: WanDiT,
    path: str | os.PathLike,
    *,
    prefix: str = "transformer",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Writes ``model``'s adapters as diffusers' ``WanLoraLoaderMixin.save_lora_weights`` does.

    Keys ``transformer.blocks.N.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` (``prefix=""``:
    none, as ``save_lora_adapter`` writes), rank and alpha in the ``lora_adapter_metadata``
    PEFT config, so ``load_lora_weights`` and ``apply_loras`` at strength 1 reproduce the
    adapted model. ``path``: a ``.safetensors`` file, or a directory that receives
    ``pytorch_lora_weights.safetensors``. ``metadata``: extra string entries (e.g. the expert).
    The patch embedding has no adapter (see ``models.lora``): export it with ``save_dit(keys=)``.
    """
    layers = adapted_linears(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save; add_lora(model, ...) adds them")
    slots = model_slots(model.config)
    tensors: dict[str, Any] = {}
    rank_alpha: dict[str, tuple[int, float]] = {}
    for path_, layer in layers:
        rank, alpha = lora_rank_alpha(layer)
        a, b = np.asarray(layer.lora_a.get_value()), np.asarray(layer.lora_b.get_value())
        for key in keys_of_paths(model.config, [(*path_, "kernel")]):
            idx = slots[key].layer
            module = original_to_diffusers(key[: -len(".weight")])
            rank_alpha[module] = (rank, alpha)
            a_i, b_i = (a, b) if idx is None else (a[idx], b[idx])
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a_i.T)  # [r, din]
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b_i.T)  # [dout, r]
    (rank, alpha), _ = collections.Counter(rank_alpha.values()).most_common(1)[0]
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {m: r for m, (r, _) in rank_alpha.items() if r != rank},
        "alpha_pattern": {m: a for m, (_, a) in rank_alpha.items() if a != alpha},
        "target_modules": sorted(rank_alpha),
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
    }
    if prefix:
        tensors = {f"{prefix}.{k}": v for k, v in tensors.items()}
        config = {f"{prefix}.{k}": v for k, v in config.items()}
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True), **dict(metadata or {})}
    write_safetensors(path, tensors, metadata=meta)
    return path
