"""What every benchmark prints about the machine it ran on."""

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
