"""FaceCam fine-tuning: the loop around the jitted step (``facecam_jax.training.train_step``).

``train(config, workdir)`` checks the config (``config_check``), joins the processes of a
multi-process run, locks ``workdir`` for this run (``facecam_jax.training.lock``: a second run
on it fails at once naming the first), builds the program on the mesh, resumes from the newest
usable checkpoint in ``workdir`` (Orbax: trainable parameters, optimizer state, step, the data
position, the config and checksums of the arrays; any mesh or process count; damaged steps are
set aside, ``facecam_jax.training.run_state``), compiles the step once, and steps the Grain
stream. Always on: loss, grad / param / update norms, step time, and a NaN/Inf guard that keeps
the last finite state, checkpoints it and stops with a clear message (in the first steps after
a restore it names the checkpoint as the likely cause and writes no new step, which restarts
would resume). A checkpoint that cannot be saved for lack of disk space stops the run at once
with one line. SIGTERM / SIGINT finish the current step, checkpoint it on every process and
return (``facecam_jax.training.preemption``); a restart resumes there. Every run ends with
a one-line summary (steps, skipped samples by reason, checkpoints written). At the end the
trained parameters are also written as a partial state dict (original Wan naming) that
``load_dit(..., overlay=...)`` applies over the base model, the same form as the released
FaceCam weights; a LoRA run (``train.lora_rank > 0``) writes its adapters beside it
as a diffusers/PEFT LoRA file (``export_trained``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import build, conditioning
from facecam_jax import sharding as sh
from facecam_jax.checkpoints.dit import save_dit
from facecam_jax.checkpoints.dit_naming import keys_of_paths, named_variables
from facecam_jax.checkpoints.lora import save_lora
from facecam_jax.data import transforms
from facecam_jax.data.pipeline import make_train_iterator
from facecam_jax.errors import TrainingDiverged
from facecam_jax.models.lora import LoRAParam
from facecam_jax.models.wan_dit import WanDiT
from facecam_jax.perf import chips
from facecam_jax.perf.flops import Throughput
from facecam_jax.perf.report import Compiled
from facecam_jax.runtime import progress
from facecam_jax.runtime.config_check import validate
from facecam_jax.training.distributed import initialize_distributed
from facecam_jax.training.lock import held_by_process_zero
from facecam_jax.training.metric_logger import Logger
from facecam_jax.training.preemption import Preemption
from facecam_jax.training.run_state import Checkpoints
from facecam_jax.training.train_step import TrainProgram, build_program

log = logging.getLogger(__name__)

SUSPECT_STEPS = 10  # a non-finite loss this soon after a restore blames the checkpoint and saves no new step


@dataclasses.dataclass
class RunResult:
    step: int
    model: WanDiT
    last_metrics: dict
    exported: str | None  # the partial state dict of the fully trained parameters (process 0)
    exported_lora: str | None = None  # a LoRA run's adapters (process 0)
    preempted: bool = False  # stopped by SIGTERM / SIGINT after checkpointing `step`
    summary: str = ""  # the run's last log line


@dataclasses.dataclass
class _Loop:
    """What the loop did, for the summary line."""

    start: int = 0
    step: int = 0
    stopped_by: str | None = None  # the signal that stopped the run, if one did
    diverged: bool = False
    skips_before: dict = dataclasses.field(default_factory=dict)
    resumed_from: int | None = None  # the checkpoint step this run restored, if any


def train(config, workdir: str, mesh: jax.sharding.Mesh | None = None) -> RunResult:
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns the final state.

    ``mesh`` defaults to ``config.mesh`` over all (global) devices."""
    validate(config)
    initialize_distributed(config.distributed)
    default_mesh, rules = build.mesh_and_rules(config)
    mesh = mesh or default_mesh
    os.makedirs(workdir, exist_ok=True)
    # One run per workdir (process 0 holds the lock), taken before anything is written there.
    with held_by_process_zero(workdir, "training"):
        return _train(config, workdir, mesh, rules)


def _train(config, workdir: str, mesh: jax.sharding.Mesh, rules) -> RunResult:
    with sh.use_mesh(mesh, rules):
        # A bad mesh, batch size or dataset fails before any model is built.
        batch_sharding = sh.batch_sharding(mesh, config.data.batch_size, rules)
        logger = Logger(workdir)
        ckpt = Checkpoints(workdir, config.train.keep_checkpoints, config)
        loop = _Loop(skips_before=transforms.skip_counts())
        try:
            logger.info("mesh %s on %d %s devices (%d processes)", dict(mesh.shape), mesh.size,
                        mesh.devices.flat[0].platform, jax.process_count())
            try:
                with Preemption() as preemption:
                    program, state, metrics = _run(config, workdir, mesh, rules, ckpt, logger, batch_sharding,
                                                   preemption, loop)
            except TrainingDiverged:  # every process sees the same loss: all of them get here
                loop.diverged = True
                ckpt.wait()
                _log0(run_summary(config, loop, ckpt.written, transforms.skip_counts()))
                raise
            ckpt.wait()
            if loop.stopped_by:
                logger.info("preempted at step %d (%s): checkpoint saved; start the same command again to "
                            "resume", loop.step, loop.stopped_by)
        finally:
            ckpt.close()
            logger.close()

    model = nnx.merge(program.graphdef, state.params, program.frozen)
    exported = exported_lora = None  # a preempted run exports with its last step, after the restart
    if not loop.stopped_by and int(state.step) == 0:
        _log0(f"train.steps={config.train.steps}: nothing was trained, so nothing is exported")
    elif not loop.stopped_by:
        exported, exported_lora = export_trained(program, state.params, mesh, workdir, config)
    summary = run_summary(config, loop, ckpt.written, transforms.skip_counts())
    _log0(summary)
    return RunResult(int(state.step), model, metrics, exported, exported_lora, preempted=bool(loop.stopped_by),
                     summary=summary)


def _log0(line: str) -> None:
    if jax.process_index() == 0:
        log.info("%s", line)


def _skips(now: dict, before: dict) -> dict[str, int]:
    """Samples skipped during this run by reason, summed over every process."""
    reasons = list(transforms.SKIP_REASONS)
    delta = {r: now.get(r, 0) - before.get(r, 0) for r in set(now) | set(before)}
    counts = np.array([delta.get(r, 0) for r in reasons] + [sum(v for r, v in delta.items() if r not in reasons)],
                      np.int32)
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, len(counts)).sum(0)
    return {r: int(n) for r, n in zip([*reasons, "other"], counts) if n}


def run_summary(config, loop: _Loop, written: list[int], skips_now: dict) -> str:
    """The last line of a run: steps, skipped samples by reason, checkpoints written."""
    skipped = _skips(skips_now, loop.skips_before)
    total = sum(skipped.values())
    skip_text = (f"{total} skipped samples ({', '.join(f'{r}: {n}' for r, n in skipped.items())})" if total
                 else "no sample skipped")
    if config.data.workers > 0:
        skip_text += " (data.workers > 0: skips inside the worker processes are only in their log lines)"
    ran = loop.step - loop.start
    end = (f"preempted by {loop.stopped_by}" if loop.stopped_by else "stopped: the loss diverged" if loop.diverged
           else "finished")
    saved = ", ".join(map(str, written)) if written else "none"
    return (f"run summary: steps {loop.start} -> {loop.step} of {config.train.steps} ({ran} this run, {end}); "
            f"{skip_text}; checkpoints written: {saved}")


def _run(config, workdir, mesh, rules, ckpt: Checkpoints, logger: Logger, batch_sharding, preemption: Preemption,
         loop: _Loop):
    """The loop of ``train``: resume, compile once, step, log, checkpoint, stop on NaN or a signal."""
    batch_size, steps = config.data.batch_size, config.train.steps
    rows = sh.process_rows(batch_sharding, batch_size)
    needs = conditioning.of(config).batch_keys()  # what the camera kind reads from a batch
    # Where the data stream starts, from the newest complete step's files (cheap), so that a
    # bad dataset fails before the models are built; the restore below has the last word.
    start, batches = ckpt.newest_intact() or (0, 0)
    iterator = make_train_iterator(config, rows, start_batch=batches, needs=needs) if start < steps else None
    program = build_program(config, mesh, rules)
    logger.info("DiT %s: %.4g M trainable of %.4g M parameters", program.dit_config,
                program.num_trainable / 1e6, program.num_params / 1e6)
    state = program.state
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored.state
        if (restored.step, restored.batches) != (start, batches):  # a damaged step was set aside
            start, batches = restored.step, restored.batches
            iterator = make_train_iterator(config, rows, start_batch=batches, needs=needs) if start < steps else None
        logger.info("resumed from step %d in %s (data position: %d global batches)", start, workdir, batches)
        loop.resumed_from = start
    loop.start = loop.step = start
    metrics: dict = {}
    if start >= steps:
        logger.info("nothing to do: step %d >= train.steps %d", start, steps)
        return program, state, metrics
    t0 = time.perf_counter()
    compiled = program.lower().compile()
    device = mesh.devices.flat[0]
    logger.info("%s", Compiled.of("train step", compiled, time.perf_counter() - t0).line(chips.hbm_bytes(device)[0]))
    throughput = Throughput.of(config, mesh)
    profile_dir = os.path.join(workdir, "profile", *([f"process_{jax.process_index()}"] if jax.process_count() > 1 else []))
    profiler = StepProfiler(config.train, profile_dir, logger)
    try:
        with progress.bar(total=steps, initial=start, desc="train", unit="step") as bar:
            for step in range(start, steps):
                profiler.before(step + 1)
                t0 = time.perf_counter()
                with jax.profiler.StepTraceAnnotation(f"train step {step + 1}", step_num=step + 1):
                    local = next(iterator)
                    batch = program.global_batch(local)
                    t_data = time.perf_counter() - t0
                    state, out = compiled(state, program.frozen, program.vae_state, program.context, batch)
                    out = jax.device_get(out)
                batches += 1
                dt = time.perf_counter() - t0
                profiler.after(step + 1)
                metrics = {k: float(v) for k, v in out.items() if k != "finite"}
                if not bool(out["finite"]):
                    raise _diverged(step, metrics, loop, ckpt, state, batches)
                metrics.update(step_time=dt, data_time=t_data, samples_per_s=batch_size / dt, **throughput(dt))
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", step_s=f"{dt:.2f}", **throughput.postfix(metrics),
                                refresh=False)
                bar.update()
                ckpt.check()  # a save that failed in the background stops the run now, not at the next save
                if (step + 1) % config.train.log_every == 0 or step == start:
                    logger(step + 1, metrics)
                if step == start or (step + 1) % config.train.preview_every == 0:
                    logger.images(step + 1, local, program.video_keys)
                if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == steps:
                    ckpt.save(step + 1, state, batches)
                loop.step = step + 1
                # Every process answers the same: all stop after this step (after the last one the run
                # just finishes, export and all).
                if step + 1 < steps and preemption.stop():
                    if step + 1 not in ckpt.written:
                        ckpt.save(step + 1, state, batches)
                    loop.stopped_by = preemption.signal_name or "a signal to another process"
                    break
    finally:
        profiler.close()
    return program, state, metrics


def _diverged(step: int, metrics: dict, loop: _Loop, ckpt: Checkpoints, state, batches: int) -> TrainingDiverged:
    """The NaN guard's error, after checkpointing the last finite state (``step``: the update
    was skipped). Within ``SUSPECT_STEPS`` of a restore the restored checkpoint is the likely
    cause and nothing is saved: a "last finite" state that is (or comes straight from) the one
    just restored, written as a new step, would be what every restart resumes."""
    head = f"step {step}: loss {metrics['loss']} / grad norm {metrics['grad_norm']} is not finite"
    if loop.resumed_from is not None and step - loop.start < SUSPECT_STEPS:
        where = os.path.join(ckpt.directory, str(loop.resumed_from))
        after = step - loop.start + 1
        when = "in the first step" if after == 1 else f"{after} steps"
        kept = (f"the last finite state is the restored one, already checkpointed as step {step}" if after == 1 else
                f"its last finite state, step {step}, grew from the restored one: saved, it is what restarts would resume")
        since = f" and the steps saved after it ({', '.join(map(str, ckpt.written))})" if ckpt.written else ""
        return TrainingDiverged(
            f"{head} {when} after resuming from checkpoint step {loop.resumed_from} ({where}): that checkpoint is the "
            "likely cause (damaged, or saved from a diverging run) unless the data or config changed. The update "
            f"was skipped and no new checkpoint was written ({kept}); move {where}{since} aside to resume from the "
            "step before it, or lower optimizer.lr and check the data.")
    if step not in ckpt.manager.all_steps():
        ckpt.save(step, state, batches)
    return TrainingDiverged(
        f"{head}. The update was skipped and the last finite state (step {step}) is checkpointed in "
        f"{ckpt.workdir}; lower optimizer.lr, check the data, or restart to resume from it.")


class StepProfiler:
    """A ``jax.profiler`` trace of steps ``train.profile_start_step`` ..
    ``+ train.profile_steps - 1`` (1-based, as logged) into ``directory``; view it with xprof
    (``xprof --logdir <workdir>/profile``) or TensorBoard's profile plugin."""

    def __init__(self, train, directory: str, logger: Logger):
        self.first = train.profile_start_step
        self.last = train.profile_start_step + train.profile_steps - 1
        self.enabled = train.profile_steps > 0
        self.directory, self.logger, self.active = directory, logger, False

    def before(self, step: int) -> None:
        if self.enabled and step == self.first:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step == self.last:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self.logger.info("profiled steps %d-%d into %s", self.first, self.last, self.directory)


def export_trained(program: TrainProgram, trainable: nnx.State, mesh, workdir: str,
                   config) -> tuple[str | None, str | None]:
    """Writes the trained parameters from process 0 (every process takes part in gathering
    them): the fully trained ones as a partial state dict (original Wan naming,
    ``facecam[_<expert>].safetensors``, for ``load_dit(overlay=...)``) and, for a LoRA run,
    the adapters in diffusers/PEFT naming with their rank and alpha
    (``facecam[_<expert>]_lora.safetensors``: ``apply_loras`` at strength 1 gives the trained
    model). Returns both paths (None where nothing was written, and on other processes)."""
    gathered = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))(trainable)
    if jax.process_index() != 0:
        return None, None
    model = nnx.merge(program.graphdef, gathered, program.frozen)  # only the gathered (trainable) tensors are read
    name = f"facecam_{config.model.expert}" if config.model.expert else "facecam"
    full = [path for path, var in named_variables(trainable) if not isinstance(var, LoRAParam)]
    keys = keys_of_paths(model.config, full)
    out = lora_out = None
    if keys:
        out = save_dit(model, os.path.join(workdir, f"{name}.safetensors"), naming="original", keys=keys)
    if config.train.lora_rank > 0:
        meta = {"facecam_expert": config.model.expert} if config.model.expert else None
        lora_out = save_lora(model, os.path.join(workdir, f"{name}_lora.safetensors"), metadata=meta)
    return out, lora_out
