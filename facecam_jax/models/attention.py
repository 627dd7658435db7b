"""One multi-head attention function with selectable implementations.

Layout is BTNH everywhere (``q [B, Lq, N, H]``, ``k, v [B, Lk, N, H]``), which is what
cuDNN wants. Implementations:

- ``xla``: a plain einsum softmax (full score matrix, fp32 softmax). Portable; used for
  the parity tests. Under a mesh with a sharded sequence GSPMD gathers K/V as needed.
- ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16 or
  fp16, head_dim a multiple of 8). O(L) memory, with a backward pass.
- ``chunked``: flash-style online softmax over key chunks in pure JAX (``lax.scan``):
  O(L * chunk) memory on any backend, for long sequences where cuDNN is not available.
- ``auto``: cuDNN on GPU when the dtype and head size allow it, else ``xla``.

Context parallelism: when traced under ``sharding.use_mesh`` with a ``context`` mesh axis
larger than one and the sequence divisible by it, the ``cudnn`` and ``chunked`` kernels
(which cannot see a sharded sequence) run per device inside ``shard_map``: Ulysses
all-to-all (sequence shards <-> head shards) when the local heads divide over the context
axis, else an all-gather of K and V. Cross-attention keys (text) are not sequence-sharded,
so only the queries are split. The ``xla`` kernel is left to GSPMD.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from facecam_jax import sharding as sh

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "auto")


def _xla(q, k, v, scale):
    logits = jnp.einsum("BLNH,BSNH->BNLS", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BNLS,BSNH->BLNH", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)


def _chunked(q, k, v, scale, chunk: int):
    """Online-softmax attention over key chunks; keys are zero-padded to a chunk multiple."""
    b, lk, n, h = k.shape
    chunk = min(chunk, lk)
    pad = (-lk) % chunk
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    n_chunks = (lk + pad) // chunk
    k_c = k.reshape(b, n_chunks, chunk, n, h).swapaxes(0, 1)  # [C, B, chunk, N, H]
    v_c = v.reshape(b, n_chunks, chunk, n, h).swapaxes(0, 1)
    valid = (jnp.arange(n_chunks * chunk) < lk).reshape(n_chunks, chunk)
    lq = q.shape[1]

    def step(carry, xs):
        m, denom, acc = carry  # [B, N, Lq], [B, N, Lq], [B, Lq, N, H]
        kc, vc, ok = xs
        s = jnp.einsum("BLNH,BSNH->BNLS", q, kc, preferred_element_type=jnp.float32) * scale
        s = jnp.where(ok[None, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        denom = denom * corr + p.sum(-1)
        pv = jnp.einsum("BNLS,BSNH->BLNH", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
        acc = acc * corr.transpose(0, 2, 1)[..., None] + pv
        return (m_new, denom, acc), None

    init = (
        jnp.full((b, n, lq), -jnp.inf, jnp.float32),
        jnp.zeros((b, n, lq), jnp.float32),
        jnp.zeros((b, lq, n, h), jnp.float32),
    )
    (_, denom, acc), _ = jax.lax.scan(step, init, (k_c, v_c, valid))
    return (acc / denom.transpose(0, 2, 1)[..., None]).astype(q.dtype)


def _cudnn_ok(q) -> bool:
    return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def attention(q, k, v, *, implementation: str = "xla", scale: float | None = None, chunk: int = 1024):
    """Softmax(q k^T * scale) v over BTNH tensors; no mask (Wan attends to everything)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if implementation == "auto":
        on_gpu = jax.default_backend() == "gpu"
        implementation = "cudnn" if on_gpu and _cudnn_ok(q) else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    mesh = sh.current_mesh()
    if implementation != "xla" and mesh is not None and mesh.shape.get(sh.CONTEXT, 1) > 1:
        return _context_parallel(q, k, v, implementation, scale, chunk, mesh)
    return _local(q, k, v, implementation, scale, chunk)


def _local(q, k, v, implementation, scale, chunk):
    if implementation == "xla":
        return _xla(q, k, v, scale)
    if implementation == "chunked":
        return _chunked(q, k, v, scale, chunk)
    if implementation == "cudnn":
        if not _cudnn_ok(q):
            raise ValueError(
                f"cuDNN attention needs bf16/fp16 inputs with head_dim a multiple of 8 (<= 256); got "
                f"{q.dtype} with head_dim {q.shape[-1]}. Use a bf16 compute dtype or attention='xla'."
            )
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")


def _context_parallel(q, k, v, implementation, scale, chunk, mesh):
    """Runs a per-device kernel on a context-sharded sequence (Ulysses or KV all-gather)."""
    rules = sh.current_rules()
    q_spec = sh.logical_to_spec((sh.ACT_BATCH, sh.ACT_SEQ, sh.ACT_HEADS, None), q.shape, mesh, rules)
    seq_axes = q_spec[1]
    if seq_axes is None:  # the sequence does not split evenly: nothing to parallelise
        return _local(q, k, v, implementation, scale, chunk)
    self_attention = k.shape[1] == q.shape[1]
    kv_spec = q_spec if self_attention else PartitionSpec(q_spec[0], None, q_spec[2], None)
    n_ctx = math.prod(mesh.shape[a] for a in ((seq_axes,) if isinstance(seq_axes, str) else seq_axes))
    heads_per_device = q.shape[2] // math.prod(
        mesh.shape[a] for a in ((q_spec[2],) if isinstance(q_spec[2], str) else q_spec[2] or ())
    )

    def kernel(q, k, v):  # local blocks [b, l/c, n/t, h]
        if not self_attention:
            return _local(q, k, v, implementation, scale, chunk)
        if heads_per_device % n_ctx == 0:  # Ulysses: trade sequence shards for head shards
            to_heads = lambda x: jax.lax.all_to_all(x, seq_axes, 2, 1, tiled=True)  # noqa: E731
            out = _local(to_heads(q), to_heads(k), to_heads(v), implementation, scale, chunk)
            return jax.lax.all_to_all(out, seq_axes, 1, 2, tiled=True)
        k_all = jax.lax.all_gather(k, seq_axes, axis=1, tiled=True)
        v_all = jax.lax.all_gather(v, seq_axes, axis=1, tiled=True)
        return _local(q, k_all, v_all, implementation, scale, chunk)

    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)

