"""JAX's persistent compilation cache for every entry point (``config.compile_cache_dir``).

A program compiled once is written to the cache directory and loaded from it, in seconds,
the next time the same program (same shapes, shardings, flags, jax version) is compiled, in
any process. ``""`` turns the cache off. Compile-only TPU targets never use it
(``chips.no_persistent_cache``): the CPU client cannot load their executables.

Every program is cached, however short its compile (JAX's default keeps only those of 1 s or
more): building a model runs ~100 small eager programs (random init, weight conversion, each
~0.1 s to compile on a CPU host), which cost a fresh process ~10 s for the mini DiT and VAE
and ~2 s from the cache.
"""

from __future__ import annotations

import logging
import os

import jax

from facecam_jax.runtime import paths

log = logging.getLogger(__name__)


def default_dir() -> str:
    """``$FACECAM_CACHE/xla`` (default ``~/.cache/facecam_jax/xla``)."""
    return paths.cache_root("xla")


def enable(directory: str | None, *, min_compile_seconds: float = 0.0) -> str | None:
    """Caches every compile of at least ``min_compile_seconds`` in ``directory`` (``~`` expanded);
    ``""`` or None switches the cache off. Returns the directory used."""
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    log.debug("persistent compilation cache in %s", path)
    return path


def from_config(config) -> str | None:
    """``enable(config.compile_cache_dir)``; ``default_dir()`` where it is None or absent."""
    directory = config.get("compile_cache_dir")
    return enable(default_dir() if directory is None else directory)
