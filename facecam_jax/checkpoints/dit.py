"""Wan DiT checkpoints: original/DiffSynth, diffusers and ComfyUI naming -> ``WanDiT``, and back.

``load_dit`` streams tensors one at a time from memory-mapped files into a model built
abstractly (no random init), checks every key and shape before reading a byte, and places
each parameter directly on its sharding when a mesh is given. ``overlay=`` applies partial
state dicts (the released FaceCam expert weights) over the loaded base. ``save_dit`` writes
diffusers-format safetensors (with a diffusers ``config.json`` when given a directory).
A directory written by ``save_dit_orbax`` (``tools/convert_wan_checkpoint.py``) reloads fast.
``quantize="int8" | "fp8"`` stores the blocks' linear kernels weight-only quantized
(``facecam_jax.models.quant``), each quantized on the host as it is read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from facecam_jax import progress as progress_lib
from facecam_jax import sharding as sh
from facecam_jax.checkpoints.io import (
    CheckpointError,
    TensorRef,
    format_key_problems,
    open_checkpoint,
    strip_prefix,
    write_safetensors,
)
from facecam_jax.models import quant
from facecam_jax.models.wan_dit import PRESETS, DiTConfig, WanDiT, get_config

log = logging.getLogger(__name__)

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
ORBAX_MARKER = "facecam_dit.json"

# ------------------------------------------------------------------ naming tables
# kind: how a torch tensor becomes the JAX parameter ("linear": transpose, "conv": [O,I,t,h,w] ->
# [t,h,w,I,O], "squeeze": drop the leading 1, "copy": as is).

_TOP: list[tuple[str, tuple[str, ...], str]] = [
    ("patch_embedding.weight", ("patch_embedding", "kernel"), "conv"),
    ("patch_embedding.bias", ("patch_embedding", "bias"), "copy"),
    ("head.modulation", ("head", "modulation"), "squeeze"),
]
for _orig, _mine in [
    ("text_embedding.0", ("text_embedding", "fc1")),
    ("text_embedding.2", ("text_embedding", "fc2")),
    ("time_embedding.0", ("time_embedding", "fc1")),
    ("time_embedding.2", ("time_embedding", "fc2")),
    ("time_projection.1", ("time_projection",)),
    ("head.head", ("head", "head")),
]:
    _TOP += [(f"{_orig}.weight", (*_mine, "kernel"), "linear"), (f"{_orig}.bias", (*_mine, "bias"), "copy")]

_BLOCK: list[tuple[str, tuple[str, ...], str]] = [
    ("modulation", ("modulation",), "squeeze"),
    ("norm3.weight", ("norm3", "scale"), "copy"),
    ("norm3.bias", ("norm3", "bias"), "copy"),
    ("ffn.0.weight", ("ffn", "fc1", "kernel"), "linear"),
    ("ffn.0.bias", ("ffn", "fc1", "bias"), "copy"),
    ("ffn.2.weight", ("ffn", "fc2", "kernel"), "linear"),
    ("ffn.2.bias", ("ffn", "fc2", "bias"), "copy"),
]
for _attn in ("self_attn", "cross_attn"):
    for _p in "qkvo":
        _BLOCK += [
            (f"{_attn}.{_p}.weight", (_attn, _p, "kernel"), "linear"),
            (f"{_attn}.{_p}.bias", (_attn, _p, "bias"), "copy"),
        ]
    _BLOCK += [(f"{_attn}.norm_{n}.weight", (_attn, f"norm_{n}", "scale"), "copy") for n in "qk"]

_TOP_BY_PATH = {path: (name, kind) for name, path, kind in _TOP}
_BLOCK_BY_PATH = {path: (name, kind) for name, path, kind in _BLOCK}

# diffusers <-> original names (block-local and top-level).
_DIFFUSERS_BLOCK = {
    "scale_shift_table": "modulation",
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
for _d, _o in (("attn1", "self_attn"), ("attn2", "cross_attn")):
    _DIFFUSERS_BLOCK.update(
        {
            f"{_d}.to_q": f"{_o}.q",
            f"{_d}.to_k": f"{_o}.k",
            f"{_d}.to_v": f"{_o}.v",
            f"{_d}.to_out.0": f"{_o}.o",
            f"{_d}.norm_q": f"{_o}.norm_q",
            f"{_d}.norm_k": f"{_o}.norm_k",
        }
    )
_DIFFUSERS_TOP = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
    "patch_embedding": "patch_embedding",
}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _rename(name: str, block_map: Mapping[str, str], top_map: Mapping[str, str]) -> str:
    """Renames by the longest matching module prefix (``prefix`` or ``prefix.<param>``)."""

    def sub(local: str, table: Mapping[str, str]) -> str:
        for src in sorted(table, key=len, reverse=True):
            if local == src or local.startswith(src + "."):
                return table[src] + local[len(src) :]
        return local

    m = _BLOCK_RE.match(name)
    if m:
        return f"blocks.{m.group(1)}.{sub(m.group(2), block_map)}"
    return sub(name, top_map)


def diffusers_to_original(name: str) -> str:
    return _rename(name, _DIFFUSERS_BLOCK, _DIFFUSERS_TOP)


def original_to_diffusers(name: str) -> str:
    inv_block = {v: k for k, v in _DIFFUSERS_BLOCK.items()}
    inv_top = {v: k for k, v in _DIFFUSERS_TOP.items()}
    return _rename(name, inv_block, inv_top)


def detect_naming(names: Iterable[str]) -> str:
    """'diffusers' or 'original' (Wan / DiffSynth naming), from the key names."""
    names = list(names)
    if any(n.startswith("condition_embedder.") or ".attn1." in n or n.startswith("proj_out.") for n in names):
        return "diffusers"
    return "original"


def to_original_naming(refs: Mapping[str, Any]) -> dict[str, Any]:
    """Strips a ComfyUI prefix and converts diffusers names, so keys are in original naming."""
    refs = strip_prefix(refs, COMFY_PREFIXES)
    if detect_naming(refs) == "diffusers":
        refs = {diffusers_to_original(k): v for k, v in refs.items()}
    return dict(refs)


# ------------------------------------------------------------------ layout transforms


def _to_jax(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 4, 1, 0)
    if kind == "squeeze":
        return x.reshape(x.shape[1:]) if x.shape[:1] == (1,) else x
    return x


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(4, 3, 0, 1, 2)
    if kind == "squeeze":
        return x[None]
    return x


def to_jax_layout(kind: str, x):
    """A torch-layout tensor (numpy, or jax inside a jitted update) in the JAX layout of ``kind``."""
    return _to_jax(kind, x)


def torch_shape(kind: str, jax_shape) -> tuple[int, ...]:
    """The torch-layout shape of a parameter of ``kind`` whose JAX shape is ``jax_shape``."""
    return _to_torch_shape(kind, jax_shape)


# ------------------------------------------------------------------ model <-> names


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One checkpoint tensor's place in the model: a variable path, optional layer index."""

    path: tuple[str, ...]
    layer: int | None
    kind: str


def _path_str(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def named_variables(state) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    """``(path of attribute names, variable)`` for every variable of an nnx state."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]
    return [(_path_str(p), v) for p, v in leaves]


def keys_of_paths(config: DiTConfig, paths) -> list[str]:
    """Original-naming keys of the model variables at ``paths`` (tuples of attribute names)."""
    paths = set(paths)
    return [k for k, slot in model_slots(config).items() if slot.path in paths]


def model_slots(config: DiTConfig) -> dict[str, _Slot]:
    """Original-naming key -> slot, for every tensor a checkpoint of ``config`` must hold."""
    slots = {}
    for name, path, kind in _TOP:
        slots[name] = _Slot(path, None, kind)
    for i in range(config.num_layers):
        for name, path, kind in _BLOCK:
            if path[0] == "norm3" and not config.cross_attn_norm:
                continue
            if "norm_q" in path or "norm_k" in path:
                if not config.qk_norm:
                    continue
            slots[f"blocks.{i}.{name}"] = _Slot(("blocks", *path), i, kind)
    return slots


# ------------------------------------------------------------------ config inference


def infer_config(refs: Mapping[str, TensorRef], head_dim: int = 128) -> DiTConfig:
    """The architecture of an original-naming checkpoint from its shapes (a preset when one matches)."""
    need = ["patch_embedding.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight"]
    missing = [k for k in need if k not in refs]
    if missing:
        raise CheckpointError(f"cannot infer the DiT architecture: keys {missing} are missing; is this a Wan DiT?")
    pe = refs["patch_embedding.weight"].shape  # [D, Cin, pt, ph, pw]
    dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
    if dim % head_dim:
        raise CheckpointError(f"dim {dim} is not a multiple of head_dim {head_dim}; pass config= explicitly")
    layers = 1 + max(int(m.group(1)) for k in refs if (m := _BLOCK_RE.match(k)))
    cfg = DiTConfig(
        dim=dim,
        ffn_dim=refs["blocks.0.ffn.0.weight"].shape[0],
        num_heads=dim // head_dim,
        num_layers=layers,
        in_dim=in_dim,
        out_dim=refs["head.head.weight"].shape[0] // math.prod(patch),
        freq_dim=refs["time_embedding.0.weight"].shape[1],
        text_dim=refs["text_embedding.0.weight"].shape[1],
        patch_size=patch,
        qk_norm="blocks.0.self_attn.norm_q.weight" in refs,
        cross_attn_norm="blocks.0.norm3.weight" in refs,
    )
    for name, preset in PRESETS.items():
        if preset == cfg:
            log.info("checkpoint matches preset %s", name)
            return preset
    return cfg


# ------------------------------------------------------------------ loading


def _check(refs: Mapping[str, TensorRef], slots: Mapping[str, _Slot], shapes: Mapping[tuple, tuple], strict: bool):
    missing = [k for k in slots if k not in refs] if strict else []
    unexpected = [k for k in refs if k not in slots]
    mismatched = []
    for k, ref in refs.items():
        if k in slots:
            slot = slots[k]
            want = shapes[slot.path][1:] if slot.layer is not None else shapes[slot.path]
            got = _to_jax_shape(slot.kind, ref.shape)
            if got != tuple(want):
                mismatched.append(f"{k}: {tuple(ref.shape)} vs {_to_torch_shape(slot.kind, want)}")
    return missing, unexpected, mismatched


def _to_torch_shape(kind, shape):
    return tuple(_to_torch(kind, np.empty(shape, np.bool_)).shape)


def _to_jax_shape(kind, shape):
    return tuple(_to_jax(kind, np.empty(shape, np.bool_)).shape)


def _place(host: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def load_dit(
    path: str | os.PathLike,
    *,
    config: str | DiTConfig | None = None,
    dtype: Any = None,
    compute_dtype: Any = None,
    overlay: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: sh.Rules = sh.DEFAULT_RULES,
    attention: str = "xla",
    remat: str = "none",
    progress: bool = True,
    quantize: str = "none",
    loras: Sequence[str | os.PathLike | tuple[str | os.PathLike, float]] = (),
    lora_unmatched: str = "error",
) -> WanDiT:
    """Loads a Wan DiT from a .safetensors file, a sharded index, a directory, or an orbax export.

    ``dtype`` is the parameter dtype (default: the checkpoint's); norms, modulation and time
    embedding stay fp32. ``compute_dtype`` defaults to ``dtype``. With ``mesh``, parameters
    are created directly sharded by their logical axes. Strict: any missing, unexpected or
    mis-shaped key raises one ``CheckpointError`` that lists them all. ``progress``: a bar over
    the tensors read (process 0, and only once loading takes over a second). ``loras``:
    ``(file, strength)`` pairs (or files, strength 1) merged after the base and the overlays
    (``checkpoints.lora.apply_loras``; ``lora_unmatched="warn"`` skips keys of other layers).

    ``quantize``: ``"none"``, or ``"int8"`` / ``"fp8"`` (e4m3) weight-only quantization of every
    block linear (``models/quant.py``): each block kernel is quantized on the host as its
    tensor is read and only the int8/fp8 values and their per-output-channel scales go to
    the devices (LoRAs merge into the dequantized kernel, which is quantized again). From an
    orbax export the float block kernels are restored to host memory first. An unknown mode,
    or fp8 on a backend that cannot run it, is a ValueError before anything is read.
    """
    quant.check_mode(quantize, None if mesh is None else list(mesh.devices.flat))
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, ORBAX_MARKER)):
        model = _load_orbax(path, dtype, compute_dtype, mesh, rules, attention, remat, quantize)
    else:
        refs = to_original_naming(open_checkpoint(path))
        cfg = get_config(config) if config is not None else infer_config(refs)
        if dtype is None:
            dtype = refs["blocks.0.self_attn.q.weight"].dtype if "blocks.0.self_attn.q.weight" in refs else jnp.float32
        model = quant.quantize_dit(_build(cfg, dtype, compute_dtype, attention, remat), quantize)
        _fill(model, refs, strict=True, mesh=mesh, rules=rules, progress=progress, source=path)
    for item in [] if overlay is None else [overlay] if isinstance(overlay, (str, os.PathLike)) else overlay:
        report = overlay_dit(model, item)
        log.info("%s", report.summary())
    if loras:
        from facecam_jax.checkpoints.lora import apply_loras  # it imports this module

        for report in apply_loras(model, loras, mesh=mesh, rules=rules, unmatched=lora_unmatched):
            log.info("%s", report.summary())
    return model


def _build(cfg, dtype, compute_dtype, attention, remat) -> WanDiT:
    dtype = jnp.dtype(dtype)
    compute = jnp.dtype(compute_dtype) if compute_dtype is not None else dtype
    return nnx.eval_shape(
        lambda: WanDiT(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=compute, attention=attention, remat=remat)
    )


def _fill(model: WanDiT, refs, *, strict, mesh, rules, progress, source) -> list[str]:
    """Writes checkpoint tensors into ``model`` (abstract or concrete); returns the keys used."""
    cfg = model.config
    slots = model_slots(cfg)
    state = nnx.state(model)
    variables = dict(named_variables(state))
    shapes = {p: tuple(np.shape(v.get_value())) for p, v in variables.items()}
    missing, unexpected, mismatched = _check(refs, slots, shapes, strict)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source}: checkpoint does not fit the DiT {cfg}:" + format_key_problems(missing, unexpected, mismatched)
        )
    by_path: dict[tuple, list[tuple[str, _Slot]]] = {}
    for k, slot in slots.items():
        if k in refs:
            by_path.setdefault(slot.path, []).append((k, slot))
    bar = progress_lib.bar(total=sum(len(items) for items in by_path.values()), desc="loading DiT", unit="tensor",
                           disable=not progress, delay=progress_lib.DELAY)
    for p, items in by_path.items():
        var = variables[p]
        shape, dtype = shapes[p], np.dtype(var.get_value().dtype)
        mode = quant.storage_mode(dtype)  # a quantized kernel: int8/fp8 values plus a scale variable
        scale = variables[(*p[:-1], "scale")] if mode != "none" else None
        whole = strict or len(items) == (shape[0] if items[0][1].layer is not None else 1)
        # a partial overlay starts from the current values
        host = np.empty(shape, dtype) if whole else np.array(var.get_value(), dtype=dtype)
        if scale is not None:
            scale_shape = shapes[(*p[:-1], "scale")]
            host_scale = np.empty(scale_shape, np.float32) if whole else np.array(scale.get_value(), np.float32)
        for k, slot in items:
            at = Ellipsis if slot.layer is None else slot.layer
            value = _to_jax(slot.kind, refs[k].load())
            if scale is not None:  # quantized here, one tensor at a time: only int8/fp8 reaches the devices
                value, host_scale[at] = quant.quantize_kernel(value, mode)
            host[at] = value.astype(dtype)
            bar.update()
        sharding = None
        if mesh is not None:
            sharding = sh.logical_sharding(sh.variable_axes(var), shape, mesh, rules)
        var.set_value(_place(host, sharding))
        if scale is not None:  # split as the kernel's output channels
            scale_sharding = None if sharding is None else quant.scale_sharding(sharding, len(shape))
            scale.set_value(_place(host_scale, scale_sharding))
    bar.close()
    nnx.update(model, state)
    return [k for items in by_path.values() for k, _ in items]


@dataclasses.dataclass
class OverlayReport:
    source: str
    replaced: list[str]
    total_model_tensors: int

    def summary(self) -> str:
        blocks = sorted({m.group(2) for k in self.replaced if (m := _BLOCK_RE.match(k))})
        top = sorted(k for k in self.replaced if not _BLOCK_RE.match(k))
        return (
            f"overlay {self.source}: replaced {len(self.replaced)} of {self.total_model_tensors} tensors "
            f"(per-block: {blocks}; top-level: {top})"
        )


def overlay_dit(model: WanDiT, path: str | os.PathLike | Mapping[str, TensorRef]) -> OverlayReport:
    """Applies a partial state dict over a loaded model (strict=False semantics, reported).

    Keys that are not model parameters, or have the wrong shape, still raise: only
    missing keys are allowed.
    """
    source = "<mapping>" if isinstance(path, Mapping) else os.fspath(path)
    refs = to_original_naming(path if isinstance(path, Mapping) else open_checkpoint(path))
    used = _fill(model, refs, strict=False, mesh=None, rules=sh.DEFAULT_RULES, progress=False, source=source)
    return OverlayReport(source, sorted(used), len(model_slots(model.config)))


# ------------------------------------------------------------------ saving


def _named_tensors(model: WanDiT, naming: str, keys=None) -> dict[str, Callable[[], np.ndarray]]:
    """name -> callable producing the torch-layout tensor (streams one tensor at a time)."""
    _refuse_quantized(model)
    variables = dict(named_variables(nnx.state(model)))
    slots = model_slots(model.config)
    if keys is not None:
        unknown = sorted(set(keys) - set(slots))
        if unknown:
            raise ValueError(f"not parameters of this model (original naming expected): {unknown[:10]}")
        slots = {k: slots[k] for k in keys}
    out = {}
    for name, slot in slots.items():
        var = variables[slot.path]

        def get(var=var, slot=slot):
            x = var.get_value() if slot.layer is None else var.get_value()[slot.layer]
            return np.ascontiguousarray(_to_torch(slot.kind, np.asarray(x)))

        out[original_to_diffusers(name) if naming == "diffusers" else name] = get
    return out


def _refuse_quantized(model: WanDiT):
    mode = quant.quantization_mode(model)
    if mode != "none":
        raise ValueError(
            f"this model's block linears are {mode}-quantized, which no Wan checkpoint format holds; save the "
            "float model and quantize when loading it (load_dit(..., quantize=...))"
        )


def diffusers_config(cfg: DiTConfig) -> dict:
    """A diffusers ``WanTransformer3DModel`` config.json for this architecture."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
        "eps": cfg.eps,
    }


def save_dit(model: WanDiT, path: str | os.PathLike, *, naming: str = "diffusers", keys=None) -> str:
    """Writes the model as diffusers (default) or original-naming safetensors; returns the file.

    ``path`` ending in ``.safetensors`` is the file; otherwise a directory is created holding
    ``diffusion_pytorch_model.safetensors`` and a diffusers ``config.json``. ``keys``
    (original naming) writes only those tensors: a partial state dict for ``overlay=``.
    """
    if naming not in ("diffusers", "original"):
        raise ValueError(f"naming must be 'diffusers' or 'original', got {naming!r}")
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        file = path
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "diffusion_pytorch_model.safetensors")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(diffusers_config(model.config), f, indent=2)
    write_safetensors(file, _named_tensors(model, naming, keys), metadata={"format": "pt"})
    return file


# ------------------------------------------------------------------ orbax fast reload


def _pure(state) -> dict:
    tree: dict = {}
    for p, var in named_variables(state):
        node = tree
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = var.get_value()
    return tree


def save_dit_orbax(model: WanDiT, path: str | os.PathLike) -> str:
    """Saves parameters with orbax plus a small JSON of the architecture and dtypes."""
    _refuse_quantized(model)
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "state"), _pure(nnx.state(model)), force=True)
    param_dtype = str(np.dtype(model.blocks.self_attn.q.kernel.get_value().dtype))
    meta = {"config": dataclasses.asdict(model.config), "param_dtype": param_dtype, "format": "facecam_jax.WanDiT"}
    with open(os.path.join(path, ORBAX_MARKER), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def _load_orbax(path, dtype, compute_dtype, mesh, rules, attention, remat, quantize="none") -> WanDiT:
    with open(os.path.join(path, ORBAX_MARKER)) as f:
        meta = json.load(f)
    cfg = DiTConfig(**meta["config"])
    dtype = meta["param_dtype"] if dtype is None else dtype
    model = quant.quantize_dit(_build(cfg, dtype, compute_dtype, attention, remat), quantize)
    state = nnx.state(model)
    variables = named_variables(state)
    # Quantized kernels are restored to the host as floats and quantized there; scales are not saved.
    scales = set(quant.scale_paths()) if quantize != "none" else set()
    restored_vars = [(p, var) for p, var in variables if p not in scales]

    def sharding_of(var):
        shape = np.shape(var.get_value())
        if mesh is not None:
            return sh.logical_sharding(sh.variable_axes(var), shape, mesh, rules)
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(var):
        shape, vdtype = np.shape(var.get_value()), var.get_value().dtype
        if quant.storage_mode(vdtype) != "none":
            return np.empty(shape, jnp.dtype(dtype))  # a numpy target: orbax restores it on the host
        return jax.ShapeDtypeStruct(shape, vdtype, sharding=sharding_of(var))

    abstract: dict = {}
    for p, var in restored_vars:
        node = abstract
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = target(var)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(path, "state"), abstract)
    by_path = dict(variables)
    for p, var in restored_vars:
        node = restored
        for k in p:
            node = node[k]
        if quant.storage_mode(var.get_value().dtype) != "none":
            q, s = quant.quantize_layers(node, quantize)
            sharding = sharding_of(var)
            var.set_value(_place(q, sharding))
            by_path[(*p[:-1], "scale")].set_value(_place(s, quant.scale_sharding(sharding, q.ndim)))
        else:
            var.set_value(node)
    nnx.update(model, state)
    return model
