"""What a chip can do: the one table of dense bf16 peaks and memory, the devices of a named TPU
topology (libtpu's compile-only client: no TPU needed), and the memory a device may use.

Used by the fit tool (``facecam_jax.fit``) and by training's MFU (``facecam_jax.training.trainer``).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # short name: v5e, v5p, H100, ...
    peak_flops: float  # dense bf16 FLOP/s per chip (spec sheet)
    hbm: int  # bytes per chip (spec sheet; the compiler's own limit is preferred where known)
    # Bytes/s between one chip and its host's memory: NOT a measurement or a published figure
    # for the TPUs, an assumed PCIe x16 link (Gen4 32 GB/s; Gen5 64 GB/s for H100/H200/v7x), used
    # only to put offloading's traffic into seconds.
    host_bandwidth: float = 32e9


# Keyed by the device kind JAX reports (TPU), or a substring of it (GPU: "NVIDIA H100 80GB HBM3").
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 32 * GiB),
    "TPU v5 lite": Chip("v5e", 197e12, 16 * GiB),
    "TPU v5": Chip("v5p", 459e12, 95 * GiB),
    "TPU v6 lite": Chip("v6e", 918e12, 32 * GiB),
    "TPU7x": Chip("v7x", 2307e12, 192 * GiB, 64e9),
    # GPUs: more specific names first (chip_of takes the first key found in the device kind).
    "H100 PCIe": Chip("H100 PCIe", 756e12, 80 * GiB, 64e9),
    "H100": Chip("H100", 989e12, 80 * GiB, 64e9),
    "H200": Chip("H200", 989e12, 141 * GiB, 64e9),
    "B200": Chip("B200", 2250e12, 180 * GiB, 64e9),
    "A100-SXM4-40GB": Chip("A100", 312e12, 40 * GiB),
    "A100": Chip("A100", 312e12, 80 * GiB),
    "L40S": Chip("L40S", 362e12, 48 * GiB),
    "RTX 4090": Chip("RTX 4090", 165e12, 24 * GiB),
    "L4": Chip("L4", 121e12, 24 * GiB),
}


def chip_of(kind: str) -> Chip | None:
    """The table entry for a device kind, or None (CPU, an unlisted chip)."""
    if kind in CHIPS:
        return CHIPS[kind]
    for key, chip in CHIPS.items():
        if not key.startswith("TPU") and key in kind:
            return chip
    return None


def peak_flops(device, override: float | None = None) -> float | None:
    """Dense bf16 FLOP/s of one ``device`` (``override``, in TFLOP/s, wins; None: not known)."""
    if override:
        return float(override) * 1e12
    chip = chip_of(device.device_kind)
    return None if chip is None else chip.peak_flops


class BadTarget(ValueError):
    """The topology or mesh asked for cannot be built (the fit tool exits 2)."""


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
    host_bandwidth: float | None = None  # bytes/s of one chip's host link (assumed: Chip.host_bandwidth)
    compile_only: bool = False  # a named topology: devices to compile for, none to run on
    cudnn_version: int | None = None  # compile-only GPUs: the cuDNN version their spec names

    @property
    def is_tpu(self) -> bool:
        return self.devices[0].platform == "tpu"

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @property
    def peak_flops(self) -> float | None:
        return None if self.peak_flops_per_chip is None else self.peak_flops_per_chip * self.chips


def tpu_topology(name: str) -> tuple:
    """The compile-only devices of a named TPU topology (``v5p:2x2x2``); BadTarget if unknown."""
    match = re.fullmatch(r"([a-zA-Z0-9]+):(\d+(?:x\d+)*)", name)
    if not match:
        raise BadTarget(f"topology {name!r} is not of the form CHIP:AxB[xC] (e.g. v5e:2x2, v5p:2x2x2, v6e:2x4)")
    dims = [int(d) for d in match.group(2).split("x")]
    kwargs = {}
    host = (2, 2, 1)  # libtpu's default chips per host; smaller slices need their own bounds
    if any(d < h for d, h in zip(dims, host)):
        kwargs["chips_per_host_bounds"] = tuple(min(d, h) for d, h in zip(dims + [1] * (3 - len(dims)), host))
    try:
        import libtpu  # noqa: F401  (only to say how to install it)
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


def hbm_from_message(text: str) -> int | None:
    """The device memory an out-of-memory compiler message says is available."""
    return _bytes_in(text, r"available HBM \(([\d.]+)([KMGT]?)\)", r"of ([\d.]+)([KMGT]?) hbm")


def required_from_message(text: str) -> int | None:
    """The device memory an out-of-memory compiler message says the program needs."""
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
            found = hbm_from_message(str(e))
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
    chip = chip_of(devices[0].device_kind)
    # A v4 chip's two TensorCores show as two devices on the compile-only client.
    chips = len({tuple(d.coords) for d in devices}) if all(hasattr(d, "coords") for d in devices) else len(devices)
    hbm, source = hbm_bytes(devices[0])
    if hbm is None and chip is not None:
        hbm, source = chip.hbm * chips // len(devices), "spec sheet"
    return Target(topology or "local", devices, chip.name if chip else devices[0].device_kind, chips,
                  chip.peak_flops if chip else None, hbm, source, chip.host_bandwidth if chip else None,
                  compile_only=bool(topology))


def no_persistent_cache() -> None:
    """A TPU or GPU executable written into JAX's persistent cache cannot be read back by the CPU
    client (a warning and a recompile), so compile-only targets do not use it."""
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
