"""The camera-conditioning seam: one module per camera representation (``camera.kind``).

A kind is the module of its name in this folder, holding ``KIND``, an instance of
``base.CameraKind``: what it reads from a training batch, how its condition enters the DiT,
what it adds to the trained parameters, and how the sampler builds its condition. The train
step, the sampling program, the step cache, the fit tool, FLOP counting and the benchmarks
reach a kind through ``of(config)`` / ``get(name)``, never by its name::

    kind = conditioning.of(config)                      # camera.kind, default "landmarks"
    v = kind.velocity(model, noisy, source_latents, condition, t, context)

The choices are ``options.camera_kinds()`` (the module files), so adding a kind is adding
its module (plus a config variant and tests).
"""

from __future__ import annotations

import importlib

from facecam_jax import options
from facecam_jax.conditioning.base import CameraKind

__all__ = ["CameraKind", "get", "of"]


def get(name: str) -> CameraKind:
    """The camera kind ``name`` (a module of this package)."""
    if name not in options.camera_kinds():
        raise ValueError(f"camera.kind must be one of {', '.join(map(repr, options.camera_kinds()))}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}").KIND


def of(config) -> CameraKind:
    """The camera kind a config names (``camera.kind``; a config without the section: landmarks),
    set up by the section's options (``CameraKind.configured``)."""
    camera = config.get("camera") if hasattr(config, "get") else None
    return get(camera.kind if camera is not None else options.DEFAULT_CAMERA_KIND).configured(camera)
