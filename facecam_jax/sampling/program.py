"""The sampling program: one jitted function of the DiT states and its ``SampleInputs`` (the
windows' source latents and camera condition, the text contexts, the noise), specialised on
one hashable ``SampleOptions``: the camera kind (``conditioning``), the solver
(``diffusion.solvers``), a MagCache step cache (``diffusion.step_cache``), Wan2.2 A14B's
expert switch (``lax.cond`` at ``t = boundary * 1000``, or one program per expert phase when
the waiting expert is offloaded), block streaming, and the windows of a long video
(``diffusion.windows``). ``sampling.render`` runs it; ``fit`` compiles it ahead of time.

The options were checked where the config was loaded (``runtime.config_check``); here they are
trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax import conditioning
from facecam_jax import options as opts
from facecam_jax.diffusion import flow, solvers
from facecam_jax.diffusion.step_cache import MagCache, load_calibration
from facecam_jax.diffusion.windows import Windows
from facecam_jax.runtime import progress
from facecam_jax.sampling.inputs import SampleInputs


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """What the sampling program is specialised on (hashable: one compilation per value)."""

    steps: int
    shift: float
    guidance: float  # 1.0: no classifier-free guidance (one pass per step)
    num_experts: int = 1
    boundary: float | None = None  # A14B: the high-noise expert runs while t >= boundary * 1000
    solver: str = "euler"
    cache: MagCache | None = None
    windows: Windows | None = None  # a long video's windows (None: the latents are one window)
    window_batch: int = 0  # windows per forward pass (0: all of them at once)
    offload: str = "none"
    cfg: str = "batch"  # "batch": cond and uncond in one forward; "sequential": one after the other
    camera: str = opts.DEFAULT_CAMERA_KIND  # camera.kind
    camera_options: tuple = ()  # the camera section's other fields as (name, value) (camera.normal_maps)
    camera_guidance: float = 1.0  # CameraCtrl II's camera CFG scale (1.0: off, no extra pass)
    # Clip extension (sampling.extend): the condition carries each row's clean context latents
    # (``clean [N, F, ...]``) and their mask (``mask [N, F]``); those frames stay clean.
    context: bool = False

    def __post_init__(self):
        if self.cache is not None and self.cache.num_steps != self.steps:
            raise ValueError(f"the step cache is for {self.cache.num_steps} steps, the sampler runs {self.steps}")

    @classmethod
    def of(cls, config, num_experts: int, *, guidance: float | None = None,
           windows: Windows | None = None) -> "SampleOptions":
        s = config.sample
        if s.get("camera_guidance", 1.0) != 1.0:
            conditioning.of(config).require_null_camera()
        if s.get("extend", "joint") == "clip":
            conditioning.of(config).require_context()
        boundary = config.model.expert_boundary if num_experts == 2 else None
        steps = s.num_steps
        cache = None
        if s.cache == "magcache":
            low = first_low_noise_step(steps, config.model.shift, boundary) if boundary else None
            cache = MagCache.from_calibration(load_calibration(s.cache_calibration), steps,
                                              threshold=s.cache_threshold, max_skips=s.cache_max_skips,
                                              retention=s.cache_retention,
                                              always_run=() if low is None or low >= steps else (low,))
        return cls(steps=steps, shift=config.model.shift, guidance=s.cfg_scale if guidance is None else guidance,
                   num_experts=num_experts, boundary=boundary, solver=s.solver, cache=cache, windows=windows,
                   window_batch=s.window_batch, offload=s.offload, cfg=s.cfg, camera=conditioning.of(config).name,
                   camera_options=tuple(sorted((k, v) for k, v in config.get("camera", {}).items() if k != "kind")),
                   camera_guidance=s.get("camera_guidance", 1.0))

    @property
    def kind(self):
        """The camera kind, set up by its options (``CameraKind.configured``)."""
        return conditioning.get(self.camera).configured(dict(self.camera_options))

    @property
    def passes(self) -> int:
        """DiT passes per step and window: 1, 2 with text CFG or with camera CFG, 3 with both."""
        return 1 + (self.guidance != 1.0) + (self.camera_guidance != 1.0)

    def sigmas(self) -> np.ndarray:
        return flow.inference_sigmas(self.steps, self.shift)

    def phases(self) -> tuple[tuple[int | None, int, int], ...]:
        """``(expert, first step, end step)`` per program: one program for every step (expert
        None: both experts inside it), or one per A14B expert when the waiting one is offloaded."""
        if self.num_experts == 2 and self.offload == "experts":
            low = first_low_noise_step(self.steps, self.shift, self.boundary)
            return tuple(p for p in ((0, 0, low), (1, low, self.steps)) if p[1] < p[2])
        return ((None, 0, self.steps),)

    def evaluations(self) -> tuple[int, int]:
        """(steps that run the block stack, steps): the step cache's plan, known before sampling."""
        ran = self.steps if self.cache is None else int(self.cache.plan().sum())
        return ran, self.steps


def first_low_noise_step(steps: int, shift: float, boundary: float) -> int:
    """The first step whose timestep is below ``boundary * 1000`` (float32, as the program tests it)."""
    t = np.float32(flow.NUM_TRAIN_TIMESTEPS) * flow.inference_sigmas(steps, shift)[:-1].astype(np.float32)
    below = np.nonzero(t < np.float32(boundary * flow.NUM_TRAIN_TIMESTEPS))[0]
    return int(below[0]) if below.size else steps


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What every function of the program closes over: the DiT's graph, the options, the kind."""

    graphdef: object
    options: SampleOptions

    @property
    def kind(self):
        return self.options.kind


@functools.partial(jax.tree_util.register_dataclass, data_fields=("x", "source", "condition", "t", "ctx_cond",
                                                                  "ctx_uncond"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class _Rows:
    """One forward's rows (windows of videos): noisy latents, their inputs, timesteps, contexts."""

    x: jax.Array
    source: jax.Array
    condition: dict
    t: jax.Array
    ctx_cond: jax.Array
    ctx_uncond: jax.Array


def _forward(spec: _Spec, state, rows: _Rows, context, condition, skip, residual):
    """One DiT pass (the camera kind's velocity) over ``rows`` with ``context`` and ``condition``."""
    model = nnx.merge(spec.graphdef, state)
    if spec.options.cache is None:
        return spec.kind.velocity(model, rows.x, rows.source, condition, rows.t, context), residual
    return spec.kind.velocity_cached(model, rows.x, rows.source, condition, rows.t, context, skip=skip,
                                     residual=residual)


def _guided(spec: _Spec, state, rows: _Rows, skip, residual):
    """The guided velocity of ``rows``: one pass without CFG; with text CFG the conditional and
    unconditional passes (the kind's unconditional condition, the negative prompt); with camera
    CFG (CameraCtrl II, eq. 3) also the pass with the kind's null camera:
    ``v(0t, 0c) + w_text (v(t, 0c) - v(0t, 0c)) + w_cam (v(t, c) - v(t, 0c))``. The passes run as
    one batch or one after the other (``sample.cfg``)."""
    options, kind = spec.options, spec.kind
    if options.guidance == 1.0 and options.camera_guidance == 1.0:
        return _forward(spec, state, rows, rows.ctx_cond, rows.condition, skip, residual)
    if options.camera_guidance == 1.0:  # text CFG, the camera in both passes
        passes = [(rows.ctx_cond, rows.condition), (rows.ctx_uncond, kind.unconditional(rows.condition))]
    else:
        null = kind.null_camera(rows.condition)
        passes = [(rows.ctx_cond, rows.condition), (rows.ctx_cond, null)]
        passes += [(rows.ctx_uncond, null)] if options.guidance != 1.0 else []
    vs, residual = _passes(spec, state, rows, passes, skip, residual)
    if options.camera_guidance == 1.0:
        return solvers.guided(vs[0], vs[1], options.guidance), residual
    v_cam, v_null = vs[0], vs[1]
    base = v_null if options.guidance == 1.0 else solvers.guided(v_null, vs[2], options.guidance)
    return base + options.camera_guidance * (v_cam - v_null), residual


def _passes(spec: _Spec, state, rows: _Rows, passes, skip, residual):
    """The velocities of ``rows`` under each ``(context, condition)`` of ``passes``: as one batch,
    or one after the other (half the activations for two passes)."""
    n = len(passes)
    if spec.options.cfg == "sequential":
        parts = [None] * n if residual is None else jnp.split(residual, n, axis=0)
        out = [_forward(spec, state, rows, ctx, cond, skip, r) for (ctx, cond), r in zip(passes, parts)]
        residual = None if residual is None else jnp.concatenate([r for _, r in out])
        return [v for v, _ in out], residual
    many = lambda a: jnp.concatenate([a] * n, axis=0)  # noqa: E731
    both = dataclasses.replace(rows, x=many(rows.x), source=many(rows.source), t=many(rows.t))
    condition = jax.tree.map(lambda *c: jnp.concatenate(c, axis=0), *[cond for _, cond in passes])
    v, residual = _forward(spec, state, both, jnp.concatenate([ctx for ctx, _ in passes]), condition, skip, residual)
    return jnp.split(v, n, axis=0), residual


def _chunked(spec: _Spec, state, rows: _Rows, skip, residual):
    """``_guided`` over the rows ``sample.window_batch`` at a time, in a ``lax.map``."""
    n = rows.x.shape[0]
    per = spec.options.window_batch or n
    if per >= n:
        return _guided(spec, state, rows, skip, residual)
    if n % per:
        raise ValueError(f"sample.window_batch {per} does not divide the {n} windows of the batch")
    chunks = jax.tree.map(lambda a: a.reshape(n // per, per, *a.shape[1:]), rows)
    res = None if residual is None else residual.reshape(n // per, -1, *residual.shape[1:])
    v, res = jax.lax.map(lambda args: _guided(spec, state, args[0], skip, args[1]), (chunks, res))
    return v.reshape(n, *v.shape[2:]), None if res is None else res.reshape(residual.shape)


def _velocity(spec: _Spec, states, expert: int | None, inputs: SampleInputs):
    """The solver's velocity over whole videos, ``(x [N, F, ...], t) -> v`` (with the step
    cache ``(x, t, cache state) -> (v, cache state)``): the windows gathered, each expert's
    pass (A14B: ``lax.cond`` on the timestep unless ``expert`` fixes it), windows blended."""
    options = spec.options
    windows = options.windows
    n = inputs.source.shape[0]

    def run(x, t, skip, residual):
        x = _with_context(options, x, inputs)
        per_video = lambda a: jnp.repeat(a, n // a.shape[0], axis=0)  # noqa: E731  one row per window
        rows = _Rows(windows.gather(x) if windows is not None else x, inputs.source, inputs.condition,
                     per_video(t), per_video(inputs.ctx_cond), per_video(inputs.ctx_uncond))
        if expert is not None or options.num_experts == 1:
            v, residual = _chunked(spec, states[0], rows, skip, residual)
        else:
            high = t[0] >= options.boundary * flow.NUM_TRAIN_TIMESTEPS
            v, residual = jax.lax.cond(high, lambda: _chunked(spec, states[0], rows, skip, residual),
                                       lambda: _chunked(spec, states[1], rows, skip, residual))
        return (windows.blend(v) if windows is not None else v), residual

    if options.cache is None:
        return lambda x, t: run(x, t, False, None)[0]
    return lambda x, t, st: options.cache(st, lambda skip, residual: run(x, t, skip, residual))


def _with_context(options: SampleOptions, x, inputs: SampleInputs):
    """``x`` with clip extension's context frames the clean ones (what the DiT sees and what the
    program returns there: whatever a solver does with their state, they stay as given)."""
    if not options.context:
        return x
    return flow.keep_context(x, inputs.condition["clean"], inputs.condition["mask"])


def make_sample_fn(graphdef, options: SampleOptions, on_step=None, phase: tuple | None = None,
                   record_norms: bool = False):
    """The sampling program's function.

    ``phase`` None: ``fn(states, inputs) -> latents``, every step. ``phase = (expert, start,
    stop)``: ``fn(state, inputs, carry) -> carry``, steps ``start .. stop - 1`` of that expert
    (``initial_carry_fn`` makes the first carry). ``inputs``: ``SampleInputs``; the latents
    returned cover whole videos. ``on_step(i, x)``: a host function called after step i (a
    progress bar). ``record_norms`` (with a cache, e.g. ``MagCache.off``): return every step's
    per-token residual norms instead of the latents, for ``step_cache.calibrate``."""
    spec = _Spec(graphdef, options)
    sigmas = options.sigmas()
    if phase is None:
        def fn(states, inputs: SampleInputs):
            cache = options.cache
            dit_config = nnx.merge(graphdef, states[0]).config
            st = None if cache is None else cache.init(cache_shape(dit_config, options, inputs.source.shape),
                                                       record_norms=record_norms)
            carry = solvers.initial_carry(inputs.noise, options.solver, st)
            carry = solvers.solve_steps(_velocity(spec, states, None, inputs), carry, sigmas, solver=options.solver,
                                        on_step=on_step)
            return carry[-1].norms if record_norms else _with_context(options, carry[0], inputs)

        return fn

    expert, start, stop = phase

    def phase_fn(state, inputs: SampleInputs, carry):
        carry = solvers.solve_steps(_velocity(spec, (state,), expert, inputs), carry, sigmas, solver=options.solver,
                                    start=start, stop=stop, on_step=on_step)
        return (_with_context(options, carry[0], inputs), *carry[1:])

    return phase_fn


def cache_shape(dit_config, options: SampleOptions, source_shape) -> tuple[int, int, int]:
    """The step cache's residual ``[rows, L, D]``: every window of every video, once per pass."""
    rows = source_shape[0] * options.passes
    return options.kind.token_shape(dit_config, (rows, *source_shape[1:]))


def initial_carry_fn(options: SampleOptions, token_shape: tuple[int, int, int] | None):
    """``noise -> the first carry`` of a phased program (the solver's, with the cache's state)."""
    def fn(noise):
        state = None if options.cache is None else options.cache.init(token_shape)
        return solvers.initial_carry(noise, options.solver, state)
    return fn


class StepProgress:
    """The host side of a program's per-step callback: advances the bar attached while it runs."""

    def __init__(self):
        self._bar = None
        self._offset = 0

    def __call__(self, i, _):
        if self._bar is not None:
            self._bar.update(self._offset + int(i) + 1 - self._bar.n)

    @contextlib.contextmanager
    def bar(self, total: int, desc: str = "sample", offset: int = 0):
        """Attaches a bar of ``total`` steps; step i of the program shows as ``offset + i + 1``."""
        with progress.bar(total=total, desc=desc, unit="step") as bar:
            self._bar, self._offset = bar, offset
            try:
                yield bar
            finally:
                self._bar = None


@dataclasses.dataclass(frozen=True)
class SampleProgram:
    fn: object  # jax.jit(make_sample_fn(...)), or per phase
    progress: StepProgress
    phases: tuple = ()  # (expert, start, stop, jitted phase fn) when the experts are offloaded
    # fn compiled, per input shapes (``render``): every batch and clip of those shapes reuses it
    compiled: dict = dataclasses.field(default_factory=dict)


@functools.lru_cache(maxsize=8)
def sample_program(graphdef, options: SampleOptions) -> SampleProgram:
    """The jitted sampling program (cached: repeated generations reuse one compilation). Its
    shardings come from its arguments: DiT states placed by their logical axes, latents and
    contexts replicated; activations are pinned inside. Each step reports to ``progress``."""
    steps = StepProgress()
    if options.phases()[0][0] is None:
        return SampleProgram(jax.jit(make_sample_fn(graphdef, options, on_step=steps)), steps)
    phased = tuple((e, a, b, jax.jit(make_sample_fn(graphdef, options, on_step=steps, phase=(e, a, b))))
                   for e, a, b in options.phases())
    return SampleProgram(None, steps, phased)


def options_for(config, num_experts: int, frames: int, *,
                guidance: float | None = None) -> tuple[SampleOptions, Windows | None]:
    """The program's options for a ``frames``-frame video, and the windows it is sampled in:
    joint windows live inside one run of the program; extended clips (``sample.extend=clip``)
    outside it, one run per clip with its context (``sampling.extend``)."""
    windows = window_layout(config, frames)
    if windows is not None and config.sample.get("extend", "joint") == "clip":
        return dataclasses.replace(SampleOptions.of(config, num_experts, guidance=guidance), context=True), windows
    return SampleOptions.of(config, num_experts, guidance=guidance, windows=windows), windows


def window_layout(config, frames: int) -> Windows | None:
    """The windows a video of ``frames`` frames is re-rendered in (None: it fits one window):
    jointly denoised, or with ``sample.extend=clip`` the clips of ``sampling.extend``."""
    window = opts.latent_frames(config.data.frames)
    total = opts.latent_frames(frames)
    if total <= window:
        return None
    if config.sample.get("extend", "joint") == "clip":  # clips, each continuing from the one before
        return Windows.cover(total, window, config.sample.context_frames, least=1, key="sample.context_frames")
    return Windows.cover(total, window, config.sample.window_overlap)


def streamed_weights(path, variable) -> bool:
    """The block weights ``offload="blocks"`` keeps in host memory: the linear layers' kernels
    (all but a sliver of the bytes). Norm scales, biases, modulation and quantization scales
    stay on the device: small, and their host-memory slices trip TPU layouts."""
    return bool(path) and path[-1] == "kernel" and isinstance(variable, nnx.Param)
