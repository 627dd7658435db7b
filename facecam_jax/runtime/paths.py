"""Output paths checked before any work: nothing is written over an input, and a path that
cannot be written fails in one line before a model loads, not after the compute.

Every entry point that writes files (``WRITERS``) calls ``check_outputs`` first, against every
path it reads (``read_paths``: the config file, the config's path-valued keys, its own inputs)::

    paths.check_outputs({"--out": out, "compare video": compare},
                        paths.read_paths(config, config_file, {"--video": video}))

An output is refused when it is a directory (or, for a directory output, a file), lies under
a file, cannot be written (its folder or the file itself), is one of the inputs (the same file
by ``os.path.samefile`` or by its real path), contains an input (a directory output), is an
existing file or folder inside an input folder (a checkpoint, a dataset), or is another of
the outputs. Missing folders are fine when the nearest existing one is writable: the
writers create them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Union

from facecam_jax.errors import OutputPathError

PathLike = Union[str, "os.PathLike[str]"]


def cache_root(*parts: str) -> str:
    """Where the project caches what it builds (the mini dataset, compiled programs), joined
    with ``parts``: ``$FACECAM_CACHE``, default ``~/.cache/facecam_jax``."""
    root = os.environ.get("FACECAM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "facecam_jax"))
    return os.path.join(root, *parts)


def _real(path: PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _same(a: str, b: str) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    path, folder = _real(path), _real(folder)
    return path != folder and path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_writable(label: str, path: str, directory: bool) -> None:
    if not path:
        raise OutputPathError(f"{label} is empty: give a path to write")
    if directory:
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputPathError(f"{label} {path!r} is a file; give a directory to write into")
    elif os.path.isdir(path):
        raise OutputPathError(f"{label} {path!r} is a directory, not a file; give a file path")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if os.path.exists(ancestor) and not os.path.isdir(ancestor):
        raise OutputPathError(f"{label} {path!r} is under {ancestor!r}, which is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{label} {path!r} cannot be written: {ancestor!r} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise OutputPathError(f"{label} {path!r} exists and is not writable")


def check_outputs(files: Mapping[str, PathLike | None] | None = None,
                  inputs: Mapping[str, PathLike | Iterable[PathLike] | None] | None = None, *,
                  directories: Mapping[str, PathLike | None] | None = None) -> None:
    """Raises ``OutputPathError`` (one line, naming the flag) for the first output that must
    not be written. ``files`` / ``directories``: label -> the file / folder an entry point will
    write (None: not written); ``inputs``: label -> a path (or paths) it reads (missing ones
    are ignored)."""
    outputs = [(label, os.fspath(p), False) for label, p in (files or {}).items() if p is not None]
    outputs += [(label, os.fspath(p), True) for label, p in (directories or {}).items() if p is not None]
    read = []
    for label, value in (inputs or {}).items():
        if value is None:
            continue
        for p in ([value] if isinstance(value, (str, os.PathLike)) else value):
            if p and os.path.exists(p):
                read.append((label, os.fspath(p)))
    for i, (label, path, directory) in enumerate(outputs):
        _check_writable(label, path, directory)
        for other_label, other, _ in outputs[:i]:
            if _same(path, other):
                raise OutputPathError(f"{label} and {other_label} are the same path {path!r}; give each its own")
        for in_label, source in read:
            if _same(path, source):
                raise OutputPathError(f"{label} {path!r} is an input ({in_label}); writing it would overwrite "
                                      "the input: choose another path")
            if directory and _inside(source, path):
                raise OutputPathError(f"{label} {path!r} holds an input ({in_label} {source!r}); writing it "
                                      "could overwrite the input: choose another directory")
            if os.path.isdir(source) and os.path.exists(path) and _inside(path, source):
                raise OutputPathError(f"{label} {path!r} already exists inside an input folder ({in_label} "
                                      f"{source!r}); writing it would overwrite part of the input: choose "
                                      "another path")


# ------------------------------------------------------------------ what a run reads

# Every config key whose value names a file or folder a run reads (a tuple: several), in one
# table: a new one is added here (tests/test_inputs_never_overwritten.py walks the config for
# keys named like paths that are missing). ``sample.loras`` entries are "path[:strength]".
# Not here: ``compile_cache_dir``, the folder JAX writes its compiled programs to (entries it
# names itself, never a file a user owns): it is written, not read.
CONFIG_PATH_KEYS = (
    "model.dit_checkpoint",
    "model.dit_overlay",
    "vae.checkpoint",
    "text.embeddings",
    "sample.high_noise_checkpoint",
    "sample.high_noise_overlay",
    "sample.low_noise_checkpoint",
    "sample.low_noise_overlay",
    "sample.weights",
    "sample.loras",
    "sample.cache_calibration",
    "data.multiview_root",
    "data.wild_root",
    "data.prepared_root",
)
_WITH_STRENGTH = ("sample.loras",)

# Every command that writes files (how it is run -> the flags naming what it writes). Each
# checks them with ``check_outputs`` against ``read_paths`` (what it reads) before any work;
# derived outputs (sample's ``<out>_compare.mp4``, preview's ``<out>_overlay.mp4``) are
# checked with their flag. Not listed: sample's ``--profile`` (a trace folder jax.profiler
# fills with new, timestamped files: nothing is replaced).
WRITERS: dict[str, tuple[str, ...]] = {
    "facecam_jax.sample": ("--out", "--output_dir"),
    "facecam_jax.app": ("--output_dir",),
    "facecam_jax.aot": ("--json",),
    "facecam_jax.evaluate": ("--out_json", "--out_md"),
    "facecam_jax.camera.preview": ("--out", "--save-trajectory"),
    "facecam_jax.train": ("--workdir",),
    "tools/calibrate_cache.py": ("--out",),
    "tools/convert_wan_checkpoint.py": ("--out",),
    "tools/encode_prompt.py": ("--out",),
    "tools/train_mini_vae.py": ("--out",),
    "tools/make_proxy_head.py": ("--out",),
    "tools/make_mini_dataset.py": ("--cache_dir",),
    "tools/prepare_dataset.py": ("--prepared_root",),
}


def _lookup(config, key: str):
    node = config
    for name in key.split("."):
        if not hasattr(node, "keys") or name not in node:
            return None
        node = node[name]
    return node


def split_lora_spec(spec: str) -> tuple[str, float, str | None]:
    """``"path"`` or ``"path:strength"`` (``sample.loras``, the sample CLI's ``--lora``) ->
    ``(path, strength, the text after the last ":" or None)``: that text is a strength only when
    it parses as a number (a path may contain ``:``). Syntax only; ``checkpoints.lora.parse_lora_spec``
    checks the file and the strength."""
    spec = os.fspath(spec).strip()
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail), tail
        except ValueError:
            pass
    return spec, 1.0, (tail if sep else None)


def config_inputs(config, *, skip: Iterable[str] = ()) -> dict[str, list[str]]:
    """The files and folders a config reads (``CONFIG_PATH_KEYS`` but ``skip``), those that
    exist, by their dotted key (``config model.dit_checkpoint``)."""
    out: dict[str, list[str]] = {}
    for key in CONFIG_PATH_KEYS:
        value = _lookup(config, key)
        if key in skip or not value:
            continue
        values = [value] if isinstance(value, str) else list(value) if isinstance(value, (tuple, list)) else []
        values = [split_lora_spec(v)[0] if key in _WITH_STRENGTH else v for v in values if isinstance(v, str) and v]
        found = [v for v in values if os.path.exists(v)]
        if found:
            out[f"config {key}"] = found
    return out


def read_paths(config=None, config_file: PathLike | None = None,
               inputs: Mapping[str, PathLike | Iterable[PathLike] | None] | None = None, *,
               skip: Iterable[str] = ()) -> dict[str, PathLike | Iterable[PathLike] | None]:
    """Every path a run reads, by label, for ``check_outputs``: the config file (the
    ``path.py`` of ``path.py:variant,k=v``), each path-valued key of ``config``
    (``CONFIG_PATH_KEYS`` but ``skip``: keys a writer writes by design, e.g. the calibration
    tools/calibrate_cache.py writes), and the command's own ``inputs`` (label -> path(s))."""
    read: dict[str, PathLike | Iterable[PathLike] | None] = {}
    if config_file:
        read["the config file"] = config_file
    if config is not None:
        read.update(config_inputs(config, skip=skip))
    read.update(inputs or {})
    return read
