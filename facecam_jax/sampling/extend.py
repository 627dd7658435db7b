"""CameraCtrl II's clip-level extension as a sampling mode (``sample.extend=clip``).

A video longer than the model's window is sampled clip by clip instead of in jointly denoised
windows (``diffusion.windows``): the clips are laid out like windows (``Windows.cover`` with
``sample.context_frames`` as the overlap, here allowed to be 1), and clip ``k > 0`` is sampled
after clip ``k - 1``, with the frames the two share as clean context. Those frames are taken
from the decoded clip before and encoded again as the start of clip ``k``: the causal VAE
encodes a clip's first frame alone (its latent 0), which no latent of the clip before holds,
so the previous clip's latents cannot be reused as they are. ``n`` context latent frames are
``4 (n - 1) + 1`` video frames. The program (``SampleOptions.context``) keeps them clean at
every step, the kind marks them with its mask channel (what ``train.context_prob`` trained),
and the rest of the clip is new. The output keeps the previous clip's frames where clips
share them, then each clip's new frames.

Cameras stay relative to the first frame of the whole video (the paper's global reference):
each clip's condition is cut from the video's (``CameraKind.encode_condition``).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax.conditioning import CameraKind
from facecam_jax.diffusion.windows import Windows
from facecam_jax.models.wan_vae import to_uint8, to_unit_range
from facecam_jax.options import latent_frames, video_frames
from facecam_jax.sampling.inputs import SampleInputs, encode_windows, noise_for


def sample_clips(kind: CameraKind, vae, sources: np.ndarray, conditions: dict, seeds: Sequence[int],
                 contexts: tuple, clips: Windows, mesh,
                 run: Callable[[SampleInputs, int], jax.Array]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Samples uint8 ``sources [N, T, H, W, 3]`` clip by clip: returns the videos ``[N, T, H, W,
    3]`` and every decoded clip ``[N, frames of a clip, H, W, 3]``. ``conditions``: the kind's raw
    conditions (``as_raw``); the noise of clip ``k`` of video ``i`` comes from ``seeds[i]`` and
    ``k`` (clip 0's is a one-window render's); ``contexts``: ``(cond, uncond)`` text contexts;
    ``run(inputs, k)``: the sampling program (``SampleOptions.context``) -> latents."""
    encode = functools.partial(encode_windows, vae, windows=clips)
    source = encode(sources)  # [N * K, F, h, w, C], video-major
    condition = kind.encode_condition(conditions, encode, clips)
    n, count = len(sources), clips.count
    frames = source.shape[1]

    def clip_rows(tree, k):
        return jax.tree.map(lambda a: a.reshape(n, count, *a.shape[1:])[:, k], tree)

    text = [np.broadcast_to(c, (n, *c.shape[1:])) for c in contexts]
    replicated = NamedSharding(mesh, PartitionSpec())
    out = np.zeros((n, video_frames(clips.total), *sources.shape[2:]), np.uint8)
    decoded = []
    shared = 0  # video frames clip k shares with the one before
    for k in range(count):
        first, end = clips.frame_range(k)
        clean = jnp.zeros((n, *source.shape[1:]), jnp.float32)
        if k:  # the shared frames, as the clip before made them, encoded as this clip's start
            shared = clips.frame_range(k - 1)[1] - first
            clean = clean.at[:, :latent_frames(shared)].set(vae.encode(to_unit_range(out[:, first:first + shared])))
        mask = (jnp.arange(frames) < (latent_frames(shared) if k else 0)).astype(jnp.float32)
        noise = jnp.concatenate([noise_for(int(s), (1, *source.shape[1:]), clip=k) for s in seeds])
        condition_k = {**clip_rows(condition, k), "clean": clean, "mask": jnp.broadcast_to(mask, (n, frames))}
        inputs = jax.device_put(SampleInputs(clip_rows(source, k), condition_k, *text, noise), replicated)
        video = to_uint8(vae.decode(run(inputs, k)))
        decoded.append(video)
        out[:, first + shared:end] = video[:, shared:]
    return out, decoded
