"""Runs the command lines: errors a user can cause end as one line, not a traceback.

Every ``python -m facecam_jax.*`` entry point (and every ``tools/*.py`` script) ends with::

    if __name__ == "__main__":
        cli.run(main)            # absl: main(argv), flags parsed first
        cli.run_script(main)     # argparse: main(argv_without_program_name) -> exit code

and an absl entry point defines its config flag with ``_CONFIG = cli.define_config(help)``
instead of ``config_flags.DEFINE_config_file`` (ml_collections checks ``--config.a.b=``
overrides while the module is imported, before ``cli.run`` could catch a typo, or while the
flags are parsed when ``--config`` is given); ``_CONFIG.value`` is the config after
``config_check.validate``, so every route to a config checks the same values, and
``_CONFIG.path`` its file (for ``paths.read_paths``). A config file that does not run is
``error: bad --config: file:line: message``.

An expected error (``EXPECTED_ERRORS``: a missing file, a video that cannot be decoded, no
face, a bad trajectory or config value, a checkpoint that does not fit, diverged training,
a missing optional package) prints ``error: <message>`` on stderr as one line and exits 1;
a usage error (unknown flag, bad flag value, unexpected argument) exits 2. ``--verbose``
also prints the traceback. Anything else is a bug and keeps Python's traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags
from ml_collections import config_flags

from facecam_jax.errors import CheckpointError, NoFaceError, TrainingDiverged, VideoDecodeError
from facecam_jax.runtime import compile_cache
from facecam_jax.runtime.config_check import validate
from facecam_jax.runtime.config_file import DEFAULT_CONFIG, load_error

# ValueError and KeyError are broad, but they are how this project reports bad inputs
# (trajectories, config values, shapes); NoFaceError and CheckpointError are ValueErrors too,
# listed to say that they are expected. --verbose shows the traceback of any of them.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, VideoDecodeError, NoFaceError, CheckpointError, TrainingDiverged,
    ImportError, ValueError, KeyError,
)
USAGE_EXIT = 2
ERROR_EXIT = 1
VERBOSE = "--verbose"


def one_line(text: str) -> str:
    """A message as one line: its lines stripped and joined, by a space after a colon (a
    heading) and by "; " otherwise (list items, sentences)."""
    out = ""
    for line in (line.strip() for line in str(text).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def message(error: BaseException) -> str:
    """What went wrong, in one line, without Python's ``KeyError`` quoting."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    elif isinstance(error, ImportError) and error.name and str(error) == f"No module named {error.name!r}":
        text = f"{error}: a package this command needs is not installed"
    else:
        text = str(error) or type(error).__name__
    return one_line(text)


def _verbose_in(argv: Sequence[str]) -> bool:
    return any(a in (VERBOSE, VERBOSE + "=true", VERBOSE + "=True", VERBOSE + "=1") for a in argv)


def fail(text: str, *, code: int = ERROR_EXIT, error: BaseException | None = None,
         verbose: bool = False) -> NoReturn:
    """Prints the traceback of ``error`` (only when ``verbose``), then ``error: <text>``; exits."""
    if verbose and error is not None:
        traceback.print_exception(error)
    sys.stderr.flush()
    print(f"error: {one_line(text)}", file=sys.stderr, flush=True)
    _exit(code)


def _exit(code: int) -> NoReturn:
    """``sys.exit``, except in a multi-process JAX run: there a normal exit waits in the
    distributed shutdown barrier for every other process (which may wait for this one: a
    stalled run). Exiting at once lets the coordination service see this process fail
    and stop the others."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def guard(main: Callable[..., Any], *args: Any, verbose: bool = False) -> Any:
    """``main(*args)`` with the expected errors (and Ctrl-C) turned into ``fail``."""
    try:
        return main(*args)
    except KeyboardInterrupt as e:
        fail("interrupted", code=130, error=e, verbose=verbose)
    except EXPECTED_ERRORS as e:
        fail(message(e), error=e, verbose=verbose)


# --- absl entry points --------------------------------------------------------------------

_CONFIG_FLAGS: list[str] = []  # names of the flags define_config made


class ConfigFlag:
    """A config flag's value, checked on every read: ``.value`` is the ConfigDict after
    ``config_check.validate`` (a ValueError naming each bad key), and a config file that could
    not be loaded is a FileNotFoundError naming it, not ml_collections' OSError."""

    def __init__(self, holder):
        self._holder, self.name = holder, holder.name

    @property
    def path(self) -> str:
        """The config file: ``path.py`` of ``--config path.py:variant,k=v`` (what ``paths.read_paths``
        protects from being written over)."""
        return config_flags.get_config_filename(flags.FLAGS[self.name]).split(":", 1)[0]

    @property
    def value(self):
        config = self._holder.value
        try:
            callable(config.keys)  # ml_collections defers a file it could not load to the first access
        except OSError as e:
            filename = config_flags.get_config_filename(flags.FLAGS[self.name])
            if not os.path.isfile(filename):
                raise FileNotFoundError(f"--{self.name}: config file {filename!r} does not exist") from e
            raise FileNotFoundError(f"--{self.name}: config file {filename!r} could not be loaded: "
                                    f"{one_line(str(e))}") from e
        validate(config)
        return config


def _override_error(name: str, argv: Sequence[str], error: BaseException) -> str | None:
    """One line for a bad ``--<name>.a.b=`` override or ``--<name>`` value (None when argv
    has neither)."""
    overrides = [a for a in argv[1:] if a.lstrip("-").startswith(name + ".")]
    given = [a for a in argv[1:] if a.lstrip("-") == name or a.lstrip("-").startswith(name + "=")]
    while isinstance(error, AttributeError) and error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]  # ml_collections wraps the KeyError that holds "Did you mean ..."
    text = message(error)
    if overrides and isinstance(error, KeyError) and not text.startswith("config override"):
        return f"bad --{name} override ({' '.join(overrides)}): no config field {text}"
    if overrides and not given:
        return f"bad --{name} override ({' '.join(overrides)}): {text}"
    if given:  # an error in the config file or its "path.py:arg" string
        return f"bad --{name}: {text}"
    return None


def _config_file_error(name: str, spec: str | None, error: BaseException) -> str | None:
    """``bad --<name>: file:line: message`` for an error raised by running the config file of
    ``spec`` (``path.py[:arg]``): a syntax error, a NameError; None for any other error."""
    if not spec or isinstance(error, (KeyError, ValueError)):  # the config's own messages
        return None
    where = load_error(error, spec.split(":", 1)[0])
    return None if where is None else f"bad --{name}: {where}"


def _given_config(name: str, argv: Sequence[str]) -> str | None:
    """The value of ``--<name>`` in argv (None when not given)."""
    for i, arg in enumerate(argv[1:], 1):
        flag, sep, value = arg.lstrip("-").partition("=")
        if flag == name and arg.startswith("-"):
            return value if sep else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def define_config(help_string: str, name: str = "config", default: str | None = None) -> ConfigFlag:
    """``config_flags.DEFINE_config_file(name, default, help, lock_config=True)`` whose bad
    ``--config.a.b=`` overrides end as one usage line, whether ``--config`` is given (checked
    while the flags are parsed) or not (ml_collections checks them here, at import), and whose
    ``.value`` is validated (``ConfigFlag``)."""
    _CONFIG_FLAGS.append(name)
    try:
        return ConfigFlag(config_flags.DEFINE_config_file(name, default or DEFAULT_CONFIG, help_string,
                                                          lock_config=True))
    except Exception as e:  # noqa: BLE001  a command-line override, or a broken default config file
        where = _config_file_error(name, default or DEFAULT_CONFIG, e)
        if where is not None:
            fail(where, error=e, verbose=_verbose_in(sys.argv))
        text = _override_error(name, sys.argv, e)
        if text is None:
            raise
        fail(text, code=USAGE_EXIT, error=e, verbose=_verbose_in(sys.argv))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors are one line (absl prints the usage and, for a bad
    config file, the config's traceback inside the message)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        text = lines[0] if lines else type(e).__name__
        if any(line.startswith("Traceback") for line in lines):  # keep the first and last line
            text = f"{text.rstrip(':')}: {lines[-1]}"
        elif len(lines) > 1:
            text = " ".join(lines)
        if _verbose_in(argv):
            print(str(e), file=sys.stderr)
        fail(f"{text} (see --help)", code=USAGE_EXIT)
    except Exception as e:  # noqa: BLE001  one line where the error is the user's; else re-raised
        # A config file that does not run (a syntax error, a NameError): its line.
        where = next((w for w in (_config_file_error(n, _given_config(n, argv), e) for n in _CONFIG_FLAGS) if w),
                     None)
        if where is not None:
            fail(where, error=e, verbose=_verbose_in(argv))
        # With an explicit --config, ml_collections applies the overrides here, raising as is.
        text = None
        if isinstance(e, (KeyError, AttributeError, TypeError, ValueError)):
            text = next((t for t in (_override_error(n, argv, e) for n in _CONFIG_FLAGS) if t), None)
        if text is None:
            raise
        fail(text, code=USAGE_EXIT, error=e, verbose=_verbose_in(argv))


def start(argv: Sequence[str], config_flag: ConfigFlag | None = None):
    """The start of every absl entry point's ``main(argv)``: no stray arguments, the project's
    log at INFO (libraries at WARNING), and the compile cache of the config (returned, checked)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    logging.getLogger().setLevel(logging.WARNING)  # orbax / grain chatter
    logging.getLogger("facecam_jax").setLevel(logging.INFO)
    if config_flag is None:
        return None
    config = config_flag.value
    compile_cache.from_config(config)
    return config


def run(main: Callable[[list[str]], Any]) -> None:
    """Runs an absl ``main(argv)`` as a command line, with ``--verbose`` and one-line errors."""
    if VERBOSE[2:] not in flags.FLAGS:
        flags.DEFINE_bool(VERBOSE[2:], False, "on an error, print the Python traceback too")

    def wrapped(argv):
        verbose = flags.FLAGS[VERBOSE[2:]].value
        try:
            return guard(main, argv, verbose=verbose)
        except app.UsageError as e:
            fail(f"{message(e)} (see --help)", code=USAGE_EXIT, error=e, verbose=verbose)

    app.run(wrapped, flags_parser=_parse_flags)


# --- argparse scripts ---------------------------------------------------------------------

def run_script(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Runs an argparse ``main(argv)`` (argv without the program name) as a command line and
    exits with its return value when that is an int (0 otherwise). ``--verbose`` is taken out
    of argv before ``main`` sees it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = _verbose_in(argv)
    argv = [a for a in argv if not _verbose_in([a])]
    result = guard(main, argv, verbose=verbose)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)

