"""Wan 2.1 / 2.2 video VAE in Flax NNX: causal 3D conv autoencoder, channels-last.

Video ``[B, T, H, W, 3]`` in [-1, 1] <-> latents ``[B, F, H/s, W/s, z]`` with
``F = 1 + (T - 1) / 4`` and s = 8 (Wan2.1, z 16) or 16 (Wan2.2, z 48, patchify 2).

The reference (official ``wan/modules/vae.py``, ``vae2_2.py`` and diffusers
``AutoencoderKLWan``) runs the encoder on frame 0 alone and then on chunks of 4 frames,
and the decoder on one latent frame at a time, with a cache of the last 2 input frames in
front of every causal conv. Here each stateful layer is a function
``(x, cache) -> (y, new_cache)`` where ``cache=None`` means "x starts the clip", so:

* the chunked path runs chunk 0 with ``cache=None`` and then ``lax.scan``s the remaining
  static-shape chunks with the caches as carry: memory is bounded by one chunk and compile
  time does not depend on the clip length;
* the unchunked path feeds the whole clip with ``cache=None`` and gives the same numbers
  (a causal conv over the whole clip equals the cached chunks), which the tests check.

Spatial tiling (``tile=``) processes overlapping spatial tiles one at a time (``lax.map``)
and blends them with linear ramps; spatial sharding pins activations to the ``ACT_HEIGHT``
logical axis when traced under ``facecam_jax.sharding.use_mesh``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax import sharding
from facecam_jax.sharding import ACT_BATCH, ACT_HEIGHT, CONV_IN, CONV_OUT, NORM

# Per-channel latent statistics (the diffusers ``AutoencoderKLWan`` / official defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

CACHE_T = 2  # frames of input kept in front of every k=3 causal conv
CHUNK_T = 4  # video frames per encoder chunk after frame 0 (one latent frame)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Wan VAE hyper-parameters, named as the original ``WanVAE_`` constructor's.

    ``is_residual`` and ``patch_size`` select the Wan2.2 design (parameter-free
    avg-down / dup-up shortcuts around each stage, patchify-2 of the pixels);
    ``dec_dim`` is the decoder base width (Wan2.2: 256 vs encoder 160; None = ``dim``).
    ``latents_mean``/``latents_std`` normalise latents (SPEC 3); None disables
    ``normalize=True`` with a clear error.
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dec_dim: int | None = None
    is_residual: bool = False
    patch_size: int = 1
    latents_mean: tuple[float, ...] | None = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] | None = WAN21_LATENTS_STD

    def __post_init__(self):
        # Lists from JSON/configs become tuples so the config stays hashable.
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs one flag per down stage ({len(self.dim_mult) - 1} for dim_mult "
                f"{self.dim_mult}), got {self.temperal_downsample}"
            )
        if sum(map(bool, self.temperal_downsample)) != 2:
            raise ValueError(
                "Wan VAEs compress time by 4 (exactly two temporal down stages); got temperal_downsample "
                f"{self.temperal_downsample}"
            )
        if self.patch_size not in (1, 2):
            raise ValueError(f"patch_size must be 1 (Wan2.1) or 2 (Wan2.2), got {self.patch_size}")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.z_dim:
                raise ValueError(f"{name} has {len(value)} values but z_dim is {self.z_dim}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("give both latents_mean and latents_std, or neither")

    @property
    def decoder_dim(self) -> int:
        return self.dec_dim if self.dec_dim is not None else self.dim

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent along H and W (8 for Wan2.1, 16 for Wan2.2)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def temporal_stride(self) -> int:
        return 4

    @property
    def video_channels(self) -> int:
        return 3 * self.patch_size**2

    @classmethod
    def wan21(cls) -> VAEConfig:
        """``Wan2.1_VAE.pth``: z 16, stride (4, 8, 8), 127 M parameters."""
        return cls()

    @classmethod
    def wan22(cls) -> VAEConfig:
        """``Wan2.2_VAE.pth`` (TI2V-5B): z 48, stride (4, 16, 16), patchify 2."""
        return cls(
            dim=160,
            dec_dim=256,
            z_dim=48,
            is_residual=True,
            patch_size=2,
            latents_mean=WAN22_LATENTS_MEAN,
            latents_std=WAN22_LATENTS_STD,
        )

    @classmethod
    def tiny(cls, version: str = "2.1") -> VAEConfig:
        """A few-thousand-parameter config with the full Wan topology, for tests."""
        if version == "2.1":
            return cls(dim=8, z_dim=4, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0))
        if version == "2.2":
            rng = np.random.default_rng(22)
            return cls(
                dim=8,
                dec_dim=12,
                z_dim=8,
                is_residual=True,
                patch_size=2,
                latents_mean=tuple(np.round(rng.normal(0, 0.3, 8), 4).tolist()),
                latents_std=tuple(np.round(rng.uniform(0.4, 1.6, 8), 4).tolist()),
            )
        raise ValueError(f"tiny config version must be '2.1' or '2.2', got {version!r}")


# ----------------------------------------------------------------------------- layers

def _lecun_normal(key, shape) -> jax.Array:
    """LeCun-scaled normal (fan_in = all but the last axis), drawn flat then reshaped: XLA:CPU
    takes seconds to compile the partitionable threefry for each 5-D kernel shape."""
    fan_in = math.prod(shape[:-1])
    return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape) / math.sqrt(fan_in)


def _param(rngs: nnx.Rngs | None, shape, dtype, axes, init=None):
    if init is None:
        value = _lecun_normal(rngs.params(), shape).astype(dtype)
    else:
        value = jnp.full(shape, init, dtype)
    return nnx.Param(value, axes=axes)


def _pin(x: jax.Array) -> jax.Array:
    """Pins a ``[B, T, H, W, C]`` activation: batch over data, height over the spatial axes."""
    return sharding.constrain(x, (ACT_BATCH, None, ACT_HEIGHT, None, None))


class CausalConv3d(nnx.Module):
    """3D conv, causal in time (all temporal padding in front), 'same' in space.

    ``__call__(x, cache)`` prepends ``cache`` (the previous ``kt - 1`` input frames, zeros
    when ``cache`` is None) and returns the new cache; ``valid(x)`` is the bare conv.
    """

    def __init__(self, cin, cout, kernel=(3, 3, 3), *, stride_t=1, dtype=jnp.float32, rngs=None):
        kt, kh, kw = kernel
        self.kernel_size, self.stride_t = (kt, kh, kw), stride_t
        self.kernel = _param(rngs, (kt, kh, kw, cin, cout), dtype, (None, None, None, CONV_IN, CONV_OUT))
        self.bias = _param(rngs, (cout,), dtype, (CONV_OUT,), init=0.0)

    def valid(self, x: jax.Array) -> jax.Array:
        """The conv with no temporal padding: ``[B, T, H, W, Ci] -> [B, (T-kt)//s+1, H, W, Co]``.

        Computed as one per-frame 2D conv over the kt temporal taps stacked on channels (a
        matmul for 1x1 kernels): the same sums as a 3D conv, but XLA's CPU 3D conv is ~2x
        slower than this, and per-frame NHWC 2D convs are the best-tuned case of cuDNN.
        """
        kt, kh, kw = self.kernel_size
        b, t, h, w, c = x.shape
        t_out = (t - kt) // self.stride_t + 1
        taps = [x[:, i : i + self.stride_t * (t_out - 1) + 1 : self.stride_t] for i in range(kt)]
        taps = jnp.concatenate(taps, axis=-1) if kt > 1 else taps[0]  # [B, T', H, W, kt*Ci], tap-major
        kernel = self.kernel.get_value().astype(x.dtype).transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * c, -1)
        if kh == kw == 1:
            y = jnp.einsum("bthwi,io->bthwo", taps, kernel[0, 0])
        else:
            y = jax.lax.conv_general_dilated(
                taps.reshape(b * t_out, h, w, kt * c),
                kernel,
                window_strides=(1, 1),
                padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            ).reshape(b, t_out, h, w, -1)
        return y + self.bias.get_value().astype(x.dtype)

    def __call__(self, x: jax.Array, cache: jax.Array | None = None):
        keep = self.kernel_size[0] - 1
        if cache is None:
            cache = jnp.zeros(x.shape[:1] + (keep,) + x.shape[2:], x.dtype)
        x = jnp.concatenate([cache, x], axis=1)  # [B, keep + T, H, W, C]
        return self.valid(x), x[:, x.shape[1] - keep :]


class Conv2d(nnx.Module):
    """Per-frame 2D conv (the resamplers' spatial conv), explicit (low, high) padding."""

    def __init__(self, cin, cout, *, stride=1, padding=((1, 1), (1, 1)), dtype=jnp.float32, rngs=None):
        self.stride, self.padding = stride, tuple(tuple(p) for p in padding)
        self.kernel = _param(rngs, (3, 3, cin, cout), dtype, (None, None, CONV_IN, CONV_OUT))
        self.bias = _param(rngs, (cout,), dtype, (CONV_OUT,), init=0.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, h, w, c),
            self.kernel.get_value().astype(x.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + self.bias.get_value().astype(x.dtype)
        return y.reshape(b, t, *y.shape[1:])


class Pointwise(nnx.Module):
    """A 1x1(x1) conv as a matmul over channels (shortcuts, quant convs, attention q/k/v/out)."""

    def __init__(self, cin, cout, *, dtype=jnp.float32, rngs=None):
        self.kernel = _param(rngs, (cin, cout), dtype, (CONV_IN, CONV_OUT))
        self.bias = _param(rngs, (cout,), dtype, (CONV_OUT,), init=0.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...i,io->...o", x, self.kernel.get_value().astype(x.dtype)) + self.bias.get_value().astype(x.dtype)


class RMSNorm(nnx.Module):
    """Wan's RMS_norm: ``l2_normalize(x, channels) * sqrt(C) * gamma``, normalised in fp32."""

    def __init__(self, dim, *, dtype=jnp.float32):
        self.scale = math.sqrt(dim)
        self.gamma = nnx.Param(jnp.ones((dim,), dtype), axes=(NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12)  # torch F.normalize's eps
        return (y.astype(x.dtype) * self.scale) * self.gamma.get_value().astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm-SiLU-conv3 twice plus a (1x1 conv when widths differ) shortcut; caches ``(c1, c2)``."""

    def __init__(self, cin, cout, *, dtype=jnp.float32, rngs=None):
        self.norm1 = RMSNorm(cin, dtype=dtype)
        self.conv1 = CausalConv3d(cin, cout, dtype=dtype, rngs=rngs)
        self.norm2 = RMSNorm(cout, dtype=dtype)
        self.conv2 = CausalConv3d(cout, cout, dtype=dtype, rngs=rngs)
        self.shortcut = Pointwise(cin, cout, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x, cache=None):
        c1, c2 = (None, None) if cache is None else cache
        skip = x if self.shortcut is None else self.shortcut(x)
        h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), c2)
        return h + skip, (c1, c2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing)."""

    def __init__(self, dim, *, dtype=jnp.float32, rngs=None):
        self.norm = RMSNorm(dim, dtype=dtype)
        self.to_qkv = Pointwise(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = Pointwise(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)  # [B*T, L, N=1, 3C]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        y = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(C)
        return x + self.proj(y.reshape(b, t, h, w, c))


class Resample(nnx.Module):
    """Spatial x2 up/down sampling, optionally with the causal temporal x2 of the 3D modes.

    ``up3d``: a (3,1,1) causal conv doubles channels, split into two frames; frame 0 of the
    clip skips it (the reference's "Rep" cache), so 1 + 2(T-1) frames come out.
    ``down3d``: a (3,1,1) stride-2 conv over [previous frame, chunk]; frame 0 passes through.
    """

    MODES = ("up2d", "up3d", "down2d", "down3d")

    def __init__(self, dim, mode, *, out_dim=None, dtype=jnp.float32, rngs=None):
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            self.conv = Conv2d(dim, out_dim or dim, dtype=dtype, rngs=rngs)
        else:
            self.conv = Conv2d(dim, dim, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
        if mode == "up3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), dtype=dtype, rngs=rngs)
        elif mode == "down3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride_t=2, dtype=dtype, rngs=rngs)
        else:
            self.time_conv = None

    @staticmethod
    def _frames_from_channels(y: jax.Array) -> jax.Array:
        """``[B, T, H, W, 2C] -> [B, 2T, H, W, C]``: channel half s becomes frame 2t + s."""
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
        return y.reshape(b, 2 * t, h, w, c2 // 2)

    def _time_up(self, x, cache):
        if cache is not None:
            y, cache = self.time_conv(x, cache)
            return self._frames_from_channels(y), cache
        head, rest = x[:, :1], x[:, 1:]
        if rest.shape[1] == 0:
            return head, jnp.zeros(x.shape[:1] + (CACHE_T,) + x.shape[2:], x.dtype)
        y, cache = self.time_conv(rest, None)
        return jnp.concatenate([head, self._frames_from_channels(y)], axis=1), cache

    def _time_down(self, x, cache):
        new_cache = x[:, -1:]
        if cache is not None:
            return self.time_conv.valid(jnp.concatenate([cache, x], axis=1)), new_cache
        if x.shape[1] < 3:  # frame 0 alone: passes through
            return x[:, :1], new_cache
        return jnp.concatenate([x[:, :1], self.time_conv.valid(x)], axis=1), new_cache

    def __call__(self, x, cache=None):
        state = ()
        if self.mode == "up3d":
            x, state = self._time_up(x, cache)
        if self.mode.startswith("up"):
            b, t, h, w, c = x.shape
            x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, t, h, 2, w, 2, c)).reshape(b, t, 2 * h, 2 * w, c)
        x = self.conv(x)
        if self.mode == "down3d":
            x, state = self._time_down(x, cache)
        return x, state


def avg_down(x: jax.Array, cout: int, factor_t: int, factor_s: int) -> jax.Array:
    """Wan2.2's parameter-free shortcut: space/time-to-channel, then mean over channel groups.

    Time is zero-padded in front to a multiple of ``factor_t`` (frame 0 pairs with zeros).
    """
    b, t, h, w, c = x.shape
    pad = (-t) % factor_t
    if pad:
        x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
        t += pad
    ft, fs = factor_t, factor_s
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # [B, T', H', W', C, ft, fs, fs]: torch's channel order
    x = x.reshape(b, t // ft, h // fs, w // fs, cout, c * ft * fs * fs // cout)
    return jnp.mean(x, axis=-1)


def dup_up(x: jax.Array, cout: int, factor_t: int, factor_s: int, first: bool) -> jax.Array:
    """Wan2.2's parameter-free shortcut: repeat channels, then channel-to-space/time.

    At the clip start the first ``factor_t - 1`` frames are dropped, matching the main path.
    """
    b, t, h, w, c = x.shape
    ft, fs = factor_t, factor_s
    x = jnp.repeat(x, cout * ft * fs * fs // c, axis=-1)
    x = x.reshape(b, t, h, w, cout, ft, fs, fs).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, t * ft, h * fs, w * fs, cout)
    return x[:, ft - 1 :] if first else x


class MidBlock(nnx.Module):
    def __init__(self, dim, *, dtype=jnp.float32, rngs=None):
        self.res0 = ResidualBlock(dim, dim, dtype=dtype, rngs=rngs)
        self.attn = AttentionBlock(dim, dtype=dtype, rngs=rngs)
        self.res1 = ResidualBlock(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, cache=None):
        c0, c1 = (None, None) if cache is None else cache
        x, c0 = self.res0(x, c0)
        x = self.attn(x)
        x, c1 = self.res1(x, c1)
        return x, (c0, c1)


class EncoderStage(nnx.Module):
    """Residual blocks at one resolution, then (except the last stage) a 2x down resample."""

    def __init__(self, cin, cout, num_res, *, down: str | None, residual: bool, dtype=jnp.float32, rngs=None):
        self.resnets = nnx.List(
            [ResidualBlock(cin if i == 0 else cout, cout, dtype=dtype, rngs=rngs) for i in range(num_res)]
        )
        self.downsample = Resample(cout, down, dtype=dtype, rngs=rngs) if down else None
        # Wan2.2: a parameter-free avg-down shortcut around the whole stage.
        self.shortcut = None
        if residual:
            self.shortcut = (cout, 2 if down == "down3d" else 1, 2 if down else 1)

    def __call__(self, x, cache=None):
        caches = [None] * (len(self.resnets) + 1) if cache is None else list(cache)
        skip = x
        for i, block in enumerate(self.resnets):
            x, caches[i] = block(x, caches[i])
        if self.downsample is not None:
            x, caches[-1] = self.downsample(x, caches[-1])
        else:
            caches[-1] = ()
        if self.shortcut is not None:
            x = x + avg_down(skip, *self.shortcut)
        return x, tuple(caches)


class DecoderStage(nnx.Module):
    """Residual blocks at one resolution, then (except the last stage) a 2x up resample."""

    def __init__(self, cin, cout, num_res, *, up: str | None, residual: bool, dtype=jnp.float32, rngs=None):
        self.resnets = nnx.List(
            [ResidualBlock(cin if i == 0 else cout, cout, dtype=dtype, rngs=rngs) for i in range(num_res)]
        )
        # Wan2.1's up resample halves the width; Wan2.2's keeps it and adds a dup-up shortcut.
        out_dim = cout if residual else cout // 2
        self.upsample = Resample(cout, up, out_dim=out_dim, dtype=dtype, rngs=rngs) if up else None
        self.shortcut = None
        if residual and up:
            self.shortcut = (cout, 2 if up == "up3d" else 1, 2)

    def __call__(self, x, cache=None):
        first = cache is None
        caches = [None] * (len(self.resnets) + 1) if first else list(cache)
        skip = x
        for i, block in enumerate(self.resnets):
            x, caches[i] = block(x, caches[i])
        if self.upsample is not None:
            x, caches[-1] = self.upsample(x, caches[-1])
        else:
            caches[-1] = ()
        if self.shortcut is not None:
            x = x + dup_up(skip, *self.shortcut, first=first)
        return x, tuple(caches)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, rngs=None):
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.video_channels, dims[0], dtype=dtype, rngs=rngs)
        last = len(cfg.dim_mult) - 1
        self.stages = nnx.List(
            [
                EncoderStage(
                    dims[i],
                    dims[i + 1],
                    cfg.num_res_blocks,
                    down=None if i == last else ("down3d" if cfg.temperal_downsample[i] else "down2d"),
                    residual=cfg.is_residual,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(cfg.dim_mult))
            ]
        )
        self.mid = MidBlock(dims[-1], dtype=dtype, rngs=rngs)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, cache=None):
        """``[B, T, H, W, 3p^2] -> [B, T', H/8, W/8, 2z]`` and the new caches."""
        c_in, c_stages, c_mid, c_out = (None, [None] * len(self.stages), None, None) if cache is None else cache
        x, c_in = self.conv_in(_pin(x), c_in)
        new_stages = []
        for stage, c in zip(self.stages, c_stages):
            x, c = stage(_pin(x), c)
            new_stages.append(c)
        x, c_mid = self.mid(_pin(x), c_mid)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c_out)
        return x, (c_in, tuple(new_stages), c_mid, c_out)


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, rngs=None):
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], dtype=dtype, rngs=rngs)
        self.mid = MidBlock(dims[0], dtype=dtype, rngs=rngs)
        last = len(mult) - 1
        stages = []
        for i in range(len(mult)):
            cin = dims[i] // 2 if (i > 0 and not cfg.is_residual) else dims[i]
            up = None if i == last else ("up3d" if temperal_upsample[i] else "up2d")
            stages.append(
                DecoderStage(
                    cin, dims[i + 1], cfg.num_res_blocks + 1, up=up, residual=cfg.is_residual, dtype=dtype, rngs=rngs
                )
            )
        self.stages = nnx.List(stages)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], cfg.video_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x, cache=None):
        """``[B, F, h, w, z] -> [B, 1 + 4(F-1) or 4F, 8h, 8w, 3p^2]`` and the new caches."""
        c_in, c_mid, c_stages, c_out = (None, None, [None] * len(self.stages), None) if cache is None else cache
        x, c_in = self.conv_in(_pin(x), c_in)
        x, c_mid = self.mid(_pin(x), c_mid)
        new_stages = []
        for stage, c in zip(self.stages, c_stages):
            x, c = stage(_pin(x), c)
            new_stages.append(c)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(_pin(x))), c_out)
        return x, (c_in, c_mid, tuple(new_stages), c_out)


# ----------------------------------------------------------------------------- patchify / tiling


def patchify(x: jax.Array, p: int) -> jax.Array:
    """``[B, T, H, W, C] -> [B, T, H/p, W/p, C*p*p]``, channel order (c, pw, ph) as Wan2.2."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x: jax.Array, p: int) -> jax.Array:
    """Inverse of :func:`patchify`."""
    if p == 1:
        return x
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, cpp // (p * p))


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of equal-size tiles covering ``[0, size)``; the last one is aligned to the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile] if starts[-1] != size - tile else starts


def _ramp_weights(starts: Sequence[int], tile: int) -> np.ndarray:
    """``[n_tiles, tile]`` blend weights: linear cross-fades where neighbouring tiles overlap."""
    weights = np.ones((len(starts), tile), np.float32)
    pos = np.arange(tile, dtype=np.float32) + 0.5
    for i, s in enumerate(starts):
        if i > 0:
            ov = starts[i - 1] + tile - s
            weights[i] = np.minimum(weights[i], np.clip(pos / ov, 0.0, 1.0))
        if i + 1 < len(starts):
            ov = s + tile - starts[i + 1]
            weights[i] = np.minimum(weights[i], np.clip((tile - pos) / ov, 0.0, 1.0))
    return weights


def _tiled(fn, x: jax.Array, tile: tuple[int, int], overlap: int, scale: float) -> jax.Array:
    """Runs ``fn`` over overlapping spatial tiles of ``x`` one at a time and blends the outputs.

    ``tile``/``overlap`` are in input pixels; ``scale`` is output size / input size (8 for
    decode, 1/8 for encode). All tiles have the same shape, so ``fn`` is traced once.
    """
    _, _, h, w, _ = x.shape
    th, tw = min(tile[0], h), min(tile[1], w)
    ys, xs = _tile_starts(h, th, overlap), _tile_starts(w, tw, overlap)
    tiles = jnp.stack([x[:, :, i : i + th, j : j + tw] for i in ys for j in xs])  # [N, B, T, th, tw, C]
    out = jax.lax.map(fn, tiles)  # [N, B, T', th', tw', C']
    oth, otw = round(th * scale), round(tw * scale)
    oys, oxs = [round(i * scale) for i in ys], [round(j * scale) for j in xs]
    wy, wx = _ramp_weights(oys, oth), _ramp_weights(oxs, otw)
    b, t, _, _, c = out.shape[1:]
    acc = jnp.zeros((b, t, round(h * scale), round(w * scale), c), jnp.float32)
    norm = np.zeros((round(h * scale), round(w * scale)), np.float32)
    for n, (row, col) in enumerate(itertools.product(range(len(ys)), range(len(xs)))):
        weight = wy[row][:, None] * wx[col][None, :]  # [th', tw']
        i, j = oys[row], oxs[col]
        acc = acc.at[:, :, i : i + oth, j : j + otw].add(out[n].astype(jnp.float32) * weight[:, :, None])
        norm[i : i + oth, j : j + otw] += weight
    return (acc / norm[:, :, None]).astype(out.dtype)


# ----------------------------------------------------------------------------- the VAE


def _frozen(x):
    return tuple(_frozen(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class _RunOptions:
    """Static (hashable) options of one jitted encode/decode, the active mesh included."""

    chunked: bool
    tile: tuple[int, int] | None
    tile_overlap: int
    mesh: Any  # the mesh ``sharding.constrain`` pins activations to while tracing
    rules: Any

    @classmethod
    def make(cls, chunked, tile, tile_overlap):
        mesh = sharding.current_mesh()
        rules = _frozen(sharding.current_rules()) if mesh is not None else None
        return cls(bool(chunked), tile, tile_overlap, mesh, rules)


class WanVAE(nnx.Module):
    """The Wan 2.1 / 2.2 video autoencoder (posterior mean only; frozen in FaceCam).

    ``encode(video)`` -> normalised latents, ``decode(latents)`` -> video in [-1, 1], both
    channels-last and jitted (one compile per input shape and option set; they may also be
    called inside a caller's jit). Under ``sharding.use_mesh(mesh)`` activations are pinned
    to ``ACT_HEIGHT`` (frame height split over the mesh's fsdp/context axes, dropped where
    it does not divide); weights may stay replicated or be placed with ``shard_module``.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = Pointwise(2 * config.z_dim, 2 * config.z_dim, dtype=dtype, rngs=rngs)
        self.post_quant_conv = Pointwise(config.z_dim, config.z_dim, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)

    # ------------------------------------------------------------------ public API

    def encode(
        self,
        video: jax.Array,
        *,
        normalize: bool = True,
        pad: bool = False,
        chunked: bool = True,
        tile: int | tuple[int, int] | None = None,
        tile_overlap: int | None = None,
    ) -> jax.Array:
        """Video ``[B, T, H, W, 3]`` in [-1, 1] -> latents ``[B, 1 + (T-1)/4, H/s, W/s, z]`` (fp32).

        ``T`` must be ``1 + 4k``; ``pad=True`` instead repeats the last frame up to the next
        such length (decode then returns the padded length). ``normalize`` applies
        ``(z - mean) / std``. ``chunked=False`` runs the whole clip at once (more memory,
        same numbers). ``tile`` (pixels, int or (h, w)) encodes overlapping spatial tiles one
        at a time, cross-faded over ``tile_overlap`` pixels (default: a quarter of the tile).
        """
        cfg = self.config
        video = self._check_video(video, pad)
        tile, overlap = self._check_tile(tile, tile_overlap, video.shape[2:4], cfg.spatial_stride)
        self._check_stats(normalize)
        graphdef, state = nnx.split(self)
        return _encode_jit(graphdef, state, video, normalize, _RunOptions.make(chunked, tile, overlap))

    def decode(
        self,
        latents: jax.Array,
        *,
        normalize: bool = True,
        chunked: bool = True,
        tile: int | tuple[int, int] | None = None,
        tile_overlap: int | None = None,
        clamp: bool = True,
    ) -> jax.Array:
        """Latents ``[B, F, h, w, z]`` -> video ``[B, 1 + 4(F-1), h*s, w*s, 3]`` (fp32).

        ``normalize`` undoes the encode normalisation (``z * std + mean``); ``clamp`` clips
        to [-1, 1] as the reference does. ``tile``/``tile_overlap`` are in output pixels.
        """
        cfg = self.config
        latents = self._check_latents(latents)
        s = cfg.spatial_stride
        tile, overlap = self._check_tile(tile, tile_overlap, tuple(d * s for d in latents.shape[2:4]), s)
        self._check_stats(normalize)
        graphdef, state = nnx.split(self)
        return _decode_jit(graphdef, state, latents, normalize, clamp, _RunOptions.make(chunked, tile, overlap))

    # ------------------------------------------------------------------ traced bodies

    def _encode_frames(self, x: jax.Array, chunked: bool) -> jax.Array:
        """Patchified ``[B, 1+4k, H, W, C]`` -> posterior mean ``[B, 1+k, h, w, z]`` (unnormalised)."""
        if not chunked or x.shape[1] == 1:
            h, _ = self.encoder(x)
        else:
            h0, cache = self.encoder(x[:, :1])

            def step(cache, i):
                chunk = jax.lax.dynamic_slice_in_dim(x, 1 + i * CHUNK_T, CHUNK_T, axis=1)  # [B, 4, H, W, C]
                y, cache = self.encoder(chunk, cache)
                return cache, y

            _, hs = jax.lax.scan(step, cache, jnp.arange((x.shape[1] - 1) // CHUNK_T))  # [N, B, 1, h, w, 2z]
            hs = hs.swapaxes(0, 1).reshape(x.shape[0], -1, *hs.shape[3:])
            h = jnp.concatenate([h0, hs], axis=1)
        return self.quant_conv(h)[..., : self.config.z_dim]

    def _decode_frames(self, z: jax.Array, chunked: bool) -> jax.Array:
        """Unnormalised ``[B, F, h, w, z]`` -> patchified video ``[B, 1+4(F-1), H, W, C]``."""
        x = self.post_quant_conv(z)
        if not chunked or x.shape[1] == 1:
            y, _ = self.decoder(x)
            return y
        y0, cache = self.decoder(x[:, :1])

        def step(cache, i):
            y, cache = self.decoder(jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1), cache)
            return cache, y

        _, ys = jax.lax.scan(step, cache, jnp.arange(1, x.shape[1]))  # [F-1, B, 4, H, W, C]
        ys = ys.swapaxes(0, 1).reshape(x.shape[0], -1, *ys.shape[3:])
        return jnp.concatenate([y0, ys], axis=1)

    def _encode_impl(self, video, normalize, opts: _RunOptions):
        cfg = self.config
        x = patchify(video.astype(self.dtype), cfg.patch_size)

        def run(x):
            return self._encode_frames(x, opts.chunked).astype(jnp.float32)

        if opts.tile is None:
            mu = run(x)
        else:
            tile = tuple(t // cfg.patch_size for t in opts.tile)
            mu = _tiled(run, x, tile, opts.tile_overlap // cfg.patch_size, cfg.patch_size / cfg.spatial_stride)
        if normalize:
            mean, std = (jnp.asarray(v, jnp.float32) for v in (cfg.latents_mean, cfg.latents_std))
            mu = (mu - mean) / std
        return _pin(mu)

    def _decode_impl(self, latents, normalize, clamp, opts: _RunOptions):
        cfg = self.config
        z = latents.astype(jnp.float32)
        if normalize:
            mean, std = (jnp.asarray(v, jnp.float32) for v in (cfg.latents_mean, cfg.latents_std))
            z = z * std + mean
        z = z.astype(self.dtype)

        def run(z):
            return self._decode_frames(z, opts.chunked).astype(jnp.float32)

        if opts.tile is None:
            y = run(z)
        else:
            s = cfg.spatial_stride
            tile = tuple(t // s for t in opts.tile)
            y = _tiled(run, z, tile, opts.tile_overlap // s, s / cfg.patch_size)
        y = unpatchify(y, cfg.patch_size)
        return _pin(jnp.clip(y, -1.0, 1.0) if clamp else y)

    # ------------------------------------------------------------------ input checks

    def _check_video(self, video, pad: bool):
        shape = getattr(video, "shape", None)
        if shape is None or len(shape) != 5:
            raise ValueError(
                f"video must be [B, T, H, W, 3] (channels-last, batch first), got shape {shape}; "
                "for a single clip add a batch axis: video[None]"
            )
        _, t, h, w, c = shape
        if c != 3:
            hint = " (it looks channels-first: move channels last)" if shape[1] == 3 or shape[2] == 3 else ""
            raise ValueError(f"video must have 3 channels in the last axis, got shape {shape}{hint}")
        if not jnp.issubdtype(video.dtype, jnp.floating):
            raise TypeError(
                f"video must be a float array in [-1, 1], got dtype {video.dtype}; "
                "convert uint8 frames with frames.astype(np.float32) / 127.5 - 1"
            )
        s = self.config.spatial_stride
        if h % s or w % s:
            raise ValueError(
                f"video height and width must be multiples of {s} for this VAE, got {h} x {w}; "
                "resize or crop first"
            )
        if t < 1 or (t - 1) % CHUNK_T:
            if not pad or t < 1:
                lo = 1 + CHUNK_T * ((t - 1) // CHUNK_T) if t > 1 else 1
                raise ValueError(
                    f"video has {t} frames, but the Wan VAE encodes 1 + 4k frames (e.g. {lo} or {lo + CHUNK_T}); "
                    "trim the clip, or pass pad=True to repeat the last frame up to the next valid length"
                )
            extra = (-(t - 1)) % CHUNK_T
            video = jnp.concatenate([video, jnp.repeat(video[:, -1:], extra, axis=1)], axis=1)
        return video

    def _check_latents(self, latents):
        shape = getattr(latents, "shape", None)
        z = self.config.z_dim
        if shape is None or len(shape) != 5 or shape[-1] != z:
            raise ValueError(f"latents must be [B, F, h, w, {z}] (channels-last), got shape {shape}")
        if shape[1] < 1:
            raise ValueError("latents have no frames")
        if not jnp.issubdtype(latents.dtype, jnp.floating):
            raise TypeError(f"latents must be a float array, got dtype {latents.dtype}")
        return latents

    def _check_stats(self, normalize: bool):
        if normalize and self.config.latents_mean is None:
            raise ValueError(
                "this VAE config has no latents_mean/latents_std, so normalize=True is not possible; pass a "
                "VAEConfig with them (load_vae(..., config=...)) or call with normalize=False"
            )

    @staticmethod
    def _check_tile(tile, overlap, size, stride):
        """Validated ``(tile, overlap)`` in pixels (tile clipped to the frame), or ``(None, 0)``."""
        if tile is None:
            return None, 0
        tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
        if len(tile) != 2:
            raise ValueError(f"tile must be an int or (height, width), got {tile}")
        tile = (min(tile[0], size[0]), min(tile[1], size[1]))
        split = [t for t, n in zip(tile, size) if t < n]  # the axes that really are tiled
        if not split:
            return None, 0  # one tile covers the frame: no tiling
        overlap = stride * max(1, min(split) // (4 * stride)) if overlap is None else overlap
        if any(t % stride for t in tile) or overlap % stride:
            raise ValueError(f"tile {tile} and tile_overlap {overlap} must be multiples of {stride} pixels")
        if not 0 <= overlap < min(split):
            raise ValueError(f"tile_overlap ({overlap}) must be non-negative and smaller than the tile {tile}")
        return tile, overlap


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _encode_jit(graphdef, state, video, normalize, opts):
    return nnx.merge(graphdef, state)._encode_impl(video, normalize, opts)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _decode_jit(graphdef, state, latents, normalize, clamp, opts):
    return nnx.merge(graphdef, state)._decode_impl(latents, normalize, clamp, opts)


def to_unit_range(video) -> jax.Array:
    """uint8 pixels [..., 3] in [0, 255] -> float32 in [-1, 1], the VAE's input range."""
    return jnp.asarray(video).astype(jnp.float32) / 127.5 - 1.0


def to_uint8(video: jax.Array) -> np.ndarray:
    """The VAE's output range [-1, 1] -> uint8 pixels (rounded, clipped), on the host."""
    return np.asarray(jnp.clip((video + 1.0) * 127.5, 0, 255).round().astype(jnp.uint8))


def count_params(module: nnx.Module) -> int:
    """Number of parameters (works on abstract modules from ``nnx.eval_shape``)."""
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))
