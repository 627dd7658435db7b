"""The sampling program's inputs, built in one place: concrete (from videos, seeds and the text
contexts) for rendering and calibration, or abstract (shapes with shardings) for the fit tool
and benchmarks. Every caller of the program takes them from here.

Rows: a long video is sampled in windows, so the per-window inputs (source latents and the
camera kind's condition) have ``N * K`` rows (video-major: the K windows of video 0, then of
video 1, ...), while the contexts and the noise have one row per video.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import build
from facecam_jax.conditioning import CameraKind
from facecam_jax.diffusion.windows import Windows
from facecam_jax.models.wan_vae import to_unit_range


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("source", "condition", "ctx_cond", "ctx_uncond", "noise"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class SampleInputs:
    """What one run of the sampling program takes besides the DiT states."""

    source: Any  # [N * K, F, h, w, C] source latents per window row
    condition: dict  # the camera kind's condition per window row (``CameraKind.encode_condition``)
    ctx_cond: Any  # [N, Lt, D] the prompt's context per video
    ctx_uncond: Any  # [N, Lt, D] the negative prompt's
    noise: Any  # [N, F_state, h, w, C] initial noise over each whole video (``Windows.state_frames``)

    @property
    def videos(self) -> int:
        return self.noise.shape[0]


def noise_for(seed: int, shape: Sequence[int], clip: int = 0) -> jax.Array:
    """The initial noise of one video ``[1, F, H, W, C]`` from its seed (of its ``clip``-th clip
    after the first when it is extended clip by clip: ``sampling.extend``)."""
    key = jax.random.key(seed)
    key = jax.random.fold_in(key, clip) if clip else key
    return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def encode_windows(vae, videos: np.ndarray, windows: Windows | None) -> jax.Array:
    """uint8 videos ``[N, T, H, W, 3]`` -> latents of their windows ``[N * K, F, h, w, C]``
    (video-major), each window encoded as a clip of its own (what the model saw in training),
    one window at a time so the VAE's memory does not grow with the video."""
    if windows is None:
        return vae.encode(to_unit_range(videos))
    per_window = [vae.encode(to_unit_range(videos[:, a:b])) for a, b in map(windows.frame_range, range(windows.count))]
    return jnp.stack(per_window, axis=1).reshape(-1, *per_window[0].shape[1:])  # [N * K, F, ...]


def make_inputs(kind: CameraKind, vae, sources: np.ndarray, conditions, seeds: Sequence[int],
                contexts: tuple, windows: Windows | None, mesh) -> SampleInputs:
    """The program's inputs for uint8 ``sources [N, T, H, W, 3]``, their raw camera conditions
    (``kind.as_raw``), one noise seed per video and the ``(cond, uncond)`` contexts ``[1, Lt, D]``;
    replicated on ``mesh``."""
    encode = functools.partial(encode_windows, vae, windows=windows)
    source = encode(sources)
    condition = kind.encode_condition(kind.as_raw(conditions), encode, windows)
    total = windows.state_frames if windows else source.shape[1]
    noise = jnp.concatenate([noise_for(int(s), (1, total, *source.shape[2:])) for s in seeds])
    ctx = [np.broadcast_to(c, (len(sources), *c.shape[1:])) for c in contexts]
    return jax.device_put(SampleInputs(source, condition, *ctx, noise), NamedSharding(mesh, PartitionSpec()))


def abstract_inputs(config, kind: CameraKind, dit_config, mesh, frames: int, windows: Windows | None,
                    videos: int = 1, *, context: bool = False) -> SampleInputs:
    """``make_inputs``' result as replicated shapes, for ``videos`` videos of ``frames`` frames at
    the config's size (the text contexts at the DiT's ``text_len``); ``context``: one clip's,
    with clip extension's context (``sampling.extend``)."""
    d = config.data
    replicated = NamedSharding(mesh, PartitionSpec())
    vae_config = build.vae_config(config.vae.config)
    rows = videos * (windows.count if windows else 1)
    window_frames = d.frames if windows else frames
    latent = build.latent_shape(vae_config, window_frames, d.height, d.width, batch=rows)
    timeline = build.latent_shape(vae_config, frames, d.height, d.width, batch=videos)
    state = (videos, windows.state_frames, *timeline[2:]) if windows else timeline

    def shape(s):
        return jax.ShapeDtypeStruct(s, jnp.float32, sharding=replicated)

    ctx = shape((videos, dit_config.text_len, dit_config.text_dim))
    condition = kind.abstract_condition(latent, replicated)
    if context:
        condition = {**condition, "clean": shape(latent), "mask": shape(latent[:2])}
    return SampleInputs(shape(latent), condition, ctx, ctx, shape(state))
