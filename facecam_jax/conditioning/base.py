"""What a camera kind is: the one interface the train step, the sampler, the fit tool and FLOP
counting use for "the camera".

A kind's condition is a dict of arrays with a leading batch (or window-row) dimension: the
VAE latents of its condition videos (``batch_videos``) and any other per-sample arrays it
needs. Everything that moves rows around (CFG's doubled batch, a long video's windows,
``sample.window_batch``) maps over that dict, so a kind never sees how it is batched.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from facecam_jax.camera import trajectories
from facecam_jax.models import wan_dit
from facecam_jax.models.wan_dit import DiTConfig, WanDiT

Array = jax.Array
Condition = dict[str, Any]  # the kind's condition: arrays [B, ...] (latents, cameras, ...)


class CameraKind(abc.ABC):
    """A camera representation. A kind sets the class attributes, defines ``dit_input`` and
    ``make_condition``, and overrides the methods whose default (a condition made of VAE-encoded
    videos and per-frame arrays, entering through the DiT input) does not describe it."""

    name: str = ""
    # Training batch entries (uint8 videos [B, T, H, W, 3]) VAE-encoded with source and target:
    # the data pipeline must produce them.
    batch_videos: tuple[str, ...] = ()
    # Other training batch entries the condition is made of (sent to the device as they are).
    batch_arrays: tuple[str, ...] = ()
    # Parameter names the kind trains whatever train.trainable says (its own new layers).
    trainable: tuple[str, ...] = ()
    # The layers its checkpoints may hold beyond a Wan DiT's (``load_dit(camera=...)``); None: none.
    checkpoint_camera: str | None = None
    # Whether the kind has a null camera (``null_camera``): camera dropout in training and camera
    # guidance in sampling (CameraCtrl II) need one.
    has_null_camera: bool = False
    # Whether the kind's DiT input marks clean context frames (a mask channel): CameraCtrl II's
    # clip-level extension (``train.context_prob``, ``sample.extend=clip``) needs it. The
    # condition then carries ``mask [B, F]`` (1 on context latent frames; absent: none).
    has_context: bool = False

    def __repr__(self) -> str:
        return f"<camera kind {self.name}>"

    def configured(self, camera) -> CameraKind:
        """The kind as the config's ``camera`` section sets it up (its options; default: itself).
        ``camera.normal_maps=False`` is FactorPortrait's alone: other kinds refuse it."""
        if camera is not None and not camera.get("normal_maps", True):
            raise ValueError(f"camera.normal_maps=False is FactorPortrait's ablation (no head-pose normal maps); "
                             f"camera kind {self.name!r} has no normal maps")
        return self

    # ------------------------------------------------------------------ the model

    def prepare(self, model: WanDiT, config) -> WanDiT:
        """The base DiT made ready for this kind (wider input, extra layers, zero-initialised so
        that the output is unchanged); abstract models too. Returns ``model``."""
        return model

    def input_frames(self, frames: int) -> int:
        """Latent frames the DiT sees for ``frames`` target latent frames."""
        return frames

    @abc.abstractmethod
    def dit_input(self, model: WanDiT, noisy: Array, source: Array, condition: Condition) -> Array:
        """The DiT's input latents ``[B, input_frames(F), H, W, in_dim]``."""

    def velocity(self, model: WanDiT, noisy: Array, source: Array, condition: Condition, t: Array,
                 context: Array) -> Array:
        """The target velocity ``[B, F, H, W, C]`` for noisy target latents ``[B, F, H, W, C]``."""
        x = self.dit_input(model, noisy, source, condition)
        return model(x, t, context, out_frames=noisy.shape[1])

    def velocity_cached(self, model: WanDiT, noisy: Array, source: Array, condition: Condition, t: Array,
                        context: Array, *, skip: bool | Array, residual: Array) -> tuple[Array, Array]:
        """``velocity`` with the block stack replaceable by a cached residual (a step cache's
        hook, ``wan_dit.cached_forward``): returns the velocity and the residual to cache."""
        x = self.dit_input(model, noisy, source, condition)
        return wan_dit.cached_forward(model, x, t, context, out_frames=noisy.shape[1], skip=skip, residual=residual)

    def token_shape(self, config: DiTConfig, noisy_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``[B, L, D]`` of the block stack's tokens for target latents ``noisy_shape [B, F, H, W, C]``."""
        b, f, h, w = noisy_shape[:4]
        pt, ph, pw = config.patch_size
        return b, (self.input_frames(f) // pt) * (h // ph) * (w // pw), config.dim

    def token_counts(self, config: DiTConfig, latent_shape: tuple[int, ...]) -> tuple[int, int]:
        """(tokens the blocks see, tokens the head keeps) per sample of ``latent_shape``."""
        _, tokens, _ = self.token_shape(config, latent_shape)
        _, f, h, w = latent_shape[:4]
        pt, ph, pw = config.patch_size
        return tokens, (f // pt) * (h // ph) * (w // pw)

    def block_linears(self, config: DiTConfig) -> tuple[tuple[tuple[str, ...], str, int, int], ...]:
        """The kind's own linear layers in every block, for FLOP counting: ``(path, rows, din,
        dout)`` with rows ``"tokens"`` (one per token) or ``"frames"`` (one per input latent frame)."""
        return ()

    def side_flops(self, config: DiTConfig, video_frames: int) -> float:
        """Forward FLOPs per sample of the kind's layers outside the block stack (FLOP counting;
        default none), for videos of ``video_frames`` frames."""
        return 0.0

    def trainable_names(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """``train.trainable`` with the kind's own layers added."""
        names = tuple(names)
        return names if names == ("all",) else names + tuple(n for n in self.trainable if n not in names)

    # ------------------------------------------------------------------ training

    def batch_keys(self) -> tuple[str, ...]:
        """The training batch entries that go to the device: source, target, the kind's."""
        return ("source", "target", *self.batch_videos, *self.batch_arrays)

    def batch_spec(self, data) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Per-sample shape and dtype of each entry of ``batch_keys`` for the ``data`` config."""
        video = ((data.frames, data.height, data.width, 3), np.uint8)
        return {"source": video, "target": video, **{k: video for k in self.batch_videos}}

    def condition(self, latents: dict[str, Array], batch: dict[str, Array], *, rng: Array | None = None,
                  dropout: float = 0.0) -> Condition:
        """The condition of a training batch from its encoded ``batch_videos`` and its arrays;
        ``dropout``: the probability (drawn from ``rng``) that a sample's camera is the null camera
        (``train.camera_dropout``; only kinds with one)."""
        return {**latents, **{k: batch[k] for k in self.batch_arrays}}

    # ------------------------------------------------------------------ sampling

    def load_trajectory(self, spec, frames: int):
        """The camera path ``spec`` names (a canonical motion, a keyframe JSON, ...) over ``frames``
        frames, in the form ``make_condition`` takes (default: ``camera.trajectories``')."""
        return trajectories.load_trajectory(spec, frames)

    @abc.abstractmethod
    def make_condition(self, trajectory, *, height: int, width: int, framing: str,
                       source_frames: np.ndarray) -> dict[str, np.ndarray]:
        """The raw condition of one video along ``trajectory`` (``load_trajectory``'s result, or a
        project ``Trajectory``): uint8 videos ``[T, H, W, 3]``, arrays per latent frame ``[F, ...]``
        and per-video values ``[]``."""

    def preview(self, raw: dict[str, np.ndarray], source_frames: np.ndarray) -> np.ndarray:
        """A uint8 video like ``source_frames [T, H, W, 3]`` showing one video's raw condition (the
        compare video's middle): its first condition video, or black for a kind without one."""
        return raw[self.batch_videos[0]] if self.batch_videos else np.zeros_like(source_frames)

    def as_raw(self, conditions) -> dict[str, np.ndarray]:
        """Raw conditions of a batch: a dict as ``make_condition`` gives (stacked), or the array of
        a kind whose condition is one video."""
        if isinstance(conditions, dict):
            return conditions
        if len(self.batch_videos) != 1 or self.batch_arrays:
            raise ValueError(f"camera kind {self.name!r} takes its conditions as a dict of {self.batch_keys()[2:]}")
        return {self.batch_videos[0]: conditions}

    def encode_condition(self, raw: dict[str, np.ndarray], encode: Callable[[np.ndarray], Array],
                         windows) -> Condition:
        """A batch's raw conditions -> the program's condition per window row (video-major,
        ``[N * K, ...]``): uint8 videos ``[N, T, H, W, 3]`` through ``encode`` (the latents of their
        windows), arrays per latent frame ``[N, F_total, ...]`` cut to each window's frames (the
        timeline's; ``windows``: a long video's ``diffusion.windows.Windows``, or None), per-video
        values ``[N]`` repeated per window."""
        out = {}
        for key, value in raw.items():
            if key in self.batch_videos:
                out[key] = encode(value)
                continue
            value = jnp.asarray(value, jnp.float32)
            if windows is None:
                out[key] = value
            elif value.ndim == 1:
                out[key] = jnp.repeat(value, windows.count, axis=0)
            else:
                cut = jnp.stack([value[:, s:s + windows.length] for s in windows.starts], axis=1)
                out[key] = cut.reshape(-1, *cut.shape[2:])  # [N * K, F, ...]
        return out

    def abstract_condition(self, latent_shape: tuple[int, ...], sharding) -> Condition:
        """``encode_condition``'s result as shapes, for window rows of latents ``latent_shape``."""
        return {k: jax.ShapeDtypeStruct(latent_shape, jnp.float32, sharding=sharding) for k in self.batch_videos}

    def null_camera(self, condition: Condition) -> Condition:
        """The condition without a camera (camera dropout, camera guidance's null pass)."""
        self.require_null_camera()
        return condition

    def require_null_camera(self) -> None:
        """A clear error, before anything is built, for a kind without a null camera."""
        if not self.has_null_camera:
            raise ValueError(f"camera kind {self.name!r} has no null camera: camera guidance and camera dropout "
                             "need one (sample.camera_guidance=1.0, train.camera_dropout=0.0)")

    def require_context(self) -> None:
        """A clear error, before anything is built, for a kind without a context mask."""
        if not self.has_context:
            raise ValueError(f"camera kind {self.name!r} has no context mask: clip extension needs one "
                             "(camera.kind=plucker; or sample.extend=joint, train.context_prob=0.0)")

    def unconditional(self, condition: Condition) -> Condition:
        """The condition of classifier-free guidance's unconditional pass (default: the same:
        guidance is on the text only)."""
        return condition
