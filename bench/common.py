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


def bootstrap(diff, rng, n: int = 4000) -> tuple[float, float, float]:
    """Mean of paired differences (numpy [N]) and its 95% percentile bootstrap interval over pairs."""
    import numpy as np

    means = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def write_report(out: str, result: dict, text: str) -> None:
    """An evaluation's ``result`` as JSON at ``out`` and its Markdown ``text`` beside it (``.md``)."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text + "\n")


def ship_bf16(src: str, out: str) -> None:
    """A run's exported weights ``src`` written to ``out`` in bfloat16 (half the bytes; the loader
    casts to the model's dtype), with a line saying so."""
    import ml_dtypes
    import numpy as np

    from facecam_jax.checkpoints.io import open_checkpoint, write_safetensors

    refs = open_checkpoint(src)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_safetensors(out, {k: (lambda r=r: np.asarray(r.load()).astype(ml_dtypes.bfloat16)) for k, r in refs.items()})
    print(f"{src} -> {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
