"""Checkpoint readers and loaders: safetensors / torch .pth -> NNX modules, and back.

``load_dit``, ``load_vae`` and ``load_umt5`` are imported lazily so that reading one kind of
checkpoint does not import the other model definitions.
"""

import importlib

from facecam_jax.checkpoints.io import open_checkpoint
from facecam_jax.errors import CheckpointError, UnsafeCheckpointError

_LAZY = {
    "load_dit": "facecam_jax.checkpoints.dit",
    "save_dit": "facecam_jax.checkpoints.dit",
    "load_vae": "facecam_jax.checkpoints.vae",
    "load_vae_state_dict": "facecam_jax.checkpoints.vae",
    "export_state_dict": "facecam_jax.checkpoints.vae",
    "load_umt5": "facecam_jax.checkpoints.umt5",
}

__all__ = ["CheckpointError", "UnsafeCheckpointError", "open_checkpoint", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
