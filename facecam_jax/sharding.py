"""Logical axis names, the one rule table that maps them to mesh axes, and mesh helpers.

Every parameter in this project carries logical axis names in its ``axes`` metadata
(``nnx.Param(value, axes=(EMBED, MLP))``). A rule table (kept in the config) maps each
logical name to mesh axes of the ``(data, fsdp, context, tensor)`` mesh. Assignments that
do not divide a dimension evenly are dropped for that dimension (e.g. 12 heads over 8
tensor shards), so any preset shards on any mesh without a special case.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

# Mesh axes.
DATA, FSDP, CONTEXT, TENSOR = "data", "fsdp", "context", "tensor"
MESH_AXES = (DATA, FSDP, CONTEXT, TENSOR)

# Logical parameter axes.
LAYERS = "layers"  # stacked (scanned) blocks
EMBED = "embed"  # model width D
HEADS = "heads"  # fused heads x head_dim
MLP = "mlp"  # feed-forward hidden width
VOCAB = "vocab"  # token embedding rows
CONV_IN = "conv_in"  # input channels of a convolution
CONV_OUT = "conv_out"  # output channels of a convolution
NORM = "norm"  # small vectors: norm scales, biases of unsharded dims

# Logical activation axes.
ACT_BATCH = "act_batch"
ACT_SEQ = "act_seq"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_HEIGHT = "act_height"  # spatial sharding of VAE activations

Rules = Sequence[tuple[str, Any]]

# FSDP over (fsdp, context): parameters are gathered per layer, so the context axis that
# splits the sequence also splits parameter memory. Heads and mlp are tensor-parallel.
DEFAULT_RULES: Rules = (
    (LAYERS, None),
    (EMBED, (FSDP, CONTEXT)),
    (HEADS, TENSOR),
    (MLP, TENSOR),
    (VOCAB, TENSOR),
    (CONV_IN, None),
    (CONV_OUT, (FSDP, CONTEXT)),
    (NORM, None),
    (ACT_BATCH, (DATA, FSDP)),
    (ACT_SEQ, CONTEXT),
    (ACT_EMBED, None),
    (ACT_HEADS, TENSOR),
    (ACT_HEIGHT, (FSDP, CONTEXT)),
)


def make_mesh(data: int = 1, fsdp: int = -1, context: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over all (global) devices; one size may be -1."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, context, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {len(devices)} are visible"
        )
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # odd device counts on CPU: a plain reshape is fine there
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def _rule_lookup(rules: Rules) -> dict[str, Any]:
    return {name: target for name, target in rules}


def logical_to_spec(
    axes: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; drops mesh axes that do not divide a dim.

    A mesh axis is used at most once per spec (first come); with ``shape`` and ``mesh``
    given, a dimension keeps only the prefix of its mesh axes whose product divides it.
    """
    if axes is None:
        return PartitionSpec()
    table = _rule_lookup(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        kept = []
        for t in targets:
            if t in used:
                continue
            if mesh is not None and shape is not None:
                size = math.prod(mesh.shape[k] for k in kept + [t])
                if shape[i] % size:
                    continue
            if mesh is not None and mesh.shape.get(t, 1) == 1:
                continue  # a size-1 axis shards nothing: keep specs minimal
            kept.append(t)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def logical_sharding(axes, shape, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_axes(var: nnx.Variable) -> tuple | None:
    """The logical axes a variable was created with (``axes`` metadata), or None."""
    return var.get_metadata().get("axes")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for every variable of an nnx state, from its ``axes`` metadata."""

    def one(var):
        return var.replace(logical_sharding(variable_axes(var), np.shape(var.get_value()), mesh, rules))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_module(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Places a module's variables on ``mesh`` by their logical axes (in place); returns it."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """Pins an activation to its logical axes when traced under an active mesh; else a no-op."""
    mesh = current_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(axes, x.shape, mesh, current_rules() if rules is None else rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, batch_size: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The sharding of a global batch of ``batch_size`` on ``mesh``; a clear error if the
    data-parallel replicas cannot each get whole samples."""
    replicas = mesh.shape.get(DATA, 1)
    if batch_size % replicas:
        raise ValueError(
            f"data.batch_size {batch_size} does not divide over mesh.data={replicas} replicas; "
            f"use a multiple of {replicas} or a smaller mesh.data")
    spec = logical_to_spec((ACT_BATCH,), (batch_size,), mesh, rules)
    shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(spec)))
    dp = replicas * mesh.shape.get(FSDP, 1)
    if shards < dp:
        log.warning("data.batch_size %d does not divide over the %d data-parallel devices (data x fsdp): "
                    "the batch is split %d ways and the rest compute it redundantly; use a multiple of %d",
                    batch_size, dp, shards, dp)
    return NamedSharding(mesh, spec)


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of the global batch that this process's devices hold."""
    index = sharding.addressable_devices_indices_map((batch_size,))
    spans = {idx[0].indices(batch_size)[:2] for idx in index.values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = set().union(*(range(a, b) for a, b in spans))
    if covered != set(range(lo, hi)):
        raise ValueError(f"this process's devices hold rows {sorted(spans)} of the batch, not one contiguous "
                         "slice; order the mesh so that each process's devices are adjacent")
    return lo, hi


_ACTIVE: list[tuple[Mesh, Rules]] = []


class use_mesh:
    """Context manager making ``mesh`` (and rules) the target of ``constrain`` while tracing.

    It does not enter ``jax.set_mesh``: every sharding here names its mesh (``NamedSharding``,
    ``shard_map(mesh=...)``), and JAX keys its cache of eager ops by the mesh in that context,
    so random init and weight conversion under each new mesh would compile every op again
    (20 s per training run for the mini models on two CPU cores)."""

    def __init__(self, mesh: Mesh, rules: Rules = DEFAULT_RULES):
        self.mesh, self.rules = mesh, rules

    def __enter__(self):
        _ACTIVE.append((self.mesh, self.rules))
        return self.mesh

    def __exit__(self, *exc):
        _ACTIVE.pop()


def current_mesh() -> Mesh | None:
    return _ACTIVE[-1][0] if _ACTIVE else None


def current_rules() -> Rules:
    return _ACTIVE[-1][1] if _ACTIVE else DEFAULT_RULES


def rules_from_config(table: Mapping[str, Any] | Rules | None) -> Rules:
    """Rule table from a config (dict or list of pairs); None gives the defaults."""
    if table is None:
        return DEFAULT_RULES
    if isinstance(table, Mapping):
        return tuple((k, v) for k, v in table.items())
    return tuple(tuple(pair) for pair in table)


def place_host(host, sharding) -> jax.Array:
    """A host (numpy) array on ``sharding`` (the default device when None), each device reading
    only its own slice: how weights go from a file or the host to a mesh without a full copy
    per device."""
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
