"""The sampling program: one jitted function of the DiT states, the (windows of the) source and
camera latents, the text contexts and the noise, specialised on one hashable ``SampleOptions``:
the solver (``flow.SOLVERS``), a MagCache step cache (``step_cache``), Wan2.2 A14B's expert
switch (``lax.cond`` at ``t = boundary * 1000``, or one program per expert phase when the
waiting expert is offloaded), block streaming, and the windows of a long video
(``windows.Windows``). ``sampler`` runs it; ``fit`` compiles it ahead of time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax.diffusion import flow
from facecam_jax.diffusion.step_cache import MagCache, load_calibration
from facecam_jax.diffusion.windows import Windows, latent_frames
from facecam_jax.models.wan_dit import facecam_token_shape, facecam_velocity, facecam_velocity_cached
from facecam_jax.runtime import progress

OFFLOAD_MODES = ("none", "experts", "blocks")
CACHE_MODES = ("none", "magcache")
CFG_MODES = ("batch", "sequential")


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

    def __post_init__(self):
        if self.solver not in flow.SOLVERS:
            raise ValueError(f"sample.solver must be one of {flow.SOLVERS}, got {self.solver!r}")
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"sample.offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        if self.cfg not in CFG_MODES:
            raise ValueError(f"sample.cfg must be one of {CFG_MODES}, got {self.cfg!r}")
        if self.cache is not None and self.cache.num_steps != self.steps:
            raise ValueError(f"the step cache is for {self.cache.num_steps} steps, the sampler runs {self.steps}")

    @classmethod
    def of(cls, config, num_experts: int, *, guidance: float | None = None,
           windows: Windows | None = None) -> "SampleOptions":
        s = config.sample
        boundary = config.model.expert_boundary if num_experts == 2 else None
        steps = s.num_steps
        cache = None
        if s.cache == "magcache":
            if not s.cache_calibration:
                raise ValueError("sample.cache=magcache needs sample.cache_calibration: a ratio curve written by "
                                 "tools/calibrate_cache.py for this model")
            low = first_low_noise_step(steps, config.model.shift, boundary) if boundary else None
            cache = MagCache.from_calibration(load_calibration(s.cache_calibration), steps,
                                              threshold=s.cache_threshold, max_skips=s.cache_max_skips,
                                              retention=s.cache_retention,
                                              always_run=() if low is None or low >= steps else (low,))
        elif s.cache != "none":
            raise ValueError(f"sample.cache must be one of {CACHE_MODES}, got {s.cache!r}")
        return cls(steps=steps, shift=config.model.shift, guidance=s.cfg_scale if guidance is None else guidance,
                   num_experts=num_experts, boundary=boundary, solver=s.solver, cache=cache, windows=windows,
                   window_batch=s.window_batch, offload=s.offload, cfg=s.cfg)

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


def make_sample_fn(graphdef, options: SampleOptions, on_step=None, phase: tuple | None = None,
                   record_norms: bool = False):
    """The sampling program's function.

    ``phase`` None: ``fn(states, source, camera, ctx_cond, ctx_uncond, noise) -> latents``, every
    step. ``phase = (expert, start, stop)``: ``fn(state, source, camera, ctx_cond, ctx_uncond,
    carry) -> carry``, steps ``start .. stop - 1`` of that expert (``initial_carry_fn`` makes
    the first carry). ``source`` / ``camera`` are the latents of the (windows of the) videos,
    ``[N * K, F, H, W, C]``; ``noise`` and the latents returned cover whole videos. ``on_step(i,
    x)``: a host function called after step i (a progress bar). ``record_norms`` (with a cache,
    e.g. ``MagCache.off``): return every step's per-token residual norms instead of the latents,
    for ``step_cache.calibrate``."""
    sigmas = options.sigmas()
    use_cfg = options.guidance != 1.0
    cache, windows = options.cache, options.windows

    def forward(state, x, source, camera, t, ctx, skip, residual):
        model = nnx.merge(graphdef, state)
        if cache is None:
            return facecam_velocity(model, x, camera, source, t, ctx), residual
        return facecam_velocity_cached(model, x, camera, source, t, ctx, skip=skip, residual=residual)

    def guided(state, x, source, camera, t, ctx_cond, ctx_uncond, skip, residual):
        if not use_cfg:
            return forward(state, x, source, camera, t, ctx_cond, skip, residual)
        if options.cfg == "sequential":  # half the activations: the two passes one after the other
            r_cond, r_uncond = (None, None) if residual is None else jnp.split(residual, 2, axis=0)
            v_cond, r_cond = forward(state, x, source, camera, t, ctx_cond, skip, r_cond)
            v_uncond, r_uncond = forward(state, x, source, camera, t, ctx_uncond, skip, r_uncond)
            residual = None if residual is None else jnp.concatenate([r_cond, r_uncond])
            return flow.guided(v_cond, v_uncond, options.guidance), residual
        two = lambda a: jnp.concatenate([a, a], axis=0)  # noqa: E731  cond and uncond in one batch
        v, residual = forward(state, two(x), two(source), two(camera), two(t),
                              jnp.concatenate([ctx_cond, ctx_uncond]), skip, residual)
        v_cond, v_uncond = jnp.split(v, 2, axis=0)
        return flow.guided(v_cond, v_uncond, options.guidance), residual

    def chunked(state, x, source, camera, t, ctx_cond, ctx_uncond, skip, residual):
        """``guided`` over the rows (videos x windows) ``window_batch`` at a time, in a ``lax.map``."""
        rows = x.shape[0]
        per = options.window_batch or rows
        if per >= rows:
            return guided(state, x, source, camera, t, ctx_cond, ctx_uncond, skip, residual)
        if rows % per:
            raise ValueError(f"sample.window_batch {per} does not divide the {rows} windows of the batch")
        split = lambda a: a.reshape(rows // per, per, *a.shape[1:])  # noqa: E731
        res = None if residual is None else residual.reshape(rows // per, -1, *residual.shape[1:])

        def one(args):
            *inputs, r = args
            return guided(state, *inputs, skip, r)

        v, res = jax.lax.map(one, (split(x), split(source), split(camera), split(t), split(ctx_cond),
                                   split(ctx_uncond), res))
        return v.reshape(rows, *v.shape[2:]), None if res is None else res.reshape(residual.shape)

    def velocity_of(expert_states, expert, source, camera, ctx_cond, ctx_uncond):
        """``flow``'s velocity ``(x [N, F, ...], t) -> v``; with the cache ``(x, t, state) -> (v, state)``."""

        def run(x, t, skip, residual):
            rows = source.shape[0]
            xw = windows.gather(x) if windows is not None else x
            tw = jnp.repeat(t, rows // x.shape[0])
            cc, cu = (jnp.repeat(c, rows // c.shape[0], axis=0) for c in (ctx_cond, ctx_uncond))  # per window

            def with_state(state):
                return chunked(state, xw, source, camera, tw, cc, cu, skip, residual)

            if expert is not None or options.num_experts == 1:
                v, residual = with_state(expert_states[0])
            else:
                high = t[0] >= options.boundary * flow.NUM_TRAIN_TIMESTEPS
                v, residual = jax.lax.cond(high, lambda: with_state(expert_states[0]),
                                           lambda: with_state(expert_states[1]))
            return (windows.blend(v) if windows is not None else v), residual

        if cache is None:
            return lambda x, t: run(x, t, False, None)[0]
        return lambda x, t, st: cache(st, lambda skip, residual: run(x, t, skip, residual))

    if phase is None:
        def fn(states, source, camera, ctx_cond, ctx_uncond, noise):
            velocity = velocity_of(states, None, source, camera, ctx_cond, ctx_uncond)
            dit_config = nnx.merge(graphdef, states[0]).config
            st = None if cache is None else cache.init(cache_shape(dit_config, options, source.shape),
                                                         record_norms=record_norms)
            carry = flow.initial_carry(noise, options.solver, st)
            carry = flow.solve_steps(velocity, carry, sigmas, solver=options.solver, on_step=on_step)
            return carry[-1].norms if record_norms else carry[0]

        return fn

    expert, start, stop = phase

    def phase_fn(state, source, camera, ctx_cond, ctx_uncond, carry):
        velocity = velocity_of((state,), expert, source, camera, ctx_cond, ctx_uncond)
        return flow.solve_steps(velocity, carry, sigmas, solver=options.solver, start=start, stop=stop,
                                on_step=on_step)

    return phase_fn


def cache_shape(dit_config, options: SampleOptions, source_shape) -> tuple[int, int, int]:
    """The step cache's residual ``[rows, L, D]``: every window of every video, twice with CFG."""
    rows = source_shape[0] * (2 if options.guidance != 1.0 else 1)
    return facecam_token_shape(dit_config, (rows, *source_shape[1:]))


def initial_carry_fn(options: SampleOptions, token_shape: tuple[int, int, int] | None):
    """``noise -> the first carry`` of a phased program (the solver's, with the cache's state)."""
    def fn(noise):
        state = None if options.cache is None else options.cache.init(token_shape)
        return flow.initial_carry(noise, options.solver, state)
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
    init: object = None  # jitted initial_carry_fn for phases


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
    return SampleProgram(None, steps, phased, None)


def window_layout(config, frames: int) -> Windows | None:
    """The windows a video of ``frames`` frames is re-rendered in (None: it fits one window)."""
    window = latent_frames(config.data.frames)
    total = latent_frames(frames)
    if total <= window:
        return None
    return Windows.cover(total, window, config.sample.window_overlap)


def streamed_weights(path, variable) -> bool:
    """The block weights ``offload="blocks"`` keeps in host memory: the linear layers' kernels
    (all but a sliver of the bytes). Norm scales, biases, modulation and quantization scales
    stay on the device: small, and their host-memory slices trip TPU layouts."""
    return bool(path) and path[-1] == "kernel" and isinstance(variable, nnx.Param)
