"""The fit tool's report: what a compiled program needs per device against what the chip has,
its analytic FLOPs and time at the peak, and the verdict (text and JSON)."""

from __future__ import annotations

import dataclasses

FITS, DOES_NOT_FIT, BAD_ARGUMENTS = 0, 3, 2
GiB = 2**30


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


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
    host: int = 0  # host memory the program's arguments and temporaries take (offloaded weights)
    host_elsewhere: int = 0  # host memory holding what waits beside it (the other offloaded expert)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.resident_elsewhere

    def line(self, hbm: int | None = None) -> str:
        """The per-device plan in one line (and against ``hbm``, the device's memory, if known)."""
        extra = f" + {gib(self.resident_elsewhere)} resident beside it" if self.resident_elsewhere else ""
        text = (f"{self.name:<10} per device: arguments {gib(self.arguments)}, outputs {gib(self.outputs)} "
                f"(aliased {gib(self.aliased)}), temporaries {gib(self.temporaries)}, code {self.code / 2**20:.1f} MiB"
                f"{extra} = {gib(self.total)}")
        if hbm:
            text += f" of {gib(hbm)} ({100 * self.total / hbm:.0f}%)"
        if self.host or self.host_elsewhere:
            text += f"; host memory {gib(self.host + self.host_elsewhere)}"
        return text + f"; compiled in {self.seconds:.1f} s"

    @classmethod
    def of(cls, name: str, compiled, seconds: float, resident_elsewhere: int = 0, host_elsewhere: int = 0) -> "Compiled":
        mem = compiled.memory_analysis()
        get = lambda f: int(getattr(mem, f, 0) or 0)  # noqa: E731
        host = get("host_argument_size_in_bytes") + get("host_temp_size_in_bytes")
        return cls(name, get("argument_size_in_bytes"), get("output_size_in_bytes"), get("alias_size_in_bytes"),
                   get("temp_size_in_bytes"), get("generated_code_size_in_bytes"), seconds, resident_elsewhere,
                   host, host_elsewhere)


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
    lora_rank: int
    hbm: int | None
    hbm_source: str
    flops: dict
    peak_flops: float | None
    compiled: list = dataclasses.field(default_factory=list)  # Compiled
    options: str = ""  # sampling: solver, cache, quantization, offload, windows
    host_traffic: int = 0  # bytes per video that cross between host and device memory, per device
    host_bandwidth: float | None = None  # bytes/s of one chip's host link (assumed, chips.CHIPS)
    out_of_memory: dict | None = None  # {"program", "required", "available", "message"}
    seconds: float = 0.0  # all compiles
    optimizer_bytes: int = 0  # the training step's optimizer state, all devices together
    optimizer_device_bytes: int = 0  # ... on one device

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
        mesh = " ".join(f"{k} {v}" for k, v in self.mesh.items())
        lines = [
            f"program    {self.program} ({self.config})",
            f"target     {self.target}: {self.devices} x {self.chip} devices ({self.chips} chip"
            f"{'s' if self.chips > 1 else ''}), mesh {mesh}",
            f"model      {self.model}, {self.experts} x {_count(self.params / self.experts)} parameters"
            + (f", {_count(self.trainable)} trainable" if self.trainable else "")
            + (f" (LoRA rank {self.lora_rank}: adapters, and the selection's non-linear parameters in full)"
               if self.lora_rank else "")
            + (f", remat {self.remat}" if self.program == "train" else "") + f", attention {self.attention}",
            f"input      batch {self.batch}, {self.tokens:,} tokens per sample",
        ]
        if self.optimizer_bytes:
            lines.append(f"optimizer  {gib(self.optimizer_bytes)} of AdamW state ({gib(self.optimizer_device_bytes)} per device)")
        if self.options:
            lines.append(f"sampling   {self.options}")
        lines += [c.line() for c in self.compiled]
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
        if self.host_traffic:
            seconds = f", {self.host_traffic / self.host_bandwidth:.3g} s at an assumed {self.host_bandwidth / 1e9:.0f} " \
                      "GB/s host link per chip" if self.host_bandwidth else ""
            lines.append(f"host link  {gib(self.host_traffic)} per device cross between host and device memory per "
                         f"run{seconds}")
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
