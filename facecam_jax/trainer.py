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


class TrainState(NamedTuple):
    params: nnx.State  # trainable parameters
    opt_state: Any
    step: jax.Array  # completed steps


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

    def step(state: TrainState, frozen, vae_state, context, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
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
                               state.step + finite.astype(state.step.dtype))
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


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


# ------------------------------------------------------------------ checkpoints


def _values(tree):
    """Variables -> their arrays (plain pytrees for orbax); other leaves unchanged."""
    return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def _into(template, values):
    return jax.tree.map(lambda v, a: v.replace(a) if _is_var(v) else a, template, values, is_leaf=_is_var)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """Orbax manager for {train state, Grain iterator} under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"), options=options, item_names=("train", "data")
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, iterator) -> None:
        import grain

        args = self._ocp.args.Composite(
            train=self._ocp.args.StandardSave(_values(state)), data=grain.checkpoint.CheckpointSave(iterator)
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, state: TrainState, iterator) -> TrainState:
        import grain

        args = self._ocp.args.Composite(
            train=self._ocp.args.StandardRestore(_abstract(_values(state))),
            data=grain.checkpoint.CheckpointRestore(iterator),
        )
        restored = self.manager.restore(step, args=args)
        return _into(state, restored["train"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ------------------------------------------------------------------ logging


class Logger:
    """Writes metrics from process 0 only: one line to the log, one JSON line to a file."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")

    def __call__(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        log.info("step %d %s", step, text)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def info(self, msg: str, *args) -> None:
        if self.enabled:
            log.info(msg, *args)


# ------------------------------------------------------------------ the loop


@dataclasses.dataclass
class RunResult:
    step: int
    model: WanDiT
    last_metrics: dict
    exported: str | None


def maybe_initialize_distributed(config) -> None:
    """``jax.distributed.initialize()`` (cluster auto-detection: TPU pods, SLURM, ...) when
    ``config.distributed``; must run before anything touches the devices."""
    if config.get("distributed", False) and jax.process_count() == 1:
        jax.distributed.initialize()


def _global_batch(local: dict, sharding: NamedSharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k])) for k in VIDEO_KEYS}


def mesh_from_config(config) -> jax.sharding.Mesh:
    return sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.context, config.mesh.tensor)


def train(config, workdir: str, mesh: jax.sharding.Mesh | None = None) -> RunResult:
    """Trains (or resumes) the run of ``config`` in ``workdir``; returns the final state.

    ``mesh`` defaults to ``config.mesh`` over all devices."""
    from facecam_jax.data.pipeline import make_train_iterator

    maybe_initialize_distributed(config)
    os.makedirs(workdir, exist_ok=True)
    logger = Logger(workdir)
    rules = sh.rules_from_config(config.get("sharding_rules"))
    mesh = mesh or mesh_from_config(config)
    logger.info("mesh %s on %d %s devices (%d processes)", dict(mesh.shape), jax.device_count(),
                jax.devices()[0].platform, jax.process_count())

    with sh.use_mesh(mesh, rules):
        dit = build_dit(config, mesh, rules)
        vae = build_vae(config, mesh)
        graphdef, params, frozen = nnx.split(dit, nnx.All(nnx.Param, trainable_filter(config.train.trainable)), ...)
        n_train = sum(x.size for x in jax.tree.leaves(params))
        if n_train == 0:
            raise ValueError(f"train.trainable={tuple(config.train.trainable)} matches no DiT parameter")
        logger.info("DiT %s: %.4g M trainable of %.4g M parameters", dit.config,
                    n_train / 1e6, wan_dit.param_count(dit) / 1e6)
        vae_graphdef, vae_state = nnx.split(vae)
        optimizer = make_optimizer(config.optimizer)
        opt_state = jax.jit(optimizer.init)(params)  # zeros shaped (and sharded) like the parameters
        replicated = NamedSharding(mesh, PartitionSpec())
        state = TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), replicated))
        context = jax.device_put(text_context(config, dit.config), replicated)
        batch_spec = sh.logical_to_spec((sh.ACT_BATCH,), (config.data.batch_size,), mesh, rules)
        batch_sharding = NamedSharding(mesh, batch_spec)

        iterator = make_train_iterator(config)
        ckpt = Checkpoints(workdir, config.train.keep_checkpoints)
        start = ckpt.latest() or 0
        if start:
            state = ckpt.restore(start, state, iterator)
            logger.info("resumed from step %d in %s", start, workdir)
        if start >= config.train.steps:
            logger.info("nothing to do: step %d >= train.steps %d", start, config.train.steps)

        step_fn = make_train_step(graphdef, vae_graphdef, optimizer, config)
        state_sh = _shardings(state)
        jitted = jax.jit(
            step_fn,
            in_shardings=(state_sh, _shardings(frozen), _shardings(vae_state), replicated,
                          {k: batch_sharding for k in VIDEO_KEYS}, replicated),
            out_shardings=(state_sh, replicated),
            donate_argnums=(0,),
        )
        rng = jax.device_put(jax.random.key(config.seed), replicated)
        compiled = None
        metrics: dict = {}
        try:
            for step in range(start, config.train.steps):
                t0 = time.perf_counter()
                batch = _global_batch(next(iterator), batch_sharding)
                t_data = time.perf_counter() - t0
                if compiled is None:
                    compiled = jitted.lower(state, frozen, vae_state, context, batch, rng).compile()
                    _log_compiled(logger, compiled, time.perf_counter() - t0)
                state, out = compiled(state, frozen, vae_state, context, batch, rng)
                out = jax.device_get(out)
                dt = time.perf_counter() - t0
                metrics = {k: float(v) for k, v in out.items() if k != "finite"}
                if not bool(out["finite"]):
                    if step not in ckpt.manager.all_steps():
                        ckpt.save(step, state, iterator)
                    raise TrainingDiverged(
                        f"step {step}: loss {metrics['loss']} / grad norm {metrics['grad_norm']} is not finite. "
                        f"The update was skipped and the last finite state (step {step}) is checkpointed in "
                        f"{workdir}; lower optimizer.lr, check the data, or restart to resume from it."
                    )
                metrics.update(step_time=dt, data_time=t_data, samples_per_s=config.data.batch_size / dt)
                if (step + 1) % config.train.log_every == 0 or step == start:
                    logger(step + 1, metrics)
                if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == config.train.steps:
                    ckpt.save(step + 1, state, iterator)
        finally:
            ckpt.close()

    model = nnx.merge(graphdef, state.params, frozen)
    exported = export_trained(model, params, workdir, config) if jax.process_index() == 0 else None
    return RunResult(int(state.step), model, metrics, exported)


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


def export_trained(model: WanDiT, trainable: nnx.State, workdir: str, config) -> str:
    """Writes the trained parameters as a partial state dict (original Wan naming)."""
    from facecam_jax.checkpoints.dit import keys_of_paths, named_variables, save_dit

    paths = [path for path, _ in named_variables(trainable)]
    name = f"facecam_{config.model.expert}" if config.model.expert else "facecam"
    out = os.path.join(workdir, f"{name}.safetensors")
    save_dit(model, out, naming="original", keys=keys_of_paths(model.config, paths))
    return out

