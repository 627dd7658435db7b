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

from facecam_jax.runtime.paths import cache_root  # noqa: E402  (imports no JAX)

# Identical programs compiled again (a resumed training run, a reloaded model, the same model
# built in another test or in a launched process) load from JAX's persistent cache instead of
# compiling: one cache, the entry points' default (compile_cache.default_dir), small programs
# included (facecam_jax/runtime/compile_cache.py: building a model runs ~100 of them). Set, like
# XLA_FLAGS, before JAX is first imported: JAX reads them then, here and in every process the
# tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache_root("xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_sessionfinish(session, exitstatus):
    import forked_runs

    forked_runs.close()


@pytest.fixture(scope="session")
def torch():
    """The torch module for parity references; tests using it skip (with a reason) without it."""
    return pytest.importorskip("torch", reason="torch is needed for the PyTorch parity references")
