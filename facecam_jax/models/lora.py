"""LoRA adapters inside the Wan DiT: add them, select them for training, fold them into the base.

``add_lora`` gives every ``Linear`` under the named modules an adapter ``A [din, r]``
(random) and ``B [r, dout]`` (zero), so a fresh adapter leaves the model's output unchanged;
the layer then adds ``(x @ A) @ B * alpha / r``. Adapter parameters are ``LoRAParam``
variables (a subclass of ``nnx.Param``): ``nnx.state(model, LoRAParam)`` is exactly what a
LoRA fine-tune optimises. They carry the base kernel's logical axes (A: the kernel's input
axis, B: its output axis, plus the leading ``layers`` axis inside the stacked blocks), so
they shard on every mesh like the layer they adapt.

The patch embedding is not a ``Linear`` and gets no adapter: FaceCam widens it from 16 to 36
input channels with zero-initialised new channels, which a low-rank update would learn only
partially, so it is trained in full (name ``patch_embedding`` among the trainable modules)
and exported as a partial state dict (``checkpoints.dit.save_dit(..., keys=...)``, read back
by ``load_dit(overlay=...)``), next to the adapters that ``checkpoints.lora.save_lora`` writes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax import sharding as sh
from facecam_jax.models.wan_dit import Linear


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix; ``nnx.state(model, LoRAParam)`` selects adapters only."""


def linears(model: nnx.Module, names: Sequence[str] = ("all",)) -> list[tuple[tuple[str, ...], Linear]]:
    """``(module path, Linear)`` for every ``Linear`` whose path contains one of ``names``.

    The rule of ``build.trainable_filter``: a path element equal to a name; ``("all",)``: all.
    """
    names = tuple(names)
    out = []
    for path, node in nnx.iter_graph(model):
        path = tuple(str(p) for p in path)
        if isinstance(node, Linear) and (names == ("all",) or any(p in names for p in path)):
            out.append((path, node))
    return out


def adapted_linears(model: nnx.Module) -> list[tuple[tuple[str, ...], Linear]]:
    """``(module path, Linear)`` for every layer that currently has a LoRA adapter."""
    return [(p, m) for p, m in linears(model) if m.lora_a is not None]


def add_lora(
    model: nnx.Module,
    rank: int,
    alpha: float | None = None,
    names: Sequence[str] = ("all",),
    *,
    rngs: nnx.Rngs | None = None,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: sh.Rules = sh.DEFAULT_RULES,
) -> nnx.Module:
    """Adds rank-``rank`` adapters (scale ``alpha / rank``; alpha defaults to rank) in place.

    Every ``Linear`` whose module path has an element in ``names`` (``("all",)``: all of them)
    gets ``A`` uniform in +-1/sqrt(din) (PEFT's default; one ``rngs.params()`` key per layer)
    and ``B = 0``. ``mesh`` places the new parameters on their logical sharding; an abstract
    model (``nnx.eval_shape``) gets abstract adapters. Returns ``model``.
    """
    if int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    alpha = float(rank if alpha is None else alpha)
    targets = linears(model, names)
    if not targets:
        raise ValueError(f"LoRA names {tuple(names)} match no Linear layer of the model")
    already = [".".join(p) for p, m in targets if m.lora_a is not None]
    if already:
        raise ValueError(f"layers {already[:5]} already have LoRA adapters; merge_lora(model) first")
    rngs = nnx.Rngs(0) if rngs is None else rngs
    for _, layer in targets:
        kernel = layer.kernel.get_value()
        axes = tuple(sh.variable_axes(layer.kernel) or (None,) * kernel.ndim)
        *lead, din, dout = kernel.shape
        a_shape, b_shape = (*lead, din, rank), (*lead, rank, dout)
        a_axes, b_axes = (*axes[:-1], None), (*axes[:-2], None, axes[-1])
        a_sh = b_sh = None
        if mesh is not None:
            a_sh = sh.logical_sharding(a_axes, a_shape, mesh, rules)
            b_sh = sh.logical_sharding(b_axes, b_shape, mesh, rules)
        key = rngs.params()
        if isinstance(kernel, jax.ShapeDtypeStruct):  # an abstract model (nnx.eval_shape): abstract adapters
            a = jax.ShapeDtypeStruct(a_shape, param_dtype, sharding=a_sh)
            b = jax.ShapeDtypeStruct(b_shape, param_dtype, sharding=b_sh)
        else:
            # Drawn on the host from the key's bits: no RNG program to compile, the same on every host.
            rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
            bound = 1.0 / math.sqrt(din)
            a = sh.place_host(rng.uniform(-bound, bound, a_shape).astype(np.float32).astype(param_dtype), a_sh)
            b = sh.place_host(np.zeros(b_shape, param_dtype), b_sh)
        layer.lora_a = LoRAParam(a, axes=a_axes)
        layer.lora_b = LoRAParam(b, axes=b_axes)
        layer.lora_scale = alpha / rank
    return model


def lora_rank_alpha(layer: Linear) -> tuple[int, float]:
    """The adapter rank and alpha of an adapted layer (alpha = scale * rank)."""
    rank = layer.lora_a.get_value().shape[-1]
    return rank, layer.lora_scale * rank


def _merge_one(kernel, a, b, scale):
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + delta * scale).astype(kernel.dtype)


_merge_jit = jax.jit(_merge_one)


def merge_lora(model: nnx.Module, strength: float = 1.0) -> nnx.Module:
    """Folds every adapter into its kernel (``W += strength * scale * A @ B``) and removes it.

    The update runs jitted with the kernel's own sharding, so a sharded model stays sharded.
    Returns ``model``, whose forward then equals the adapted forward (up to fp32 rounding).
    """
    for _, layer in adapted_linears(model):
        kernel = layer.kernel.get_value()
        if not isinstance(kernel, jax.ShapeDtypeStruct):
            # A sharded kernel keeps its sharding; an uncommitted one stays uncommitted.
            sharded = isinstance(getattr(kernel, "sharding", None), jax.sharding.NamedSharding)
            merge = jax.jit(_merge_one, out_shardings=kernel.sharding) if sharded else _merge_jit
            merged = merge(kernel, layer.lora_a.get_value(), layer.lora_b.get_value(), strength * layer.lora_scale)
            layer.kernel.set_value(merged)
        layer.lora_a = layer.lora_b = None
        layer.lora_scale = 0.0
    return model
