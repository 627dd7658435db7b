"""Flow solvers: Euler, DPM++ 2M and UniPC on the shifted grid (orders, first / last steps, references)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facecam_jax.diffusion import flow, solvers

SHIFT = 5.0


def nonlinear_velocity(x, t):
    """A smooth velocity that depends on both x and t (jax), for exactness tests."""
    s = t[:, None] / 1000.0
    return jnp.sin(x) * (1 + s) - s * x


def nonlinear_velocity_np(x, s):
    return np.sin(x) * (1 + s) - s * x


def old_euler_sample(velocity, x, sigmas):
    """``solvers.euler_sample`` as it was before the multistep solvers (the reference for bit equality)."""
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(x, inputs):
        _, s, s_next = inputs
        t = jnp.full((x.shape[0],), s * 1000, jnp.float32)
        v = velocity(x, t).astype(jnp.float32)
        return x + v * (s_next - s), None

    steps = jnp.arange(sigmas.shape[0] - 1)
    x, _ = jax.lax.scan(step, x.astype(jnp.float32), (steps, sigmas[:-1], sigmas[1:]))
    return x


def recording(velocity, num_steps):
    """A stateful velocity that records the x of every evaluation: state (count, xs [N, ...], vs [N, ...])."""

    def fn(x, t, state):
        k, xs, vs = state
        v = velocity(x, t)
        return v, (k + 1, xs.at[k].set(x), vs.at[k].set(v))

    def init(x):
        return jnp.zeros((), jnp.int32), jnp.zeros((num_steps, *x.shape)), jnp.zeros((num_steps, *x.shape))

    return fn, init


def x1():
    return jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)


def test_euler_is_the_old_euler_sample_bit_for_bit():
    sig = flow.inference_sigmas(7, SHIFT)
    want = np.asarray(jax.jit(lambda x: old_euler_sample(nonlinear_velocity, x, sig))(x1()))
    got = np.asarray(jax.jit(lambda x: solvers.sample(nonlinear_velocity, x, sig, solver="euler"))(x1()))
    kept = np.asarray(jax.jit(lambda x: solvers.euler_sample(nonlinear_velocity, x, sig))(x1()))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(kept, want)


def test_solvers_converge_at_their_order_on_a_gaussian_flow():
    """Data z0 ~ N(mu, s0^2) per dimension, noise N(0, 1): the exact velocity E[eps - z0 | x_s] is
    closed form and the exact ODE map from noise x_1 is x_0 = mu + s0 x_1 (quantiles are kept).

    Slopes are fitted over 32..256 steps: below that, with shift 5, the multistep solvers are not
    yet asymptotic on this grid (their error changes sign near 8-16 steps as a first-order error
    of the first and last steps meets the second-order one), so only "below Euler" is asserted
    there. DPM++ 2M's error goes as log(N) / N^2 from the sigma = 1 start (its early steps are
    O(1/k) in log-SNR whatever N; UniPC's corrector cancels that term), hence its lower bound.
    """
    rng = np.random.default_rng(0)
    d = 8
    mu = jnp.asarray(rng.uniform(-1, 1, d), jnp.float32)
    s0 = jnp.asarray(np.geomspace(2.0, 3.0, d), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((4, d)), jnp.float32)

    def velocity(x, t):
        s = (t / 1000.0)[:, None]
        var = (1 - s) ** 2 * s0**2 + s**2
        dev = x - (1 - s) * mu
        return s * dev / var - (mu + (1 - s) * s0**2 * dev / var)  # E[eps | x] - E[z0 | x]

    exact = mu + s0 * noise
    counts = (4, 8, 16, 32, 64, 128, 256)
    errors = {}
    for n in counts:
        sig = flow.inference_sigmas(n, SHIFT)

        def errors_at(x, sig=sig):
            return [jnp.max(jnp.abs(solvers.sample(velocity, x, sig, solver=s) - exact)) for s in solvers.SOLVERS]

        errors[n] = np.asarray(jax.jit(errors_at)(noise), np.float64)
    err = np.stack([errors[n] for n in counts], axis=1)  # [solver, count]
    fit = slice(counts.index(32), None)
    slopes = {}
    for k, solver in enumerate(solvers.SOLVERS):
        slopes[solver] = -np.polyfit(np.log(counts[fit]), np.log(err[k, fit]), 1)[0]
        print(f"\n[{solver}] max error at {counts} steps: {np.array2string(err[k], precision=3)}; "
              f"slope over 32..256: {slopes[solver]:.2f}", end="")
    assert 0.9 <= slopes["euler"] <= 1.1
    assert slopes["unipc"] >= 1.85
    assert slopes["dpmpp_2m"] >= 1.5
    euler, unipc, dpm = err
    assert np.all(unipc < euler) and np.all(dpm < euler)
    assert np.all(unipc[fit] < dpm[fit])  # the corrector pays off once asymptotic


def test_first_multistep_step_is_the_euler_step():
    """With no history the multistep solvers are first order, and in the flow parameterisation the
    first-order data-prediction step is Euler: (s'/s) x + (1 - s'/s)(x - s v) = x + (s' - s) v.
    (At s = 1 the exponential integrator's e^{-h} = s' alpha / (alpha' s) is 0: x' = s' x + (1 - s') x0.)
    The velocity's second input is the first step's result (UniPC corrects x only afterwards)."""
    n = 6
    sig = flow.inference_sigmas(n, SHIFT)
    fn, init = recording(nonlinear_velocity, n)
    x = x1()
    euler_step = np.asarray(x + nonlinear_velocity(x, jnp.full((3,), 1000.0)) * (sig[1] - sig[0]))
    for solver in ("unipc", "dpmpp_2m"):
        _, (count, xs, _) = jax.jit(lambda x, solver=solver: solvers.sample(fn, x, sig, solver=solver, state=init(x)))(x)
        assert int(count) == n
        np.testing.assert_array_equal(np.asarray(xs[0]), np.asarray(x))
        np.testing.assert_allclose(np.asarray(xs[1]), euler_step, rtol=1e-6, atol=1e-6)
        assert np.abs(np.asarray(xs[2]) - np.asarray(xs[1])).max() > 1e-3  # the recording really moves


def reference_sample(velocity, x, sig, solver):
    """The schedulers' recursions as diffusers / Wan state them (lambda = log alpha - log sigma,
    r_k ratios, the UniC R rho = b system solved generally), float64 with IEEE infinities at
    sigma 1 and 0: an independent transcription against the closed-form coefficients."""
    sig = np.asarray(sig, np.float64)
    n = sig.size - 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = np.log(1 - sig) - np.log(sig)
        ms, x_last, prev_order = [], None, None
        for i in range(n):
            m = x - sig[i] * velocity(x, sig[i])
            if solver == "unipc" and i > 0:  # UniC of the order the last predictor had
                h = lam[i] - lam[i - 1]
                hh = -h
                phi1 = np.expm1(hh)
                rks, d1s = [], []
                if prev_order == 2:
                    rk = (lam[i - 2] - lam[i - 1]) / h
                    rks.append(rk)
                    d1s.append((ms[-2] - ms[-1]) / rk)
                rks.append(1.0)
                rows, b, phik, fact = [], [], phi1 / hh - 1, 1
                for k in range(1, prev_order + 1):
                    rows.append(np.power(rks, k - 1))
                    b.append(phik * fact / phi1)
                    fact *= k + 1
                    phik = phik / hh - 1 / fact
                rho = np.array([0.5]) if prev_order == 1 else np.linalg.solve(np.array(rows), np.array(b))
                corr = sum(r * d for r, d in zip(rho[:-1], d1s)) + rho[-1] * (m - ms[-1])
                x = sig[i] / sig[i - 1] * x_last - (1 - sig[i]) * phi1 * ms[-1] - (1 - sig[i]) * phi1 * corr
            ms.append(m)
            order = min(2, n - i, i + 1)  # warm-up, and lower order at the final step
            h = lam[i + 1] - lam[i]
            alpha_t = 1 - sig[i + 1]
            x_last = x
            base = sig[i + 1] / sig[i] * x - alpha_t * np.expm1(-h) * m
            if order == 1:
                x = base
            elif solver == "dpmpp_2m":  # midpoint form: D1 = (m0 - m1) / r0, r0 = h_0 / h
                r0 = (lam[i] - lam[i - 1]) / h
                x = base - 0.5 * alpha_t * np.expm1(-h) * (m - ms[-2]) / r0
            else:  # UniP-2, bh2, rho_p = 1/2
                rk = (lam[i - 1] - lam[i]) / h
                x = base - alpha_t * np.expm1(-h) * 0.5 * (ms[-2] - m) / rk
            prev_order = order
    return x


@pytest.mark.parametrize("grid", ["facecam", "wan"])
def test_multistep_solvers_match_the_reference_recursions(grid):
    """On FaceCam's grid (from sigma 1: infinite first step in log-SNR) and on Wan's own
    (linspace from 0.999, shifted: everything finite)."""
    n = 9
    if grid == "facecam":
        sig = flow.inference_sigmas(n, SHIFT)
    else:
        sig = np.append(flow.shift_sigmas(np.linspace(0.999, 0.0, n + 1)[:-1], SHIFT), 0.0).astype(np.float32)
    x = x1()
    for solver in ("unipc", "dpmpp_2m"):
        got = np.asarray(jax.jit(lambda x, solver=solver: solvers.sample(nonlinear_velocity, x, sig, solver=solver))(x))
        want = reference_sample(nonlinear_velocity_np, np.asarray(x, np.float64), sig, solver)
        assert np.all(np.isfinite(want))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=solver)
    unipc = np.asarray(jax.jit(lambda x: solvers.sample(nonlinear_velocity, x, sig, solver="unipc"))(x))
    dpm = np.asarray(jax.jit(lambda x: solvers.sample(nonlinear_velocity, x, sig, solver="dpmpp_2m"))(x))
    assert np.abs(unipc - dpm).max() > 1e-4  # the corrector changes the result


def test_edge_levels_stay_finite_and_the_last_step_is_the_data_prediction():
    sig = flow.inference_sigmas(8, SHIFT)
    for solver in ("unipc", "dpmpp_2m"):
        c = solvers.multistep_coefficients(sig, solver)
        for name, values in c.items():
            assert np.all(np.isfinite(values)), name
        np.testing.assert_array_equal(c["order"], [1, 2, 2, 2, 2, 2, 2, 1])
        assert c["pred_dm"][0] == 0 and c["pred_dm"][-1] == 0
        # The step after sigma = 1 gets no slope from it: its data prediction is infinitely far in log-SNR.
        assert c["pred_dm"][1] == 0 and np.all(c["pred_dm"][2:-1] != 0)
        assert c["pred_x"][-1] == 0 and c["pred_m"][-1] == 1  # to sigma 0: x_N = m_{N-1}
    c = solvers.multistep_coefficients(sig, "unipc")
    assert c["corr"][0] == 0 and np.all(c["corr"][1:] == 1)
    np.testing.assert_array_equal(solvers.multistep_coefficients(sig, "dpmpp_2m")["corr"], 0)
    for name in ("pred_x", "pred_m", "pred_dm"):  # UniP-2 (bh2) is DPM++ 2M
        np.testing.assert_array_equal(c[name], solvers.multistep_coefficients(sig, "dpmpp_2m")[name])
    for n in (1, 2, 3, 8):
        sig = flow.inference_sigmas(n, SHIFT)
        fn, init = recording(nonlinear_velocity, n)

        def all_solvers(x, fn=fn, init=init, sig=sig):
            return [solvers.sample(fn, x, sig, solver=s, state=init(x)) for s in solvers.SOLVERS]

        runs = jax.jit(all_solvers)(x1())
        for solver, (out, (count, xs, vs)) in zip(solvers.SOLVERS, runs):
            assert int(count) == n and np.all(np.isfinite(np.asarray(out))), (n, solver)
            if solver != "euler":
                np.testing.assert_allclose(np.asarray(out), np.asarray(xs[-1] - sig[-2] * vs[-1]), rtol=1e-6, atol=1e-6)


def test_stateful_velocity_carries_its_state_and_changes_nothing():
    sig = flow.inference_sigmas(5, SHIFT)
    fn, init = recording(nonlinear_velocity, 5)
    seen = []
    for solver in solvers.SOLVERS:
        def both(x, solver=solver):
            return (solvers.sample(nonlinear_velocity, x, sig, solver=solver),
                    solvers.sample(fn, x, sig, solver=solver, state=init(x), on_step=lambda i, _: seen.append(int(i))))

        plain, (out, (count, xs, _)) = jax.block_until_ready(jax.jit(both)(x1()))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
        assert int(count) == 5
        np.testing.assert_array_equal(np.asarray(xs[0]), np.asarray(x1()))
    assert seen == [0, 1, 2, 3, 4] * 3


def test_bad_solver_and_traced_grid_are_clear_errors():
    sig = flow.inference_sigmas(4, SHIFT)
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.sample(nonlinear_velocity, x1(), sig, solver="heun")
    with pytest.raises(TypeError, match="numpy array"):
        jax.jit(lambda s: solvers.sample(nonlinear_velocity, x1(), s, solver="unipc"))(jnp.asarray(sig))
    with pytest.raises(ValueError, match="strictly"):
        solvers.sample(nonlinear_velocity, x1(), sig[::-1].copy(), solver="dpmpp_2m")
    # Euler still takes a traced grid, as before.
    out = jax.jit(lambda s: solvers.sample(nonlinear_velocity, x1(), s))(jnp.asarray(sig))
    assert np.all(np.isfinite(np.asarray(out)))
