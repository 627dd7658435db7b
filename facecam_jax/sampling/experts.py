"""The DiT experts a sampling run uses: which weights (a checkpoint, an A14B pair, a training
run's exported weights, LoRA files), loaded and placed on the mesh, and where they wait while
sampling (``sample.offload``: on the device, the waiting A14B expert in host memory, or the
block weights streamed from host memory layer by layer).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os

import jax
from flax import nnx

from facecam_jax import build
from facecam_jax import sharding as sh
from facecam_jax.checkpoints.dit import load_dit, overlay_dit
from facecam_jax.checkpoints.lora import apply_loras, parse_lora_spec
from facecam_jax.models import quant
from facecam_jax.models.wan_dit import WanDiT
from facecam_jax.sampling.program import streamed_weights

log = logging.getLogger(__name__)

LORA_SUFFIX = "_lora.safetensors"  # a training run's exported adapters (trainer.export_trained)
TRAINED_WEIGHTS = "facecam*.safetensors"  # what a training run exports (trainer.export_trained)


def weights_dir(config, workdir: str | None) -> str | None:
    """The folder of trained weights a sampling run overlays: ``workdir`` (a training run), else
    the config's ``sample.weights`` (the ``learn`` config's shipped ones), else none."""
    return workdir or config.sample.get("weights") or None


def trained_files(folder: str | None) -> list[str]:
    """The exported weight files of a training run's folder (partial state dicts and LoRA files)."""
    return sorted(glob.glob(os.path.join(folder, TRAINED_WEIGHTS))) if folder else []


def lora_files(config) -> list[tuple[str, float]]:
    """``sample.loras`` as ``(path, strength)``: each file checked to exist, each strength finite."""
    return [parse_lora_spec(spec) for spec in config.sample.get("loras", ())]


@dataclasses.dataclass
class Experts:
    """One DiT, or Wan2.2 A14B's (high-noise, low-noise) pair with its boundary."""

    models: list[WanDiT]
    boundary: float | None = None

    def __post_init__(self):
        if len(self.models) not in (1, 2) or (len(self.models) == 2) != (self.boundary is not None):
            raise ValueError("give one model, or two (high noise, low noise) with a boundary")


def load_experts(config, mesh, rules, workdir: str | None = None) -> Experts:
    """The DiT(s) of ``config``, placed on ``mesh``: both A14B experts when
    ``sample.high_noise_checkpoint`` and ``sample.low_noise_checkpoint`` are set, else
    ``config.model`` with the weights a training run in ``workdir`` exported overlaid
    (``facecam*.safetensors``; its LoRA files, ``*_lora.safetensors``, merged at strength 1).
    Then the LoRA files of ``sample.loras`` (``"path"`` or ``"path:strength"``) are merged into
    every expert. ``model.quantize`` applies to every expert. Every file is checked before a
    model is built."""
    s, m = config.sample, config.model
    loras = lora_files(config)
    if s.high_noise_checkpoint or s.low_noise_checkpoint:
        if not (s.high_noise_checkpoint and s.low_noise_checkpoint):
            raise ValueError("set both sample.high_noise_checkpoint and sample.low_noise_checkpoint (Wan2.2 A14B)")
        kw = dict(config=m.dit, dtype=m.param_dtype, compute_dtype=m.compute_dtype, mesh=mesh, rules=rules,
                  attention=m.attention, quantize=m.quantize, loras=loras)
        high = load_dit(s.high_noise_checkpoint, overlay=list(s.high_noise_overlay) or None, **kw)
        low = load_dit(s.low_noise_checkpoint, overlay=list(s.low_noise_overlay) or None, **kw)
        return Experts([high, low], m.expert_boundary)
    exported = trained_files(workdir)
    if workdir and not exported:  # before the model is built: a wrong path fails at once
        raise FileNotFoundError(f"no trained weights (facecam*.safetensors) in {workdir}; train first or drop --workdir")
    trained_loras = [(path, 1.0) for path in exported if path.endswith(LORA_SUFFIX)]
    model = build.build_dit(config, mesh, rules)
    for path in exported:
        if not path.endswith(LORA_SUFFIX):
            log.info("%s", overlay_dit(model, path).summary())
    for report in apply_loras(model, trained_loras + loras, mesh=mesh, rules=rules):
        log.info("%s", report.summary())
    return Experts([model])


def on_mesh(state: nnx.State, mesh, rules, memory_kind: str | None = None) -> nnx.State:
    """A DiT state placed on ``mesh`` by its logical axes (a copy; wherever it lived before);
    ``memory_kind="pinned_host"`` keeps it in host memory with the same layout."""
    shardings = sh.state_shardings(state, mesh, rules)
    if memory_kind is not None:
        shardings = jax.tree.map(lambda s: s.with_memory_kind(memory_kind), shardings)
    return jax.device_put(state, shardings)


def offload_blocks(model: WanDiT, to_host) -> WanDiT:
    """Block offload on ``model`` (in place): the block kernels ``streamed_weights`` selects
    replaced by ``to_host(kernels)`` (arrays or shapes in host memory) and the model set to
    stream them layer by layer inside its scan. Returns ``model``."""
    kernels = nnx.state(model.blocks, streamed_weights)
    nnx.update(model.blocks, to_host(kernels))
    model.stream_blocks = True
    return model


def place_experts(experts: Experts, mesh, rules, offload: str) -> Experts:
    """``sample.offload`` applied to experts on ``mesh``: ``"experts"`` moves every expert to host
    memory (each phase brings its own to the device); ``"blocks"`` moves the stacked block
    weights to host memory and the models stream them layer by layer; ``"none"`` as given."""
    if offload == "none":
        return experts
    check_offload(offload, len(experts.models), mesh)
    models = []
    for model in experts.models:
        graphdef, state = nnx.split(model)
        if offload == "experts":
            state = on_mesh(state, mesh, rules, memory_kind="pinned_host")
            models.append(nnx.merge(graphdef, state))
        else:
            to_host = lambda kernels: on_mesh(kernels, mesh, rules, memory_kind="pinned_host")  # noqa: E731
            models.append(offload_blocks(nnx.merge(graphdef, state), to_host))
    return Experts(models, experts.boundary)


def check_options(config, mesh, num_experts: int) -> None:
    """What the config's sampling options need from this machine, checked before any weight
    loads (the values themselves were checked where the config loaded): the cache's calibration
    file, host memory to offload to, and a quantization mode the devices run."""
    s = config.sample
    if s.cache == "magcache" and not os.path.isfile(s.cache_calibration or ""):
        raise FileNotFoundError(f"sample.cache=magcache needs sample.cache_calibration, a ratio curve file "
                                f"(got {s.cache_calibration!r}); write one with tools/calibrate_cache.py")
    if s.offload != "none":
        check_offload(s.offload, num_experts, mesh)
    quant.check_mode(config.model.quantize, list(mesh.devices.flat))


def check_offload(offload: str, num_experts: int, mesh) -> None:
    """``sample.offload`` against the model and the devices: ``experts`` needs the A14B pair, and
    any offload needs host memory the devices can address (before any weight moves)."""
    if offload == "experts" and num_experts != 2:
        raise ValueError("sample.offload=experts keeps the waiting Wan2.2 A14B expert in host memory; this model "
                         "has one expert: use sample.offload=blocks to stream its layers, or none")
    device = mesh.devices.flat[0]
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(f"sample.offload needs pinned host memory, which {device.platform} devices "
                         f"({device.device_kind}) do not offer (they have {sorted(kinds)}); use sample.offload=none")


