"""Rectified flow matching as Wan / FaceCam train and sample it (SPEC 7).

Noise level ``s`` in [0, 1] (``sigma``): ``z_s = (1 - s) z0 + s eps``, velocity ``eps - z0``.
The network sees the timestep ``1000 s``. Both training and sampling shift noise levels with
``shift * s / (1 + (shift - 1) s)`` (shift 5), which spends more steps at high noise.

Training draws a uniform index into a fixed 1000-level shifted grid (optionally restricted
to one Wan2.2 expert's timestep range) and weights the loss by a Gaussian bump around
t = 500 that is fixed over the GRID (minimum subtracted, mean 1): never over the batch,
so a sample's weight does not depend on what else is in its batch.

Sampling runs over ``linspace(1, 0, N + 1)[:N]`` shifted, then 0 (``inference_sigmas``); the
ODE solvers that integrate it are ``diffusion.solvers``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(s, shift: float):
    """The time shift ``shift * s / (1 + (shift - 1) s)`` (identity for shift 1)."""
    return shift * s / (1 + (shift - 1) * s)


@dataclasses.dataclass(frozen=True)
class TrainGrid:
    """The 1000-level training grid: noise levels, timesteps and fixed loss weights (numpy)."""

    sigmas: np.ndarray  # [1000], from 1 (pure noise) down towards 0, shifted
    timesteps: np.ndarray  # [1000], 1000 * sigmas
    weights: np.ndarray  # [1000], mean 1 over the grid

    @classmethod
    def make(cls, shift: float = 5.0, num: int = NUM_TRAIN_TIMESTEPS) -> "TrainGrid":
        sigmas = shift_sigmas(np.linspace(1.0, 0.0, num + 1)[:-1], shift)
        timesteps = sigmas * NUM_TRAIN_TIMESTEPS
        bump = np.exp(-2.0 * ((timesteps - num / 2) / num) ** 2)
        bump = bump - bump.min()
        return cls(sigmas.astype(np.float32), timesteps.astype(np.float32), (bump * num / bump.sum()).astype(np.float32))

    def index_range(self, t_min: float = 0.0, t_max: float = float(NUM_TRAIN_TIMESTEPS) + 1) -> tuple[int, int]:
        """[lo, hi) grid indices with ``t_min <= timestep < t_max`` (an expert's range)."""
        inside = np.nonzero((self.timesteps >= t_min) & (self.timesteps < t_max))[0]
        if inside.size == 0:
            raise ValueError(f"no training timestep lies in [{t_min}, {t_max})")
        return int(inside[0]), int(inside[-1]) + 1


def expert_timestep_range(expert: str | None, boundary: float) -> tuple[float, float]:
    """Timestep range an A14B expert is trained on: high noise t >= boundary*1000, low below."""
    edge = boundary * NUM_TRAIN_TIMESTEPS
    if expert in (None, "", "all"):
        return 0.0, NUM_TRAIN_TIMESTEPS + 1.0
    if expert == "high":
        return edge, NUM_TRAIN_TIMESTEPS + 1.0
    if expert == "low":
        return 0.0, edge
    raise ValueError(f"expert must be 'high', 'low' or None, got {expert!r}")


def sample_training_levels(rng: jax.Array, batch: int, grid: TrainGrid, index_range: tuple[int, int]):
    """Uniform grid indices in ``index_range``: (sigma [B], timestep [B], weight [B])."""
    lo, hi = index_range
    idx = jax.random.randint(rng, (batch,), lo, hi)
    return jnp.asarray(grid.sigmas)[idx], jnp.asarray(grid.timesteps)[idx], jnp.asarray(grid.weights)[idx]


def add_noise(z0: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
    """``(1 - s) z0 + s eps`` with one ``s`` per sample."""
    s = sigma.reshape(-1, *([1] * (z0.ndim - 1))).astype(z0.dtype)
    return (1 - s) * z0 + s * eps


def velocity_target(z0: jax.Array, eps: jax.Array) -> jax.Array:
    return eps - z0


def flow_loss(pred: jax.Array, target: jax.Array, weight: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """Per-sample MSE (fp32) times the grid weight, averaged over the batch. ``keep [B, F]``: 1 on
    the latent frames the loss counts (clip extension: not the context), 0 elsewhere; a
    sample's MSE is then the mean over its kept frames."""
    sq = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    axes = tuple(range(1, pred.ndim))
    if keep is None:
        return jnp.mean(jnp.mean(sq, axis=axes) * weight)
    k = jnp.broadcast_to(keep.reshape(*keep.shape, *([1] * (pred.ndim - 2))).astype(jnp.float32), sq.shape)
    per_sample = jnp.sum(sq * k, axis=axes) / jnp.maximum(jnp.sum(k, axis=axes), 1.0)
    return jnp.mean(per_sample * weight)


def context_mask(rng: jax.Array, batch: int, frames: int, prob: float) -> jax.Array:
    """CameraCtrl II's clip-extension training (``train.context_prob``): float32 ``[B, F]``, 1 on a
    sample's context latent frames. With probability ``prob`` a sample's first ``n`` latent
    frames are context, ``n`` uniform in ``1 .. F // 2`` (the paper: up to half the clip);
    otherwise none are."""
    if frames < 2:
        raise ValueError(f"clip-extension training needs at least 2 latent frames (data.frames >= 5), got {frames}")
    use_rng, count_rng = jax.random.split(rng)
    n = jax.random.randint(count_rng, (batch,), 1, frames // 2 + 1)
    n = jnp.where(jax.random.uniform(use_rng, (batch,)) < prob, n, 0)
    return (jnp.arange(frames)[None, :] < n[:, None]).astype(jnp.float32)


def keep_context(noisy: jax.Array, clean: jax.Array, mask: jax.Array) -> jax.Array:
    """``noisy [B, F, ...]`` with its context latent frames (``mask [B, F]`` = 1) the clean ones."""
    return jnp.where(mask.reshape(*mask.shape, *([1] * (noisy.ndim - 2))) > 0, clean, noisy)


def inference_sigmas(num_steps: int, shift: float = 5.0) -> np.ndarray:
    """Euler noise levels: ``linspace(1, 0, N + 1)[:N]`` shifted, then a final 0: [N + 1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = shift_sigmas(np.linspace(1.0, 0.0, num_steps + 1)[:-1], shift)
    return np.concatenate([s, [0.0]]).astype(np.float32)
