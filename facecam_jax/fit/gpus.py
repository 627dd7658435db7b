"""Named NVIDIA GPUs without a GPU: compile-only devices from the CUDA PJRT plugin and a target
spec (``GpuTargetConfigProto`` text), and the memory a JAX run on that card may use.

``make_target("h100", "8")`` gives the compile-only devices of 8 H100s on one host
(``"2x8"``: 2 hosts of 8) as a ``chips.Target`` the fit tool compiles for. The specs are data
shipped beside this module (``gpu_specs/``): XLA's own files (``xla/backends/gpu/target_config/
specs/``, matched to the installed jaxlib) and, for cards XLA has none for (L40S, RTX 4090, L4),
specs this project wrote from published device properties, marked ``project`` below.

The verdict is judged against usable memory, not the card's: a JAX process takes
``XLA_PYTHON_CLIENT_MEM_FRACTION`` (default 0.75) of the memory at start-up unless
``XLA_PYTHON_CLIENT_PREALLOCATE=false``, and cuDNN's attention workspace is allocated at run
time beside XLA's buffer plan (``memory_analysis`` does not count it). Both read the same
environment variables the run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import math
import os
import re

from facecam_jax import build
from facecam_jax.perf.chips import BadTarget, GiB, Target

INSTALL = "pip install -e '.[gpu-aot]'"
DEFAULT_MEM_FRACTION = 0.75  # jax's default XLA_PYTHON_CLIENT_MEM_FRACTION


@dataclasses.dataclass(frozen=True)
class Gpu:
    spec: str  # file in gpu_specs/
    source: str  # "xla": XLA's spec file; "project": written here from published properties
    peak_flops: float  # dense bf16 FLOP/s (spec sheet, no sparsity)
    host_bandwidth: float  # bytes/s of the host link (PCIe Gen4 x16 32 GB/s, Gen5 64 GB/s)


GPUS = {
    "a100-40": Gpu("a100_sxm_40.txtpb", "xla", 312e12, 32e9),
    "a100-80": Gpu("a100_sxm_80.txtpb", "xla", 312e12, 32e9),
    "h100": Gpu("h100_sxm.txtpb", "xla", 989e12, 64e9),
    "h100-pcie": Gpu("h100_pcie.txtpb", "xla", 756e12, 64e9),
    "h200": Gpu("h200.txtpb", "xla", 989e12, 64e9),
    "b200": Gpu("b200.txtpb", "xla", 2250e12, 64e9),
    "l40s": Gpu("l40s.txtpb", "project", 362e12, 32e9),
    "rtx4090": Gpu("rtx4090.txtpb", "project", 165e12, 32e9),
    "l4": Gpu("l4.txtpb", "project", 121e12, 32e9),
}


# Words of a device's ``device_kind`` (lower case) -> the name of its spec, most specific first.
_KINDS = (("h100 pcie", "h100-pcie"), ("h100", "h100"), ("h200", "h200"), ("b200", "b200"),
          ("a100-sxm4-40gb", "a100-40"), ("a100-pcie-40gb", "a100-40"), ("a100", "a100-80"), ("l40s", "l40s"),
          ("4090", "rtx4090"), ("l4", "l4"))


def name_of(device_kind: str) -> str | None:
    """The spec name of a GPU as JAX reports it (``NVIDIA H100 80GB HBM3`` -> ``h100``), or None."""
    kind = device_kind.lower()
    return next((name for words, name in _KINDS if words in kind), None)


def spec_text(name: str) -> str:
    """The GpuTargetConfigProto text of a named GPU; BadTarget (one line listing the names) if unknown."""
    if name not in GPUS:
        raise BadTarget(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return importlib.resources.files("facecam_jax.fit").joinpath("gpu_specs", GPUS[name].spec).read_text()


def _field(text: str, key: str) -> str | None:
    match = re.search(rf"^\s*{key}:\s*\"?([^\"\n]+)\"?\s*$", text, re.MULTILINE)
    return match.group(1) if match else None


def spec_memory(text: str) -> int:
    """``device_memory_size``: the bytes the card reports (what XLA plans against)."""
    return int(_field(text, "device_memory_size"))


def spec_cudnn_version(text: str) -> int:
    """The spec's cuDNN version as ``cudnnGetVersion`` reports it (9.10.0 -> 91000, 8.9.4 -> 8904)."""
    block = re.search(r"dnn_version_info\s*{([^}]*)}", text)
    part = lambda k: int(_field(block.group(1), k) or 0) if block else 0  # noqa: E731
    major, minor, patch = part("major"), part("minor"), part("patch")
    return major * 10000 + minor * 100 + patch if major >= 9 else major * 1000 + minor * 100 + patch


def parse_topology(gpus: str | None) -> tuple[int, int]:
    """``--gpus``: "N" (one host of N) or "HxN" (H hosts of N) -> (hosts, gpus per host)."""
    match = re.fullmatch(r"(?:(\d+)x)?(\d+)", gpus or "1")
    if not match or int(match.group(2)) < 1 or int(match.group(1) or 1) < 1:
        raise BadTarget(f"--gpus must be N or HOSTSxN (e.g. 8, 2x8), got {gpus!r}")
    return int(match.group(1) or 1), int(match.group(2))


def compile_only_devices(text: str, hosts: int, per_host: int) -> tuple:
    """The CUDA plugin's compile-only devices for ``hosts`` x ``per_host`` GPUs of that spec."""
    import importlib.util

    if not any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)):  # only to say how to install
        raise BadTarget(f"compiling for a GPU without one needs the CUDA PJRT plugin: {INSTALL}")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}", target_config=text)
    except NotImplementedError as e:  # the plugin did not register (it failed to initialize)
        raise BadTarget(f"the CUDA plugin is installed but not loaded ({e}); run with JAX_PLATFORMS=cpu, or "
                        f"reinstall it: {INSTALL}") from e
    except Exception as e:  # noqa: BLE001  XLA's messages are one status line
        raise BadTarget(f"the installed CUDA plugin rejects the spec: {str(e).splitlines()[0][:300]}") from e
    return tuple(topology.devices)


def usable_memory(device_memory: int) -> tuple[int, str]:
    """The bytes a JAX process may give XLA's buffers on a card of ``device_memory``, and how
    that figure was reached (from the environment variables a run on that card reads)."""
    preallocate = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() not in ("false", "0")
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
    if not preallocate:
        return device_memory, f"all {device_memory / GiB:.2f} GiB (XLA_PYTHON_CLIENT_PREALLOCATE=false)"
    default = "" if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ else ": jax's default; a run may set 0.95"
    return int(device_memory * fraction), (f"{fraction:g} x {device_memory / GiB:.2f} GiB "
                                           f"(XLA_PYTHON_CLIENT_MEM_FRACTION{default})")


def make_target(name: str, gpus: str | None = None) -> Target:
    """Compile-only devices of ``gpus`` (``"8"``, ``"2x8"``) GPUs named ``name`` (``h100``)."""
    text = spec_text(name)
    hosts, per_host = parse_topology(gpus)
    devices = compile_only_devices(text, hosts, per_host)
    gpu = GPUS[name]
    usable, how = usable_memory(spec_memory(text))
    source = f"{how}; spec {gpu.spec}, {'XLA' if gpu.source == 'xla' else 'written here from published properties'}"
    topology = f"{name}:{hosts}x{per_host}" if hosts > 1 else f"{name}:{per_host}"
    return Target(topology, devices, devices[0].device_kind, len(devices), gpu.peak_flops, usable, source,
                  gpu.host_bandwidth, compile_only=True, cudnn_version=spec_cudnn_version(text))


def attention_workspace(config, program: str, devices: int) -> int:
    """Estimated bytes of cuDNN attention workspace per device, allocated beside XLA's plan: the
    training step's backward keeps an fp32 dQ accumulator of one attention call (B x L x N x H x
    4 bytes of the batch, tokens and heads this device holds); the forward's is small: 0."""
    if program != "train":
        return 0
    dit = build.dit_config(config)
    tokens, _ = build.token_counts(config)
    context, tensor = max(1, config.mesh.context), max(1, config.mesh.tensor)
    batch = math.ceil(config.data.batch_size / max(1, devices // (context * tensor)))
    return batch * math.ceil(tokens / context) * math.ceil(dit.num_heads / tensor) * dit.head_dim * 4


def reserve_workspace(target: Target, config, program: str, attention: str) -> Target:
    """``target`` with cuDNN attention's workspace taken off its usable memory (compile-only GPUs
    whose attention resolves to cuDNN)."""
    if not (compile_only_gpu(target) and "cudnn" in attention):
        return target
    workspace = attention_workspace(config, program, len(target.devices))
    if not workspace:
        return target
    return dataclasses.replace(target, hbm_per_device=target.hbm_per_device - workspace,
                               hbm_source=f"{target.hbm_source}; less {workspace / GiB:.2f} GiB of cuDNN attention "
                                          "workspace (estimated: backward's fp32 dQ accumulator)")


def compile_only_gpu(target: Target) -> bool:
    return target.compile_only and target.platform == "gpu"


def check_supported(target: Target, config, program: str) -> None:
    """BadTarget for what a compile-only GPU cannot express: block streaming places weights in
    host memory inside the program, and the plugin's compile-only devices have no memory spaces
    (``addressable_memories()`` is empty: a ``pinned_host`` sharding silently stays on the device)."""
    if compile_only_gpu(target) and program == "sample" and config.sample.offload == "blocks":
        raise BadTarget("sample.offload=blocks cannot be compiled for a GPU without one: the CUDA plugin's "
                        "compile-only devices have no host memory space; run the fit tool on the GPU itself, "
                        "or use sample.offload=experts")


def compiler_options(target: Target) -> dict:
    """XLA options for a compile-only GPU: GEMMs through cuBLAS. On a GPU, XLA autotunes each GEMM
    between Triton and cuBLAS; without one it takes Triton's default tiling, which XLA 0.10.2
    cannot tile for some small f32 dots ("Couldn't find output tile sizes"). cuBLAS's workspace
    is in XLA's plan either way."""
    if compile_only_gpu(target):
        return {"xla_gpu_enable_triton_gemm": False}
    return {}


@contextlib.contextmanager
def cudnn_as_on(target: Target):
    """Lowering for a compile-only GPU: jax checks the cuDNN library's version before it emits
    cuDNN flash attention, and with no cuDNN installed here that check fails; the spec names the
    version the card runs, so the check answers that while the program is traced."""
    if not (compile_only_gpu(target) and target.cudnn_version):
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # no public hook for this check

    try:
        cudnn_attention.check_cudnn_version()
        yield  # a cuDNN library is loadable: the real check stands
        return
    except RuntimeError:
        pass
    real = cudnn_attention.check_cudnn_version
    cudnn_attention.check_cudnn_version = lambda: target.cudnn_version
    try:
        yield
    finally:
        cudnn_attention.check_cudnn_version = real


