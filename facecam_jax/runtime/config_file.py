"""Loads a config file the way ``--config path[:arg]`` does: for notebooks, scripts and tests.

    from facecam_jax.runtime.config_file import load_config
    config = load_config("mini,frames=21")                     # the default configs/facecam.py
    config = load_config("configs/facecam.py:nersemble,train.steps=100")

Every value is checked once loaded (``facecam_jax.runtime.config_check.validate``: a ValueError naming
each bad key); a file that does not run (a syntax error, a NameError) is a ``ConfigFileError``
reading ``file:line: message``, as ``--config`` reports it (``facecam_jax.runtime.cli``).
"""

from __future__ import annotations

import importlib.util
import os
import traceback

from facecam_jax.runtime.config_check import validate

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "facecam.py")


class ConfigFileError(ValueError):
    """A config file that cannot be run (a syntax error, a name it lacks): ``file:line: message``."""


def config_path(spec: str | None) -> str:
    """The file of a config spec: ``path.py`` of ``"path.py[:arg]"``, the default file for a
    bare ``arg`` (``load_config``'s rule)."""
    spec = spec or ""
    return spec.partition(".py")[0] + ".py" if ".py" in spec else DEFAULT_CONFIG


def load_error(error: BaseException, path: str) -> str | None:
    """``file:line: message`` for an error raised while the config file ``path`` was compiled or
    run (a syntax error, a NameError in it); None when no line of ``path`` raised it."""
    def same(name) -> bool:
        return bool(name) and os.path.realpath(name) == os.path.realpath(path)

    if isinstance(error, SyntaxError) and same(error.filename):
        return f"{path}:{error.lineno}: syntax error: {error.msg}"
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if same(frame.filename)]
    if not lines:
        return None
    return f"{path}:{lines[-1]}: {type(error).__name__}: {' '.join(str(error).split())}"


def load_config(spec: str | None = None):
    """``get_config(arg)`` of ``path`` for ``"path.py[:arg]"``, validated; a bare ``arg`` uses the
    default file. A config file that does not run is a ``ConfigFileError`` naming its line."""
    spec = spec or ""
    path = config_path(spec)
    arg = spec.partition(".py")[2].removeprefix(":") if ".py" in spec else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist (run from a source checkout, or pass its path)")
    module_spec = importlib.util.spec_from_file_location(f"facecam_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigFileError(f"{path} defines no get_config(arg) function: it is not a config file")
        config = module.get_config(arg or None)
    except (ValueError, KeyError):  # ConfigFileError too
        raise  # the config's own messages (an unknown variant, a bad override)
    except Exception as e:  # noqa: BLE001  a broken file: its line, not a traceback
        where = load_error(e, path)
        if where is None:
            raise
        raise ConfigFileError(where) from e
    validate(config)
    return config
