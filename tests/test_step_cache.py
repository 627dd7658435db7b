"""MagCache: the skip rule on known curves, the cached DiT program against the uncached one, calibration."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax.diffusion import flow, solvers
from facecam_jax.diffusion import step_cache as sc
from facecam_jax.models import wan_dit as W

CFG = W.PRESETS["tiny"].replace(in_dim=36)
STEPS = 10
GUIDANCE = 5.0
# A plausible curve for 10 steps (residual magnitudes shrink a little each step).
CURVE = (1.0, 0.95, 0.97, 0.98, 0.99, 0.97, 0.98, 0.99, 0.96, 0.93)


@pytest.fixture(scope="module")
def toy():
    """A tiny FaceCam DiT and latents [1, 2, 4, 4, 16] as in test_sample.py."""
    model = W.WanDiT(CFG, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    source, camera, noise = (jnp.asarray(rng.standard_normal((1, 2, 4, 4, 16)), jnp.float32) for _ in range(3))
    ctx_c, ctx_u = (jnp.asarray(rng.standard_normal((1, 3, CFG.text_dim)), jnp.float32) for _ in range(2))
    return model, (source, camera, noise, ctx_c, ctx_u)


def two(a):
    return jnp.concatenate([a, a], axis=0)  # cond and uncond in one batch


def guided(v):
    v_cond, v_uncond = jnp.split(v, 2, axis=0)
    return solvers.guided(v_cond, v_uncond, GUIDANCE)


def run_program(model, inputs, cache, *, record_norms=False, solver="euler"):
    """The sampling program as the sampler builds it (CFG in one batch), with or without the cache."""
    graphdef, params = nnx.split(model)
    sigmas = flow.inference_sigmas(STEPS, 5.0)

    def fn(params, source, camera, noise, ctx_c, ctx_u):
        m = nnx.merge(graphdef, params)
        ctx = jnp.concatenate([ctx_c, ctx_u])
        if cache is None:
            def velocity(x, t):
                return guided(W.facecam_velocity(m, two(x), two(camera), two(source), two(t), ctx))

            return solvers.sample(velocity, noise, sigmas, solver=solver), None

        def velocity(x, t, state):
            def forward(skip, residual):
                return W.facecam_velocity_cached(m, two(x), two(camera), two(source), two(t), ctx,
                                                 skip=skip, residual=residual)

            v, state = cache(state, forward)
            return guided(v), state

        state = cache.init(W.facecam_token_shape(m.config, (2, *noise.shape[1:])), record_norms=record_norms)
        return solvers.sample(velocity, noise, sigmas, solver=solver, state=state)

    out, state = jax.jit(fn)(params, *inputs)
    return np.asarray(out), state


@pytest.fixture(scope="module")
def uncached(toy):
    return run_program(*toy, None)[0]


@pytest.fixture(scope="module")
def off(toy):
    """Cache off, recording the residual norms as a calibration run does."""
    return run_program(*toy, sc.MagCache.off(STEPS), record_norms=True)


def test_cache_off_is_the_uncached_program_bit_for_bit(uncached, off):
    out, state = off
    np.testing.assert_array_equal(out, uncached)
    assert int(state.evals) == STEPS and np.all(np.asarray(state.ran))
    assert np.abs(uncached).max() > 0.1


def test_other_solvers_carry_the_cache_state(toy):
    cache = sc.MagCache(CURVE, threshold=10.0, max_skips=2, retention=0.2)
    out, state = run_program(*toy, cache, solver="unipc")
    assert int(state.evals) == 5 and np.all(np.isfinite(out))
    np.testing.assert_array_equal(np.asarray(state.ran), cache.plan())


def test_threshold_zero_runs_every_step_and_equals_cache_off(toy, off):
    model, inputs = toy
    off, _ = off
    cache = sc.MagCache(CURVE, threshold=0.0, max_skips=STEPS)
    assert cache.plan().all()
    on, state = run_program(model, inputs, cache)
    assert int(state.evals) == STEPS and np.all(np.asarray(state.ran))
    # The blocks now run inside a lax.cond branch; XLA may fuse that branch differently.
    np.testing.assert_allclose(on, off, rtol=0, atol=1e-6)
    print(f"\n[threshold 0] max |cache on - off| = {np.abs(on - off).max():.1e}", end="")


def test_large_threshold_skips_exactly_the_rule_and_reuses_the_last_residual(toy, uncached):
    """Threshold 10 (never reached): only retention, K and the last step decide. 10 steps,
    retention 0.2 -> steps 0, 1 run; K = 2: 2, 3 reused, 4 runs, 5, 6 reused, 7 runs, 8 reused;
    9 is the last and runs. Model evaluations: 5 of 10."""
    model, inputs = toy
    cache = sc.MagCache(CURVE, threshold=10.0, max_skips=2, retention=0.2)
    runs = np.array([1, 1, 0, 0, 1, 0, 0, 1, 0, 1], bool)
    np.testing.assert_array_equal(cache.plan(), runs)
    got, state = run_program(model, inputs, cache)
    assert int(state.evals) == 5 and int(state.step) == STEPS
    np.testing.assert_array_equal(np.asarray(state.ran), runs)
    assert state.residual.shape == (2, 16, CFG.dim)  # one residual for both CFG halves

    # By hand, step by step: the DiT's parts, reusing the residual of the last step that ran.
    source, camera, noise, ctx_c, ctx_u = inputs
    ctx = jnp.concatenate([ctx_c, ctx_u])
    sig = flow.inference_sigmas(STEPS, 5.0)

    @nnx.jit(static_argnames="run")
    def hand_step(model, x, residual, s, s_next, run):
        tokens, cond = model.embed(W.facecam_input(model, two(x), two(camera), two(source)),
                                   jnp.full((2,), s * 1000.0), ctx)
        if run:
            out = model.run_blocks(tokens, cond)
            residual = out - tokens
        else:
            out = tokens + residual
        return x + guided(model.unembed(out, cond, out_frames=2)) * (s_next - s), residual

    x, residual = noise, jnp.zeros(W.facecam_token_shape(CFG, (2, *noise.shape[1:])))
    for i in range(STEPS):
        x, residual = hand_step(model, x, residual, sig[i], sig[i + 1], run=bool(runs[i]))
    np.testing.assert_allclose(got, np.asarray(x), rtol=1e-5, atol=1e-5)
    assert np.abs(got - uncached).max() > 1e-3  # skipping really changed the result


def drive(cache):
    """Runs the rule alone for every step, with a forward that adds 1 to the residual when it runs."""

    def body(state, _):
        skipped, state = cache(state, lambda skip, r: (jnp.asarray(skip), jnp.where(skip, r, r + 1.0)))
        return state, skipped

    state, skipped = jax.jit(lambda s: jax.lax.scan(body, s, None, length=cache.num_steps))(cache.init((1, 2, 3)))
    np.testing.assert_array_equal(np.asarray(skipped), ~np.asarray(state.ran))
    assert int(state.evals) == int(np.asarray(state.ran).sum())
    np.testing.assert_array_equal(np.asarray(state.residual), float(state.evals))  # kept while skipping
    return np.asarray(state.ran), int(state.evals)


def test_accumulated_error_decides_on_a_known_curve():
    """12 steps, retention 0.25 -> 0, 1, 2 always run; threshold 0.1, K = 2, step 9 in always_run.
    step 3: acc .99, err .01 -> reuse | 4: acc .9801, err .0299 -> reuse | 5: err .0596 but a 3rd
    reuse in a row > K -> run, reset | 6: ratio .85, err .15 -> run | 7: acc .97, err .03 -> reuse |
    8: acc .9215, err .03 + .0785 = .1085 -> run | 9: always_run -> run | 10: err .01 -> reuse |
    11: last -> run. Evaluations: 8 of 12."""
    curve = (1.0, 0.9, 0.9, 0.99, 0.99, 0.99, 0.85, 0.97, 0.95, 1.0, 0.99, 0.99)
    cache = sc.MagCache(curve, threshold=0.1, max_skips=2, retention=0.25, always_run=(9,))
    want = np.array([1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1], bool)
    ran, evals = drive(cache)
    np.testing.assert_array_equal(ran, want)
    np.testing.assert_array_equal(cache.plan(), want)
    assert evals == 8
    # Without step 9 forced, step 9 (ratio 1, nothing accumulated) is reused and 10 then makes it two.
    ran, evals = drive(sc.MagCache(curve, threshold=0.1, max_skips=2, retention=0.25))
    np.testing.assert_array_equal(ran, [1, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1])
    assert evals == 7


def test_first_retained_and_last_steps_always_run():
    n = 10
    for retention, always in ((0.0, ()), (0.3, ()), (0.3, (6,))):
        cache = sc.MagCache((1.0,) * n, threshold=1e9, max_skips=n, retention=retention, always_run=always)
        ran, evals = drive(cache)
        want = np.zeros(n, bool)
        want[0] = True  # even with retention 0: nothing is cached before the first step
        want[: int(n * retention)] = True
        want[list(always)] = True
        want[-1] = True
        np.testing.assert_array_equal(ran, want, err_msg=f"retention {retention}, always {always}")
        assert evals == want.sum()


def test_calibration_from_a_recorded_run_and_its_file(off, tmp_path):
    _, state = off  # recording changed nothing: test_cache_off_is_the_uncached_program_bit_for_bit
    norms = np.asarray(state.norms, np.float64)
    assert norms.shape == (STEPS, 2, 16) and np.all(norms > 0)
    np.testing.assert_allclose(norms[-1], np.linalg.norm(np.asarray(state.residual, np.float64), axis=-1), rtol=1e-6)
    ratios = sc.calibrate(norms)
    assert ratios[0] == 1.0 and ratios.shape == (STEPS,)
    np.testing.assert_allclose(ratios[3], np.mean(norms[3] / norms[2]), rtol=1e-12)
    # By hand: per-token ratios averaged over tokens and both CFG rows.
    np.testing.assert_allclose(sc.calibrate([[1.0, 2.0], [2.0, 2.0], [1.0, 4.0]]), [1.0, 1.5, 1.25])
    with pytest.raises(ValueError, match="zero or not finite"):
        sc.calibrate([[1.0, 2.0], [0.0, 2.0]])

    path = str(tmp_path / "magcache.json")
    sc.save_calibration(path, ratios, model="tiny", solver="euler", shift=5.0)
    back = sc.load_calibration(path)
    np.testing.assert_array_equal(back.ratios, ratios)  # exact: JSON floats round-trip
    assert back.num_steps == STEPS and back.meta == {"model": "tiny", "solver": "euler", "shift": 5.0}
    with open(path) as f:
        assert json.load(f)["num_steps"] == STEPS
    cache = sc.MagCache.from_calibration(back, STEPS)
    assert cache.ratios == tuple(ratios) and (cache.threshold, cache.max_skips, cache.retention) == (0.12, 2, 0.2)
    with open(path, "w") as f:
        json.dump({"ratios": [1.0]}, f)
    with pytest.raises(ValueError, match="not a MagCache calibration"):
        sc.load_calibration(path)


def test_ratio_curve_interpolates_to_other_step_counts_by_nearest_index():
    src = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(sc.interpolate_ratios(src, 5), src)
    np.testing.assert_array_equal(sc.interpolate_ratios(src, 3), [1.0, 3.0, 5.0])
    # 9 steps: j * 0.5 rounded half to even (numpy, as MagCache): 0 0 1 2 2 2 3 4 4.
    np.testing.assert_array_equal(sc.interpolate_ratios(src, 9), [1, 1, 2, 3, 3, 3, 4, 5, 5])
    np.testing.assert_array_equal(sc.interpolate_ratios(src, 1), [5.0])
    cache = sc.MagCache.from_calibration(src, 9, threshold=0.5)
    assert cache.num_steps == 9 and cache.ratios[1] == 1.0 and cache.threshold == 0.5


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="positive finite"):
        sc.MagCache((1.0, 0.0))
    with pytest.raises(ValueError, match="always_run"):
        sc.MagCache((1.0,) * 4, always_run=(4,))
    with pytest.raises(ValueError, match="retention"):
        sc.MagCache((1.0,) * 4, retention=1.5)
