"""The training program: the jitted flow-matching step with explicit shardings, and its state.

One jitted ``step(state, frozen, vae, context, batch)`` per run, donating the train state.
Each step encodes source, target and landmark-map videos with the frozen VAE, draws a
flow-matching level from the fixed shifted grid (restricted to the trained Wan2.2 expert's
range; with ``train.context_prob`` some samples' first frames kept clean as clip-extension
context), and updates only the trainable parameters (the paper: self-attention and the patch
embedding; with ``train.lora_rank > 0`` their LoRA adapters, the patch embedding and the
q/k norm scales, ``build.trainable_filter``: the optimizer state exists for those alone).
A NaN/Inf step changes nothing (``metrics["finite"]`` says so). Every leaf of the state
(parameters, optimizer moments and counters, step, rng) has an explicit sharding.

``build_program(config, mesh, rules)`` builds it from the factory's models (``build``);
``abstract=True`` builds the same program from shapes only, which is what the fit tool
(``facecam_jax.fit``) compiles ahead of time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import build, conditioning
from facecam_jax import sharding as sh
from facecam_jax.diffusion import flow
from facecam_jax.models import wan_dit
from facecam_jax.models.wan_vae import to_unit_range
from facecam_jax.runtime.config_check import validate


class TrainState(NamedTuple):
    params: nnx.State  # trainable parameters
    opt_state: Any
    step: jax.Array  # int32 [], completed steps
    rng: jax.Array  # uint32 raw key data (checkpointable); the step's key is fold_in(rng, step)


def make_optimizer(opt) -> optax.GradientTransformation:
    chain = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
    chain.append(optax.adamw(opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay))
    return optax.chain(*chain)


def make_train_step(graphdef, vae_graphdef, optimizer, config):
    """The pure step function (to be jitted): encodes, samples a level, updates. The camera
    condition and the DiT's forward are the camera kind's (``conditioning.of(config)``)."""
    kind = conditioning.of(config)
    videos_in = ("source", "target", *kind.batch_videos)  # encoded together, in this order
    camera_dropout = config.train.get("camera_dropout", 0.0)
    if camera_dropout:
        kind.require_null_camera()
    context_prob = config.train.get("context_prob", 0.0)
    if context_prob:
        kind.require_context()
    grid = flow.TrainGrid.make(config.model.shift)
    index_range = grid.index_range(*flow.expert_timestep_range(config.model.expert or None, config.model.expert_boundary))

    def step(state: TrainState, frozen, vae_state, context, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        level_rng, noise_rng = jax.random.split(rng)
        vae = nnx.merge(vae_graphdef, vae_state)
        b = batch["target"].shape[0]
        videos = jnp.concatenate([to_unit_range(batch[k]) for k in videos_in], axis=0)  # [(2 + c) B, T, H, W, 3]
        latents = dict(zip(videos_in, jnp.split(jax.lax.stop_gradient(vae.encode(videos)), len(videos_in))))
        source, target = latents.pop("source"), latents.pop("target")
        condition = kind.condition(latents, batch, rng=jax.random.fold_in(rng, 2), dropout=camera_dropout)
        sigma, timestep, weight = flow.sample_training_levels(level_rng, b, grid, index_range)
        eps = jax.random.normal(noise_rng, target.shape, jnp.float32)
        noisy = flow.add_noise(target, eps, sigma)
        keep = None
        if context_prob:  # clip extension (CameraCtrl II): clean context frames, marked, not in the loss
            mask = flow.context_mask(jax.random.fold_in(rng, 3), b, target.shape[1], context_prob)
            noisy = flow.keep_context(noisy, target, mask)
            condition, keep = {**condition, "mask": mask}, 1.0 - mask
        ctx = jnp.broadcast_to(context, (b, *context.shape[1:]))

        def loss_fn(params):
            model = nnx.merge(graphdef, params, frozen)
            v = kind.velocity(model, noisy, source, condition, timestep, ctx)
            return flow.flow_loss(v, flow.velocity_target(target, eps), weight, keep)

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


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _shapes(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def opt_state_shardings(optimizer, params, param_shardings, replicated: NamedSharding):
    """Every optimizer-state leaf's sharding: moments like their parameter, scalars replicated."""
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


@dataclasses.dataclass
class TrainProgram:
    """The jitted step with explicit shardings, and what it is called with.

    Built from real arrays (training) or from shapes only (``abstract=True``: ahead-of-time
    compilation); both carry the same shardings.
    """

    step: Any  # jax.jit(step_fn, in_shardings, out_shardings, donate_argnums=0)
    graphdef: Any
    state: TrainState
    frozen: nnx.State
    vae_state: nnx.State
    vae_graphdef: Any
    context: Any
    batch: dict  # ShapeDtypeStruct per batch entry (the camera kind's ``batch_keys``): the global batch
    batch_sharding: NamedSharding
    dit_config: wan_dit.DiTConfig
    vae_config: Any
    num_trainable: int
    num_params: int

    @property
    def optimizer_bytes(self) -> int:
        """Bytes of the optimizer state (all devices together): AdamW's two moments per trained
        parameter, in its dtype, plus counters."""
        return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.state.opt_state))

    def lower(self):
        return self.step.lower(self.state, self.frozen, self.vae_state, self.context, self.batch)

    def global_batch(self, local: dict) -> dict:
        """This process's rows of a batch (numpy, the entries of ``batch``) -> the global device batch."""
        size = self.batch["target"].shape[0]
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local[k]),
                                                          (size, *local[k].shape[1:])) for k in self.batch}

    @property
    def video_keys(self) -> tuple[str, ...]:
        """The batch entries that are videos (uint8 ``[B, T, H, W, 3]``): what a preview shows."""
        return tuple(k for k, v in self.batch.items() if v.dtype == jnp.uint8 and v.ndim == 5)


def build_program(config, mesh: jax.sharding.Mesh, rules, *, abstract: bool = False) -> TrainProgram:
    """The training program of ``config`` on ``mesh``: models, state and the jitted step.

    ``abstract``: shapes only (the DiT preset ``config.model.dit``, random-init shapes for
    the VAE), for compiling ahead of time; nothing is allocated or read. The config is checked
    first (``config_check.validate``: a config changed in code after it was loaded)."""
    validate(config)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = sh.batch_sharding(mesh, config.data.batch_size, rules)
    if abstract:
        dit = build.abstract_dit(config, mesh, rules, adapters=True)
    else:
        dit = build.build_dit(config, mesh, rules, adapters=True)
    vae = build.abstract_vae(config, mesh) if abstract else build.build_vae(config, mesh)
    graphdef, params, frozen = nnx.split(dit, nnx.All(nnx.Param, build.train_filter(config, dit)), ...)
    num_trainable = sum(x.size for x in jax.tree.leaves(params))
    if num_trainable == 0:
        raise ValueError(f"train.trainable={tuple(config.train.trainable)} matches no DiT parameter")
    quantized = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params)
                 if jnp.dtype(x.dtype).itemsize == 1]
    if quantized:  # int8 / fp8 kernels have no useful gradient: only adapters train over them (QLoRA)
        raise ValueError(f"model.quantize={config.model.quantize!r}: quantized kernels ({quantized[0]} and "
                         f"{len(quantized) - 1} more) cannot be trained; train LoRA adapters over them "
                         "(train.lora_rank > 0) or set model.quantize='none'")
    vae_graphdef, vae_state = nnx.split(vae)
    optimizer = make_optimizer(config.optimizer)
    param_sh = _shardings(params)
    opt_sh = opt_state_shardings(optimizer, params, param_sh, replicated)
    state_sh = TrainState(param_sh, opt_sh, replicated, replicated)
    context = build.text_contexts(config, dit.config)
    key = jax.random.key_data(jax.random.key(config.seed))
    if abstract:
        opt_state = _shapes(jax.eval_shape(optimizer.init, params), opt_sh)
        state = TrainState(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                           jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated))
        context = jax.ShapeDtypeStruct(context.shape, jnp.float32, sharding=replicated)
    else:
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
        state = TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), replicated),
                           jax.device_put(key, replicated))
        context = jax.device_put(context, replicated)
    batch = {k: jax.ShapeDtypeStruct((config.data.batch_size, *shape), dtype, sharding=batch_sharding)
             for k, (shape, dtype) in conditioning.of(config).batch_spec(config.data).items()}
    jitted = jax.jit(
        make_train_step(graphdef, vae_graphdef, optimizer, config),
        in_shardings=(state_sh, _shardings(frozen), _shardings(vae_state), replicated,
                      {k: batch_sharding for k in batch}),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    return TrainProgram(jitted, graphdef, state, frozen, vae_state, vae_graphdef, context, batch, batch_sharding,
                        dit.config, vae.config, num_trainable,
                        num_trainable + sum(x.size for x in jax.tree.leaves(frozen)))
