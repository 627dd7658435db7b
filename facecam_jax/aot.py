"""Ahead-of-time compiles of the real programs: what fits where, before renting the chips.

    python -m facecam_jax.aot --config configs/facecam.py:nersemble --topology v5p:4x4x4 --program train
    python -m facecam_jax.aot --config configs/facecam.py:nersemble,mesh.context=2 --topology v6e:4x4 --program sample
    python -m facecam_jax.aot --config configs/facecam.py --program train      # the local devices (e.g. a GPU)

Builds the training step (``trainer.build_program(..., abstract=True)``: the preset DiT,
trainable subset, optimizer state, frozen VAE encode, batch over (data, fsdp)) or the
sampling program (both Wan2.2 A14B experts in one jitted Euler loop with CFG, plus the VAE
encode and decode that run beside them) from shapes only, on the config's mesh over the
devices of a named TPU topology (libtpu's compile-only client: no TPU needed) or over the
local devices. It compiles them and prints per-device memory (XLA's buffer plan:
arguments + outputs - donated + temporaries + code, plus what stays resident beside a
program), the device's HBM, the analytic FLOPs per step (``step_flops``; XLA's
``cost_analysis`` counts a scan body once and Pallas kernels not at all), the time per step
at the chips' bf16 peak, and a verdict. Exit 0: fits; 3: does not fit (XLA's out-of-memory
at compile, the total over the HBM, or arguments alone over it: then nothing is compiled);
2: bad arguments (unknown topology, a mesh that does not divide it). Sampling is compiled
with ``sample.cfg_scale`` as set (the sampler itself skips guidance without text.embeddings).

Topology names: ``v5e:2x2``, ``v5e:4x8``, ``v5p:2x2x1``, ``v5p:4x4x4``, ``v6e:2x4``,
``v4:2x2x2``; ``1x1`` / ``1x1x1`` and ``1x2`` are single hosts smaller than the default
2x2 host. The HBM is what the TPU compiler reports it may use (``hbm_bytes``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jex_core
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import sharding as sh

log = logging.getLogger(__name__)

FITS, DOES_NOT_FIT, BAD_ARGUMENTS = 0, 3, 2
GiB = 2**30

# Per chip: peak dense bf16 FLOP/s and HBM (spec sheets). The HBM here is only a fallback:
# the TPU compiler's own figure (``hbm_bytes``) is used when it can be had.
CHIPS = {
    "TPU v5 lite": ("v5e", 197e12, 16 * GiB),
    "TPU v5": ("v5p", 459e12, 95 * GiB),
    "TPU v6 lite": ("v6e", 918e12, 32 * GiB),
    "TPU v4": ("v4", 275e12, 32 * GiB),
    "H100": ("H100", 989e12, 80 * GiB),
    "H200": ("H200", 989e12, 141 * GiB),
    "A100": ("A100", 312e12, 80 * GiB),
}


class BadTarget(ValueError):
    """The topology or mesh asked for cannot be built (exit 2)."""


# ------------------------------------------------------------------ targets


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices to compile for and what one chip can do."""

    name: str  # the topology name, or "local"
    devices: tuple
    chip: str  # v5e, v5p, ... or the device kind
    chips: int  # chips (a v4 chip shows as two devices)
    peak_flops_per_chip: float | None  # bf16 FLOP/s
    hbm_per_device: int | None  # bytes
    hbm_source: str  # where hbm_per_device came from

    @property
    def is_tpu(self) -> bool:
        return self.devices[0].platform == "tpu"

    @property
    def peak_flops(self) -> float | None:
        return None if self.peak_flops_per_chip is None else self.peak_flops_per_chip * self.chips


def _chip_of(kind: str):
    """(short name, peak bf16 FLOP/s, documented HBM) for a device kind, or Nones."""
    if kind in CHIPS:
        return CHIPS[kind]
    for key, value in CHIPS.items():
        if not key.startswith("TPU") and key in kind:  # "NVIDIA H100 80GB HBM3"
            return value
    return kind, None, None


def tpu_topology(name: str) -> tuple:
    """The compile-only devices of a named TPU topology (``v5p:2x2x2``); BadTarget if unknown."""
    from jax.experimental import topologies

    match = re.fullmatch(r"([a-zA-Z0-9]+):(\d+(?:x\d+)*)", name)
    if not match:
        raise BadTarget(f"topology {name!r} is not of the form CHIP:AxB[xC] (e.g. v5e:2x2, v5p:2x2x2, v6e:2x4)")
    dims = [int(d) for d in match.group(2).split("x")]
    kwargs = {}
    host = (2, 2, 1)  # libtpu's default chips per host; smaller slices need their own bounds
    if any(d < h for d, h in zip(dims, host)):
        kwargs["chips_per_host_bounds"] = tuple(min(d, h) for d, h in zip(dims + [1] * (3 - len(dims)), host))
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ImportError("compiling for a TPU topology needs libtpu (pip install -e '.[tpu]')") from e
    # The compile-only client uses no chip; without this a second process loading libtpu on the
    # host (another compile) aborts on libtpu's lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return tuple(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
    except Exception as e:  # noqa: BLE001  libtpu's messages are one INVALID_ARGUMENT line
        raise BadTarget(f"unknown TPU topology {name!r}: {str(e).splitlines()[0][:300]}") from e


def _bytes_in(text: str, *patterns: str) -> int | None:
    """The first size ("12.5G", "800M", ...) that one of ``patterns`` (a number group and a
    unit group) finds in a compiler message, in bytes."""
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return int(float(match.group(1)) * 1024 ** "BKMGT".index(match.group(2) or "B"))
    return None


def _hbm_from_message(text: str) -> int | None:
    return _bytes_in(text, r"available HBM \(([\d.]+)([KMGT]?)\)", r"of ([\d.]+)([KMGT]?) hbm")


def _required_from_message(text: str) -> int | None:
    return _bytes_in(text, r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", r"Used ([\d.]+)([KMGT]?) of")


def hbm_bytes(device) -> tuple[int | None, str]:
    """The memory one device may use, and where the figure came from (None: not known here).

    TPU (compile-only or attached): the compiler's own limit, read from the out-of-memory
    error of a 1 TiB probe program (it compiles in well under a second). Attached GPUs:
    ``memory_stats()["bytes_limit"]``."""
    if device.platform == "tpu":
        mesh = jax.sharding.Mesh([device], ("x",))
        probe = jax.jit(lambda: jnp.zeros((2**40,), jnp.int8), out_shardings=NamedSharding(mesh, PartitionSpec()))
        try:
            probe.lower().compile()
        except Exception as e:  # noqa: BLE001  the expected RESOURCE_EXHAUSTED
            found = _hbm_from_message(str(e))
            if found:
                return found, "the TPU compiler's limit"
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  compile-only devices have none
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "device memory_stats"
    return None, "unknown"


def make_target(topology: str | None) -> Target:
    """The devices of ``topology`` (a TPU topology name), or the local devices when None."""
    devices = tpu_topology(topology) if topology else tuple(jax.devices())
    chip, peak, documented = _chip_of(devices[0].device_kind)
    # A v4 chip's two TensorCores show as two devices on the compile-only client.
    chips = len({tuple(d.coords) for d in devices}) if all(hasattr(d, "coords") for d in devices) else len(devices)
    hbm, source = hbm_bytes(devices[0])
    if hbm is None and documented is not None:
        hbm, source = documented * chips // len(devices), "spec sheet"
    return Target(topology or "local", devices, chip, chips, peak, hbm, source)


def _no_persistent_cache() -> None:
    """A TPU executable written into JAX's persistent cache cannot be read back by the CPU
    client (a warning and a recompile), so compile-only targets do not use it."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()


# ------------------------------------------------------------------ FLOPs


def jaxpr_flops(jaxpr) -> float:
    """Multiply-add FLOPs (2 per MAC) of the dots and convolutions in a (closed) jaxpr: scan
    bodies times their length, the larger branch of a cond, a while body once. Pallas kernels
    and elementwise work are not counted. Used for the VAE, whose convs are its cost."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
            total += 2.0 * math.prod(out) * rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
        jaxprs = (jex_core.Jaxpr, jex_core.ClosedJaxpr)
        subs = [v for v in eqn.params.values() if isinstance(v, jaxprs)]
        subs += [b for v in eqn.params.values() if isinstance(v, tuple) for b in v if isinstance(b, jaxprs)]
        if not subs:
            continue
        counts = [jaxpr_flops(s) for s in subs]
        if name == "cond":
            total += max(counts)
        elif name == "scan":
            total += eqn.params["length"] * sum(counts)
        else:
            total += sum(counts)
    return total


def vae_flops(vae_config, video_shape: tuple, *, decode: bool = False) -> float:
    """FLOPs of one Wan VAE encode of ``video_shape [B, T, H, W, 3]`` (or the decode back to it),
    counted from its traced convs (``jaxpr_flops``; shapes only, nothing is compiled)."""
    from facecam_jax.models.wan_vae import WanVAE

    vae = nnx.eval_shape(lambda: WanVAE(vae_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(vae)
    b, t, h, w, _ = video_shape
    if decode:
        s = vae_config.spatial_stride
        shape = (b, 1 + (t - 1) // vae_config.temporal_stride, h // s, w // s, vae_config.z_dim)
        fn = lambda st, z: nnx.merge(graphdef, st).decode(z)  # noqa: E731
    else:
        shape = video_shape
        fn = lambda st, v: nnx.merge(graphdef, st).encode(v)  # noqa: E731
    return jaxpr_flops(jax.make_jaxpr(fn)(state, jax.ShapeDtypeStruct(shape, jnp.float32)))


def _trainable(path: Sequence[str], names: Sequence[str]) -> bool:
    """``trainer.trainable_filter``'s rule: a path element is one of ``names`` (or "all")."""
    return tuple(names) == ("all",) or any(p in names for p in path)


def dit_flops(cfg, batch: int, tokens: int, out_tokens: int, trainable: Sequence[str] | None = None,
              remat: str = "none") -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one Wan DiT call on ``batch`` samples of ``tokens`` tokens
    whose head runs on the first ``out_tokens``: ``{"forward", "backward", "remat"}``.

    Forward: every matmul (patch embedding, text and time embeddings, per layer self-attn
    q/k/v/o, cross-attn q/o over the image tokens and k/v over the ``text_len`` text tokens,
    FFN, head) plus attention, 4 L^2 D per layer (QK^T and PV) and 4 L Lt D for cross
    attention. ``trainable`` (``config.train.trainable``; None: no backward) gives the
    backward: a matmul's input gradient costs its forward FLOPs when the input needs a
    gradient (the token stream does whenever the patch embedding or a block is trained; the
    text and time branches only when their embeddings are), and its weight gradient the same
    when that weight is trained; self-attention's backward is twice its forward (dQ, dK, dV,
    dP). ``remat="full"`` recomputes each block's forward in the backward (less FFN fc2,
    whose output is the saved block output); the "dots" policies keep the matmuls, so nothing
    is counted for them. With FaceCam's trainable subset these counts equal the dots JAX
    traces for the step (tests/test_aot.py).
    """
    d, f, lt, layers = cfg.dim, cfg.ffn_dim, cfg.text_len, cfg.num_layers
    patch = math.prod(cfg.patch_size)
    b, l = batch, tokens
    names = tuple(trainable or ())
    train = trainable is not None
    tokens_grad = train and (_trainable(("patch_embedding",), names) or _trainable(("blocks",), names)
                             or any(_trainable(("blocks", m, p), names) for m in ("self_attn", "cross_attn", "ffn")
                                    for p in ("q", "k", "v", "o", "fc1", "fc2", "norm_q", "norm_k")))
    text_grad = train and _trainable(("text_embedding",), names)
    time_grad = train and (_trainable(("time_embedding",), names) or _trainable(("time_projection",), names))

    # (path, forward FLOPs, the input needs a gradient, number of calls)
    linears = [
        (("patch_embedding",), 2 * b * l * patch * cfg.in_dim * d, False, 1),
        (("text_embedding", "fc1"), 2 * b * lt * cfg.text_dim * d, False, 1),
        (("text_embedding", "fc2"), 2 * b * lt * d * d, text_grad, 1),
        (("time_embedding", "fc1"), 2 * b * cfg.freq_dim * d, False, 1),
        (("time_embedding", "fc2"), 2 * b * d * d, time_grad, 1),
        (("time_projection",), 2 * b * d * 6 * d, time_grad, 1),
        (("head", "head"), 2 * b * out_tokens * d * cfg.out_dim * patch, tokens_grad, 1),
    ]
    block = [
        (("blocks", "self_attn", "q"), 2 * b * l * d * d, tokens_grad),
        (("blocks", "self_attn", "k"), 2 * b * l * d * d, tokens_grad),
        (("blocks", "self_attn", "v"), 2 * b * l * d * d, tokens_grad),
        (("blocks", "self_attn", "o"), 2 * b * l * d * d, tokens_grad),
        (("blocks", "cross_attn", "q"), 2 * b * l * d * d, tokens_grad),
        (("blocks", "cross_attn", "k"), 2 * b * lt * d * d, text_grad),
        (("blocks", "cross_attn", "v"), 2 * b * lt * d * d, text_grad),
        (("blocks", "cross_attn", "o"), 2 * b * l * d * d, tokens_grad),
        (("blocks", "ffn", "fc1"), 2 * b * l * d * f, tokens_grad),
        (("blocks", "ffn", "fc2"), 2 * b * l * f * d, tokens_grad),
    ]
    linears += [(path, flops, grad, layers) for path, flops, grad in block]
    self_attn = 4 * b * l * l * d
    cross_attn = 4 * b * l * lt * d

    block_forward = layers * (sum(fl for _, fl, _ in block) + self_attn + cross_attn)
    forward = sum(fl * n for _, fl, _, n in linears) + layers * (self_attn + cross_attn)
    backward = 0.0
    if train:
        for path, fl, grad, n in linears:
            backward += n * fl * (int(grad) + int(_trainable(path, names)))
        if tokens_grad:  # self: dP, dV, dS->dQ, dK; cross: dP, dQ (+ dK, dV when the text needs grads)
            backward += layers * (2 * self_attn + cross_attn * (2 if text_grad else 1))
    # Full remat recomputes a block's forward except its last matmul (FFN fc2): that output only
    # feeds the block's output, which the scan keeps as the next block's input.
    recompute = block_forward - layers * 2 * b * l * f * d if train and remat == "full" else 0.0
    return {"forward": float(forward), "backward": float(backward), "remat": float(recompute)}


def _tokens(dit_config, frames: int, height: int, width: int, vae_config) -> tuple[int, int]:
    """(tokens of the two FaceCam halves, tokens of the target half) for a video size."""
    pt, ph, pw = dit_config.patch_size
    s = vae_config.spatial_stride
    f = 1 + (frames - 1) // vae_config.temporal_stride
    half = (f // pt) * (height // s // ph) * (width // s // pw)
    return 2 * half, half


def step_flops(config, program: str) -> dict[str, float]:
    """Analytic FLOPs of one step of ``program`` ("train" or "sample") for ``config``.

    train: the DiT forward + backward (+ remat) on ``data.batch_size`` samples (``dit_flops``
    with ``train.trainable`` and ``model.remat``) and the frozen VAE encode of source, target
    and camera videos (3 x batch). sample: ``sample.num_steps`` DiT forwards on a batch of 2
    with CFG (1 without: ``sample.cfg_scale == 1``), one expert per step, plus the VAE encode
    of source and camera and the decode of the output. VAE FLOPs are its convs counted from
    the traced program (``vae_flops``). Returns the parts and their ``"total"``.
    """
    from facecam_jax import trainer
    from facecam_jax.models import wan_dit

    m, d = config.model, config.data
    dit_config = wan_dit.get_config(m.dit)
    dit_config = dit_config.replace(in_dim=max(m.in_dim, dit_config.in_dim))
    vae_config = trainer.vae_config(config.vae.config)
    tokens, out_tokens = _tokens(dit_config, d.frames, d.height, d.width, vae_config)
    video = (d.frames, d.height, d.width, 3)
    if program == "train":
        b = d.batch_size
        parts = dit_flops(dit_config, b, tokens, out_tokens, tuple(config.train.trainable), m.remat)
        parts["vae"] = vae_flops(vae_config, (3 * b, *video))
    elif program == "sample":
        s = config.sample
        cfg_batch = 2 if s.cfg_scale != 1.0 else 1
        one = dit_flops(dit_config, cfg_batch, tokens, out_tokens)
        parts = {"forward": s.num_steps * one["forward"]}
        parts["vae"] = vae_flops(vae_config, (2, *video)) + vae_flops(vae_config, (1, *video), decode=True)
    else:
        raise ValueError(f"program must be 'train' or 'sample', got {program!r}")
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------ programs


@dataclasses.dataclass
class Compiled:
    """One compiled program's per-device memory (bytes) and compile time."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    seconds: float
    resident_elsewhere: int = 0  # arrays on the device that this program does not take

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.resident_elsewhere

    @classmethod
    def of(cls, name: str, compiled, seconds: float, resident_elsewhere: int = 0) -> "Compiled":
        mem = compiled.memory_analysis()
        get = lambda f: int(getattr(mem, f, 0) or 0)  # noqa: E731
        return cls(name, get("argument_size_in_bytes"), get("output_size_in_bytes"), get("alias_size_in_bytes"),
                   get("temp_size_in_bytes"), get("generated_code_size_in_bytes"), seconds, resident_elsewhere)


class OutOfMemory(Exception):
    """The program needs more than the device's memory: XLA refused it at compile, or its
    arguments alone exceed the HBM (then it is not compiled at all)."""

    def __init__(self, name: str, message: str, seconds: float, required: int | None = None,
                 available: int | None = None):
        super().__init__(message)
        self.name, self.seconds = name, seconds
        self.required = required or _required_from_message(message)
        self.available = available or _hbm_from_message(message)


def _check_arguments(name: str, arguments: int, hbm: int | None) -> None:
    """Skips a compile that cannot fit: the per-device arguments alone exceed the HBM."""
    if hbm is not None and arguments > hbm:
        raise OutOfMemory(name, f"the arguments alone need {arguments / GiB:.2f} GiB per device, more than the "
                          f"{hbm / GiB:.2f} GiB of HBM; not compiled", 0.0, arguments, hbm)


def _compile(name: str, lowered_fn, resident_elsewhere: int = 0) -> Compiled:
    start = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001  XLA raises a generic runtime error
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            raise OutOfMemory(name, str(e).splitlines()[0], time.perf_counter() - start) from e
        raise
    result = Compiled.of(name, compiled, time.perf_counter() - start, resident_elsewhere)
    log.info("%s compiled in %.1f s", name, result.seconds)
    return result


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _train_programs(config, mesh, rules, hbm: int | None) -> tuple[list[Compiled], dict]:
    from facecam_jax import trainer

    # Built outside the mesh context (optax's state-sharding helper runs an init eagerly, which a
    # compile-only device cannot execute); traced inside it, where activations are pinned.
    program = trainer.build_program(config, mesh, rules, abstract=True)
    info = {"params": program.num_params, "trainable": program.num_trainable, "experts": 1}
    _check_arguments("train step", _device_bytes(
        (program.state, program.frozen, program.vae_state, program.context, program.batch)), hbm)

    def lower():
        with sh.use_mesh(mesh, rules):
            return program.lower()

    return [_compile("train step", lower)], info


def num_experts(config) -> int:
    """Two for Wan2.2 A14B (an ``a14b`` preset, or both sample.*_noise_checkpoint set), else one."""
    s = config.sample
    return 2 if ("a14b" in config.model.dit or (s.high_noise_checkpoint and s.low_noise_checkpoint)) else 1


def _sample_programs(config, mesh, rules, hbm: int | None, *, with_vae: bool = True) -> tuple[list[Compiled], dict]:
    """The Euler loop (both experts resident) and, beside it, the VAE encode and decode."""
    from facecam_jax import sampler, trainer

    d, s, m = config.data, config.sample, config.model
    replicated = NamedSharding(mesh, PartitionSpec())
    dit = trainer._abstract_dit(config, mesh, rules)
    n = num_experts(config)
    states = tuple(nnx.state(dit) for _ in range(n))
    vae = trainer._abstract_vae(config, mesh)
    vae_graphdef, vae_state = nnx.split(vae)
    vc = vae.config
    s_ = vc.spatial_stride
    latent = (1, 1 + (d.frames - 1) // vc.temporal_stride, d.height // s_, d.width // s_, vc.z_dim)
    lat = jax.ShapeDtypeStruct(latent, jnp.float32, sharding=replicated)
    ctx = jax.ShapeDtypeStruct((1, dit.config.text_len, dit.config.text_dim), jnp.float32, sharding=replicated)
    fn = sampler.sample_program(nnx.graphdef(dit), n, m.expert_boundary if n == 2 else None, s.cfg_scale,
                                s.num_steps, s.shift)
    dit_bytes, vae_bytes = _device_bytes(states), _device_bytes(vae_state)
    _check_arguments("sample loop", dit_bytes + vae_bytes, hbm)

    def under_mesh(jitted, *args):
        def lower():
            with sh.use_mesh(mesh, rules):
                return jitted.lower(*args)
        return lower

    out = [_compile("sample loop", under_mesh(fn, states, lat, lat, ctx, ctx, lat), vae_bytes)]
    if with_vae:
        video = jax.ShapeDtypeStruct((2, d.frames, d.height, d.width, 3), jnp.float32, sharding=replicated)
        encode = jax.jit(lambda st, v: nnx.merge(vae_graphdef, st).encode(v))
        decode = jax.jit(lambda st, z: nnx.merge(vae_graphdef, st).decode(z))
        out.append(_compile("VAE encode", under_mesh(encode, vae_state, video), dit_bytes))
        out.append(_compile("VAE decode", under_mesh(decode, vae_state, lat), dit_bytes))
    params = sum(x.size for x in jax.tree.leaves(states))
    return out, {"params": params, "trainable": 0, "experts": n}


# ------------------------------------------------------------------ the report


@dataclasses.dataclass
class Report:
    program: str
    config: str
    target: str
    chip: str
    devices: int
    chips: int
    mesh: dict
    model: str
    remat: str
    attention: str
    tokens: int
    batch: int
    params: int
    trainable: int
    experts: int
    hbm: int | None
    hbm_source: str
    flops: dict
    peak_flops: float | None
    compiled: list = dataclasses.field(default_factory=list)  # Compiled
    out_of_memory: dict | None = None  # {"program", "required", "available", "message"}
    seconds: float = 0.0  # all compiles

    @property
    def peak(self) -> Compiled | None:
        return max(self.compiled, key=lambda c: c.total) if self.compiled else None

    @property
    def memory(self) -> int | None:
        """Per-device bytes at the peak (the largest program plus what stays resident beside it)."""
        if self.out_of_memory:
            return self.out_of_memory.get("required")
        return self.peak.total if self.peak else None

    @property
    def step_seconds(self) -> float | None:
        return None if not self.peak_flops else self.flops["total"] / self.peak_flops

    @property
    def fits(self) -> bool | None:
        if self.out_of_memory:
            return False
        if self.hbm is None:
            return None
        return self.memory <= self.hbm

    @property
    def exit_code(self) -> int:
        return DOES_NOT_FIT if self.fits is False else FITS

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["compiled"] = [dict(dataclasses.asdict(c), total=c.total) for c in self.compiled]
        out.update(memory=self.memory, step_seconds=self.step_seconds, fits=self.fits)
        return out

    def text(self) -> str:
        gib = lambda n: "?" if n is None else f"{n / GiB:.2f} GiB"  # noqa: E731
        mesh = " ".join(f"{k} {v}" for k, v in self.mesh.items())
        lines = [
            f"program    {self.program} ({self.config})",
            f"target     {self.target}: {self.devices} x {self.chip} devices ({self.chips} chip"
            f"{'s' if self.chips > 1 else ''}), mesh {mesh}",
            f"model      {self.model}, {self.experts} x {_count(self.params / self.experts)} parameters"
            + (f", {_count(self.trainable)} trainable" if self.trainable else "")
            + (f", remat {self.remat}" if self.program == "train" else "") + f", attention {self.attention}",
            f"input      batch {self.batch}, {self.tokens:,} tokens per sample",
        ]
        for c in self.compiled:
            extra = f" + {gib(c.resident_elsewhere)} resident beside it" if c.resident_elsewhere else ""
            lines.append(
                f"{c.name:<10} per device: arguments {gib(c.arguments)}, outputs {gib(c.outputs)} "
                f"(aliased {gib(c.aliased)}), temporaries {gib(c.temporaries)}, code {c.code / 2**20:.1f} MiB"
                f"{extra} = {gib(c.total)}; compiled in {c.seconds:.1f} s")
        if self.out_of_memory:
            o = self.out_of_memory
            lines.append(f"{o['program']:<10} does not fit ({o['seconds']:.1f} s): needs {gib(o['required'])} of "
                         f"{gib(o['available'])}: {o['message'][:300]}")
        lines.append(f"HBM        {gib(self.hbm)} per device ({self.hbm_source})")
        parts = ", ".join(f"{k} {v:.3g}" for k, v in self.flops.items() if k != "total")
        lines.append(f"FLOPs      {self.flops['total']:.4g} per step ({parts})")
        if self.step_seconds is not None:
            lines.append(f"time       {self.step_seconds:.3g} s per step at the bf16 peak "
                         f"({self.chips} x {self.peak_flops / self.chips / 1e12:.0f} TFLOP/s)")
        if self.fits is None:
            verdict = f"unknown: no memory limit known for {self.chip}; needs {gib(self.memory)} per device"
        elif self.fits:
            verdict = f"fits: {gib(self.memory)} of {gib(self.hbm)} per device ({100 * self.memory / self.hbm:.0f}%)"
        else:
            verdict = f"does not fit: needs {gib(self.memory)} per device, {gib(self.hbm)} available"
        lines.append(f"verdict    {verdict}")
        return "\n".join(lines)


def _count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


def _attention_used(config, target: Target) -> str:
    """What ``attention="auto"`` resolves to on the target (``models.attention.attention``'s rule)."""
    impl = config.model.attention
    if impl != "auto":
        return impl
    dtype = config.model.compute_dtype
    platform = target.devices[0].platform
    if platform == "tpu" and dtype in ("float32", "bfloat16"):
        return "auto -> splash"
    if platform == "gpu" and dtype in ("bfloat16", "float16"):
        return "auto -> cudnn"
    return "auto -> xla"


def analyze(config, program: str, topology: str | None = None, *, config_name: str = "", with_vae: bool = True,
            target: Target | None = None) -> Report:
    """Builds ``program`` ("train" or "sample") of ``config`` on the target's devices from shapes
    only, compiles it, and reports memory, FLOPs and whether it fits. BadTarget: the topology
    or mesh cannot be built."""
    from facecam_jax import trainer
    from facecam_jax.models import wan_dit

    if program not in ("train", "sample"):
        raise BadTarget(f"--program must be 'train' or 'sample', got {program!r}")
    target = target or make_target(topology)
    if target.is_tpu:
        _no_persistent_cache()
    mc = config.mesh
    try:
        mesh = sh.make_mesh(mc.data, mc.fsdp, mc.context, mc.tensor, devices=target.devices)
    except ValueError as e:
        raise BadTarget(f"{e} (the {target.name} target); set --config.mesh.* so that the mesh divides it") from e
    rules = sh.rules_from_config(config.get("sharding_rules"))
    dit_config = wan_dit.get_config(config.model.dit)
    dit_config = dit_config.replace(in_dim=max(config.model.in_dim, dit_config.in_dim))
    tokens, _ = _tokens(dit_config, config.data.frames, config.data.height, config.data.width,
                        trainer.vae_config(config.vae.config))
    report = Report(
        program=program, config=config_name, target=target.name, chip=target.chip, devices=len(target.devices),
        chips=target.chips, mesh=dict(mesh.shape), model=config.model.dit, remat=config.model.remat,
        attention=_attention_used(config, target), tokens=tokens,
        batch=config.data.batch_size if program == "train" else 1, params=0, trainable=0, experts=1,
        hbm=target.hbm_per_device, hbm_source=target.hbm_source, flops=step_flops(config, program),
        peak_flops=target.peak_flops,
    )
    start = time.perf_counter()
    try:
        if program == "train":
            report.compiled, info = _train_programs(config, mesh, rules, target.hbm_per_device)
        else:
            report.compiled, info = _sample_programs(config, mesh, rules, target.hbm_per_device, with_vae=with_vae)
        report.params, report.trainable, report.experts = info["params"], info["trainable"], info["experts"]
    except OutOfMemory as e:
        report.out_of_memory = {"program": e.name, "required": e.required, "available": e.available,
                                "message": str(e), "seconds": e.seconds}
        n = num_experts(config) if program == "sample" else 1
        report.experts = n
        report.params = n * wan_dit.param_count(wan_dit.abstract_model(dit_config))
    report.seconds = time.perf_counter() - start
    return report


# ------------------------------------------------------------------ command line


def main(argv):
    """``python -m facecam_jax.aot``: prints the report; returns the exit code."""
    import sys

    from absl import app, flags

    from facecam_jax import cli

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("facecam_jax").setLevel(logging.INFO)
    f = flags.FLAGS
    if f.topology and not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # host-side work stays off any local accelerator
    args = sys.argv[1:]
    name = next((a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
                 if a == "--config" and i + 1 < len(args) or a.startswith("--config=")), "configs/facecam.py")
    try:
        report = analyze(_CONFIG.value, f.program, f.topology, config_name=name, with_vae=f.vae)
    except BadTarget as e:
        cli.fail(cli.message(e), code=BAD_ARGUMENTS)
    print(report.text(), flush=True)
    if f.json:
        with open(f.json, "w") as out:
            json.dump(report.to_json(), out, indent=1)
    return report.exit_code


if __name__ == "__main__":
    from absl import flags

    from facecam_jax import cli

    # Defined here, not at import: tests import this module beside other entry points' flags.
    _CONFIG = cli.define_config("the config whose program is compiled (configs/facecam.py[:variant,key=value])")
    flags.DEFINE_string("topology", None, "a TPU topology to compile for (v5e:2x2, v5p:2x2x2, v6e:2x4, ...); "
                        "default: the local devices")
    flags.DEFINE_enum("program", "train", ["train", "sample"], "the training step or the sampling program")
    flags.DEFINE_bool("vae", True, "sample: also compile the VAE encode and decode that run beside the experts")
    flags.DEFINE_string("json", None, "also write the report as JSON here")
    cli.run(main)
