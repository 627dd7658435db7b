"""JAX's persistent compilation cache for every entry point (``config.compile_cache_dir``).

A program compiled once is written to the cache directory and loaded from it, in seconds,
the next time the same program (same shapes, shardings, flags, jax version) is compiled, in
any process. ``""`` turns the cache off. Compile-only TPU targets never use it
(``chips.no_persistent_cache``): the CPU client cannot load their executables.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "facecam_jax", "xla")


def enable(directory: str | None, *, min_compile_seconds: float = 1.0) -> str | None:
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
    """``enable(config.compile_cache_dir)`` (the default directory for a config without the key)."""
    return enable(config.get("compile_cache_dir", DEFAULT_DIR))
