"""Loads a config file the way ``--config path[:arg]`` does: for notebooks, scripts and tests.

    from facecam_jax.runtime.config_file import load_config
    config = load_config("mini,frames=21")                     # the default configs/facecam.py
    config = load_config("configs/facecam.py:nersemble,train.steps=100")

Every value is checked once loaded (``facecam_jax.runtime.config_check.validate``: a ValueError naming
each bad key).
"""

from __future__ import annotations

import importlib.util
import os

from facecam_jax.runtime.config_check import validate

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "facecam.py")


def load_config(spec: str | None = None):
    """``get_config(arg)`` of ``path`` for ``"path.py[:arg]"``, validated; a bare ``arg`` uses the
    default file."""
    spec = spec or ""
    if ".py" in spec:
        path, _, arg = spec.partition(".py")
        path, arg = path + ".py", arg.removeprefix(":")
    else:
        path, arg = DEFAULT_CONFIG, spec
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist (run from a source checkout, or pass its path)")
    module_spec = importlib.util.spec_from_file_location(f"facecam_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    validate(config)
    return config
