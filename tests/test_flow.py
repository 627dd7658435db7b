"""Flow matching: the shifted training grid, its fixed weights, expert ranges, Euler sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facecam_jax.diffusion import flow, solvers


def test_train_grid_is_the_shifted_1000_level_grid_with_grid_normalised_weights():
    grid = flow.TrainGrid.make(shift=5.0)
    assert grid.sigmas.shape == grid.timesteps.shape == grid.weights.shape == (1000,)
    assert grid.sigmas[0] == 1.0 and np.all(np.diff(grid.sigmas) < 0) and grid.sigmas[-1] > 0
    # Level i is linspace(1, 0, 1001)[i] shifted by 5 s / (1 + 4 s).
    s = 1 - 500 / 1000
    np.testing.assert_allclose(grid.sigmas[500], 5 * s / (1 + 4 * s), rtol=1e-6)
    np.testing.assert_allclose(grid.timesteps, 1000 * grid.sigmas, rtol=1e-6)
    # Weights: exp(-2 ((t - 500) / 1000)^2) minus its grid minimum, mean 1 over the grid.
    assert grid.weights.min() == 0.0
    np.testing.assert_allclose(grid.weights.mean(), 1.0, rtol=1e-5)
    bump = np.exp(-2 * ((grid.timesteps.astype(np.float64) - 500) / 1000) ** 2)
    np.testing.assert_allclose(grid.weights, (bump - bump.min()) / (bump - bump.min()).mean(), atol=1e-4)
    assert np.argmax(grid.weights) == np.argmin(np.abs(grid.timesteps - 500))


def test_expert_ranges_split_the_grid_at_the_boundary():
    grid = flow.TrainGrid.make()
    hi = grid.index_range(*flow.expert_timestep_range("high", 0.9))
    lo = grid.index_range(*flow.expert_timestep_range("low", 0.9))
    assert hi[0] == 0 and hi[1] == lo[0] and lo[1] == 1000
    assert np.all(grid.timesteps[slice(*hi)] >= 900) and np.all(grid.timesteps[slice(*lo)] < 900)
    sig, t, w = flow.sample_training_levels(jax.random.key(0), 4096, grid, hi)
    assert float(t.min()) >= 900
    np.testing.assert_allclose(np.asarray(t), 1000 * np.asarray(sig), rtol=1e-6)
    # Weights are looked up on the fixed grid: the same timestep always has the same weight.
    idx = np.searchsorted(-grid.timesteps, -np.asarray(t))
    np.testing.assert_array_equal(np.asarray(w), grid.weights[idx])
    with pytest.raises(ValueError, match="expert"):
        flow.expert_timestep_range("middle", 0.9)


def test_noise_target_and_weighted_loss():
    z0 = jnp.ones((2, 3, 4))
    eps = -jnp.ones((2, 3, 4))
    zt = flow.add_noise(z0, eps, jnp.array([0.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(zt[0]), 1.0)
    np.testing.assert_array_equal(np.asarray(zt[1]), -1.0)
    target = flow.velocity_target(z0, eps)
    assert float(flow.flow_loss(target, target, jnp.ones(2))) == 0.0
    pred = target + jnp.array([1.0, 2.0])[:, None, None]
    np.testing.assert_allclose(float(flow.flow_loss(pred, target, jnp.array([2.0, 0.5]))), (2 * 1 + 0.5 * 4) / 2)


def test_inference_sigmas_and_exact_euler_on_a_straight_flow():
    sig = flow.inference_sigmas(50, shift=5.0)
    assert sig.shape == (51,) and sig[0] == 1.0 and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)
    np.testing.assert_allclose(sig[1], flow.shift_sigmas(1 - 1 / 50, 5.0), rtol=1e-6)
    # The straight path from noise to c has velocity (x - c) / s: Euler lands exactly on c.
    c = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5)), jnp.float32)
    x1 = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5)), jnp.float32)
    out = jax.jit(lambda x: solvers.euler_sample(lambda x, t: (x - c) / (t[:, None] / 1000.0), x, sig))(x1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(c), atol=1e-5)
    np.testing.assert_allclose(np.asarray(solvers.guided(jnp.array(3.0), jnp.array(1.0), 5.0)), 11.0)


def test_euler_sampler_reports_every_finished_step_to_the_host():
    seen = []
    sigmas = flow.inference_sigmas(4, 5.0)
    x = jax.jit(lambda x: solvers.euler_sample(lambda x, t: -x, x, sigmas, on_step=lambda i, _: seen.append(int(i))))(
        jnp.ones((1, 3)))
    jax.block_until_ready(x)
    assert seen == [0, 1, 2, 3]
