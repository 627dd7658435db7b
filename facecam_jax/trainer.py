"""FaceCam fine-tuning: models from a config, the jitted flow-matching step, and the loop.

One jitted ``train_step(state, frozen, vae, context, batch, rng)`` per run, lowered and
compiled once with explicit NamedShardings (parameters by their logical axes, the batch
over (data, fsdp)), donating the train state. Each step encodes source, target and
landmark-map videos with the frozen VAE, draws a flow-matching level from the fixed
shifted grid (restricted to the trained Wan2.2 expert's range), and updates only the
trainable parameters (the paper: self-attention and the patch embedding).

Always on: loss, grad / param / update norms, step time, and a NaN/Inf guard that keeps
the last finite state, checkpoints it and stops with a clear message. Orbax saves the
trainable parameters, optimizer state, step and the Grain iterator position; a restarted
run resumes from the newest checkpoint in its workdir. At the end the trained parameters
are also written as a partial state dict (original Wan naming) that ``load_dit(...,
overlay=...)`` applies over the base model, the same form as the released FaceCam weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import flow
from facecam_jax import sharding as sh
from facecam_jax.models import wan_dit
from facecam_jax.models.wan_dit import WanDiT, facecam_velocity
from facecam_jax.models.wan_vae import VAEConfig, WanVAE

log = logging.getLogger(__name__)

VIDEO_KEYS = ("source", "target", "camera")  # the batch entries that go to the device


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/Inf; the last finite state was kept."""


class DistributedSetupError(ValueError):
    """The processes of a multi-process run could not join (mismatched settings, a missing peer)."""


class TrainState(NamedTuple):
    params: nnx.State  # trainable parameters
    opt_state: Any
    step: jax.Array  # int32 [], completed steps
    rng: jax.Array  # uint32 raw key data (checkpointable); the step's key is fold_in(rng, step)


# ------------------------------------------------------------------ models and inputs


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def vae_config(name: str) -> VAEConfig:
    """The VAE architecture named by ``config.vae.config`` (for random init without a checkpoint)."""
    if name == "mini":  # Wan2.1 topology and latent statistics (z 16), toy width
        return VAEConfig(dim=8, z_dim=16)
    if name == "wan2.1":
        return VAEConfig.wan21()
    if name == "wan2.2":
        return VAEConfig.wan22()
    raise ValueError(f"vae.config must be 'mini', 'wan2.1' or 'wan2.2', got {name!r}")


def build_dit(config, mesh, rules) -> WanDiT:
    """The DiT from ``config.model``: loaded (and overlaid) or random, widened, sharded."""
    m = config.model
    kw = dict(attention=m.attention, remat=m.remat)
    if m.dit_checkpoint:
        from facecam_jax.checkpoints.dit import load_dit

        dit = load_dit(
            m.dit_checkpoint, config=m.dit, dtype=m.param_dtype, compute_dtype=m.compute_dtype,
            overlay=list(m.dit_overlay) or None, mesh=mesh, rules=rules, **kw,
        )
    else:
        dit = WanDiT(m.dit, rngs=nnx.Rngs(config.seed), param_dtype=jnp.dtype(m.param_dtype),
                     dtype=jnp.dtype(m.compute_dtype), **kw)
    if m.in_dim > dit.config.in_dim:
        wan_dit.widen_patch_embedding(dit, m.in_dim)
    return sh.shard_module(dit, mesh, rules)


def build_vae(config, mesh) -> WanVAE:
    """The frozen VAE, replicated: its 127 M (Wan2.1) parameters are cheap to hold on every
    device, while its activations shard spatially under the mesh (``ACT_HEIGHT``)."""
    v = config.vae
    if v.checkpoint:
        from facecam_jax.checkpoints.vae import load_vae

        vae = load_vae(v.checkpoint, dtype=jnp.dtype(v.dtype))
    else:
        vae = WanVAE(vae_config(v.config), dtype=jnp.dtype(v.dtype), rngs=nnx.Rngs(config.seed + 1))
    state = nnx.state(vae)
    nnx.update(vae, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    return vae


def text_context(config, dit_config: wan_dit.DiTConfig) -> np.ndarray:
    """The text context ``[1, L, text_dim]``: the encoded prompt, or zeros without a file."""
    if not config.text.embeddings:
        return np.zeros((1, dit_config.text_len, dit_config.text_dim), np.float32)
    from facecam_jax.text import load_prompt_embeddings

    ctx = load_prompt_embeddings(config.text.embeddings).context([config.text.prompt])
    if ctx.shape[-1] != dit_config.text_dim:
        raise ValueError(
            f"{config.text.embeddings} holds {ctx.shape[-1]}-d embeddings, the DiT expects text_dim "
            f"{dit_config.text_dim}; encode the prompt with the matching text encoder"
        )
    return np.asarray(ctx, np.float32)


def trainable_filter(names: Sequence[str]):
    """Parameters whose path contains one of ``names`` (``("all",)``: every parameter)."""
    names = tuple(names)
    if names == ("all",):
        return nnx.Param

    def match(path, value):
        return isinstance(value, nnx.Param) and any(str(p) in names for p in path)

    return match


def make_optimizer(opt) -> optax.GradientTransformation:
    chain = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
    chain.append(optax.adamw(opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay))
    return optax.chain(*chain)


def videos_to_unit_range(video: jax.Array) -> jax.Array:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1] (the VAE's input range)."""
    return video.astype(jnp.float32) / 127.5 - 1.0


# ------------------------------------------------------------------ the step


def make_train_step(graphdef, vae_graphdef, optimizer, config):
    """The pure step function (to be jitted): encodes, samples a level, updates."""
    grid = flow.TrainGrid.make(config.train.shift)
    index_range = grid.index_range(*flow.expert_timestep_range(config.model.expert or None, config.model.expert_boundary))

    def step(state: TrainState, frozen, vae_state, context, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        level_rng, noise_rng = jax.random.split(rng)
        vae = nnx.merge(vae_graphdef, vae_state)
        b = batch["target"].shape[0]
        videos = jnp.concatenate([videos_to_unit_range(batch[k]) for k in VIDEO_KEYS], axis=0)  # [3B, T, H, W, 3]
        latents = jax.lax.stop_gradient(vae.encode(videos))
        source, target, camera = latents[:b], latents[b : 2 * b], latents[2 * b :]
        sigma, timestep, weight = flow.sample_training_levels(level_rng, b, grid, index_range)
        eps = jax.random.normal(noise_rng, target.shape, jnp.float32)
        noisy = flow.add_noise(target, eps, sigma)
        ctx = jnp.broadcast_to(context, (b, *context.shape[1:]))

        def loss_fn(params):
            model = nnx.merge(graphdef, params, frozen)
            v = facecam_velocity(model, noisy, camera, source, timestep, ctx)
            return flow.flow_loss(v, flow.velocity_target(target, eps), weight)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Keep the last finite state: a NaN step changes nothing and the loop stops.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(keep(params, state.params), keep(opt_state, state.opt_state),
                               state.step + finite.astype(state.step.dtype), state.rng)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(state.params),
            "update_norm": optax.tree.norm(updates),
            "timestep": jnp.mean(timestep),
            "finite": finite,
        }
        return new_state, metrics

    return step


# ------------------------------------------------------------------ the program


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _abstract(tree):
    """Arrays (or ShapeDtypeStructs with a sharding) -> ShapeDtypeStructs with that sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def check_batch_fits(mesh: jax.sharding.Mesh, batch_size: int, rules) -> NamedSharding:
    """The sharding of a global batch of ``batch_size`` on ``mesh``; a clear error if the
    data-parallel replicas cannot each get whole samples."""
    replicas = mesh.shape.get(sh.DATA, 1)
    if batch_size % replicas:
        raise ValueError(
            f"data.batch_size {batch_size} does not divide over mesh.data={replicas} replicas; "
            f"use a multiple of {replicas} or a smaller mesh.data")
    spec = sh.logical_to_spec((sh.ACT_BATCH,), (batch_size,), mesh, rules)
    shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(spec)))
    dp = replicas * mesh.shape.get(sh.FSDP, 1)
    if shards < dp:
        log.warning("data.batch_size %d does not divide over the %d data-parallel devices (data x fsdp): "
                    "the batch is split %d ways and the rest compute it redundantly; use a multiple of %d",
                    batch_size, dp, shards, dp)
    return NamedSharding(mesh, spec)


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of the global batch that this process's devices hold."""
    index = sharding.addressable_devices_indices_map((batch_size,))
    spans = {idx[0].indices(batch_size)[:2] for idx in index.values()}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = set().union(*(range(a, b) for a, b in spans))
    if covered != set(range(lo, hi)):
        raise ValueError(f"this process's devices hold rows {sorted(spans)} of the batch, not one contiguous "
                         "slice; order the mesh so that each process's devices are adjacent")
    return lo, hi


@dataclasses.dataclass
class TrainProgram:
    """The jitted step with explicit shardings, and what it is called with.

    Built from real arrays (training) or from shapes only (``abstract=True``: ahead-of-time
    compilation, ``facecam_jax.aot``); both carry the same shardings.
    """

    step: Any  # jax.jit(step_fn, in_shardings, out_shardings, donate_argnums=0)
    graphdef: Any
    state: TrainState
    frozen: nnx.State
    vae_state: nnx.State
    context: Any
    batch: dict  # ShapeDtypeStruct per VIDEO_KEYS entry: the global batch
    batch_sharding: NamedSharding
    dit_config: wan_dit.DiTConfig
    num_trainable: int
    num_params: int

    def lower(self):
        return self.step.lower(self.state, self.frozen, self.vae_state, self.context, self.batch)


def _abstract_dit(config, mesh, rules) -> WanDiT:
    """The DiT of ``config.model`` as shapes on ``mesh`` (the preset; nothing is read)."""
    m = config.model

    def make():
        dit = WanDiT(m.dit, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(m.param_dtype),
                     dtype=jnp.dtype(m.compute_dtype), attention=m.attention, remat=m.remat)
        return wan_dit.widen_patch_embedding(dit, max(m.in_dim, dit.config.in_dim))

    dit = nnx.eval_shape(make)
    shardings = sh.state_shardings(nnx.state(dit), mesh, rules)
    nnx.update(dit, jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                 nnx.state(dit), shardings))
    return dit


def _abstract_vae(config, mesh) -> WanVAE:
    v = config.vae
    vae = nnx.eval_shape(lambda: WanVAE(vae_config(v.config), dtype=jnp.dtype(v.dtype), rngs=nnx.Rngs(0)))
    replicated = NamedSharding(mesh, PartitionSpec())
    nnx.update(vae, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                 nnx.state(vae)))
    return vae


def opt_state_shardings(optimizer, params, param_shardings, replicated: NamedSharding):
    """Every optimizer-state leaf's sharding: moments like their parameter, scalars replicated."""
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def build_program(config, mesh: jax.sharding.Mesh, rules, *, abstract: bool = False) -> TrainProgram:
    """The training program of ``config`` on ``mesh``: models, state and the jitted step.

    ``abstract``: shapes only (the DiT preset ``config.model.dit``, random-init shapes for
    the VAE), for compiling ahead of time; nothing is allocated or read."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = check_batch_fits(mesh, config.data.batch_size, rules)
    dit = _abstract_dit(config, mesh, rules) if abstract else build_dit(config, mesh, rules)
    vae = _abstract_vae(config, mesh) if abstract else build_vae(config, mesh)
    graphdef, params, frozen = nnx.split(dit, nnx.All(nnx.Param, trainable_filter(config.train.trainable)), ...)
    num_trainable = sum(x.size for x in jax.tree.leaves(params))
    if num_trainable == 0:
        raise ValueError(f"train.trainable={tuple(config.train.trainable)} matches no DiT parameter")
    vae_graphdef, vae_state = nnx.split(vae)
    optimizer = make_optimizer(config.optimizer)
    param_sh = _shardings(params)
    opt_sh = opt_state_shardings(optimizer, params, param_sh, replicated)
    state_sh = TrainState(param_sh, opt_sh, replicated, replicated)
    context = text_context(config, dit.config)
    key = jax.random.key_data(jax.random.key(config.seed))
    if abstract:
        opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 jax.eval_shape(optimizer.init, params), opt_sh)
        state = TrainState(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                           jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated))
        context = jax.ShapeDtypeStruct(context.shape, jnp.float32, sharding=replicated)
    else:
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
        state = TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), replicated),
                           jax.device_put(key, replicated))
        context = jax.device_put(context, replicated)
    d = config.data
    batch = {k: jax.ShapeDtypeStruct((d.batch_size, d.frames, d.height, d.width, 3), jnp.uint8,
                                     sharding=batch_sharding) for k in VIDEO_KEYS}
    jitted = jax.jit(
        make_train_step(graphdef, vae_graphdef, optimizer, config),
        in_shardings=(state_sh, _shardings(frozen), _shardings(vae_state), replicated,
                      {k: batch_sharding for k in VIDEO_KEYS}),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    return TrainProgram(jitted, graphdef, state, frozen, vae_state, context, batch, batch_sharding,
                        dit.config, num_trainable, num_trainable + sum(x.size for x in jax.tree.leaves(frozen)))


# ------------------------------------------------------------------ checkpoints


def _values(tree):
    """Variables -> their arrays (plain pytrees for orbax); other leaves unchanged."""
    return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def _into(template, values):
    return jax.tree.map(lambda v, a: v.replace(a) if _is_var(v) else a, template, values, is_leaf=_is_var)


class Checkpoints:
    """Orbax manager for {train state, data position} under ``workdir/checkpoints``.

    Every process writes its shards and reads back onto the CURRENT mesh (restore targets
    carry this run's shardings), so a run may resume on a different mesh or process count.
    The data position is the global batch count (``facecam_jax.data.pipeline``)."""

    def __init__(self, workdir: str, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"), options=options, item_names=("train", "data")
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, batches: int) -> None:
        args = self._ocp.args.Composite(
            train=self._ocp.args.StandardSave(_values(state)), data=self._ocp.args.JsonSave({"batches": batches})
        )
        self.manager.save(step, args=args, force=True)

    def data_position(self, step: int) -> int:
        """The global batches consumed when ``step`` was saved."""
        restored = self.manager.restore(step, args=self._ocp.args.Composite(data=self._ocp.args.JsonRestore()))
        return int(restored["data"]["batches"])

    def restore(self, step: int, state: TrainState) -> TrainState:
        """The train state at ``step``, placed on ``state``'s shardings (this run's mesh)."""
        args = self._ocp.args.Composite(train=self._ocp.args.StandardRestore(_abstract(_values(state))))
        return _into(state, self.manager.restore(step, args=args)["train"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ------------------------------------------------------------------ logging


class Logger:
    """Metrics from process 0 only: a log line, a JSON line (``metrics.jsonl``) and
    TensorBoard scalars (event files in the workdir: ``tensorboard --logdir runs``)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(workdir, flush_secs=10)

    def __call__(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        log.info("step %d %s", step, text)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def images(self, step: int, batch: dict) -> None:
        """The first sample's source | target | camera condition at its first, middle and last frame."""
        if not self.enabled:
            return
        t = batch["target"].shape[1]
        rows = [np.concatenate([np.asarray(batch[k][0, i]) for k in VIDEO_KEYS], axis=1) for i in (0, t // 2, t - 1)]
        self.writer.add_image("batch/source_target_camera", np.concatenate(rows, axis=0), step, dataformats="HWC")

    def info(self, msg: str, *args) -> None:
        if self.enabled:
            log.info(msg, *args)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------ the loop


@dataclasses.dataclass
class RunResult:
    step: int
    model: WanDiT
    last_metrics: dict
    exported: str | None


def initialize_distributed(d) -> None:
    """Joins the processes of a multi-process run (``config.distributed``); must run before
    anything touches the devices. ``auto``: cluster auto-detection (TPU pods, SLURM, Open MPI);
    else an explicit ``coordinator_address`` / ``num_processes`` / ``process_id``."""
    if not (d.auto or d.coordinator_address):
        return
    if jax.distributed.is_initialized():
        return
    # CPU processes all-reduce over gloo (no-op for GPU/TPU clients).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if d.auto:
        jax.distributed.initialize(initialization_timeout=d.initialization_timeout)
        return
    if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
        raise DistributedSetupError(f"distributed.process_id must be in [0, num_processes={d.num_processes}), "
                         f"got {d.process_id}")
    hint = ("start every process with the same distributed.coordinator_address and num_processes and "
            "its own process_id")
    log.info("process %d of %d: joining the run at %s (waiting up to %ds for the others)", d.process_id,
             d.num_processes, d.coordinator_address, d.initialization_timeout)
    try:
        jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id,
                                   initialization_timeout=d.initialization_timeout)
    except Exception as e:  # the coordination service's errors are long and cryptic
        raise DistributedSetupError(
            f"process {d.process_id} of {d.num_processes} could not join the run at {d.coordinator_address} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); {hint}") from e
    if jax.process_count() != d.num_processes:  # the coordinator's count wins, silently: say so
        raise DistributedSetupError(
            f"this process was started with distributed.num_processes={d.num_processes}, but the coordinator "
            f"at {d.coordinator_address} runs {jax.process_count()} processes; {hint}")


def _global_batch(local: dict, sharding: NamedSharding, batch_size: int) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]), (batch_size, *local[k].shape[1:]))
            for k in VIDEO_KEYS}


def mesh_from_config(config) -> jax.sharding.Mesh:
    return sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.context, config.mesh.tensor)


def train(config, workdir: str, mesh: jax.sharding.Mesh | None = None) -> RunResult:
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns the final state.

    ``mesh`` defaults to ``config.mesh`` over all (global) devices."""
    initialize_distributed(config.distributed)
    rules = sh.rules_from_config(config.get("sharding_rules"))
    mesh = mesh or mesh_from_config(config)
    os.makedirs(workdir, exist_ok=True)
    with sh.use_mesh(mesh, rules):
        # A bad mesh, batch size or dataset fails before any model is built.
        batch_sharding = check_batch_fits(mesh, config.data.batch_size, rules)
        logger = Logger(workdir)
        ckpt = Checkpoints(workdir, config.train.keep_checkpoints)
        try:
            logger.info("mesh %s on %d %s devices (%d processes)", dict(mesh.shape), mesh.size,
                        mesh.devices.flat[0].platform, jax.process_count())
            program, state, metrics = _run(config, workdir, mesh, rules, ckpt, logger, batch_sharding)
        finally:
            ckpt.close()
            logger.close()

    model = nnx.merge(program.graphdef, state.params, program.frozen)
    exported = export_trained(program.graphdef, state.params, program.frozen, mesh, workdir, config)
    return RunResult(int(state.step), model, metrics, exported)


def _run(config, workdir, mesh, rules, ckpt: Checkpoints, logger: Logger, batch_sharding):
    """The loop of ``train``: resume, compile once, step, log, checkpoint, stop on NaN."""
    from facecam_jax import progress
    from facecam_jax.data.pipeline import make_train_iterator

    batch_size, steps = config.data.batch_size, config.train.steps
    start = ckpt.latest() or 0
    batches = ckpt.data_position(start) if start else 0  # global batches consumed: the data position
    iterator = None
    if start < steps:
        iterator = make_train_iterator(config, process_rows(batch_sharding, batch_size), start_batch=batches)
    program = build_program(config, mesh, rules)
    logger.info("DiT %s: %.4g M trainable of %.4g M parameters", program.dit_config,
                program.num_trainable / 1e6, program.num_params / 1e6)
    state = program.state
    if start:
        state = ckpt.restore(start, state)
        logger.info("resumed from step %d in %s (data position: %d global batches)", start, workdir, batches)
    metrics: dict = {}
    if start >= steps:
        logger.info("nothing to do: step %d >= train.steps %d", start, steps)
        return program, state, metrics
    t0 = time.perf_counter()
    compiled = program.lower().compile()
    _log_compiled(logger, compiled, time.perf_counter() - t0)
    with progress.bar(total=steps, initial=start, desc="train", unit="step") as bar:
        for step in range(start, steps):
            t0 = time.perf_counter()
            local = next(iterator)
            batch = _global_batch(local, program.batch_sharding, batch_size)
            t_data = time.perf_counter() - t0
            state, out = compiled(state, program.frozen, program.vae_state, program.context, batch)
            batches += 1
            out = jax.device_get(out)
            dt = time.perf_counter() - t0
            metrics = {k: float(v) for k, v in out.items() if k != "finite"}
            if not bool(out["finite"]):
                if step not in ckpt.manager.all_steps():
                    ckpt.save(step, state, batches)
                raise TrainingDiverged(
                    f"step {step}: loss {metrics['loss']} / grad norm {metrics['grad_norm']} is not finite. "
                    f"The update was skipped and the last finite state (step {step}) is checkpointed in "
                    f"{workdir}; lower optimizer.lr, check the data, or restart to resume from it."
                )
            metrics.update(step_time=dt, data_time=t_data, samples_per_s=batch_size / dt)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", step_s=f"{dt:.2f}", refresh=False)
            bar.update()
            if (step + 1) % config.train.log_every == 0 or step == start:
                logger(step + 1, metrics)
            if step == start or (step + 1) % config.train.preview_every == 0:
                logger.images(step + 1, local)
            if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == steps:
                ckpt.save(step + 1, state, batches)
    return program, state, metrics


def _log_compiled(logger: Logger, compiled, seconds: float) -> None:
    logger.info("train step compiled in %.1fs", seconds)
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        mem = None
    if mem is not None:
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
        logger.info("memory (per device): %s", ", ".join(
            f"{f.replace('_size_in_bytes', '')} {getattr(mem, f) / 2**20:.1f} MiB" for f in fields if hasattr(mem, f)))


def export_trained(graphdef, trainable: nnx.State, frozen: nnx.State, mesh, workdir: str, config) -> str | None:
    """Writes the trained parameters as a partial state dict (original Wan naming) from
    process 0; every process takes part in gathering them. Returns the path (process 0)."""
    from facecam_jax.checkpoints.dit import keys_of_paths, named_variables, save_dit

    gathered = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))(trainable)
    if jax.process_index() != 0:
        return None
    model = nnx.merge(graphdef, gathered, frozen)  # only the gathered (trainable) tensors are read
    paths = [path for path, _ in named_variables(trainable)]
    name = f"facecam_{config.model.expert}" if config.model.expert else "facecam"
    out = os.path.join(workdir, f"{name}.safetensors")
    save_dit(model, out, naming="original", keys=keys_of_paths(model.config, paths))
    return out
