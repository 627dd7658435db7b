"""Does it fit? The real training or sampling program, compiled ahead of time from shapes.

``analyze(config, program, topology)`` builds the training step (``train_step.build_program(...,
abstract=True)``: the preset DiT, trainable subset or its LoRA adapters, optimizer state, frozen VAE encode, batch
over (data, fsdp)) or the sampling program (``sp.sample_program``: both Wan2.2 A14B
experts in one jitted Euler loop with CFG, plus the VAE encode and decode that run beside
them) from the factory's abstract models, on the config's mesh over the devices of a named
TPU topology (``chips.tpu_topology``), of named NVIDIA GPUs (``gpus.make_target``: the CUDA
plugin's compile-only devices) or the local devices. It compiles them and reports
(``perf.report.Report``) the trained parameters and optimizer-state bytes, per-device memory
from XLA's buffer plan, the device's memory, the
analytic FLOPs (``flops.step_flops``), the time at the bf16 peak, and a verdict.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import build, conditioning
from facecam_jax import sharding as sh
from facecam_jax.fit import gpus
from facecam_jax.models import attention, wan_dit
from facecam_jax.perf import chips
from facecam_jax.perf.chips import BadTarget, GiB, Target
from facecam_jax.perf.flops import step_flops
from facecam_jax.perf.report import BAD_ARGUMENTS, DOES_NOT_FIT, FITS, Compiled, Report
from facecam_jax.sampling import experts as experts_lib
from facecam_jax.sampling import program as sp
from facecam_jax.sampling.inputs import abstract_inputs
from facecam_jax.training.train_step import build_program

log = logging.getLogger(__name__)

__all__ = ["BAD_ARGUMENTS", "DOES_NOT_FIT", "FITS", "BadTarget", "Compiled", "OutOfMemory", "analyze"]


class OutOfMemory(Exception):
    """The program needs more than the device's memory: XLA refused it at compile, or its
    arguments alone exceed the HBM (then it is not compiled at all)."""

    def __init__(self, name: str, message: str, seconds: float, required: int | None = None,
                 available: int | None = None):
        super().__init__(message)
        self.name, self.seconds = name, seconds
        self.required = required or chips.required_from_message(message)
        self.available = available or chips.hbm_from_message(message)


def _check_arguments(name: str, arguments: int, hbm: int | None) -> None:
    """Skips a compile that cannot fit: the per-device arguments alone exceed the HBM."""
    if hbm is not None and arguments > hbm:
        raise OutOfMemory(name, f"the arguments alone need {arguments / GiB:.2f} GiB per device, more than the "
                          f"{hbm / GiB:.2f} GiB of HBM; not compiled", 0.0, arguments, hbm)


def _compile(name: str, lowered_fn, resident_elsewhere: int = 0, host_elsewhere: int = 0,
             options: dict | None = None) -> Compiled:
    start = time.perf_counter()
    try:
        compiled = lowered_fn().compile(compiler_options=options or None)
    except Exception as e:  # noqa: BLE001  XLA raises a generic runtime error
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            raise OutOfMemory(name, str(e).splitlines()[0], time.perf_counter() - start) from e
        raise
    result = Compiled.of(name, compiled, time.perf_counter() - start, resident_elsewhere, host_elsewhere)
    log.info("%s compiled in %.1f s", name, result.seconds)
    return result


def device_bytes(tree, memory_kind: str | None = None) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard); with
    ``memory_kind`` ("device", "pinned_host"), only the leaves placed in that memory."""
    total = 0
    for x in jax.tree.leaves(tree):
        kind = getattr(getattr(x, "sharding", None), "memory_kind", None) or "device"
        if memory_kind is not None and kind != memory_kind:
            continue
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _under_mesh(mesh, rules, jitted, *args):
    """A thunk lowering ``jitted(*args)`` under the mesh, where activations are pinned."""
    def lower():
        with sh.use_mesh(mesh, rules):
            return jitted.lower(*args)
    return lower


def _train_programs(config, mesh, rules, hbm: int | None, info: dict, options: dict) -> list[Compiled]:
    """The training step; ``info`` receives its parameter counts and optimizer-state bytes
    (before a compile that may not fit)."""
    # Built outside the mesh context (optax's state-sharding helper runs an init eagerly, which a
    # compile-only device cannot execute); traced inside it, where activations are pinned.
    program = build_program(config, mesh, rules, abstract=True)
    info.update(params=program.num_params, trainable=program.num_trainable, experts=1,
                optimizer_bytes=program.optimizer_bytes,
                optimizer_device_bytes=device_bytes(program.state.opt_state))
    args = (program.state, program.frozen, program.vae_state, program.context, program.batch)
    _check_arguments("train step", device_bytes(args), hbm)
    return [_compile("train step", _under_mesh(mesh, rules, program.step, *args), options=options)]


def _on_host(tree):
    """Sharded shapes moved to host memory (``pinned_host``), same layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding.with_memory_kind(
        "pinned_host")), tree)


def _without_progress(graphdef, options) -> sp.SampleProgram:
    """``sp.sample_program`` without its per-step progress callback: jax lowers a host callback
    only with the target platform's runtime loaded, which a compile-only GPU target has not
    (the callback sends one scalar per step to the host: nothing in the memory plan)."""
    if options.phases()[0][0] is None:
        return sp.SampleProgram(jax.jit(sp.make_sample_fn(graphdef, options)), sp.StepProgress())
    return sp.SampleProgram(None, sp.StepProgress(), tuple(
        (e, a, b, jax.jit(sp.make_sample_fn(graphdef, options, phase=(e, a, b)))) for e, a, b in options.phases()))


def _sample_programs(config, mesh, rules, hbm: int | None, *, with_vae: bool = True, frames: int | None = None,
                     compiler_options: dict | None = None, host_callbacks: bool = True) -> tuple[list[Compiled], dict]:
    """The sampling loop (both experts resident, or offloaded as ``sample.offload`` says, over
    the windows of a ``frames``-frame video) and, beside it, the VAE encode and decode.
    ``host_callbacks`` False: the loop without its progress callback (compile-only GPUs)."""
    d, s = config.data, config.sample
    frames = frames or d.frames
    compile_ = functools.partial(_compile, options=compiler_options)
    replicated = NamedSharding(mesh, PartitionSpec())
    dit = build.abstract_dit(config, mesh, rules)
    if s.offload == "blocks":  # the stacked block weights wait in host memory, streamed layer by layer
        experts_lib.offload_blocks(dit, _on_host)
    n = build.num_experts(config)
    options, windows = sp.options_for(config, n, frames)
    state = nnx.state(dit)
    graphdef = nnx.graphdef(dit)
    states = tuple(state for _ in range(n))
    vae_graphdef, vae_state = nnx.split(build.abstract_vae(config, mesh))
    # Extended clips (sample.extend=clip) run the program once per clip: one clip's program.
    inputs = abstract_inputs(config, conditioning.of(config), dit.config, mesh, d.frames if options.context else frames,
                             options.windows, context=options.context)
    window_frames = d.frames if windows else frames
    program = sp.sample_program(graphdef, options) if host_callbacks else _without_progress(graphdef, options)
    expert_device = device_bytes(states[0], "device")
    expert_host = device_bytes(states[0], "pinned_host")
    vae_bytes = device_bytes(vae_state)
    out = []
    if program.fn is not None:
        _check_arguments("sample loop", n * expert_device + vae_bytes, hbm)
        out.append(compile_("sample loop", _under_mesh(mesh, rules, program.fn, states, inputs), vae_bytes))
        traffic = options.steps * expert_host  # blocks: every step streams the running expert's layers in
    else:  # one program per expert phase: that expert on the device, the other in host memory
        _check_arguments("sample loop", expert_device + vae_bytes, hbm)
        shape = None if options.cache is None else sp.cache_shape(dit.config, options, inputs.source.shape)
        carry = jax.eval_shape(sp.initial_carry_fn(options, shape), inputs.noise)
        carry = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), carry)
        for expert, start, stop, fn in program.phases:
            name = f"{('high', 'low')[expert]}-noise steps {start}-{stop - 1}"
            out.append(compile_(name, _under_mesh(mesh, rules, fn, states[expert], inputs, carry),
                                vae_bytes, host_elsewhere=expert_device))
        traffic = n * expert_device  # each expert comes to the device once per video
    if with_vae:
        video = jax.ShapeDtypeStruct((1, window_frames, d.height, d.width, 3), jnp.float32,
                                     sharding=replicated)  # the sampler encodes one clip (window) at a time
        encode = jax.jit(lambda st, v: nnx.merge(vae_graphdef, st).encode(v))
        decode = jax.jit(lambda st, z: nnx.merge(vae_graphdef, st).decode(z))
        beside = n * expert_device if program.fn is not None else 0  # offloaded experts are not on the device
        out.append(compile_("VAE encode", _under_mesh(mesh, rules, encode, vae_state, video), beside))
        lat = inputs.source
        one = jax.ShapeDtypeStruct((1, *lat.shape[1:]), lat.dtype, sharding=replicated)  # and decodes one window
        out.append(compile_("VAE decode", _under_mesh(mesh, rules, decode, vae_state, one), beside))
    params = n * sum(x.size for x in jax.tree.leaves(states[0]))
    described = (f"{options.solver} {options.steps} steps, CFG {options.guidance}, cache "
                 f"{'magcache' if options.cache else 'none'}, weights {config.model.quantize}, offload {s.offload}, "
                 f"{frames} frames" + (f" in {windows.count} {'clips' if options.context else 'windows'} of "
                                       f"{d.frames}" if windows else ""))
    return out, {"params": params, "trainable": 0, "experts": n, "options": described,
                 "host_traffic": traffic if s.offload != "none" else 0}


def attention_used(config, target: Target) -> str:
    """What ``model.attention`` resolves to on the target (the model's own dispatch rule)."""
    impl = config.model.attention
    if impl != "auto":
        return impl
    dit = build.dit_config(config)
    return "auto -> " + attention.resolve(impl, target.platform, jnp.dtype(config.model.compute_dtype), dit.head_dim)


def _program_flops(config, program: str, frames: int | None) -> dict[str, float]:
    if program == "train":
        return step_flops(config, "train")
    options, windows = sp.options_for(config, build.num_experts(config), frames or config.data.frames)
    return step_flops(config, "sample", windows=windows.count if windows else 1, evaluations=options.evaluations()[0])


def analyze(config, program: str, topology: str | None = None, *, config_name: str = "", with_vae: bool = True,
            target: Target | None = None, frames: int | None = None) -> Report:
    """Builds ``program`` ("train" or "sample") of ``config`` on the target's devices from shapes
    only, compiles it, and reports memory, FLOPs and whether it fits. BadTarget: the topology
    or mesh cannot be built."""
    if program not in ("train", "sample"):
        raise BadTarget(f"--program must be 'train' or 'sample', got {program!r}")
    target = target or chips.make_target(topology)
    if target.is_tpu or target.compile_only:
        chips.no_persistent_cache()
    gpus.check_supported(target, config, program)
    attention_impl = attention_used(config, target)
    target = gpus.reserve_workspace(target, config, program, attention_impl)
    options = gpus.compiler_options(target)
    try:
        mesh, rules = build.mesh_and_rules(config, devices=target.devices)
    except ValueError as e:
        raise BadTarget(f"{e} (the {target.name} target); set --config.mesh.* so that the mesh divides it") from e
    d = config.data
    dit_config = build.dit_config(config)
    tokens, _ = build.token_counts(config)
    report = Report(
        program=program, config=config_name, target=target.name, chip=target.chip, devices=len(target.devices),
        chips=target.chips, mesh=dict(mesh.shape), model=config.model.dit, remat=config.model.remat,
        attention=attention_impl, tokens=tokens,
        batch=d.batch_size if program == "train" else 1, params=0, trainable=0, experts=1,
        lora_rank=config.train.lora_rank if program == "train" else 0,
        hbm=target.hbm_per_device, hbm_source=target.hbm_source, flops=_program_flops(config, program, frames),
        peak_flops=target.peak_flops,
    )
    start = time.perf_counter()
    info: dict = {}
    try:
        with gpus.cudnn_as_on(target):
            if program == "train":
                report.compiled = _train_programs(config, mesh, rules, target.hbm_per_device, info, options)
            else:
                report.compiled, sampled = _sample_programs(config, mesh, rules, target.hbm_per_device,
                                                            with_vae=with_vae, frames=frames,
                                                            compiler_options=options,
                                                            host_callbacks=not gpus.compile_only_gpu(target))
                info.update(sampled)
                report.options, report.host_traffic = info["options"], info["host_traffic"]
                report.host_bandwidth = target.host_bandwidth
    except OutOfMemory as e:
        report.out_of_memory = {"program": e.name, "required": e.required, "available": e.available,
                                "message": str(e), "seconds": e.seconds}
        if not info:  # the sampling program: counted from the preset
            n = build.num_experts(config) if program == "sample" else 1
            info = {"experts": n, "params": n * wan_dit.param_count(wan_dit.abstract_model(dit_config)), "trainable": 0}
    report.params, report.trainable, report.experts = info["params"], info["trainable"], info["experts"]
    report.optimizer_bytes = info.get("optimizer_bytes", 0)
    report.optimizer_device_bytes = info.get("optimizer_device_bytes", 0)
    report.seconds = time.perf_counter() - start
    return report
