"""Temporal windows of a long video, denoised jointly (the temporal form of MultiDiffusion).

The DiT sees windows of its own length (``length`` latent frames, ``4 (length - 1) + 1`` video
frames). A longer video's latent timeline (``total`` frames: what the causal Wan VAE makes of
the whole video; latent ``g > 0`` holds video frames ``4g - 3 .. 4g``) is covered by windows
that overlap by ``overlap`` latent frames; at every solver step each window's velocity is
computed and the overlapping velocities are blended with smooth weights, so the whole video
is one sample and a seam never exists as a separate one. A window's latent ``j > 0`` holds
the same frames as timeline latent ``start + j``; its latent 0 does not: the VAE encodes a
clip's first frame alone (an image latent), and that is what the DiT was trained to see
there. So every later window keeps a latent 0 of its own, denoised by it alone beside the
timeline (the sampled state is ``state_frames`` = the timeline + one per later window),
and the timeline frame it would sit on belongs to the window before. After sampling every
window is decoded as the clip it is (its latent 0, then its timeline latents: what the VAE was
trained to decode), one at a time, and the frames neighbours share are cross-faded
(``blend_frames``). A single causal decode of the whole timeline is not used: a VAE trained
on short clips (the mini one) drifts in colour over a long timeline.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from facecam_jax.options import TEMPORAL_STRIDE, latent_frames, video_frames

__all__ = ["TEMPORAL_STRIDE", "Windows", "latent_frames", "video_frames"]

@dataclasses.dataclass(frozen=True)
class Windows:
    """Where the windows of a ``total``-latent-frame video start (static: keys a compiled program)."""

    total: int
    length: int
    starts: tuple[int, ...]

    @classmethod
    def cover(cls, total: int, length: int, overlap: int, *, least: int = 2,
              key: str = "sample.window_overlap") -> "Windows":
        """Windows of ``length`` every ``length - overlap`` latent frames, the last one ending at the
        video's end (it may overlap its neighbour by more); one window when the video fits in one.
        ``overlap`` is at least ``least`` (config ``key``): jointly denoised windows need 2 (a later
        window's latent 0 is its own: 1 would share nothing); extended clips (``sampling.extend``)
        1 (the one frame that latent 0 encodes is the previous clip's last)."""
        if length < 1 or total < 1:
            raise ValueError(f"need a window and a video of at least one latent frame, got {length} and {total}")
        if total <= length:
            return cls(total, total, (0,))
        if not least <= overlap < length:
            raise ValueError(f"{key} must be in [{least}, {length - 1}] latent frames for windows of {length}, "
                             f"got {overlap}")
        stride = length - overlap
        count = 1 + math.ceil((total - length) / stride)
        starts = tuple(min(k * stride, total - length) for k in range(count))
        return cls(total, length, starts)

    @property
    def count(self) -> int:
        return len(self.starts)

    def frame_range(self, k: int) -> tuple[int, int]:
        """Video frames ``[first, last + 1)`` of window ``k``."""
        first = TEMPORAL_STRIDE * self.starts[k]
        return first, first + video_frames(self.length)

    def weights(self) -> np.ndarray:
        """float32 [K, length]: each window's blending weight per latent frame on the timeline. 1
        inside; a later window's latent 0 (its own, not on the timeline) 0; across the rest of a
        shared stretch of n frames the earlier window falls and the later rises along a raised
        cosine, so the weights of the windows covering a frame add up to 1."""
        w = np.ones((self.count, self.length), np.float64)
        for k in range(1, self.count):
            shared = self.starts[k - 1] + self.length - self.starts[k]  # frames windows k-1 and k share
            ramp = np.sin(0.5 * np.pi * np.arange(shared) / shared) ** 2  # 0 at latent 0, then rises, < 1
            w[k, :shared] *= ramp
            w[k - 1, self.length - shared:] *= 1.0 - ramp
        total = np.zeros(self.total)
        for k, s in enumerate(self.starts):
            total[s:s + self.length] += w[k]
        for k, s in enumerate(self.starts):
            w[k] /= total[s:s + self.length]
        return w.astype(np.float32)

    @property
    def state_frames(self) -> int:
        """Latent frames of the sampled state: the timeline, then each later window's latent 0."""
        return self.total + self.count - 1

    def timeline(self, x: jnp.ndarray) -> jnp.ndarray:
        """The sampled state ``[B, state_frames, ...]`` -> its timeline ``[B, total, ...]``."""
        return x[:, :self.total]

    def gather(self, x: jnp.ndarray) -> jnp.ndarray:
        """The state ``[B, state_frames, ...]`` -> the windows ``[B * K, length, ...]`` (video-major):
        window 0 is the timeline's start; window ``k > 0`` is its own latent 0, then timeline
        latents ``start + 1 ..``."""
        w = [x[:, :self.length]] + [
            jnp.concatenate([x[:, self.total + k - 1:self.total + k], x[:, s + 1:s + self.length]], axis=1)
            for k, s in enumerate(self.starts) if k > 0]
        w = jnp.stack(w, axis=1)  # [B, K, length, ...]
        return w.reshape(-1, *w.shape[2:])

    def blend(self, windows: jnp.ndarray) -> jnp.ndarray:
        """Per-window values ``[B * K, length, ...]`` -> the state ``[B, state_frames, ...]``: the
        weighted blend on the timeline, each later window's latent 0 as it is."""
        w = windows.reshape(-1, self.count, *windows.shape[1:])  # [B, K, length, ...]
        weights = jnp.asarray(self.weights()).reshape(self.count, self.length, *([1] * (w.ndim - 3)))
        out = jnp.zeros((w.shape[0], self.total, *w.shape[3:]), w.dtype)
        for k, s in enumerate(self.starts):
            out = out.at[:, s:s + self.length].add(w[:, k] * weights[k])
        return jnp.concatenate([out, w[:, 1:, 0]], axis=1)

    def frame_weights(self) -> np.ndarray:
        """float32 [K, video frames of a window]: each decoded window's weight per frame. 1 inside;
        across the n frames two neighbours share, the later one rises along a raised cosine from
        0 at its first frame (decoded from its own image latent), so the weights add up to 1."""
        n_frames = video_frames(self.length)
        w = np.ones((self.count, n_frames), np.float64)
        for k in range(1, self.count):
            shared = self.frame_range(k - 1)[1] - self.frame_range(k)[0]
            ramp = np.sin(0.5 * np.pi * np.arange(shared) / shared) ** 2
            w[k, :shared] *= ramp
            w[k - 1, n_frames - shared:] *= 1.0 - ramp
        total = np.zeros(video_frames(self.total))
        for k in range(self.count):
            a, b = self.frame_range(k)
            total[a:b] += w[k]
        for k in range(self.count):
            a, b = self.frame_range(k)
            w[k] /= total[a:b]
        return w.astype(np.float32)

    def blend_frames(self, videos: np.ndarray) -> np.ndarray:
        """Decoded windows uint8 ``[K, frames of a window, H, W, 3]`` -> the video ``[frames, H, W, 3]``."""
        weights = self.frame_weights()
        out = np.zeros((video_frames(self.total), *videos.shape[2:]), np.float32)
        for k in range(self.count):
            a, b = self.frame_range(k)
            out[a:b] += videos[k].astype(np.float32) * weights[k][:, None, None, None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def seams(self) -> list[int]:
        """Video frames where a window begins or ends (where a seam would show)."""
        return sorted({f for k in range(1, self.count) for f in (self.frame_range(k)[0], self.frame_range(k - 1)[1] - 1)})
