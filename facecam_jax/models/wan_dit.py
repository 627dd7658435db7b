"""The Wan 2.1 / 2.2 video diffusion transformer in Flax NNX, and FaceCam's input assembly.

Channels-last latents: ``WanDiT(x [B, F, H, W, Cin], t [B] or [B, L], context [B, Lt, text_dim])
-> [B, F, H, W, Cout]``. Numerics follow the original Wan ``WanModel`` (SPEC 3): fp32 layer
norms, modulation and time embedding whatever the compute dtype; 3-axis RoPE on interleaved
pairs; text context zero-padded to ``text_len`` before its embedding. The blocks are stacked
along a leading ``layers`` axis and run with ``lax.scan``, so compile time does not grow
with depth. Every parameter carries logical sharding axes (``facecam_jax.sharding``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from facecam_jax import sharding as sh
from facecam_jax.models.attention import attention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture of one Wan DiT; field names follow the original ``WanModel`` constructor."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.freq_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) and freq_dim ({self.freq_dim}) must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def replace(self, **kw) -> "DiTConfig":
        return dataclasses.replace(self, **kw)


_14B = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

PRESETS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": _14B,
    # Wan2.2 A14B: two experts of this shape; the high-noise one runs while t >= boundary * 1000
    # (Wan T2V 0.875; I2V and FaceCam 0.9: config.model.expert_boundary).
    "wan2.2-t2v-a14b": _14B,
    "wan2.2-i2v-a14b": _14B.replace(in_dim=36),  # the official FaceCam base
    "wan2.2-ti2v-5b": DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    "tiny": DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16),
    # The learning proof (configs/facecam.py:learn): trained from scratch on a 2-core CPU. Head
    # dim 128 and text_len 512 as the full presets, so a checkpoint of it infers back to it.
    "small": DiTConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, freq_dim=64, text_dim=32),
}

# Exact parameter counts of the full presets (diffusers WanTransformer3DModel, same shapes).
REFERENCE_PARAM_COUNTS = {
    "wan2.1-t2v-1.3b": 1_418_996_800,
    "wan2.1-t2v-14b": 14_288_491_584,
    "wan2.2-t2v-a14b": 14_288_491_584,
    "wan2.2-i2v-a14b": 14_288_901_184,
    "wan2.2-ti2v-5b": 4_999_787_712,
}


def get_config(config: str | DiTConfig) -> DiTConfig:
    if isinstance(config, DiTConfig):
        return config
    if config not in PRESETS:
        raise ValueError(f"unknown DiT preset {config!r}; choose one of {sorted(PRESETS)} or pass a DiTConfig")
    return PRESETS[config]


REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "dots": "dots_saveable",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}

# --------------------------------------------------------------------------- layers


def _xavier(key, shape, dtype, fan_in, fan_out):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit).astype(dtype)


class Linear(nnx.Module):
    """``x @ kernel + bias`` in the compute dtype; kernel [din, dout] with logical axes.

    A weight-only quantized kernel (int8 / fp8, ``models/quant.py``) comes with ``scale [dout]``:
    ``(x @ kernel) * scale + bias``. Optional LoRA adapters (``facecam_jax.models.lora.add_lora``):
    ``lora_a [din, r]`` and ``lora_b [r, dout]`` add ``(x @ lora_a) @ lora_b * lora_scale``;
    without them (None) the layer computes exactly what it did before adapters existed.
    """

    def __init__(self, din, dout, axes, *, rngs, param_dtype=jnp.float32, dtype=None, std=None):
        key = rngs.params()
        if std is None:
            w = _xavier(key, (din, dout), param_dtype, din, dout)
        else:
            w = (std * jax.random.normal(key, (din, dout), jnp.float32)).astype(param_dtype)
        self.kernel = nnx.Param(w, axes=tuple(axes))
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype), axes=(axes[1],))
        self.scale = nnx.data(None)  # set by quant.quantize_dit / load_dit(quantize=...)
        self.dtype = dtype
        self.lora_a = nnx.data(None)  # data attributes: add_lora may set LoRAParams here
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = jnp.dot(x, self.kernel.get_value().astype(dtype), preferred_element_type=jnp.float32)
        if self.scale is not None:
            y = y * self.scale.get_value()
        if self.lora_a is not None:
            # The rank-r bottleneck is rounded to the compute dtype, as a bf16 PEFT layer does.
            xa = jnp.dot(x, self.lora_a.get_value().astype(dtype), preferred_element_type=jnp.float32).astype(dtype)
            b = self.lora_b.get_value().astype(dtype)
            y = y + jnp.dot(xa, b, preferred_element_type=jnp.float32) * self.lora_scale
        return (y + self.bias.get_value().astype(jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    """RMS norm over the last axis, computed in fp32 (Wan's q/k norm spans all heads)."""

    def __init__(self, dim, axis_name, *, eps):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(axis_name,))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale.get_value().astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: Array, eps: float, scale: Array | None = None, bias: Array | None = None) -> Array:
    """fp32 layer norm over the last axis (optionally affine); returns fp32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y


class AffineLayerNorm(nnx.Module):
    def __init__(self, dim, *, eps):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(sh.NORM,))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=(sh.NORM,))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.eps, self.scale.get_value(), self.bias.get_value()).astype(x.dtype)


class MLP(nnx.Module):
    """Linear -> activation -> Linear (Wan's ``ffn``, ``text_embedding``, ``time_embedding``)."""

    def __init__(self, din, dhidden, dout, act, axes_in, axes_out, *, rngs, param_dtype, dtype, std=None):
        self.fc1 = Linear(din, dhidden, axes_in, rngs=rngs, param_dtype=param_dtype, dtype=dtype, std=std)
        self.fc2 = Linear(dhidden, dout, axes_out, rngs=rngs, param_dtype=param_dtype, dtype=dtype, std=std)
        self.act = act

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# --------------------------------------------------------------------------- rope and time


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Per-head split of RoPE frequencies over (frame, height, width): 128 -> (44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, frame_offset: int = 0):
    """cos/sin tables [F*H*W, head_dim // 2] for post-patch grid positions (float64 on host).

    The grid is static, so the tables are compile-time constants computed in float64 as
    the original does, then rounded once to fp32.
    """
    f, h, w = grid
    tables = []
    for n, size, offset in zip(rope_axis_dims(head_dim), grid, (frame_offset, 0, 0)):
        inv = 1.0 / theta ** (np.arange(0, n, 2, dtype=np.float64) / n)
        tables.append(np.outer(np.arange(offset, offset + size, dtype=np.float64), inv))  # [size, n/2]
    ang = np.concatenate(
        [
            np.broadcast_to(tables[0][:, None, None], (f, h, w, tables[0].shape[-1])),
            np.broadcast_to(tables[1][None, :, None], (f, h, w, tables[1].shape[-1])),
            np.broadcast_to(tables[2][None, None, :], (f, h, w, tables[2].shape[-1])),
        ],
        axis=-1,
    ).reshape(f * h * w, head_dim // 2)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of ``x [B, L, N, H]`` in fp32."""
    b, l, n, h = x.shape
    xf = x.astype(jnp.float32).reshape(b, l, n, h // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(b, l, n, h).astype(x.dtype)


def sinusoidal_embedding(t: Array, dim: int) -> Array:
    """Wan's timestep embedding ``[cos(t f), sin(t f)]``, f = 10000^(-i/half), in fp32."""
    half = dim // 2
    freqs = jnp.asarray(np.power(10000.0, -np.arange(half, dtype=np.float64) / half), jnp.float32)
    ang = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)


# --------------------------------------------------------------------------- blocks


class Attention(nnx.Module):
    """Wan self/cross attention: q, k, v, o projections and RMS q/k norms over all heads."""

    def __init__(self, cfg: DiTConfig, *, rngs, param_dtype, dtype):
        d = cfg.dim
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.q = Linear(d, d, (sh.EMBED, sh.HEADS), **kw)
        self.k = Linear(d, d, (sh.EMBED, sh.HEADS), **kw)
        self.v = Linear(d, d, (sh.EMBED, sh.HEADS), **kw)
        self.o = Linear(d, d, (sh.HEADS, sh.EMBED), **kw)
        self.norm_q = RMSNorm(d, sh.HEADS, eps=cfg.eps) if cfg.qk_norm else None
        self.norm_k = RMSNorm(d, sh.HEADS, eps=cfg.eps) if cfg.qk_norm else None
        self.num_heads = cfg.num_heads

    def __call__(self, x: Array, context: Array | None, rope, impl: str) -> Array:
        b, l, d = x.shape
        src = x if context is None else context
        q, k, v = self.q(x), self.k(src), self.v(src)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        n = self.num_heads
        q = q.reshape(b, l, n, d // n)  # [B, L, N, H]
        k = k.reshape(b, src.shape[1], n, d // n)
        v = v.reshape(b, src.shape[1], n, d // n)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = sh.constrain(q, (sh.ACT_BATCH, sh.ACT_SEQ, sh.ACT_HEADS, None))
        out = attention(q, k, v, implementation=impl)
        return self.o(out.reshape(b, l, d))


class WanBlock(nnx.Module):
    """Modulated self-attention, cross-attention to text, modulated feed-forward."""

    def __init__(self, cfg: DiTConfig, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        mod = jax.random.normal(rngs.params(), (6, cfg.dim), jnp.float32) / math.sqrt(cfg.dim)
        self.modulation = nnx.Param(mod, axes=(None, sh.EMBED))
        self.self_attn = Attention(cfg, **kw)
        self.cross_attn = Attention(cfg, **kw)
        self.norm3 = AffineLayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.dim, gelu_tanh, (sh.EMBED, sh.MLP), (sh.MLP, sh.EMBED), **kw)
        self.eps = cfg.eps
        self.dtype = dtype
        # ReCamMaster's per-block camera layers (``add_camera_layers``); None: a plain Wan block.
        self.cam_encoder = nnx.data(None)  # Linear(12, D): a latent frame's 3x4 pose -> its tokens' offset
        self.projector = nnx.data(None)  # Linear(D, D) on the self-attention output

    def __call__(self, x: Array, e0: Array, context: Array, rope, impl: str, camera: Array | None = None) -> Array:
        # e0: [B, 6, D] (one timestep per sample) or [B, L, 6, D] (per-token timesteps)
        mod = self.modulation.get_value().astype(jnp.float32) + e0
        if mod.ndim == 3:
            mod = mod[:, None]  # [B, 1, 6, D]
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, :, i] for i in range(6))
        dtype = self.dtype
        h = layer_norm(x, self.eps) * (1 + scale) + shift
        if self.cam_encoder is not None:  # ReCamMaster: each frame's camera, broadcast over its tokens
            c = self.cam_encoder(camera.astype(dtype)).astype(jnp.float32)  # [B, F, D]
            h = h + jnp.repeat(c, x.shape[1] // camera.shape[1], axis=1)  # [B, L, D]
        attn = self.self_attn(h.astype(dtype), None, rope, impl)
        if self.projector is not None:
            attn = self.projector(attn)
        x = x + (attn.astype(jnp.float32) * gate).astype(x.dtype)
        h = x.astype(dtype) if self.norm3 is None else self.norm3(x).astype(dtype)
        x = x + self.cross_attn(h, context, None, impl).astype(x.dtype)
        h = (layer_norm(x, self.eps) * (1 + c_scale) + c_shift).astype(dtype)
        x = x + (self.ffn(h).astype(jnp.float32) * c_gate).astype(x.dtype)
        return sh.constrain(x, (sh.ACT_BATCH, sh.ACT_SEQ, sh.ACT_EMBED))


class Head(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs, param_dtype, dtype):
        out = cfg.out_dim * math.prod(cfg.patch_size)
        mod = jax.random.normal(rngs.params(), (2, cfg.dim), jnp.float32) / math.sqrt(cfg.dim)
        self.modulation = nnx.Param(mod, axes=(None, sh.EMBED))
        self.head = Linear(cfg.dim, out, (sh.EMBED, None), rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.eps = cfg.eps

    def __call__(self, x: Array, e: Array) -> Array:
        # e: [B, D] or [B, L, D]; the head is modulated by e (not e0), as in the original.
        mod = self.modulation.get_value().astype(jnp.float32) + (e[:, None, None] if e.ndim == 2 else e[:, :, None])
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        h = layer_norm(x, self.eps) * (1 + scale) + shift
        return self.head(h.astype(self.head.dtype or x.dtype))


class PatchEmbed(nnx.Module):
    """Non-overlapping 3D patches -> tokens; kernel [pt, ph, pw, Cin, D] (a Conv3d with stride = kernel)."""

    def __init__(self, cfg: DiTConfig, *, rngs, param_dtype, dtype):
        pt, ph, pw = cfg.patch_size
        fan_in = pt * ph * pw * cfg.in_dim
        w = _xavier(rngs.params(), (pt, ph, pw, cfg.in_dim, cfg.dim), param_dtype, fan_in, cfg.dim)
        self.kernel = nnx.Param(w, axes=(None, None, None, sh.CONV_IN, sh.EMBED))
        self.bias = nnx.Param(jnp.zeros((cfg.dim,), param_dtype), axes=(sh.EMBED,))
        self.patch_size = cfg.patch_size
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        b, f, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, pt * ph * pw * c)  # [B, L, pt*ph*pw*C]
        kernel = self.kernel.get_value().reshape(-1, self.kernel.get_value().shape[-1])
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
        return (y + self.bias.get_value().astype(jnp.float32)).astype(dtype)


# --------------------------------------------------------------------------- model


def _stacked_blocks(cfg: DiTConfig, rngs: nnx.Rngs, param_dtype, dtype) -> WanBlock:
    """``num_layers`` blocks as one WanBlock whose variables have a leading ``layers`` axis."""
    key = rngs.params()
    make = lambda k: WanBlock(cfg, rngs=nnx.Rngs(params=k), param_dtype=param_dtype, dtype=dtype)  # noqa: E731
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(jax.random.key(0))))
    state = jax.vmap(lambda k: nnx.state(make(k)))(jax.random.split(key, cfg.num_layers))

    def add_layer_axis(var):
        return var.replace(var.get_value(), axes=(sh.LAYERS, *(sh.variable_axes(var) or ())))

    state = jax.tree.map(add_layer_axis, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


class WanDiT(nnx.Module):
    """The Wan DiT. Call with channels-last latents; see the module docstring."""

    def __init__(
        self,
        config: str | DiTConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = jnp.float32,
        attention: str = "xla",
        remat: str = "none",
    ):
        cfg = get_config(config)
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        self.config = cfg
        self.dtype = dtype
        self.attention = attention
        self.remat = remat
        # Set by sampler.place_experts (sample.offload=blocks): the stacked block weights live in
        # host memory and run_blocks brings each layer to the device inside the scan.
        self.stream_blocks = False
        # CameraCtrl II's camera patchify (``add_camera_patch``): Plücker ray maps -> tokens added
        # to the video tokens before the first block; None: a plain Wan DiT.
        self.camera_patch = nnx.data(None)
        # FactorPortrait's expression controller (``add_expression_layers``): per-frame expression
        # codes -> a per-latent-frame offset of the time embedding; None: a plain Wan DiT.
        self.expression = nnx.data(None)
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        d = cfg.dim
        self.patch_embedding = PatchEmbed(cfg, **kw)
        self.text_embedding = MLP(
            cfg.text_dim, d, d, gelu_tanh, (None, sh.EMBED), (sh.EMBED, None), std=0.02, **kw
        )
        fp32 = dict(rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32)
        self.time_embedding = MLP(cfg.freq_dim, d, d, jax.nn.silu, (None, sh.EMBED), (sh.EMBED, None), std=0.02, **fp32)
        self.time_projection = Linear(d, 6 * d, (sh.EMBED, sh.MLP), **fp32)
        self.blocks = _stacked_blocks(cfg, rngs, param_dtype, dtype)
        # Wan zero-inits the head for pretraining from scratch; a random model here stands in
        # for a pretrained one (tests, the mini config), so the head is random like the rest
        # and gradients reach every block from the first step.
        self.head = Head(cfg, **kw)

    def __call__(self, x: Array, t: Array, context: Array, *, out_frames: int | None = None,
                 camera: Array | None = None, rays: Array | None = None,
                 expression: Array | None = None) -> Array:
        """Velocity for latents ``x [B, F, H, W, Cin]`` at timesteps ``t [B]`` or ``[B, L]``.

        ``context [B, Lt, text_dim]`` is zero-padded to ``text_len``. ``out_frames`` keeps
        only the first latent frames of the output (FaceCam discards the source half).
        ``camera [B, F, 12]``: one pose per latent frame for blocks with camera layers
        (ReCamMaster, ``add_camera_layers``). ``rays [B, F, H, W, 7]``: Plücker ray maps and the
        clip-extension context mask on the latent grid for a model with a camera patchify
        (CameraCtrl II, ``add_camera_patch``). ``expression [B, T, E]``: per-video-frame expression
        codes for a model with an expression controller (FactorPortrait, ``add_expression_layers``).
        ``embed`` -> ``run_blocks`` -> ``unembed``; a step cache calls the parts itself.
        """
        tokens, cond = self.embed(x, t, context, camera=camera, rays=rays, expression=expression)
        return self.unembed(self.run_blocks(tokens, cond), cond, out_frames=out_frames)

    @property
    def has_camera_layers(self) -> bool:
        return self.blocks.cam_encoder is not None

    def embed(self, x: Array, t: Array, context: Array, *, camera: Array | None = None,
              rays: Array | None = None, expression: Array | None = None) -> tuple[Array, "BlockInputs"]:
        """Checks the inputs; returns the block stack's input tokens ``[B, L, D]`` (fp32) and its conditioning."""
        cfg = self.config
        _, f, h, w, c = x.shape
        pt, ph, pw = cfg.patch_size
        if c != cfg.in_dim:
            raise ValueError(f"latents have {c} channels, the model expects in_dim={cfg.in_dim}")
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent shape F,H,W = {(f, h, w)} is not divisible by the patch size {cfg.patch_size}")
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"context must be [B, Lt, {cfg.text_dim}], got {context.shape}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len={cfg.text_len}")
        grid = (f // pt, h // ph, w // pw)
        n_tokens = math.prod(grid)
        dtype = self.dtype
        if self.has_camera_layers != (camera is not None):
            raise ValueError("this DiT has ReCamMaster's camera layers: give camera [B, F, 12]" if camera is None else
                             "a camera was given but this DiT has no camera layers (ReCamMaster's: add_camera_layers, "
                             "or load_dit(..., camera='recammaster'))")
        if camera is not None and camera.shape != (x.shape[0], grid[0], 12):
            raise ValueError(f"camera must be [B, F, 12] = {(x.shape[0], grid[0], 12)} (one 3x4 pose per latent "
                             f"frame of the DiT input), got {camera.shape}")

        if (self.camera_patch is not None) != (rays is not None):
            raise ValueError(f"this DiT has a camera patchify (CameraCtrl II): give rays [B, F, H, W, "
                             f"{CAMERA_PATCH_CHANNELS}]" if rays is None
                             else "ray maps were given but this DiT has no camera patchify (add_camera_patch)")
        if rays is not None and rays.shape != (*x.shape[:4], CAMERA_PATCH_CHANNELS):
            raise ValueError(f"rays must be [B, F, H, W, {CAMERA_PATCH_CHANNELS}] = "
                             f"{(*x.shape[:4], CAMERA_PATCH_CHANNELS)} (the latent grid: Plücker rays and the "
                             f"context mask), got {rays.shape}")
        x_tok = self.patch_embedding(x.astype(dtype))  # [B, L, D]
        x_tok = x_tok.astype(jnp.float32)
        if rays is not None:  # CameraCtrl II: the rays' own patchify, added before the first block
            x_tok = x_tok + self.camera_patch(rays.astype(dtype)).astype(jnp.float32)
        x_tok = sh.constrain(x_tok, (sh.ACT_BATCH, sh.ACT_SEQ, sh.ACT_EMBED))

        t = jnp.asarray(t)
        if t.ndim == 2 and t.shape[1] != n_tokens:
            raise ValueError(f"per-token timesteps must be [B, {n_tokens}] for this latent shape, got {t.shape}")
        if (self.expression is not None) != (expression is not None):
            raise ValueError("this DiT has an expression controller (FactorPortrait): give expression [B, T, E]"
                             if expression is None else "expression codes were given but this DiT has no "
                             "expression controller (add_expression_layers)")
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim))  # [B, D] or [B, L, D]
        if expression is not None:
            e, e0 = self._expression_modulation(e, expression, grid)
        else:
            e0 = self.time_projection(jax.nn.silu(e))
            e0 = e0.reshape(*e0.shape[:-1], 6, cfg.dim)  # [B, 6, D] or [B, L, 6, D]

        ctx = jnp.pad(context, ((0, 0), (0, cfg.text_len - context.shape[1]), (0, 0)))
        ctx = self.text_embedding(ctx.astype(dtype))  # [B, text_len, D]

        cos, sin = rope_tables(grid, cfg.head_dim)
        return x_tok, BlockInputs(e, e0, ctx, (jnp.asarray(cos), jnp.asarray(sin)), grid, camera)

    def _expression_modulation(self, e: Array, expression: Array, grid: tuple[int, int, int]) -> tuple[Array, Array]:
        """FactorPortrait's frame-specific timestep embeddings: the expression controller's offset
        per latent frame added to the time embedding ``e [B, D]`` (or per token ``[B, L, D]``), then
        the block modulation from it; both expanded to the tokens of their frame ->
        ``e [B, L, D]``, ``e0 [B, L, 6, D]``. The projection runs per frame, not per token."""
        d = self.config.dim
        offset = self.expression(expression, grid[0])  # [B, F, D] fp32, F the DiT input's latent frames
        tokens_per_frame = grid[1] * grid[2]
        if e.ndim == 2:
            e = e[:, None] + offset  # [B, F, D]
            e0 = self.time_projection(jax.nn.silu(e)).reshape(*e.shape[:2], 6, d)  # [B, F, 6, D]
            return _per_token(e, tokens_per_frame), _per_token(e0, tokens_per_frame)
        e = e + _per_token(offset, tokens_per_frame)  # per-token timesteps: [B, L, D]
        return e, self.time_projection(jax.nn.silu(e)).reshape(*e.shape[:2], 6, d)

    def run_blocks(self, x: Array, cond: "BlockInputs") -> Array:
        """The block stack (one ``lax.scan`` over the stacked layers): tokens ``[B, L, D]`` -> tokens."""
        graphdef, state = nnx.split(self.blocks)
        impl = self.attention
        e0, ctx, rope, camera = cond.e0, cond.context, cond.rope, cond.camera

        def body(carry, layer_state):
            return nnx.merge(graphdef, layer_state)(carry, e0, ctx, rope, impl, camera), None

        policy = REMAT_POLICIES[self.remat]
        if policy is not None:
            body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=False)
        if self.stream_blocks:
            return _streamed_scan(body, x, state)
        x, _ = jax.lax.scan(body, x, state)
        return x

    def unembed(self, x_tok: Array, cond: "BlockInputs", *, out_frames: int | None = None) -> Array:
        """The head on the block stack's output tokens: ``[B, F', H, W, Cout]`` (fp32), ``F' = out_frames or F``."""
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        grid, e = cond.grid, cond.e
        b = x_tok.shape[0]
        keep = grid[0] if out_frames is None else out_frames // pt
        n_keep = keep * grid[1] * grid[2]
        x_tok = x_tok[:, :n_keep]
        e_head = e if e.ndim == 2 else e[:, :n_keep]
        out = self.head(x_tok, e_head)  # [B, L', pt*ph*pw*Cout]
        out = out.reshape(b, keep, grid[1], grid[2], pt, ph, pw, cfg.out_dim)
        out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [B, F', pt, H', ph, W', pw, C]
        return out.reshape(b, keep * pt, grid[1] * ph, grid[2] * pw, cfg.out_dim).astype(jnp.float32)


def _per_token(per_frame: Array, tokens_per_frame: int) -> Array:
    """``[B, F, ...]`` -> ``[B, F * tokens_per_frame, ...]``: each latent frame's value on its tokens
    (tokens are frame-major, as the patch embedding lays them out)."""
    b, f = per_frame.shape[:2]
    out = jnp.broadcast_to(per_frame[:, :, None], (b, f, tokens_per_frame, *per_frame.shape[2:]))
    return out.reshape(b, f * tokens_per_frame, *per_frame.shape[2:])


def _streamed_scan(body, x: Array, host_state):
    """``lax.scan(body, x, host_state)`` over stacked layers that live in host memory: iteration
    i copies layer i to the device while the layer fetched before it runs, so the copy of the
    next layer overlaps the current one's compute and only two layers are on the device."""
    mesh, rules = sh.current_mesh(), sh.current_rules()
    if mesh is None or mesh.empty:
        raise ValueError("streaming the blocks from host memory needs an active mesh (sharding.use_mesh)")

    def to_device(layer):
        def put(var):
            value = var.get_value()
            spec = sh.logical_to_spec((sh.variable_axes(var) or ())[1:] or None, value.shape, mesh, rules)
            return var.replace(jax.device_put(value, NamedSharding(mesh, spec, memory_kind="device")))

        return jax.tree.map(put, layer, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def step(carry, host_layer):
        x, current, i = carry
        fetched = to_device(host_layer)  # layer i, for the next iteration
        x = jax.lax.cond(i > 0, lambda: body(x, current)[0], lambda: x)  # layer i - 1
        return (x, fetched, i + 1), None

    placeholder = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), host_state)
    (x, last, _), _ = jax.lax.scan(step, (x, to_device(placeholder), jnp.zeros((), jnp.int32)), host_state)
    return body(x, last)[0]


@functools.partial(jax.tree_util.register_dataclass, data_fields=("e", "e0", "context", "rope", "camera"),
                   meta_fields=("grid",))
@dataclasses.dataclass(frozen=True)
class BlockInputs:
    """One forward's conditioning of the block stack and the head (``WanDiT.embed``)."""

    e: Array  # [B, D] or [B, L, D] time embedding (modulates the head)
    e0: Array  # [B, 6, D] or [B, L, 6, D] block modulation
    context: Array  # [B, text_len, D] embedded text
    rope: tuple[Array, Array]  # cos, sin [L, head_dim // 2]
    grid: tuple[int, int, int]  # post-patch (F, H, W)
    camera: Array | None = None  # [B, F, 12] per-frame poses for blocks with camera layers (ReCamMaster)


# --------------------------------------------------------------------------- FaceCam


def facecam_velocity(
    model: WanDiT, noisy: Array, camera_latents: Array, source_latents: Array, t: Array, context: Array
) -> Array:
    """FaceCam's forward (SPEC 2): the target velocity from noisy target, camera and source latents.

    Target half ``[noisy, camera, 0]`` and source half ``[source, camera, 0]`` (channels),
    concatenated along frames (RoPE frame indices 0..2F-1) with one timestep per sample;
    the velocity is the first F frames of the output. All latents are ``[B, F, H, W, 16]``.
    """
    x = facecam_input(model, noisy, camera_latents, source_latents)
    return model(x, t, context, out_frames=noisy.shape[1])


def facecam_velocity_cached(
    model: WanDiT, noisy: Array, camera_latents: Array, source_latents: Array, t: Array, context: Array, *,
    skip: bool | Array, residual: Array
) -> tuple[Array, Array]:
    """``facecam_velocity`` with the block stack replaceable by a cached residual (``cached_forward``)."""
    x = facecam_input(model, noisy, camera_latents, source_latents)
    return cached_forward(model, x, t, context, out_frames=noisy.shape[1], skip=skip, residual=residual)


def cached_forward(model: WanDiT, x: Array, t: Array, context: Array, *, out_frames: int | None,
                   skip: bool | Array, residual: Array, camera: Array | None = None,
                   rays: Array | None = None, expression: Array | None = None) -> tuple[Array, Array]:
    """``model(x, t, context, out_frames=...)`` with the block stack replaceable by a cached
    residual (a step cache's hook).

    ``skip`` (a traced bool: ``lax.cond``; Python ``False``: no branch in the program) adds
    ``residual [B, L, D]`` to the stack's input tokens instead of running the blocks. Returns
    the output and the residual to cache: the blocks' output minus input when they ran (in
    ``residual``'s dtype), else ``residual`` itself. ``camera``, ``rays``, ``expression``: as for
    ``WanDiT.__call__``.
    """
    tokens, cond = model.embed(x, t, context, camera=camera, rays=rays, expression=expression)

    def run():
        out = model.run_blocks(tokens, cond)
        return out, (out - tokens).astype(residual.dtype)

    def reuse():
        return tokens + residual.astype(tokens.dtype), residual

    out, residual = run() if skip is False else jax.lax.cond(skip, reuse, run)
    return model.unembed(out, cond, out_frames=out_frames), residual


def facecam_token_shape(config: DiTConfig, noisy_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``[B, L, D]`` of the block stack's tokens for FaceCam latents ``noisy_shape [B, F, H, W, C]`` (both halves)."""
    b, f, h, w = noisy_shape[:4]
    pt, ph, pw = config.patch_size
    return b, (2 * f // pt) * (h // ph) * (w // pw), config.dim


def facecam_input(model: WanDiT, noisy: Array, camera_latents: Array, source_latents: Array) -> Array:
    """FaceCam's DiT input ``[B, 2F, H, W, in_dim]``: target half then source half along frames."""
    if not (noisy.shape == camera_latents.shape == source_latents.shape):
        raise ValueError(
            f"noisy {noisy.shape}, camera {camera_latents.shape} and source {source_latents.shape} latents must match"
        )
    c = noisy.shape[-1]
    pad = model.config.in_dim - 2 * c
    if pad < 0:
        raise ValueError(f"model in_dim {model.config.in_dim} is too small for two {c}-channel inputs; widen it")
    zeros = jnp.zeros((*noisy.shape[:-1], pad), noisy.dtype)
    target = jnp.concatenate([noisy, camera_latents.astype(noisy.dtype), zeros], axis=-1)
    source = jnp.concatenate([source_latents.astype(noisy.dtype), camera_latents.astype(noisy.dtype), zeros], -1)
    return jnp.concatenate([target, source], axis=1)  # [B, 2F, H, W, in_dim]


# --------------------------------------------------------------------------- ReCamMaster


def recammaster_input(model: WanDiT, noisy: Array, source_latents: Array) -> Array:
    """ReCamMaster's DiT input ``[B, 2F, H, W, in_dim]``: the noisy target then the source along
    frames (no extra channels; zero-padded when the model's input is wider)."""
    if noisy.shape != source_latents.shape:
        raise ValueError(f"noisy {noisy.shape} and source {source_latents.shape} latents must match")
    x = jnp.concatenate([noisy, source_latents.astype(noisy.dtype)], axis=1)
    pad = model.config.in_dim - x.shape[-1]
    if pad < 0:
        raise ValueError(f"model in_dim {model.config.in_dim} is narrower than the {x.shape[-1]}-channel latents")
    return jnp.pad(x, ((0, 0),) * 4 + ((0, pad),))


def recammaster_cameras(cameras: Array, frames: int) -> Array:
    """``cameras [B, F, 12]`` tiled over the DiT input's two halves: the source half gets the
    target's per-frame cameras too (ReCamMaster's ``repeat(1, 2, 1)``)."""
    if cameras.ndim != 3 or cameras.shape[1:] != (frames, 12):
        raise ValueError(f"cameras must be [B, {frames}, 12] (one 3x4 relative pose per latent frame, row-major), "
                         f"got {cameras.shape}")
    return jnp.concatenate([cameras, cameras], axis=1)


def recammaster_velocity(model: WanDiT, noisy: Array, source_latents: Array, cameras: Array, t: Array,
                         context: Array) -> Array:
    """ReCamMaster's forward (``model_fn_wan_video``): the target velocity ``[B, F, H, W, C]`` from
    noisy target and source latents ``[B, F, H, W, C]`` concatenated along frames (RoPE over all
    2F frames, one timestep) and ``cameras [B, F, 12]``, the 3x4 pose of each target latent
    frame relative to the first, row-major, entering every block through its camera layers
    (``add_camera_layers``). Any latent grid works."""
    x = recammaster_input(model, noisy, source_latents)
    return model(x, t, context, out_frames=noisy.shape[1], camera=recammaster_cameras(cameras, noisy.shape[1]))


def add_camera_layers(model: WanDiT) -> WanDiT:
    """ReCamMaster's per-block camera layers on ``model`` (in place, abstract models too): a
    ``cam_encoder`` Linear(12, D), zero-initialised, and a ``projector`` Linear(D, D), the
    identity, in every block, stacked over the layers like the block's other linears and in
    its parameter dtype. The model's output is unchanged until they are trained. Returns ``model``."""
    if model.has_camera_layers:
        return model
    cfg, blocks = model.config, model.blocks
    n, d = cfg.num_layers, cfg.dim
    param_dtype = blocks.self_attn.q.bias.get_value().dtype

    def stacked(din, dout, axes, kernel):
        layer = Linear(din, dout, axes, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=model.dtype)
        layer.kernel = nnx.Param(kernel.astype(param_dtype), axes=(sh.LAYERS, *axes))
        layer.bias = nnx.Param(jnp.zeros((n, dout), param_dtype), axes=(sh.LAYERS, axes[1]))
        return layer

    blocks.cam_encoder = stacked(12, d, (None, sh.EMBED), jnp.zeros((n, 12, d)))
    blocks.projector = stacked(d, d, (sh.EMBED, sh.HEADS), jnp.broadcast_to(jnp.eye(d), (n, d, d)))
    return model


# --------------------------------------------------------------------------- CameraCtrl II


# The camera patchify's input channels: a Plücker ray map (o x d, d), then CameraCtrl II's
# clip-extension mask (1 on clean context frames). A patchify of the mask concatenated to the
# rays is the patchify of the mask concatenated to the latents that the paper describes: both
# add a linear function of the mask to the video tokens.
CAMERA_PATCH_CHANNELS = 7


def add_camera_patch(model: WanDiT) -> WanDiT:
    """CameraCtrl II's camera patchify on ``model`` (in place, abstract models too): a patch
    embedding of the 6 channels of Plücker ray maps and the context mask's one
    (``CAMERA_PATCH_CHANNELS``) with the visual patchify's patch size and width,
    zero-initialised, whose tokens are added to the video tokens before the first block (the
    model's output is unchanged until it is trained). Returns ``model``."""
    if model.camera_patch is not None:
        return model
    param_dtype = model.patch_embedding.kernel.get_value().dtype
    layer = PatchEmbed(model.config.replace(in_dim=CAMERA_PATCH_CHANNELS), rngs=nnx.Rngs(0), param_dtype=param_dtype,
                       dtype=model.dtype)
    layer.kernel = nnx.Param(jnp.zeros_like(layer.kernel.get_value()), axes=(None, None, None, sh.CONV_IN, sh.EMBED))
    model.camera_patch = layer
    return model


# --------------------------------------------------------------------------- FactorPortrait


EXPRESSION_WIDTH = 128  # the expression features' width (the paper's expression latents are 128-d)
EXPRESSION_HEADS = 4
VAE_TIME_STRIDE = 4  # video frames per latent frame after the first (Wan VAE)


def group_frames(x: Array, stride: int = VAE_TIME_STRIDE) -> Array:
    """Per-video-frame features ``[B, T, C]`` -> per-latent-frame ``[B, 1 + (T - 1) // stride, stride * C]``
    as the Wan VAE groups frames: the first frame alone (repeated ``stride`` times, as Wan I2V's
    frame mask treats it), then chunks of ``stride`` consecutive frames (81 -> 21)."""
    b, t, c = x.shape
    if t < 1 or (t - 1) % stride:
        raise ValueError(f"expression codes need 1 + {stride}k frames (the VAE's frame grouping), got {t}")
    first = jnp.tile(x[:, :1], (1, 1, stride))  # [B, 1, stride*C]
    rest = x[:, 1:].reshape(b, (t - 1) // stride, stride * c)  # [B, k, stride*C]
    return jnp.concatenate([first, rest], axis=1)


def _frame_positions(t: int, width: int) -> Array:
    """Sinusoidal positions ``[T, width]`` of video frames 0..T-1 (self-attention alone is order-blind)."""
    return sinusoidal_embedding(jnp.arange(t, dtype=jnp.float32), width)


class TemporalLayer(nnx.Module):
    """A pre-norm transformer layer over the frames of one video: self-attention, then an MLP (fp32)."""

    def __init__(self, width: int, heads: int, *, rngs, eps: float):
        kw = dict(rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32)
        self.norm1 = AffineLayerNorm(width, eps=eps)
        self.q, self.k, self.v, self.o = (Linear(width, width, (None, None), **kw) for _ in range(4))
        self.norm2 = AffineLayerNorm(width, eps=eps)
        self.ffn = MLP(width, 4 * width, width, gelu_tanh, (None, None), (None, None), **kw)
        self.heads = heads

    def __call__(self, x: Array) -> Array:
        b, t, w = x.shape
        n = self.heads
        h = self.norm1(x)
        q, k, v = (f(h).reshape(b, t, n, w // n) for f in (self.q, self.k, self.v))  # [B, T, N, H]
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(w // n)
        attn = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, w)
        x = x + self.o(attn)
        return x + self.ffn(self.norm2(x))


class ExpressionController(nnx.Module):
    """FactorPortrait's expression controller (paper 4.2): per-video-frame expression codes
    ``[B, T, E]`` -> a learned projection to ``EXPRESSION_WIDTH`` -> two self-attention layers over
    time -> grouped per latent frame (``group_frames``) -> ``out`` to the model width: one offset
    per latent frame, added to the shared time embedding. ``out`` is zero-initialised, so the
    offset is zero (and the model unchanged) until it is trained."""

    def __init__(self, codes_dim: int, dim: int, *, rngs, eps: float = 1e-6, width: int = EXPRESSION_WIDTH,
                 heads: int = EXPRESSION_HEADS):
        kw = dict(rngs=rngs, param_dtype=jnp.float32, dtype=jnp.float32)
        self.proj = Linear(codes_dim, width, (None, None), **kw)
        self.layer0 = TemporalLayer(width, heads, rngs=rngs, eps=eps)
        self.layer1 = TemporalLayer(width, heads, rngs=rngs, eps=eps)
        self.out = Linear(VAE_TIME_STRIDE * width, dim, (None, sh.EMBED), **kw)
        self.out.kernel.set_value(jnp.zeros_like(self.out.kernel.get_value()))
        self.codes_dim, self.width = codes_dim, width

    def __call__(self, codes: Array, frames: int) -> Array:
        """``codes [B, T, E]`` -> ``[B, frames, D]`` fp32: the grouped offsets on the last latent
        frames, zero on the leading ones (a reference frame prepended to the video: no expression)."""
        if codes.ndim != 3 or codes.shape[-1] != self.codes_dim:
            raise ValueError(f"expression codes must be [B, T, {self.codes_dim}], got {codes.shape}")
        x = self.proj(codes.astype(jnp.float32)) + _frame_positions(codes.shape[1], self.width)  # [B, T, W]
        x = self.layer1(self.layer0(x))
        offset = self.out(group_frames(x))  # [B, F_video, D]
        lead = frames - offset.shape[1]
        if lead < 0:
            raise ValueError(f"{codes.shape[1]} frames of expression codes make {offset.shape[1]} latent frames, "
                             f"more than the DiT input's {frames}")
        return jnp.pad(offset, ((0, 0), (lead, 0), (0, 0)))


def add_expression_layers(model: WanDiT, codes_dim: int) -> WanDiT:
    """FactorPortrait's expression controller on ``model`` (in place, abstract models too): codes of
    ``codes_dim`` per video frame modulate every block through frame-specific timestep embeddings
    (``WanDiT.embed``). Zero-initialised output: the model's output is unchanged until it is
    trained. Returns ``model``."""
    if model.expression is not None:
        return model
    model.expression = ExpressionController(codes_dim, model.config.dim, rngs=nnx.Rngs(0), eps=model.config.eps)
    return model


def widen_patch_embedding(model: WanDiT, in_dim: int = 36) -> WanDiT:
    """Widens a T2V patch embedding (e.g. 16 channels) to ``in_dim`` with zero-initialised new channels.

    The widened model computes exactly the same output for inputs whose extra channels
    are anything, at initialisation, so fine-tuning starts from the base model.
    """
    kernel = model.patch_embedding.kernel.get_value()
    old = kernel.shape[3]
    if in_dim < old:
        raise ValueError(f"cannot narrow the patch embedding from {old} to {in_dim} channels")
    if in_dim == old:
        return model
    pad = jnp.zeros((*kernel.shape[:3], in_dim - old, kernel.shape[4]), kernel.dtype)
    model.patch_embedding.kernel.set_value(jnp.concatenate([kernel, pad], axis=3))
    model.config = model.config.replace(in_dim=in_dim)
    return model


def param_count(model_or_state) -> int:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(state)))


def abstract_model(config: str | DiTConfig, **kw) -> WanDiT:
    """The model with ShapeDtypeStruct leaves (no memory): for counting, sharding and loading."""
    return nnx.eval_shape(lambda: WanDiT(config, rngs=nnx.Rngs(0), **kw))
