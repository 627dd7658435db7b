"""The umT5 encoder (Wan's text encoder) as an NNX module: token ids -> per-token features.

Numerics follow the official Wan ``T5Encoder`` (and transformers' ``UMT5EncoderModel``):
pre-norm blocks with RMS norms (no mean, no bias; statistics in fp32), self-attention with
a relative position bias learned PER LAYER and no 1/sqrt(d) scaling, a gated tanh-GELU
feed-forward (``fc1(x) * gelu(gate(x))``), softmax in fp32, and a final RMS norm.

The blocks' weights are stacked on a leading layer axis and run with ``jax.lax.scan``, so
the 24-layer XXL encoder compiles as one block. Every parameter carries logical sharding
axes (``sharding.py``): embedding rows over VOCAB, attention projections over HEADS and the
feed-forward width over MLP (tensor parallel), the model width over EMBED (FSDP).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax.sharding import (
    ACT_BATCH,
    ACT_EMBED,
    ACT_HEADS,
    ACT_SEQ,
    EMBED,
    HEADS,
    LAYERS,
    MLP,
    NORM,
    VOCAB,
    constrain,
)


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Encoder sizes; names follow the dimension alphabet (D model, N heads, H head dim)."""

    vocab_size: int
    dim: int  # D (d_model)
    num_heads: int  # N
    head_dim: int  # H (d_kv); the attention width is N * H
    ffn_dim: int  # d_ff
    num_layers: int
    num_buckets: int = 32  # relative-position buckets (half per direction)
    max_distance: int = 128  # distances beyond this share the last bucket
    eps: float = 1e-6  # RMS norm epsilon

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim


PRESETS: dict[str, UMT5Config] = {
    # google/umt5-xxl encoder as used by every Wan 2.1 / 2.2 model (SPEC 3): 5.68 B parameters.
    "umt5-xxl": UMT5Config(vocab_size=256384, dim=4096, num_heads=64, head_dim=64, ffn_dim=10240, num_layers=24),
    # Same structure at toy size, for tests and laptops.
    "tiny": UMT5Config(vocab_size=256, dim=32, num_heads=4, head_dim=8, ffn_dim=48, num_layers=2),
}


def get_config(name: str) -> UMT5Config:
    """A preset by name (``umt5-xxl`` or ``tiny``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown umT5 preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def count_params(config: UMT5Config) -> int:
    """Parameter count of the encoder, from the config alone."""
    per_layer = (
        4 * config.dim * config.attn_dim  # q, k, v, o
        + 3 * config.dim * config.ffn_dim  # gate, fc1, fc2
        + config.num_buckets * config.num_heads  # relative position bias
        + 2 * config.dim  # two norms
    )
    return config.vocab_size * config.dim + config.num_layers * per_layer + config.dim


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of every (query, key) pair: int32 [L, L], a trace-time constant.

    Half of the buckets are for keys after the query. Within a direction, distances below
    half the buckets get their own bucket; larger ones share logarithmically wider buckets
    up to ``max_distance``. Computed in numpy float64, which reproduces the float32 torch
    reference bucket for bucket (checked against transformers up to L = 1024 in the tests).
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query, [L, L]
    half = num_buckets // 2
    base = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) is masked by the `dist < max_exact` branch
        log_ratio = np.log(np.maximum(dist, 1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (base + np.where(dist < max_exact, dist, large)).astype(np.int32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """T5 layer norm: divide by the root mean square (fp32 statistics), cast, then scale."""
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return scale * (x.astype(jnp.float32) * jax.lax.rsqrt(var + eps)).astype(scale.dtype)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class UMT5Blocks(nnx.Module):
    """All encoder blocks; each weight is stacked over layers, [num_layers, ...].

    Weights are stored channels-last (``x @ w``), i.e. transposed from torch ``nn.Linear``.
    """

    def __init__(self, config: UMT5Config, *, dtype, rngs: nnx.Rngs):
        c = config
        n, d, a, f = c.num_layers, c.dim, c.attn_dim, c.ffn_dim

        def param(shape, std, axes):
            return nnx.Param(_normal(rngs, (n, *shape), std, dtype), axes=(LAYERS, *axes))

        def ones(size):
            return nnx.Param(jnp.ones((n, size), dtype), axes=(LAYERS, NORM))

        # Initial scales as in the official implementation (only used for untrained models).
        self.attn_norm = ones(d)
        self.q = param((d, a), (d * c.head_dim) ** -0.5, (EMBED, HEADS))
        self.k = param((d, a), d**-0.5, (EMBED, HEADS))
        self.v = param((d, a), d**-0.5, (EMBED, HEADS))
        self.o = param((a, d), a**-0.5, (HEADS, EMBED))
        # [buckets, N]: the bias table is tiny; its head axis follows the attention heads.
        self.rel_bias = param((c.num_buckets, c.num_heads), (2 * c.num_buckets * c.num_heads) ** -0.5, (NORM, HEADS))
        self.ffn_norm = ones(d)
        self.gate = param((d, f), d**-0.5, (EMBED, MLP))
        self.fc1 = param((d, f), d**-0.5, (EMBED, MLP))
        self.fc2 = param((f, d), f**-0.5, (MLP, EMBED))

    def weights(self) -> dict[str, jax.Array]:
        """The stacked arrays, the ``xs`` of the layer scan."""
        names = ("attn_norm", "q", "k", "v", "o", "rel_bias", "ffn_norm", "gate", "fc1", "fc2")
        return {name: getattr(self, name).get_value() for name in names}


def _block(x: jax.Array, w: dict[str, jax.Array], buckets: np.ndarray, keep: jax.Array, config: UMT5Config):
    """One pre-norm encoder block on ``x [B, L, D]`` with one layer's weights ``w``."""
    b, length, _ = x.shape
    n, hd = config.num_heads, config.head_dim

    h = rms_norm(x, w["attn_norm"], config.eps)
    q = (h @ w["q"]).reshape(b, length, n, hd)  # [B, L, N, H]
    k = (h @ w["k"]).reshape(b, length, n, hd)
    v = (h @ w["v"]).reshape(b, length, n, hd)
    q = constrain(q, (ACT_BATCH, ACT_SEQ, ACT_HEADS, None))
    bias = jnp.take(w["rel_bias"], buckets, axis=0).transpose(2, 0, 1)  # [N, L, L]
    # No 1/sqrt(H) scaling (T5 folds it into the initialisation); the bias is added in the
    # compute dtype and the softmax runs in fp32, as in the reference.
    logits = (jnp.einsum("BQNH,BKNH->BNQK", q, k) + bias[None]).astype(jnp.float32)
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)  # padded keys get zero weight
    probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    attn = jnp.einsum("BNQK,BKNH->BQNH", probs, v).reshape(b, length, n * hd)  # [B, L, N*H]
    x = x + attn @ w["o"]
    x = constrain(x, (ACT_BATCH, ACT_SEQ, ACT_EMBED))

    h = rms_norm(x, w["ffn_norm"], config.eps)
    hidden = (h @ w["fc1"]) * jax.nn.gelu(h @ w["gate"], approximate=True)  # [B, L, F]
    x = x + hidden @ w["fc2"]
    return constrain(x, (ACT_BATCH, ACT_SEQ, ACT_EMBED))


class UMT5Encoder(nnx.Module):
    """umT5 encoder: ``encoder(ids [B, L], mask [B, L]) -> [B, L, D]``.

    ``dtype`` is both the parameter and the compute dtype (the released weights are bf16);
    norm statistics and the attention softmax are always fp32. Outputs at padded positions
    are computed but meaningless; ``facecam_jax.text.encode_prompts`` zeroes them.
    """

    def __init__(self, config: UMT5Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.token_embedding = nnx.Param(
            _normal(rngs, (config.vocab_size, config.dim), 1.0, dtype), axes=(VOCAB, EMBED)
        )
        self.blocks = UMT5Blocks(config, dtype=dtype, rngs=rngs)
        self.norm = nnx.Param(jnp.ones((config.dim,), dtype), axes=(NORM,))

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``ids`` int [B, L]; ``mask`` [B, L], nonzero for real tokens (None: all real)."""
        if ids.ndim != 2:
            raise ValueError(f"umT5 expects token ids of shape [B, L], got {ids.shape}")
        length = ids.shape[1]
        c = self.config
        x = jnp.take(self.token_embedding.get_value(), ids, axis=0)  # [B, L, D]
        x = constrain(x, (ACT_BATCH, ACT_SEQ, ACT_EMBED))
        if mask is None:
            keep = jnp.ones((ids.shape[0], 1, 1, length), bool)
        else:
            keep = (mask != 0)[:, None, None, :]  # [B, 1, 1, L] over keys
        buckets = relative_position_buckets(length, c.num_buckets, c.max_distance)

        def layer(x, w):
            return _block(x, w, buckets, keep, c), None

        x, _ = jax.lax.scan(layer, x, self.blocks.weights())
        return rms_norm(x, self.norm.get_value(), c.eps)  # [B, L, D]
