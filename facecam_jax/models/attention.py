"""One multi-head attention function with selectable implementations.

Layout is BTNH everywhere (``q [B, Lq, N, H]``, ``k, v [B, Lk, N, H]``), which is what
cuDNN wants. Implementations:

- ``xla``: a plain einsum softmax (full score matrix, fp32 softmax). Portable; used for
  the parity tests. Under a mesh with a sharded sequence GSPMD gathers K/V as needed.
- ``cudnn``: cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16 or
  fp16, head_dim a multiple of 8). O(L) memory, with a backward pass.
- ``chunked``: flash-style online softmax over key chunks in pure JAX (``lax.scan``):
  O(L * chunk) memory on any backend, for long sequences where cuDNN is not available.
- ``splash``: the Pallas TPU splash-attention kernel (fp32 or bf16, with a backward pass).
  It takes per-example ``[N, L, H]`` and unscaled logits, so q is scaled first, the layout
  transposed and the batch vmapped. Q and K/V are padded separately to a block multiple
  (512, or the length rounded up to 128 when shorter) and segment ids (0 real, 1 padding)
  keep real queries off padded keys; padded query rows stay finite (splash masks with a
  finite value) and are sliced off. ``SPLASH_INTERPRET = True`` runs it in Pallas interpret
  mode, which works on CPU (the tests use it). The backward uses separate dq and dkv
  kernels: the fused one is O(L^2 / block) in memory.
- ``auto``: splash on TPU, cuDNN on GPU, when the dtype (and for cuDNN the head size)
  allows it, else ``xla``. The platform is that of the active mesh's devices (so an
  ahead-of-time compile for a TPU topology on a CPU host picks splash), else
  ``jax.default_backend()``.

Per-device kernels under ``sharding.use_mesh``: ``splash`` always runs inside
``shard_map`` (batch and heads split as the logical rules say; a Pallas call cannot be
partitioned by GSPMD). With a ``context`` mesh axis larger than one and the sequence
divisible by it, ``cudnn``, ``chunked`` and ``splash`` (which cannot see a sharded
sequence) run that way too, with Ulysses all-to-all (sequence shards <-> head shards) when
the local heads divide over the context axis, else an all-gather of K and V.
Cross-attention keys (text) are not sequence-sharded, so only the queries are split. The
``xla`` kernel is left to GSPMD.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from facecam_jax import sharding as sh

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "splash", "auto")

SPLASH_BLOCK = 512  # kernel block along q and kv for sequences at least this long
SPLASH_INTERPRET = False  # run splash in Pallas interpret mode (CPU tests); never on a TPU


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


def _splash_block(length: int) -> int:
    """Kernel block for a sequence: SPLASH_BLOCK, or the length rounded up to 128 lanes."""
    return min(SPLASH_BLOCK, -(-length // 128) * 128)


def _pad_to_block(x, block: int):
    """Zero-pads the sequence of ``x [B, L, N, H]`` to a block multiple; segment ids 0 real, 1 pad."""
    length = x.shape[1]
    padded = -(-length // block) * block
    x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))  # [B, L', N, H]
    return x, (jnp.arange(padded) >= length).astype(jnp.int32)


def _splash(q, k, v, scale):
    """Splash attention per device: pad, mask padding by segment ids, vmap over the batch."""
    if not _splash_ok(q):
        raise ValueError(
            f"splash attention takes float32 or bfloat16 inputs (Mosaic cannot load {q.dtype}); "
            "use a bf16 compute dtype or attention='xla'."
        )
    n, lq = q.shape[2], q.shape[1]
    bq, bkv = _splash_block(lq), _splash_block(k.shape[1])
    q, q_ids = _pad_to_block((q.astype(jnp.float32) * scale).astype(q.dtype), bq)  # splash does not scale
    k, kv_ids = _pad_to_block(k, bkv)
    v, _ = _pad_to_block(v, bkv)
    # Separate dq and dkv backward kernels: the fused one keeps a dq per kv block ([Lk/bkv, N, Lq, H]),
    # 15.6 GB at 55k tokens and 10 heads.
    blocks = splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv,
    )
    mask = splash.MultiHeadMask([splash.FullMask((q.shape[1], k.shape[1]))] * n)
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=SPLASH_INTERPRET)
    to_nlh = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  [B, L', N, H] -> [B, N, L', H]
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(
        to_nlh(q), to_nlh(k), to_nlh(v), splash.SegmentIds(q=q_ids, kv=kv_ids)
    )  # [B, N, Lq', H]
    return to_nlh(out)[:, :lq]


def _cudnn_ok(q) -> bool:
    return _cudnn_supports(q.dtype, q.shape[-1])


def _cudnn_supports(dtype, head_dim: int) -> bool:
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 256


def _splash_ok(q) -> bool:
    return q.dtype in (jnp.float32, jnp.bfloat16)


def resolve(implementation: str, platform: str, dtype, head_dim: int) -> str:
    """The implementation ``attention`` runs: ``auto`` is splash on TPU (fp32 / bf16), cuDNN on
    GPU (bf16 / fp16, head_dim a multiple of 8 up to 256), XLA otherwise; others as given."""
    if implementation != "auto":
        return implementation
    if platform == "tpu" and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16):  # what _splash_ok takes
        return "splash"
    if platform == "gpu" and _cudnn_supports(dtype, head_dim):
        return "cudnn"
    return "xla"


def _platform() -> str:
    """The platform being compiled for: the active mesh's devices, else the default backend."""
    mesh = sh.current_mesh()
    if mesh is not None and not mesh.empty:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def attention(q, k, v, *, implementation: str = "xla", scale: float | None = None, chunk: int = 1024):
    """Softmax(q k^T * scale) v over BTNH tensors; no mask (Wan attends to everything)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    platform = _platform()
    implementation = resolve(implementation, platform, q.dtype, q.shape[-1])
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation == "splash" and platform != "tpu" and not SPLASH_INTERPRET:
        raise ValueError(
            f"splash attention is a TPU kernel, but this compiles for {platform!r}; "
            "use attention='auto' (cuDNN on GPU, XLA on CPU) or 'chunked'."
        )
    mesh = sh.current_mesh()
    if mesh is not None and not mesh.empty and implementation != "xla":
        if implementation == "splash" or mesh.shape.get(sh.CONTEXT, 1) > 1:
            return _per_device(q, k, v, implementation, scale, chunk, mesh)
        if implementation == "cudnn":  # its partitioner takes q, k and v on one sharding, which GSPMD
            # need not have picked for k and v (fsdp 8 on H100s: "should have same sharding")
            q, k, v = (sh.constrain(x, (sh.ACT_BATCH, None, sh.ACT_HEADS, None)) for x in (q, k, v))
    return _local(q, k, v, implementation, scale, chunk)


def _local(q, k, v, implementation, scale, chunk):
    if implementation == "xla":
        return _xla(q, k, v, scale)
    if implementation == "chunked":
        return _chunked(q, k, v, scale, chunk)
    if implementation == "splash":
        return _splash(q, k, v, scale)
    if implementation == "cudnn":
        if not _cudnn_ok(q):
            raise ValueError(
                f"cuDNN attention needs bf16/fp16 inputs with head_dim a multiple of 8 (<= 256); got "
                f"{q.dtype} with head_dim {q.shape[-1]}. Use a bf16 compute dtype or attention='xla'."
            )
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")


def _per_device(q, k, v, implementation, scale, chunk, mesh):
    """Runs a per-device kernel in shard_map; a context-sharded sequence goes Ulysses or KV all-gather."""
    rules = sh.current_rules()
    q_spec = sh.logical_to_spec((sh.ACT_BATCH, sh.ACT_SEQ, sh.ACT_HEADS, None), q.shape, mesh, rules)
    seq_axes = q_spec[1]
    if seq_axes is None and implementation != "splash":  # nothing to parallelise: GSPMD splits the rest
        return _local(q, k, v, implementation, scale, chunk)
    self_attention = k.shape[1] == q.shape[1]
    kv_spec = q_spec if self_attention else PartitionSpec(q_spec[0], None, q_spec[2], None)
    n_ctx = math.prod(mesh.shape[a] for a in ((seq_axes,) if isinstance(seq_axes, str) else seq_axes or ()))
    heads_per_device = q.shape[2] // math.prod(
        mesh.shape[a] for a in ((q_spec[2],) if isinstance(q_spec[2], str) else q_spec[2] or ())
    )

    def kernel(q, k, v):  # local blocks [b, l/c, n/t, h]
        if not self_attention or n_ctx == 1:
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
