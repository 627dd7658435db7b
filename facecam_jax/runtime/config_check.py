"""Checks the values of a config where it is loaded: one ``ValueError`` naming every bad key.

``validate(config)`` runs in ``facecam_jax.runtime.config_file.load_config``, behind the ``--config``
flag of every command line (``facecam_jax.runtime.cli.define_config``) and at the start of training,
so a zero width, a checkpoint interval of 0, negative steps or 100,000 frames fail in one
line before anything is built, whichever route the config took. Only fields that exist are
checked (a custom config file may lack sections); enumerations that their owners check
early (attention, remat, dtypes, presets) are left to them. The choices themselves are
``facecam_jax.options``' (spelled once, there).

This module imports only ``options`` (no JAX): every layer may use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from facecam_jax import options
from facecam_jax.options import (
    CACHES,
    CFG_MODES,
    EXPERTS,
    EXTENDS,
    FRAMINGS,
    OFFLOADS,
    QUANTIZE,
    SOLVERS,
)

_MISSING = object()


def _get(config, key: str):
    node = config
    for name in key.split("."):
        try:
            if name not in node:
                return _MISSING
            node = node[name]
        except TypeError:
            return _MISSING
    return node


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"must be an integer >= {low}"


def _number(low: float | None = None, high: float | None = None, *, low_open=False, high_open=False):
    def ok(v):
        if not _is_num(v):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return not (high is not None and (v >= high if high_open else v > high))

    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    return ok, "must be a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (
        f" {hi}" if hi else "")


def _one_of(choices):
    return (lambda v: v in choices), f"must be one of {', '.join(map(repr, choices))}"


def _scale_range(v) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_num(x) and x > 0 for x in v)
            and v[0] <= v[1])


def _ratio(v) -> bool:
    return v is None or (_is_num(v) and 0 <= v <= 1)


def _mesh_size(v) -> bool:
    return _is_int(v) and (v >= 1 or v == -1)


def _names(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) > 0 and all(isinstance(x, str) and x for x in v)


def _ints(v) -> bool:
    return isinstance(v, (tuple, list)) and all(_is_int(x) for x in v)


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_is_int, "must be an integer"),
    "data.stride": _int_at_least(1),
    "data.window_step": _int_at_least(0),
    "data.wild_stride": _int_at_least(1),
    "data.holdout_windows": (_ints, "must be a tuple of integers"),
    "data.holdout_cameras": ((lambda v: _ints(v) and all(x >= 0 for x in v)), "must be a tuple of integers >= 0"),
    "data.max_shots": _int_at_least(1),
    "data.multiview_source_scale": (_scale_range, "must be a (low, high) pair with 0 < low <= high"),
    "data.multiview_target_zoom": (_scale_range, "must be a (low, high) pair with 0 < low <= high"),
    "data.wild_source_scale": (_scale_range, "must be a (low, high) pair with 0 < low <= high"),
    "data.wild_target_zoom": (_scale_range, "must be a (low, high) pair with 0 < low <= high"),
    "data.wild_ratio": (_ratio, "must be None (by dataset size) or a fraction in [0, 1]"),
    "data.batch_size": _int_at_least(1),
    "data.workers": _int_at_least(0),
    "data.worker_buffer_size": _int_at_least(1),
    "data.read_threads": _int_at_least(1),
    "data.prefetch": _int_at_least(0),
    "data.mini.height": _int_at_least(1),
    "data.mini.width": _int_at_least(1),
    "data.mini.num_cameras": _int_at_least(1),
    "data.mini.scales": ((lambda v: isinstance(v, (tuple, list)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0.25 <= x <= 4.0 for x in v)),
        "must be a tuple of scene scales, each in [0.25, 4] (or () for the plain build)"),
    "model.in_dim": _int_at_least(1),
    "model.expert": _one_of(EXPERTS),
    "model.expert_boundary": _number(0.0, 1.0, low_open=True, high_open=True),
    "model.shift": _number(0.0, low_open=True),
    "train.steps": _int_at_least(0),  # 0: nothing to train (the trainer says so)
    "train.log_every": _int_at_least(1),
    "train.checkpoint_every": _int_at_least(1),
    "train.preview_every": _int_at_least(1),
    "train.keep_checkpoints": _int_at_least(1),
    "train.trainable": (_names, "must be a non-empty tuple of parameter names (or ('all',))"),
    "train.lora_rank": _int_at_least(0),  # 0: full fine-tuning of train.trainable
    "train.lora_alpha": _number(0.0),  # 0: the rank
    "train.camera_dropout": _number(0.0, 1.0),
    "train.context_prob": _number(0.0, 1.0),
    "train.peak_tflops": _number(0.0),
    "train.profile_start_step": _int_at_least(1),
    "train.profile_steps": _int_at_least(0),
    "optimizer.lr": _number(0.0, low_open=True),
    "optimizer.b1": _number(0.0, 1.0, high_open=True),
    "optimizer.b2": _number(0.0, 1.0, high_open=True),
    "optimizer.eps": _number(0.0, low_open=True),
    "optimizer.weight_decay": _number(0.0),
    "optimizer.grad_clip": _number(0.0),
    "mesh.data": (_mesh_size, "must be an integer >= 1, or -1 (the rest of the devices)"),
    "mesh.fsdp": (_mesh_size, "must be an integer >= 1, or -1 (the rest of the devices)"),
    "mesh.context": (_mesh_size, "must be an integer >= 1, or -1 (the rest of the devices)"),
    "mesh.tensor": (_mesh_size, "must be an integer >= 1, or -1 (the rest of the devices)"),
    "sample.num_steps": _int_at_least(1),
    "sample.cfg_scale": _number(),
    "sample.camera_guidance": _number(),
    "sample.framing": _one_of(FRAMINGS),
    "camera.kind": ((lambda v: v in options.camera_kinds()),
                    f"must be one of {', '.join(map(repr, options.camera_kinds()))} (facecam_jax/conditioning/)"),
    "model.quantize": _one_of(QUANTIZE),
    "sample.solver": _one_of(SOLVERS),
    "sample.cache": _one_of(CACHES),
    "sample.cache_threshold": _number(0.0),
    "sample.cache_max_skips": _int_at_least(0),
    "sample.cache_retention": _number(0.0, 1.0),
    "sample.offload": _one_of(OFFLOADS),
    "sample.cfg": _one_of(CFG_MODES),
    "sample.window_overlap": _int_at_least(2),  # a later window's latent 0 is its own
    "sample.window_batch": _int_at_least(0),
    "sample.extend": _one_of(EXTENDS),
    "sample.context_frames": _int_at_least(1),  # a clip's latent 0 is its own: 1 shares one frame
    "distributed.num_processes": _int_at_least(1),
    "distributed.process_id": _int_at_least(0),
    "distributed.initialization_timeout": _number(0.0, low_open=True),
}


# Keys whose message depends on the value (the nearest valid ones): the rules of
# ``facecam_jax.options``, which the command-line flags that set them pass too
# (``options.frames_flag_problem`` / ``size_flag_problem``).
VALUE_RULES: dict[str, Callable[[Any], str | None]] = {
    "data.frames": options.frames_problem,
    "data.height": options.size_problem,
    "data.width": options.size_problem,
    "sample.max_frames": options.frames_problem,
}


def problems(config) -> list[str]:
    """Every bad value of ``config`` as ``"key=value: what it must be"``."""
    out = []
    for key, problem in VALUE_RULES.items():
        value = _get(config, key)
        if value is not _MISSING and problem(value) is not None:
            out.append(f"{key}={value!r} {problem(value)}")
    for key, (ok, what) in RULES.items():
        value = _get(config, key)
        if value is not _MISSING and not ok(value):
            out.append(f"{key}={value!r} {what}")
    sizes = [_get(config, f"mesh.{a}") for a in ("data", "fsdp", "context", "tensor")]
    if sum(s == -1 for s in sizes) > 1:
        out.append(f"mesh (data, fsdp, context, tensor) = {tuple(sizes)}: at most one size may be -1")
    n, i = _get(config, "distributed.num_processes"), _get(config, "distributed.process_id")
    if _is_int(n) and _is_int(i) and n >= 1 and i >= n:
        out.append(f"distributed.process_id={i} must be < distributed.num_processes={n}")
    return out


def validate(config) -> None:
    """Raises ``ValueError`` naming every bad key of ``config`` (one line); returns quietly otherwise."""
    found = problems(config)
    if found:
        raise ValueError(f"bad config value{'s' if len(found) > 1 else ''}: " + "; ".join(found))
