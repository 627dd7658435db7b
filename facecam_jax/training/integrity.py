"""What a saved training step must satisfy beyond being readable: checksums of its arrays
(written with the step, verified on restore, so bytes changed on disk are caught rather than
restored as NaN), the disk space a save needs (a full disk is one line, not Orbax's
tracebacks), and the config it was written by (a workdir of another config names the keys
that differ). Used by ``training.run_state``.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

CHECKSUM_METHOD = "u32-weighted-sum-v1"  # see ``checksums``
SPACE_MARGIN = 1 << 20  # free space a save needs beyond the size of a step: file system blocks, metadata


def key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


# --------------------------------------------------------------- checksums


def _words(x: jax.Array) -> jax.Array:
    """An array's elements as uint32 words of their bit patterns (NaNs count as written)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 8:
        return lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """sum_i mix(word_i) * (2 i + 1) mod 2**32 over the row-major index i: one elementwise pass
    and a sum, exact under any sharding (integer addition wraps and commutes). ``mix`` and the
    odd weights are bijections mod 2**32, so any change of one word changes the sum; random
    changes of several cancel with odds of 2**-32."""
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, w.shape, d) * np.uint32(stride % 2**32)
        stride *= w.shape[d]
    h = w * np.uint32(0x9E3779B1)
    h = h ^ (h >> 16)
    return jnp.sum(h * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


@functools.lru_cache(maxsize=8)
def _checksum_program(out_sharding):
    return jax.jit(lambda leaves: jnp.stack([_checksum(x) for x in leaves]), out_shardings=out_sharding)


def checksums(tree) -> dict[str, int]:
    """{dotted leaf path: checksum} of a tree of arrays, computed where they live (one pass over
    the state in device memory, any mesh; every process gets the same numbers), so a restore on
    another mesh or process count checks the same values."""
    named = [(".".join(key_name(k) for k in path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]
    if not named:
        return {}
    mesh = next((x.sharding.mesh for _, x in named if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
    out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    sums = np.asarray(_checksum_program(out)([x for _, x in named]))
    return {name: int(v) for (name, _), v in zip(named, sums)}


# --------------------------------------------------------------- disk space


def folder_bytes(path: str) -> int:
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def size_text(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}


def no_space(error: BaseException) -> str | None:
    """Why ``error`` (or an error it wraps) is a full disk, or None. Orbax passes TensorStore's
    as a ValueError: ``RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']``."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return _NO_SPACE[e.errno]
        text = str(e)
        for code, reason in _NO_SPACE.items():
            if os.strerror(code) in text or f"os_error_code='{code}'" in text:
                return reason
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


class QuietNoSpace(logging.Filter):
    """Drops Orbax's logged tracebacks (~100 lines each) of a save that failed for lack of space:
    ``Checkpoints`` reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] is not None and no_space(record.exc_info[1]))


# --------------------------------------------------------------- the config a step was written by


def config_json(config) -> dict:
    """A ConfigDict as plain JSON (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: dict, new: dict, limit: int = 8) -> list[str]:
    """``key: old -> new`` for each config key that differs, the ones that shape the train
    state first (``distributed.*`` is per process and left out)."""
    a, b = _flat(old), _flat(new)
    shaping = ("model.", "vae.", "optimizer.", "train.trainable")
    keys = sorted((k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")
                   and not k.startswith("distributed.")), key=lambda k: (not k.startswith(shaping), k))
    out = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        out.append(f"and {len(keys) - limit} more")
    return out
