"""What every benchmark prints about the machine it ran on, and small shared formatters."""

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    """JAX device kind, CPU model and core count, jax version: one line."""
    import jax

    dev = jax.devices()[0]
    return f"{dev.platform}:{dev.device_kind} | CPU {cpu_model()} x{os.cpu_count()} | jax {jax.__version__}"


def si(flops: float) -> str:
    """A FLOP count with its SI prefix."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops / 1e6:.2f} MFLOP"


def peak_bytes(device=None) -> int | None:
    """The device's peak memory in use so far (``memory_stats``; None where it is not reported)."""
    import jax

    try:
        stats = (device or jax.devices()[0]).memory_stats()
    except Exception:  # noqa: BLE001  not every backend reports it
        return None
    return (stats or {}).get("peak_bytes_in_use")
