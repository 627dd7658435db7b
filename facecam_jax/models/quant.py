"""Weight-only int8 / fp8 (e4m3) quantization of the DiT blocks' linear layers, for inference.

Modes ``"none" | "int8" | "fp8"``. Every linear layer of the blocks (self- and cross-attention
q, k, v, o; ffn fc1, fc2) keeps its kernel ``[layers, din, dout]`` as int8 or float8_e4m3fn
values ``q`` and one fp32 ``scale`` per output channel and layer (symmetric absmax over the
input dim: ``w ~= q * scale``, scale ``[layers, dout]``). Embeddings, norms, modulation and
the head stay as they are. ``Linear`` computes ``(x @ q) * scale``: ``q`` converts exactly to
the compute dtype (int8 and e4m3 values are bf16 numbers), the dot accumulates in fp32 and
the scale is applied to the fp32 output, so the only error is the rounding of ``w`` itself.
The quantized arrays are the model's parameters, hence the arguments of a jitted program:
XLA's memory plan counts 1 byte per weight. The kernel keeps its logical axes and the scale
takes the kernel's (layers, output) axes, so every mesh and rule table shards both.

Quantization is done on the host in numpy (``quantize_kernel``), by ``load_dit(...,
quantize=...)`` one checkpoint tensor at a time as it is read, or by ``quantize_dit`` for a
model already built (random-weight tests, benchmarks).

Why not Qwix (google/qwix 0.1.8, tried with flax 0.12 / jax 0.10 on this model):
``qwix.quantize_model(model, qwix.PtqProvider(rules), x, t, ctx)`` runs the model once and,
inside each intercepted ``dot``, replaces the weight attribute of the *calling module
instance* with a ``WithAux(QArray)``. Our blocks are one stacked ``WanBlock`` run by
``lax.scan`` over ``nnx.merge(graphdef, layer_state)``, so the caller is a throwaway module
re-merged from one sliced layer inside the scan trace. Measured on the ``tiny`` preset with
the rule ``module_path="blocks/.*", weight_qtype=int8``: quantize_model returns without error,
but every block kernel in the returned model is still a float32 ``Param [2, 64, 64]`` (the
jitted program's arguments are all float32), while the output differs from the float model
by 1.2e-3 relative, i.e. the weights are re-quantized on the fly in every call (fake
quantization, no memory saved). The abstract route (``nnx.eval_shape`` of quantize_model,
then ``qwix.quantize_params``) fails the same way: the abstract blocks hold float ``Param``s,
not ``WithAux``, so quantize_params returns the block kernels unquantized. Outside the scan
(the rule ``.*``) the replacement does happen, e.g. ``time_projection.kernel`` becomes a
``WithAux``, and the second call then fails with ``AttributeError: 'WithAux' object has no
attribute 'get_value'``: it is not an ``nnx.Variable``, so it also drops out of our
``axes``-metadata sharding and checkpoint code. Quantizing at load time without the float
weights on device is not possible either: PTQ needs a forward pass over the float weights
(or a complete abstract PTQ model, which the scan prevents). For weight-only quantization with
float activations, Qwix's ``dot_general`` dequantizes the weight and runs a float dot (its
"slow path"); that is what ``Linear`` does here, so nothing of Qwix's kernels is given up.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax import sharding as sh
from facecam_jax.options import QUANTIZE

MODES = QUANTIZE  # facecam_jax.options: model.quantize
STORAGE_DTYPES = {"int8": np.dtype(jnp.int8), "fp8": np.dtype(jnp.float8_e4m3fn)}
_QMAX = {"int8": 127.0, "fp8": float(jnp.finfo(jnp.float8_e4m3fn).max)}  # 448 for e4m3fn

# The quantized linear layers, as attribute paths inside a block.
BLOCK_LINEARS: tuple[tuple[str, str], ...] = (
    *((attn, p) for attn in ("self_attn", "cross_attn") for p in "qkvo"),
    ("ffn", "fc1"),
    ("ffn", "fc2"),
)


def kernel_paths() -> list[tuple[str, ...]]:
    """Variable paths (as in ``nnx.state(model)``) of the kernels that a quantized model stores quantized."""
    return [("blocks", *lin, "kernel") for lin in BLOCK_LINEARS]


def scale_paths() -> list[tuple[str, ...]]:
    """Variable paths of the per-output-channel scales a quantized model adds."""
    return [("blocks", *lin, "scale") for lin in BLOCK_LINEARS]


# ------------------------------------------------------------------ backend check


@functools.cache
def fp8_problem(device) -> str | None:
    """None when ``device`` stores e4m3 arrays and runs ``Linear``'s convert + dot on them, else why not."""
    try:
        q = jax.device_put(np.array([[1.0, -2.0], [0.5, 448.0]], STORAGE_DTYPES["fp8"]), device)
        x = jax.device_put(np.ones((1, 2), jnp.bfloat16), device)
        y = jax.jit(lambda x, q: jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32))(x, q)
        got = np.asarray(y)
    except Exception as e:  # the backend's own error is the reason shown to the user
        return f"{type(e).__name__}: {e}"
    if not np.array_equal(got, [[1.5, 446.0]]):
        return f"a float8_e4m3fn dot returned {got.tolist()} instead of [[1.5, 446.0]]"
    return None


def _check_name(mode):
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; choose one of {', '.join(map(repr, MODES))}")


def check_mode(mode: str, devices: Sequence[jax.Device] | None = None) -> str:
    """Returns ``mode`` if the devices that will hold the model can run it; else a ValueError.

    Unknown names fail; ``"fp8"`` fails when a one-off probe (an e4m3 array placed on the
    device, converted and used in a dot, as ``Linear`` does) errors or is wrong on any
    platform among ``devices`` (default: the first default device).
    """
    _check_name(mode)
    if mode == "fp8":
        devices = list(devices) if devices is not None else jax.devices()[:1]
        seen = {}
        for d in devices:
            seen.setdefault((d.platform, d.device_kind), d)
        for (platform, kind), d in seen.items():
            problem = fp8_problem(d)
            if problem is not None:
                raise ValueError(
                    f"quantize='fp8' (float8_e4m3fn weights) does not run on the {platform} backend ({kind}): "
                    f"{problem}; use quantize='int8' (or 'none') there"
                )
    return mode


# ------------------------------------------------------------------ host quantization


def quantize_kernel(w, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of ``w [..., din, dout]`` on the host.

    Returns ``q [..., din, dout]`` (int8 or float8_e4m3fn) and ``scale [..., dout]`` (fp32) with
    ``w ~= q * scale[..., None, :]``: the scale maps each output channel's largest magnitude to
    127 (int8, rounded to nearest) or 448 (e4m3's largest finite value). An all-zero channel
    gets scale 1.
    """
    if mode not in STORAGE_DTYPES:
        raise ValueError(f"quantize_kernel takes 'int8' or 'fp8', got {mode!r}")
    w = np.asarray(w, np.float32)
    if w.ndim < 2:
        raise ValueError(f"a kernel is [..., din, dout], got shape {w.shape}")
    amax = np.max(np.abs(w), axis=-2)  # [..., dout]
    if not np.isfinite(amax).all():
        raise ValueError(f"kernel of shape {w.shape} has non-finite values; it cannot be quantized")
    qmax = np.float32(_QMAX[mode])
    scale = np.where(amax > 0, amax / qmax, np.float32(1.0)).astype(np.float32)
    x = np.clip(w / scale[..., None, :], -qmax, qmax)
    q = np.rint(x) if mode == "int8" else x
    return q.astype(STORAGE_DTYPES[mode]), scale


def quantize_array(w: jax.Array, mode: str) -> tuple[jax.Array, jax.Array]:
    """``quantize_kernel``'s rule in JAX (traceable, on the device): for re-quantizing a kernel
    that something was merged into (``checkpoints.lora.apply_loras``)."""
    qmax = _QMAX[mode]
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.float32)
    x = jnp.clip(w / scale[..., None, :], -qmax, qmax)
    q = jnp.rint(x) if mode == "int8" else x
    return q.astype(STORAGE_DTYPES[mode]), scale


def dequantize_array(q: jax.Array, scale: jax.Array) -> jax.Array:
    """``q * scale`` in fp32, in JAX: the kernel a quantized ``Linear`` multiplies by."""
    return q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, :]


def quantize_layers(w, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_kernel`` of a stacked kernel ``[layers, din, dout]``, one layer at a time.

    ``w`` may be a numpy or a (single-process) jax array; only one layer is in fp32 on the
    host at a time.
    """
    q = np.empty(w.shape, STORAGE_DTYPES[mode])
    scale = np.empty((*w.shape[:-2], w.shape[-1]), np.float32)
    for i in range(w.shape[0]):
        q[i], scale[i] = quantize_kernel(np.asarray(w[i]), mode)
    return q, scale


def dequantize_kernel(q, scale) -> np.ndarray:
    """``q * scale`` in fp32 on the host: the kernel a quantized ``Linear`` multiplies by."""
    return np.asarray(q).astype(np.float32) * np.asarray(scale, np.float32)[..., None, :]


def scale_axes(kernel_axes: Sequence[str | None] | None) -> tuple | None:
    """Logical axes of a scale: the kernel's without its input dim (``[layers, din, dout]`` -> ``[layers, dout]``)."""
    if kernel_axes is None:
        return None
    return (*kernel_axes[:-2], kernel_axes[-1])


def scale_sharding(kernel_sharding, ndim: int):
    """The sharding of an ``ndim``-D kernel without its input dim: the scale splits as the output channels do."""
    if isinstance(kernel_sharding, jax.sharding.NamedSharding):
        spec = tuple(kernel_sharding.spec) + (None,) * (ndim - len(kernel_sharding.spec))  # trailing Nones are implicit
        return jax.sharding.NamedSharding(kernel_sharding.mesh, jax.sharding.PartitionSpec(*spec[:-2], spec[-1]))
    if isinstance(kernel_sharding, jax.sharding.SingleDeviceSharding):
        return kernel_sharding
    raise ValueError(f"cannot derive a scale sharding from {kernel_sharding}; use a NamedSharding")


# ------------------------------------------------------------------ models


def _block_linears(model) -> list:
    out = []
    for attn, name in BLOCK_LINEARS:
        out.append(getattr(getattr(model.blocks, attn), name))
    return out


def storage_mode(dtype) -> str:
    """``"int8"`` or ``"fp8"`` for a quantized kernel's dtype, ``"none"`` for a float one."""
    for mode, storage in STORAGE_DTYPES.items():
        if np.dtype(dtype) == storage:
            return mode
    return "none"


def quantization_mode(model) -> str:
    """``"none"``, ``"int8"`` or ``"fp8"``: how the model's block linears are stored."""
    return storage_mode(model.blocks.self_attn.q.kernel.get_value().dtype)


def quantize_dit(model, mode: str):
    """Quantizes the block linears of a built ``WanDiT`` in place (weight-only); returns it.

    Concrete kernels are read to the host one layer at a time, quantized by
    ``quantize_kernel`` and placed back on the kernel's sharding (the scale on the same
    mesh, split as the output channels are). Abstract kernels (``jax.ShapeDtypeStruct``, a
    model from ``nnx.eval_shape``) become abstract int8/fp8 kernels and fp32 scales, the
    layout ``load_dit`` fills (and the AOT tool compiles); only the mode's name is checked
    then, as no device holds them. ``nnx.clone`` the model first to keep the float one. Single
    process only for concrete models (the kernel is read whole); ``load_dit(..., quantize=)``
    is the multi-host path.
    """
    abstract = isinstance(model.blocks.self_attn.q.kernel.get_value(), jax.ShapeDtypeStruct)
    if abstract:  # no device holds it (yet): the name only; load_dit checks the mesh's devices
        _check_name(mode)
    else:
        check_mode(mode, sorted(model.blocks.self_attn.q.kernel.get_value().sharding.device_set, key=lambda d: d.id))
    if mode == "none":
        return model
    if quantization_mode(model) != "none":
        raise ValueError(f"the model is already quantized ({quantization_mode(model)}); quantize the float model")
    qdtype = STORAGE_DTYPES[mode]
    for lin in _block_linears(model):
        w = lin.kernel.get_value()
        axes = sh.variable_axes(lin.kernel)
        scale_shape = (*w.shape[:-2], w.shape[-1])
        if abstract:
            q = jax.ShapeDtypeStruct(w.shape, qdtype, sharding=w.sharding)
            s_sharding = None if w.sharding is None else scale_sharding(w.sharding, w.ndim)
            s = jax.ShapeDtypeStruct(scale_shape, jnp.float32, sharding=s_sharding)
        else:
            q_host, s_host = quantize_layers(w, mode)
            q = sh.place_host(q_host, w.sharding)
            s = sh.place_host(s_host, scale_sharding(w.sharding, w.ndim))
        lin.kernel.set_value(q)
        lin.scale = nnx.Param(s, axes=scale_axes(axes))
    return model


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters: ``block_linears`` (kernels + scales), ``other`` and ``total``."""
    linears = set(kernel_paths()) | set(scale_paths())
    out = {"block_linears": 0, "other": 0}
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, var in leaves:
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        value = var.get_value()
        n = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        out["block_linears" if names in linears else "other"] += n
    out["total"] = out["block_linears"] + out["other"]
    return out
