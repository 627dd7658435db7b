"""Merging LoRA files into a ``WanDiT`` (sharded, one layer at a time) and exporting a model's
adapters in diffusers/PEFT naming.

``apply_loras`` reads and checks every key, shape and value of every file (``lora_files.read_lora``)
before it changes a parameter, then adds ``strength * scale * B @ A`` (and ``strength *
diff``) one layer at a time in a jitted update that keeps each parameter's sharding, so no
device ever holds more than its shard of a parameter; a weight-only quantized kernel takes
the update on its dequantized layer and is quantized again. ``save_lora`` writes a model's
adapters as diffusers' ``save_lora_weights`` does, which ``load_lora_weights`` and
``apply_loras`` both read back.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import sharding as sh
from facecam_jax.checkpoints.dit_naming import (
    keys_of_paths,
    named_variables,
    original_to_diffusers,
    slots_of,
    to_jax_layout,
    torch_shape,
)
from facecam_jax.checkpoints.io import CheckpointError, format_key_problems, write_safetensors
from facecam_jax.checkpoints.lora_files import METADATA_KEY, LoraFile, LoraReport, read_lora
from facecam_jax.models import quant
from facecam_jax.models.lora import adapted_linears, lora_rank_alpha
from facecam_jax.models.wan_dit import WanDiT
from facecam_jax.runtime.paths import split_lora_spec

# LoRAs are used between about -2 and 2; ComfyUI's LoraLoader stops at +-100, and past that an update
# swamps the weights it is added to (a typo such as 1e38 overflows them to Inf, a black video), so a
# larger |strength| is refused as a mistake rather than merged.
MAX_STRENGTH = 100.0


def check_strength(strength: float, what: str) -> float:
    """``strength`` when it is finite and within +-MAX_STRENGTH; a ValueError naming ``what`` otherwise."""
    if not math.isfinite(strength):
        raise ValueError(f"LoRA {what}: strength {strength!r} is not a finite number")
    if abs(strength) > MAX_STRENGTH:
        raise ValueError(
            f"LoRA {what}: strength {strength:g} is beyond +-{MAX_STRENGTH:g}; LoRA strengths are usually "
            "between -2 and 2 (is it a typo?)"
        )
    return strength


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
    slots = slots_of(model)
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

    ``loras``: ``(file, strength)`` pairs, or files (strength 1); a strength that is not finite or
    beyond +-``MAX_STRENGTH`` is a ValueError. Every file is read and checked (keys, shapes, and
    that every value is finite) before any parameter changes. ``mesh``: parameters end on their
    logical sharding (else each keeps its current one). ``unmatched="error"`` raises a ``CheckpointError`` naming
    keys that match no layer; ``"warn"`` skips them with one warning per file that counts them.
    """
    if unmatched not in ("error", "warn"):
        raise ValueError(f"unmatched must be 'error' or 'warn', got {unmatched!r}")
    items = [(item, 1.0) if isinstance(item, (str, os.PathLike)) else (item[0], float(item[1])) for item in loras]
    for path, strength in items:
        check_strength(strength, repr(os.fspath(path)))
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


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"path"`` (strength 1) or ``"path:strength"`` -> ``(path, strength)``, as ``sample.loras``
    and the sample CLI's ``--lora`` take them. The text after the last ``:`` is a strength only
    when it parses as a number (a path may contain ``:``); a file that does not exist, an empty
    path, or a strength that is not finite or beyond +-``MAX_STRENGTH`` is a ValueError /
    FileNotFoundError naming the spec."""
    spec = os.fspath(spec).strip()
    path, strength, tail = split_lora_spec(spec)
    head, sep = spec.rpartition(":")[0], tail is not None
    if not path:
        raise ValueError(f"LoRA {spec!r} has no file: give PATH or PATH:STRENGTH")
    if not math.isfinite(strength):
        raise ValueError(f"LoRA {spec!r}: strength {tail!r} is not a finite number (PATH:STRENGTH, e.g. {path}:0.8)")
    check_strength(strength, repr(spec))
    if not os.path.exists(path):
        if path == spec and sep and head and os.path.exists(head):
            raise ValueError(f"LoRA {spec!r}: strength {tail!r} is not a number (PATH:STRENGTH, e.g. {head}:0.8)")
        raise FileNotFoundError(f"LoRA file {path!r} does not exist (from {spec!r}; give PATH or PATH:STRENGTH)")
    return path, strength


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
    slots = slots_of(model)
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
