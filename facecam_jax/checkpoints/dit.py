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
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from facecam_jax import sharding as sh
from facecam_jax.checkpoints.dit_naming import (
    BLOCK_RE,
    CAMERA_KEY_RE,
    Slot,
    infer_config,
    jax_shape,
    named_variables,
    slots_of,
    to_jax_layout,
    to_original_naming,
    torch_shape,
)
from facecam_jax.checkpoints.dit_save import diffusers_config, refuse_quantized, save_dit  # noqa: F401  (re-exported)
from facecam_jax.checkpoints.io import (
    CheckpointError,
    TensorRef,
    format_key_problems,
    open_checkpoint,
)
from facecam_jax.checkpoints.lora import apply_loras
from facecam_jax.models import quant
from facecam_jax.models.wan_dit import DiTConfig, WanDiT, add_camera_layers, get_config
from facecam_jax.runtime import progress as progress_lib

log = logging.getLogger(__name__)

ORBAX_MARKER = "facecam_dit.json"
CAMERAS = (None, "none", "landmarks", "recammaster")  # load_dit(camera=): only recammaster adds weights


# ------------------------------------------------------------------ loading


def _check(refs: Mapping[str, TensorRef], slots: Mapping[str, Slot], shapes: Mapping[tuple, tuple], strict: bool):
    missing = [k for k in slots if k not in refs] if strict else []
    unexpected = [k for k in refs if k not in slots]
    mismatched = []
    for k, ref in refs.items():
        if k in slots:
            slot = slots[k]
            want = shapes[slot.path][1:] if slot.layer is not None else shapes[slot.path]
            got = jax_shape(slot.kind, ref.shape)
            if got != tuple(want):
                mismatched.append(f"{k}: {tuple(ref.shape)} vs {torch_shape(slot.kind, want)}")
    return missing, unexpected, mismatched


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
    camera: str | None = None,
) -> WanDiT:
    """Loads a Wan DiT from a .safetensors file, a sharded index, a directory, or an orbax export.

    ``dtype`` is the parameter dtype (default: the checkpoint's); norms, modulation and time
    embedding stay fp32. ``compute_dtype`` defaults to ``dtype``. With ``mesh``, parameters
    are created directly sharded by their logical axes. Strict: any missing, unexpected or
    mis-shaped key raises one ``CheckpointError`` that lists them all, and a NaN or Inf in any
    tensor read (base, overlay or LoRA) one that names the tensor and its file. ``progress``: a bar over
    the tensors read (process 0, and only once loading takes over a second). ``loras``:
    ``(file, strength)`` pairs (or files, strength 1) merged after the base and the overlays
    (``checkpoints.lora.apply_loras``; ``lora_unmatched="warn"`` skips keys of other layers).

    ``quantize``: ``"none"``, or ``"int8"`` / ``"fp8"`` (e4m3) weight-only quantization of every
    block linear (``models/quant.py``): each block kernel is quantized on the host as its
    tensor is read and only the int8/fp8 values and their per-output-channel scales go to
    the devices (LoRAs merge into the dequantized kernel, which is quantized again). From an
    orbax export the float block kernels are restored to host memory first. An unknown mode,
    or fp8 on a backend that cannot run it, is a ValueError before anything is read.

    ``camera="recammaster"``: the DiT with ReCamMaster's per-block camera layers
    (``wan_dit.add_camera_layers``), read from the checkpoint (its ``step20000.ckpt``: the whole DiT
    plus ``blocks.N.cam_encoder`` / ``projector`` in DiffSynth naming, or the same in
    safetensors) or from an overlay of only those layers over a base Wan checkpoint; found in
    neither, a ``CheckpointError``. Other camera kinds add no weights (None, "landmarks").
    """
    if camera not in CAMERAS:
        raise ValueError(f"load_dit(camera={camera!r}): choose one of {CAMERAS}")
    layers = camera == "recammaster"
    quant.check_mode(quantize, None if mesh is None else list(mesh.devices.flat))
    path = os.fspath(path)
    cameras_from = []  # the files the camera layers came from
    if os.path.isdir(path) and os.path.exists(os.path.join(path, ORBAX_MARKER)):
        model = _load_orbax(path, dtype, compute_dtype, mesh, rules, attention, remat, quantize)
        if layers and not model.has_camera_layers:
            raise CheckpointError(f"{path}: an orbax export without camera layers; export the model loaded with "
                                  "camera='recammaster' (tools/convert_wan_checkpoint.py)")
        cameras_from += [path] if model.has_camera_layers else []
    else:
        refs = to_original_naming(open_checkpoint(path))
        try:
            cfg = get_config(config) if config is not None else infer_config(refs)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if dtype is None:
            dtype = refs["blocks.0.self_attn.q.weight"].dtype if "blocks.0.self_attn.q.weight" in refs else jnp.float32
        model = quant.quantize_dit(_build(cfg, dtype, compute_dtype, attention, remat, layers), quantize)
        with_cameras = any(CAMERA_KEY_RE.match(k) for k in refs)
        optional = () if with_cameras else [k for k in slots_of(model) if CAMERA_KEY_RE.match(k)]
        _fill(model, refs, strict=True, mesh=mesh, rules=rules, progress=progress, source=path, optional=optional)
        cameras_from += [path] if layers and with_cameras else []
    for item in [] if overlay is None else [overlay] if isinstance(overlay, (str, os.PathLike)) else overlay:
        report = overlay_dit(model, item)
        log.info("%s", report.summary())
        cameras_from += [report.source] if any(CAMERA_KEY_RE.match(k) for k in report.replaced) else []
    if layers and not cameras_from:
        raise CheckpointError(f"{path}{' and its overlays' if overlay else ''} hold no camera layers "
                              "(blocks.N.cam_encoder / projector): camera='recammaster' needs ReCamMaster's "
                              "checkpoint, or an overlay of its camera layers over the Wan base")
    if loras:
        for report in apply_loras(model, loras, mesh=mesh, rules=rules, unmatched=lora_unmatched):
            log.info("%s", report.summary())
    return model


def holds_camera_layers(paths: Sequence[str | os.PathLike]) -> bool:
    """Whether any of these DiT checkpoints (or overlays) holds ReCamMaster's camera layers (keys only)."""
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path) and os.path.exists(os.path.join(path, ORBAX_MARKER)):
            with open(os.path.join(path, ORBAX_MARKER)) as f:
                if json.load(f).get("camera_layers"):
                    return True
        elif any(CAMERA_KEY_RE.match(k) for k in to_original_naming(open_checkpoint(path))):
            return True
    return False


def _build(cfg, dtype, compute_dtype, attention, remat, camera_layers: bool = False) -> WanDiT:
    dtype = jnp.dtype(dtype)
    compute = jnp.dtype(compute_dtype) if compute_dtype is not None else dtype

    def make():
        model = WanDiT(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=compute, attention=attention, remat=remat)
        return add_camera_layers(model) if camera_layers else model

    return nnx.eval_shape(make)


def _fill(model: WanDiT, refs, *, strict, mesh, rules, progress, source, optional=()) -> list[str]:
    """Writes checkpoint tensors into ``model`` (abstract or concrete); returns the keys used.
    ``optional``: keys a strict read may miss (camera layers an overlay brings; they keep the
    model's initial values, zero and identity)."""
    cfg = model.config
    slots = slots_of(model)
    state = nnx.state(model)
    variables = dict(named_variables(state))
    shapes = {p: tuple(np.shape(v.get_value())) for p, v in variables.items()}
    missing, unexpected, mismatched = _check(refs, slots, shapes, strict)
    missing = [k for k in missing if k not in set(optional)]
    if missing or unexpected or mismatched:
        hint = ("; it holds ReCamMaster's camera layers: load it with camera='recammaster'"
                if any(CAMERA_KEY_RE.match(k) for k in unexpected) else "")
        raise CheckpointError(
            f"{source}: checkpoint does not fit the DiT {cfg}:" + format_key_problems(missing, unexpected, mismatched)
            + hint)
    by_path: dict[tuple, list[tuple[str, Slot]]] = {}
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
            value = to_jax_layout(slot.kind, refs[k].load_finite(k))  # a NaN or Inf names its tensor
            if scale is not None:  # quantized here, one tensor at a time: only int8/fp8 reaches the devices
                value, host_scale[at] = quant.quantize_kernel(value, mode)
            host[at] = value.astype(dtype)
            bar.update()
        sharding = None
        if mesh is not None:
            sharding = sh.logical_sharding(sh.variable_axes(var), shape, mesh, rules)
        var.set_value(sh.place_host(host, sharding))
        if scale is not None:  # split as the kernel's output channels
            scale_sharding = None if sharding is None else quant.scale_sharding(sharding, len(shape))
            scale.set_value(sh.place_host(host_scale, scale_sharding))
    bar.close()
    nnx.update(model, state)
    return [k for items in by_path.values() for k, _ in items]


@dataclasses.dataclass
class OverlayReport:
    source: str
    replaced: list[str]
    total_model_tensors: int

    def summary(self) -> str:
        blocks = sorted({m.group(2) for k in self.replaced if (m := BLOCK_RE.match(k))})
        top = sorted(k for k in self.replaced if not BLOCK_RE.match(k))
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
    return OverlayReport(source, sorted(used), len(slots_of(model)))


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
    refuse_quantized(model)
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "state"), _pure(nnx.state(model)), force=True)
    param_dtype = str(np.dtype(model.blocks.self_attn.q.kernel.get_value().dtype))
    meta = {"config": dataclasses.asdict(model.config), "param_dtype": param_dtype, "format": "facecam_jax.WanDiT",
            "camera_layers": model.has_camera_layers}
    with open(os.path.join(path, ORBAX_MARKER), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def _load_orbax(path, dtype, compute_dtype, mesh, rules, attention, remat, quantize="none") -> WanDiT:
    with open(os.path.join(path, ORBAX_MARKER)) as f:
        meta = json.load(f)
    cfg = DiTConfig(**meta["config"])
    dtype = meta["param_dtype"] if dtype is None else dtype
    model = quant.quantize_dit(_build(cfg, dtype, compute_dtype, attention, remat, meta.get("camera_layers", False)),
                               quantize)
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
            var.set_value(sh.place_host(q, sharding))
            by_path[(*p[:-1], "scale")].set_value(sh.place_host(s, quant.scale_sharding(sharding, q.ndim)))
        else:
            var.set_value(node)
    nnx.update(model, state)
    return model
