"""The ODE solvers that sample a rectified flow on ``flow.inference_sigmas``' shifted grid, and
classifier-free guidance.

Euler (the paper's solver), DPM++ 2M or UniPC (Wan's default), one model evaluation per step
each, every step inside one ``lax.scan`` so the whole loop is a single jitted program
(``sample``); ``solve_steps`` runs a range of the steps (one program per Wan2.2 expert phase
when an expert waits in host memory).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from facecam_jax.diffusion.flow import NUM_TRAIN_TIMESTEPS
from facecam_jax.options import SOLVERS

__all__ = ["SOLVERS", "euler_sample", "guided", "initial_carry", "multistep_coefficients", "sample", "solve_steps"]


def guided(v_cond: jax.Array, v_uncond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance ``v_u + scale (v_c - v_u)``."""
    return v_uncond + scale * (v_cond - v_uncond)


VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, ...], timestep [B]) -> v
StatefulVelocityFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]  # (x, t, state) -> (v, state)



def euler_sample(velocity: VelocityFn, x: jax.Array, sigmas: jax.Array,
                 on_step: Callable[..., None] | None = None) -> jax.Array:
    """Integrates ``x`` from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps in one scan.

    ``velocity(x, t)`` gets the timestep ``1000 * sigma`` broadcast over the batch;
    ``x_next = x + v (s_next - s)`` in fp32. ``on_step(i)`` (a host function, e.g. a progress
    bar) is called after step i completes, through ``jax.debug.callback``.
    """
    return sample(velocity, x, sigmas, solver="euler", on_step=on_step)


def sample(velocity: VelocityFn | StatefulVelocityFn, x: jax.Array, sigmas, *, solver: str = "euler",
           on_step: Callable[..., None] | None = None, state: Any = None):
    """Integrates ``x`` from ``sigmas[0]`` (noise) to ``sigmas[-1]`` with ``solver``, every step in one scan.

    ``solver`` (static): ``"euler"`` (``x + v (s_next - s)``, bit for bit the paper's sampler),
    ``"dpmpp_2m"`` or ``"unipc"`` (see ``multistep_coefficients``); each evaluates the velocity
    once per step, in step order. The velocity gets ``t = 1000 * sigma`` broadcast over the
    batch: ``velocity(x, t) -> v``; with ``state`` given (any pytree, e.g. a step cache's),
    ``velocity(x, t, state) -> (v, state)`` instead, the state is carried from step to step
    and ``sample`` returns ``(x, state)`` rather than ``x``. ``on_step(i, _)`` (a host
    function, e.g. a progress bar) is called after step i completes (``jax.debug.callback``).

    Euler accepts a traced grid; the multistep solvers precompute their per-step
    coefficients on the host in float64, so they need a concrete one (numpy, as
    ``inference_sigmas`` returns). ``solve_steps`` runs a range of the steps (one program per
    Wan2.2 expert phase when an expert waits in host memory).
    """
    carry = solve_steps(velocity, initial_carry(x, solver, state), sigmas, solver=solver, on_step=on_step)
    return (carry[0], carry[-1]) if state is not None else carry[0]


def initial_carry(x: jax.Array, solver: str, state: Any = None) -> tuple:
    """What ``solve_steps`` carries from step to step: ``(x, state)`` for Euler; the multistep
    solvers add the previous sample and the two previous data predictions."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    x = x.astype(jnp.float32)
    if solver == "euler":
        return (x, state)
    zeros = jnp.zeros_like(x)
    return (x, zeros, zeros, zeros, state)


def solve_steps(velocity: VelocityFn | StatefulVelocityFn, carry: tuple, sigmas, *, solver: str = "euler",
                start: int = 0, stop: int | None = None, on_step: Callable[..., None] | None = None) -> tuple:
    """Steps ``start .. stop - 1`` of ``sample`` from ``carry`` (``initial_carry``), in one scan:
    the carry after them (its first entry is the sample, its last the velocity's state)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    stateful = carry[-1] is not None
    call = velocity if stateful else (lambda x, t, st: (velocity(x, t), st))
    num = len(sigmas) - 1
    stop = num if stop is None else stop
    if not 0 <= start <= stop <= num:
        raise ValueError(f"steps [{start}, {stop}) are not within the {num} steps of the grid")

    def evaluate(x, s, st):
        t = jnp.full((x.shape[0],), s * NUM_TRAIN_TIMESTEPS, jnp.float32)
        v, st = call(x, t, st)
        return v.astype(jnp.float32), st

    def report(i, x):
        if on_step is not None:
            jax.debug.callback(on_step, i, x.ravel()[0])  # the data dependency orders it after the step

    steps = jnp.arange(start, stop)
    if solver == "euler":
        sig = jnp.asarray(sigmas, jnp.float32)

        def euler_step(carry, inputs):
            x, st = carry
            i, s, s_next = inputs
            v, st = evaluate(x, s, st)
            x = x + v * (s_next - s)
            report(i, x)
            return (x, st), None

        carry, _ = jax.lax.scan(euler_step, carry, (steps, sig[start:stop], sig[start + 1:stop + 1]))
        return carry

    coef = multistep_coefficients(sigmas, solver)
    table = jnp.asarray(np.stack([coef[k] for k in _COEFFICIENTS], axis=1), jnp.float32)  # [N, 8]
    sig = jnp.asarray(_concrete_grid(sigmas), jnp.float32)
    corrector = solver == "unipc"

    def multistep(carry, inputs):
        # x: the sample at sigma_i (UniPC: before its correction); x_last: the previous step's
        # (corrected) sample; m1, m2: the data predictions of the two previous steps.
        x, x_last, m1, m2, st = carry
        i, s, c = inputs
        px, pm, pd, use_c, cx, cm, cd2, cd = (c[k] for k in range(8))
        v, st = evaluate(x, s, st)
        m = x - s * v  # the data (x0) prediction at sigma_i
        if corrector:  # UniC: re-solve the last interval with m_i known; m_i itself is not re-evaluated
            x = jnp.where(use_c > 0, cx * x_last + cm * m1 + cd2 * (m1 - m2) + cd * (m - m1), x)
        x_next = px * x + pm * m + pd * (m - m1)
        report(i, x_next)
        return (x_next, x, m, m1, st), None

    carry, _ = jax.lax.scan(multistep, carry, (steps, sig[start:stop], table[start:stop]))
    return carry


_COEFFICIENTS = ("pred_x", "pred_m", "pred_dm", "corr", "corr_x", "corr_m", "corr_dm2", "corr_dm")


def _concrete_grid(sigmas) -> np.ndarray:
    try:
        s = np.asarray(sigmas, np.float64)
    except jax.errors.TracerArrayConversionError as err:
        raise TypeError("the unipc and dpmpp_2m solvers precompute their coefficients on the host: pass the "
                        "sigma grid as a numpy array (flow.inference_sigmas), not a traced one") from err
    if s.ndim != 1 or s.size < 2 or s[0] > 1 or s[-1] < 0 or np.any(np.diff(s) >= 0):
        raise ValueError(f"sigmas must fall strictly from at most 1 to at least 0 (at least 2 levels), got {s}")
    return s


def multistep_coefficients(sigmas, solver: str) -> dict[str, np.ndarray]:
    """Per-step scalars [N] (float64) of the DPM++ 2M / UniPC updates in the flow parameterisation.

    With ``alpha = 1 - sigma``, half-log-SNR ``lambda = log(alpha / sigma)``, step size
    ``h_i = lambda_{i+1} - lambda_i`` and the data prediction ``m_i = x_i - sigma_i v_i``:

    - predictor: ``x_{i+1} = pred_x x_i + pred_m m_i + pred_dm (m_i - m_{i-1})``, where
      ``pred_x = sigma_{i+1} / sigma_i`` and ``pred_m = 1 - pred_x = alpha_{i+1} (1 - e^{-h_i})``
      is the first-order exponential integrator, and ``pred_dm = pred_m (h_i / h_{i-1}) / 2``
      the second-order term. This is DPM-Solver++(2M), midpoint form, data prediction, and
      also UniPC's UniP-2 with B(h) = e^h - 1 ("bh2", rho = 1/2): the two predictors coincide.
      First order (``pred_dm = 0``) at the first step (no history) and the last (to sigma = 0,
      where ``h`` is infinite: ``x_N = m_{N-1}``), as diffusers / Wan do with
      ``lower_order_final`` and ``final_sigmas_type="zero"``.
    - UniPC only, before the predictor of step i >= 1 (``corr`` = 1): the UniC corrector
      re-solves the interval i-1 -> i with the fresh ``m_i``:
      ``x_i = corr_x x_{i-1} + corr_m m_{i-1} + corr_dm2 (m_{i-1} - m_{i-2}) + corr_dm (m_i - m_{i-1})``,
      of the order the predictor of step i-1 had (UniC-1: rho = 1/2; UniC-2: rho solves the
      2x2 system of the bh2 variant), as Wan's ``FlowUniPCMultistepScheduler`` (solver_order 2,
      bh2, predict_x0, no disabled corrector steps).

    A first-order step is exactly Euler here: ``(s'/s) x + (1 - s'/s)(x - s v) = x + (s' - s) v``.
    Sigma = 1 (alpha = 0, lambda = -inf) makes the first step's ``h`` infinite; the history
    ratio ``h_i / h_{i-1}`` that weights the previous data prediction is then taken as its limit
    0, so no step sees an infinity or a NaN (Wan's own grid starts at shift(0.999) instead).
    """
    if solver not in ("unipc", "dpmpp_2m"):
        raise ValueError(f"multistep coefficients exist for 'unipc' and 'dpmpp_2m', not {solver!r}")
    s = _concrete_grid(sigmas)
    n = s.size - 1
    alpha = 1.0 - s
    ratio = s[1:] / s[:-1]  # sigma_i > 0 for every step's start
    with np.errstate(divide="ignore"):
        h = -np.log(s[1:] * alpha[:-1] / (alpha[1:] * s[:-1]))  # e^{-h_i}; 0 -> h = inf at sigma 1 or 0
    order = np.full(n, 2)
    order[0] = order[-1] = 1
    q = np.zeros(n)  # h_i / h_{i-1}: how far back the previous data prediction lies
    for i in range(1, n):
        if order[i] == 2 and np.isfinite(h[i - 1]):
            q[i] = h[i] / h[i - 1]
    out = {k: np.zeros(n) for k in _COEFFICIENTS}
    out["pred_x"], out["pred_m"] = ratio, 1.0 - ratio
    out["pred_dm"] = 0.5 * (1.0 - ratio) * q
    out["order"] = order
    if solver == "unipc":
        for i in range(1, n):
            j = i - 1  # the interval j -> i being corrected, solved by the predictor of step j
            if order[j] == 1:
                rho_d, rho_t = 0.0, 0.5
            else:  # h_j is finite here (1 <= j <= N - 2)
                hh = -h[j]
                phi = np.expm1(hh)
                b1 = (phi / hh - 1.0) / phi
                b2 = 2.0 * ((phi / hh - 1.0) / hh - 0.5) / phi
                g = q[j]
                rho_d = g * (b1 - b2) / (g + 1.0)  # R = [[1, 1], [-1/g, 1]], R rho = (b1, b2)
                rho_t = b1 - rho_d
            out["corr"][i] = 1.0
            out["corr_x"][i], out["corr_m"][i] = ratio[j], 1.0 - ratio[j]
            out["corr_dm2"][i] = (1.0 - ratio[j]) * rho_d * q[j]
            out["corr_dm"][i] = (1.0 - ratio[j]) * rho_t
    return out
