"""Test set-up: 8 fake CPU devices (sharding tests) and shared fixtures.

XLA_FLAGS must be set before jax is first imported, so it is done here at collection.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The TPU tests only compile (libtpu's compile-only client, no TPU attached); without this,
# libtpu's one-process lockfile fails them while any other process (an AOT run) holds it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    # Identical programs compiled again (a resumed training run, a reloaded model) hit JAX's
    # persistent cache instead of recompiling; it lives beside the mini-dataset cache.
    import jax

    cache = os.path.join(os.environ.get("FACECAM_CACHE", os.path.expanduser("~/.cache/facecam_jax")), "jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_sessionfinish(session, exitstatus):
    import forked_runs

    forked_runs.close()


@pytest.fixture(scope="session")
def torch():
    """The torch module for parity references; tests using it skip (with a reason) without it."""
    return pytest.importorskip("torch", reason="torch is needed for the PyTorch parity references")
