"""MagCache (Ma et al. 2025): reuse the DiT block stack's residual on steps where it barely changes.

The residual of the block stack, ``r_i`` = output tokens minus input tokens at step i, changes
in magnitude along a sampling run in nearly the same way for every input. A calibration run
measures the curve ``gamma_i = mean over tokens of ||r_i|| / ||r_{i-1}||`` once (``calibrate``,
``gamma_0 = 1``). While sampling, each step multiplies the ratio up, ``acc = prod gamma``, and
sums the error of skipping, ``err = sum |1 - acc|``, over the steps since the blocks last ran;
step i adds the cached residual instead of running the blocks iff ``err < threshold`` and it
would be at most the ``max_skips``-th skip in a row. A step that runs resets both sums. The
first step (nothing is cached yet), the first ``int(N * retention)`` steps, the last step and
any ``always_run`` step always run.

The whole rule is traced inside the sampling program: the state (``CacheState``) rides the
solver's scan (``solvers.sample(..., state=...)``) and ``lax.cond`` picks the blocks or the cached
residual (``CameraKind.velocity_cached``). With CFG the conditional and unconditional
halves are one batch, so one decision and one cached residual cover both, and the
calibrated curve averages over both. The state counts the steps that ran the blocks
(``evals``), so "model evaluations: K of N" is exact. A sketch of the hook::

    cache = MagCache.from_calibration(load_calibration(path), num_steps)
    state = cache.init(kind.token_shape(cfg, cfg_batch_latent_shape))

    def velocity(x, t, state):
        forward = lambda skip, r: kind.velocity_cached(model, x, src, cond, t, ctx, skip=skip, residual=r)
        return cache(state, forward)              # (v, state)

    x, state = solvers.sample(velocity, noise, sigmas, solver="unipc", state=state)

Wan2.2 A14B: the two experts' residuals differ, so the step where the low-noise expert takes
over belongs in ``always_run``. The cached residual is ``[B, L, D]`` (fp32 by default: 2.3 GB
for a 14B model at 480x704, 81 frames, CFG; ``init(..., dtype=jnp.bfloat16)`` halves it).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CALIBRATION_FORMAT = "facecam-magcache-ratios"


class CacheState(NamedTuple):
    """What the cache carries from step to step (a pytree; ``MagCache.init`` makes one)."""

    step: jax.Array  # int32 [], the step the next call serves
    residual: jax.Array  # [B, L, D], the block stack's output minus input at the last step that ran
    acc_ratio: jax.Array  # f32 [], product of the ratios since the blocks last ran
    acc_err: jax.Array  # f32 [], sum of |1 - acc_ratio| since the blocks last ran
    acc_skips: jax.Array  # int32 [], steps reused in a row
    evals: jax.Array  # int32 [], steps that ran the blocks
    ran: jax.Array  # bool [N], per step: the blocks ran
    norms: jax.Array | None  # f32 [N, B, L] per-token residual norms (calibration runs), else None


@dataclasses.dataclass(frozen=True)
class MagCache:
    """The cache rule for one step count (static and hashable, so it can key a compiled program).

    ``ratios`` [N]: the calibrated magnitude-ratio curve at this step count
    (``from_calibration`` interpolates a stored one). Defaults are MagCache's for Wan 2.1
    (threshold 0.12, K = 2, retention 0.2). ``enabled=False`` (``off``) runs every step with
    no ``lax.cond`` in the program while still counting (and recording norms, for calibration).
    """

    ratios: tuple[float, ...]
    threshold: float = 0.12
    max_skips: int = 2
    retention: float = 0.2
    always_run: tuple[int, ...] = ()
    enabled: bool = True

    def __post_init__(self):
        ratios = tuple(float(r) for r in self.ratios)
        object.__setattr__(self, "ratios", ratios)
        object.__setattr__(self, "always_run", tuple(sorted({int(i) for i in self.always_run})))
        if not ratios or not all(np.isfinite(r) and r > 0 for r in ratios):
            raise ValueError(f"ratios must be a non-empty curve of positive finite numbers, got {ratios}")
        if not (self.threshold >= 0 and self.max_skips >= 0 and 0 <= self.retention <= 1):
            raise ValueError(f"need threshold >= 0, max_skips >= 0 and 0 <= retention <= 1; got {self.threshold}, "
                             f"{self.max_skips}, {self.retention}")
        if any(not 0 <= i < len(ratios) for i in self.always_run):
            raise ValueError(f"always_run steps {self.always_run} must lie in [0, {len(ratios)})")

    @classmethod
    def from_calibration(cls, calibration: "Calibration | Sequence[float]", num_steps: int, **kw) -> "MagCache":
        """The rule for ``num_steps`` from a calibrated curve at any step count (``interpolate_ratios``)."""
        ratios = calibration.ratios if isinstance(calibration, Calibration) else calibration
        return cls(tuple(interpolate_ratios(ratios, num_steps)), **kw)

    @classmethod
    def off(cls, num_steps: int) -> "MagCache":
        """Every step runs the blocks (a calibration run, or caching switched off), still counted."""
        return cls((1.0,) * num_steps, enabled=False)

    @property
    def num_steps(self) -> int:
        return len(self.ratios)

    @property
    def retained_steps(self) -> int:
        """The first steps that always run: ``int(N * retention)``, as MagCache counts them."""
        return int(self.num_steps * self.retention)

    def must_run(self) -> np.ndarray:
        """bool [N]: steps the rule never skips (the first, retained, ``always_run``, the last)."""
        must = np.zeros(self.num_steps, bool)
        must[: max(1, self.retained_steps)] = True
        must[list(self.always_run)] = True
        must[-1] = True
        return must

    def init(self, residual_shape: Sequence[int], dtype: Any = jnp.float32, *,
             record_norms: bool = False) -> CacheState:
        """The state before the first step; ``residual_shape`` is the block stack's ``[B, L, D]``.

        ``record_norms``: keep every step's per-token residual norms ``[N, B, L]`` for ``calibrate``.
        """
        b, l, _ = residual_shape
        return CacheState(
            step=jnp.zeros((), jnp.int32),
            residual=jnp.zeros(tuple(residual_shape), dtype),
            acc_ratio=jnp.ones((), jnp.float32),
            acc_err=jnp.zeros((), jnp.float32),
            acc_skips=jnp.zeros((), jnp.int32),
            evals=jnp.zeros((), jnp.int32),
            ran=jnp.zeros((self.num_steps,), bool),
            norms=jnp.zeros((self.num_steps, b, l), jnp.float32) if record_norms else None,
        )

    def __call__(self, state: CacheState, forward: Callable[[Any, jax.Array], tuple[Any, jax.Array]]):
        """One step: ``forward(skip, residual) -> (out, residual)`` runs or reuses; returns ``(out, state)``.

        ``skip`` is a traced bool (``False``, a Python bool, when the cache is off);
        ``forward`` must hand back the residual it was given when it skips. Call once per step.
        """
        i = jnp.minimum(state.step, self.num_steps - 1)
        if self.enabled:
            acc_ratio = state.acc_ratio * jnp.asarray(self.ratios, jnp.float32)[i]
            acc_err = state.acc_err + jnp.abs(1.0 - acc_ratio)
            acc_skips = state.acc_skips + 1
            skip = ~jnp.asarray(self.must_run())[i] & (acc_err < self.threshold) & (acc_skips <= self.max_skips)
            out, residual = forward(skip, state.residual)
        else:
            acc_ratio, acc_err, acc_skips = state.acc_ratio, state.acc_err, state.acc_skips
            skip = jnp.zeros((), bool)
            out, residual = forward(False, state.residual)
        residual = residual.astype(state.residual.dtype)
        norms = state.norms
        if norms is not None:
            norms = norms.at[i].set(token_norms(residual))
        return out, CacheState(
            step=state.step + 1,
            residual=residual,
            acc_ratio=jnp.where(skip, acc_ratio, 1.0),
            acc_err=jnp.where(skip, acc_err, 0.0),
            acc_skips=jnp.where(skip, acc_skips, 0),
            evals=state.evals + (~skip).astype(jnp.int32),
            ran=state.ran.at[i].set(~skip),
            norms=norms,
        )

    def plan(self) -> np.ndarray:
        """bool [N]: the steps that will run the blocks, on the host, in the program's float32 arithmetic.

        The rule depends only on the calibrated curve, so this is known before sampling.
        """
        runs = np.ones(self.num_steps, bool)
        if not self.enabled:
            return runs
        one, threshold = np.float32(1.0), np.float32(self.threshold)
        acc_ratio, acc_err, acc_skips = one, np.float32(0.0), 0
        for i, (ratio, must) in enumerate(zip(np.asarray(self.ratios, np.float32), self.must_run())):
            cand_ratio = np.float32(acc_ratio * ratio)
            cand_err = np.float32(acc_err + np.abs(one - cand_ratio))
            if not must and cand_err < threshold and acc_skips + 1 <= self.max_skips:
                runs[i] = False
                acc_ratio, acc_err, acc_skips = cand_ratio, cand_err, acc_skips + 1
            else:
                acc_ratio, acc_err, acc_skips = one, np.float32(0.0), 0
        return runs


def token_norms(residual: jax.Array) -> jax.Array:
    """Per-token L2 norms ``[B, L]`` of a residual ``[B, L, D]``, in fp32."""
    return jnp.linalg.norm(residual.astype(jnp.float32), axis=-1)


def calibrate(norms) -> np.ndarray:
    """The magnitude-ratio curve [N] from per-step residual norms ``[N, ...]`` of an uncached run.

    ``gamma_0 = 1``; ``gamma_i`` = the mean over every token (and batch row: CFG's two halves
    share one decision) of ``norms_i / norms_{i-1}``, as MagCache's calibration.
    """
    flat = np.asarray(norms, np.float64)
    if flat.ndim < 1 or flat.shape[0] < 1:
        raise ValueError(f"norms must be [steps, ...], got shape {flat.shape}")
    flat = flat.reshape(flat.shape[0], -1)
    bad = np.nonzero(~np.all(np.isfinite(flat) & (flat > 0), axis=1))[0]
    if bad.size:
        raise ValueError(f"residual norms at steps {bad.tolist()} are zero or not finite: was every step run "
                         "(MagCache.off, init(record_norms=True))?")
    return np.concatenate([[1.0], np.mean(flat[1:] / flat[:-1], axis=1)])


def interpolate_ratios(ratios, num_steps: int) -> np.ndarray:
    """A ratio curve resampled to ``num_steps`` by nearest index, as MagCache's ``nearest_interp``.

    Step j takes the ratio at ``round(j (N_src - 1) / (num_steps - 1))`` (one step: the last ratio).
    Nearest resampling keeps the curve's shape, not its per-step meaning: a ratio between two
    calibrated steps is not compounded when steps are merged.
    """
    src = np.asarray(ratios, np.float64)
    if src.ndim != 1 or src.size == 0 or num_steps < 1:
        raise ValueError(f"need a 1-D ratio curve and num_steps >= 1, got shape {src.shape} and {num_steps}")
    if num_steps == 1:
        return src[-1:].copy()
    scale = (src.size - 1) / (num_steps - 1)
    return src[np.round(np.arange(num_steps) * scale).astype(int)]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A calibrated ratio curve and what it was measured with (``meta``: model, solver, shift, ...)."""

    ratios: np.ndarray  # [num_steps], float64
    meta: dict

    @property
    def num_steps(self) -> int:
        return int(self.ratios.size)


def save_calibration(path: str, ratios, **meta) -> None:
    """Writes the curve as JSON: ``{"format", "num_steps", "ratios", "meta"}`` (floats round-trip exactly)."""
    ratios = np.asarray(ratios, np.float64)
    if ratios.ndim != 1 or ratios.size == 0 or not np.all(np.isfinite(ratios) & (ratios > 0)):
        raise ValueError(f"ratios must be a non-empty 1-D curve of positive finite numbers, got {ratios}")
    record = {"format": CALIBRATION_FORMAT, "num_steps": int(ratios.size), "ratios": [float(r) for r in ratios],
              "meta": meta}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def load_calibration(path: str) -> Calibration:
    """Reads a curve written by ``save_calibration``; a file of another kind (not JSON, not a
    calibration, bad ratios) is a clear ValueError naming the file."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a MagCache calibration ({why}); write one with tools/calibrate_cache.py")

    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except UnicodeDecodeError:
        raise bad("not text: a binary file") from None
    except json.JSONDecodeError as e:
        raise bad(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(record, dict) or record.get("format") != CALIBRATION_FORMAT:
        raise bad(f'no "format": "{CALIBRATION_FORMAT}"')
    try:
        ratios = np.asarray(record["ratios"], np.float64)
    except KeyError:
        raise bad('no "ratios"') from None
    except (TypeError, ValueError):
        raise bad('"ratios" is not a list of numbers') from None
    if ratios.ndim != 1 or ratios.size != record.get("num_steps"):
        raise ValueError(f"{path}: num_steps is {record.get('num_steps')!r} but {ratios.size} ratios are stored")
    meta = record.get("meta", {})
    return Calibration(ratios, dict(meta) if isinstance(meta, dict) else {})
