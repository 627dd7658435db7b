"""Temporal windows of a long video, denoised jointly (the temporal form of MultiDiffusion).

The DiT sees windows of its own length (``length`` latent frames, ``4 (length - 1) + 1`` video
frames). A longer video's latent timeline (``total`` frames) is covered by windows that
overlap by ``overlap`` latent frames; at every solver step each window's velocity is computed
and the overlapping velocities are blended with smooth weights, so the whole video is one
sample and a seam never exists as a separate one. Latent frame ``g`` of the timeline is
video frame ``4 g`` (the last frame of its 4-frame chunk; frame 0 alone for ``g = 0``), which
is also what latent ``g - start`` of a window starting at ``start`` encodes. After
sampling, every window is decoded on its own and the frames the windows share are
cross-faded with the same weights (``blend_frames``).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

TEMPORAL_STRIDE = 4  # video frames per latent frame (Wan VAE)


def latent_frames(frames: int) -> int:
    """Latent frames of a ``4k + 1``-frame video."""
    return 1 + (frames - 1) // TEMPORAL_STRIDE


def video_frames(latents: int) -> int:
    return TEMPORAL_STRIDE * (latents - 1) + 1


@dataclasses.dataclass(frozen=True)
class Windows:
    """Where the windows of a ``total``-latent-frame video start (static: keys a compiled program)."""

    total: int
    length: int
    starts: tuple[int, ...]

    @classmethod
    def cover(cls, total: int, length: int, overlap: int) -> "Windows":
        """Windows of ``length`` every ``length - overlap`` latent frames, the last one ending at the
        video's end (it may overlap its neighbour by more); one window when the video fits in one."""
        if length < 1 or total < 1:
            raise ValueError(f"need a window and a video of at least one latent frame, got {length} and {total}")
        if total <= length:
            return cls(total, total, (0,))
        if not 0 < overlap < length:
            raise ValueError(f"sample.window_overlap must be in [1, {length - 1}] latent frames for windows of "
                             f"{length}, got {overlap}")
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
        """float32 [K, length]: each window's blending weight per latent frame. 1 inside; across a
        shared stretch of n frames the earlier window falls and the later rises along a raised
        cosine, so the weights of the windows covering a frame add up to 1."""
        w = np.ones((self.count, self.length), np.float64)
        for k in range(1, self.count):
            shared = self.starts[k - 1] + self.length - self.starts[k]  # frames windows k-1 and k share
            ramp = np.sin(0.5 * np.pi * np.arange(1, shared + 1) / (shared + 1)) ** 2  # rises, < 1
            w[k, :shared] *= ramp
            w[k - 1, self.length - shared:] *= 1.0 - ramp
        total = np.zeros(self.total)
        for k, s in enumerate(self.starts):
            total[s:s + self.length] += w[k]
        for k, s in enumerate(self.starts):
            w[k] /= total[s:s + self.length]
        return w.astype(np.float32)

    def gather(self, x: jnp.ndarray) -> jnp.ndarray:
        """Latents ``[B, total, ...]`` -> the windows ``[B * K, length, ...]`` (video-major)."""
        w = jnp.stack([x[:, s:s + self.length] for s in self.starts], axis=1)  # [B, K, length, ...]
        return w.reshape(-1, *w.shape[2:])

    def blend(self, windows: jnp.ndarray) -> jnp.ndarray:
        """Per-window values ``[B * K, length, ...]`` -> the weighted blend ``[B, total, ...]``."""
        w = windows.reshape(-1, self.count, *windows.shape[1:])  # [B, K, length, ...]
        weights = jnp.asarray(self.weights()).reshape(self.count, self.length, *([1] * (w.ndim - 3)))
        out = jnp.zeros((w.shape[0], self.total, *w.shape[3:]), w.dtype)
        for k, s in enumerate(self.starts):
            out = out.at[:, s:s + self.length].add(w[:, k] * weights[k])
        return out

    def frame_weights(self) -> np.ndarray:
        """float32 [K, video frames of a window]: ``weights`` carried to video frames (frame ``q``
        of a window belongs to its latent ``ceil(q / 4)``), normalised over the windows."""
        q = np.arange(video_frames(self.length))
        w = self.weights()[:, (q + TEMPORAL_STRIDE - 1) // TEMPORAL_STRIDE]
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
        """Video frames where a window's weight changes (the frames a seam would show at)."""
        return sorted({f for k in range(1, self.count) for f in (self.frame_range(k)[0], self.frame_range(k - 1)[1] - 1)})
