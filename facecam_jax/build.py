"""Configs -> models, text contexts, meshes and shapes: the one factory.

Training, sampling, the ahead-of-time fit tool, tools and benchmarks all need "config ->
DiT / VAE / context on a mesh"; they take it from here (STYLE: a factory is its own room).
Every builder has an abstract twin (shapes with their shardings, nothing allocated or read)
so that a program compiled ahead of time is the program a run builds from weights.
"""

from __future__ import annotations

from typing import Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from facecam_jax import conditioning, text
from facecam_jax import sharding as sh
from facecam_jax.checkpoints.dit import holds_camera_layers, load_dit
from facecam_jax.checkpoints.vae import load_vae
from facecam_jax.models import lora, quant, wan_dit
from facecam_jax.models.lora import LoRAParam
from facecam_jax.models.wan_dit import WanDiT
from facecam_jax.models.wan_vae import VAEConfig, WanVAE

# ------------------------------------------------------------------ mesh


def mesh_and_rules(config, devices=None) -> tuple[jax.sharding.Mesh, sh.Rules]:
    """The ``(data, fsdp, context, tensor)`` mesh of ``config.mesh`` over ``devices`` (default:
    every global device) and the logical-axis rule table of ``config.sharding_rules``."""
    m = config.mesh
    mesh = sh.make_mesh(m.data, m.fsdp, m.context, m.tensor, devices=devices)
    return mesh, sh.rules_from_config(config.get("sharding_rules"))


# ------------------------------------------------------------------ shapes


def vae_config(name: str) -> VAEConfig:
    """The VAE architecture named by ``config.vae.config`` (for random init without a checkpoint)."""
    if name == "mini":  # Wan2.1 topology and latent statistics (z 16), toy width
        return VAEConfig(dim=8, z_dim=16)
    if name == "wan2.1":
        return VAEConfig.wan21()
    if name == "wan2.2":
        return VAEConfig.wan22()
    raise ValueError(f"vae.config must be 'mini', 'wan2.1' or 'wan2.2', got {name!r}")


def dit_config(config) -> wan_dit.DiTConfig:
    """The DiT preset of ``config.model.dit`` with FaceCam's input width (``model.in_dim``)."""
    cfg = wan_dit.get_config(config.model.dit)
    return cfg.replace(in_dim=max(config.model.in_dim, cfg.in_dim))


def latent_shape(vae: VAEConfig, frames: int, height: int, width: int, batch: int = 1) -> tuple[int, ...]:
    """``[B, F, H, W, z]`` latents of ``batch`` videos of ``frames x height x width``."""
    s = vae.spatial_stride
    return (batch, 1 + (frames - 1) // vae.temporal_stride, height // s, width // s, vae.z_dim)


def token_counts(config, frames: int | None = None) -> tuple[int, int]:
    """(tokens the DiT's blocks see, tokens its head keeps) per sample of ``config``'s videos
    (``frames``, default ``data.frames``), as the camera kind lays out its input."""
    d = config.data
    shape = latent_shape(vae_config(config.vae.config), frames or d.frames, d.height, d.width)
    return conditioning.of(config).token_counts(dit_config(config), shape)


def num_experts(config) -> int:
    """Two for Wan2.2 A14B (an ``a14b`` preset, or both sample.*_noise_checkpoint set), else one."""
    s = config.sample
    return 2 if ("a14b" in config.model.dit or (s.high_noise_checkpoint and s.low_noise_checkpoint)) else 1


# ------------------------------------------------------------------ trainable parameters


def is_trainable(path: Sequence[str], names: Sequence[str]) -> bool:
    """``train.trainable``'s rule: a parameter is trained when an element of its path is one of
    ``names`` (``("all",)``: every parameter)."""
    names = tuple(names)
    return names == ("all",) or any(str(p) in names for p in path)


def trainable_filter(names: Sequence[str], lora_layers: Collection[tuple[str, ...]] | None = None):
    """The nnx filter of the trained parameters: those ``is_trainable`` selects.

    With LoRA (``lora_layers``: the module paths of the adapted ``Linear`` layers, see
    ``lora_layers``): every adapter (``LoRAParam``), and every selected parameter that is not an
    adapted layer's kernel, bias or quantization scale, i.e. the selection's non-``Linear``
    parameters, trained in full: the patch embedding (a low-rank update could not learn its
    zero-initialised FaceCam channels; ``models.lora``) and the small ones inside the selected
    modules (self-attention's q/k RMSNorm scales, 2 x dim per layer; with ``("all",)`` also the
    modulations and affine norms). Base kernels stay frozen in the model's param dtype.
    """
    names = tuple(names)
    if lora_layers is not None:
        frozen_layers = frozenset(tuple(p) for p in lora_layers)

        def lora_match(path, value):
            if isinstance(value, LoRAParam):
                return True
            path = tuple(str(p) for p in path)
            return isinstance(value, nnx.Param) and is_trainable(path, names) and path[:-1] not in frozen_layers

        return lora_match
    if names == ("all",):
        return nnx.Param

    def match(path, value):
        return isinstance(value, nnx.Param) and is_trainable(path, names)

    return match


def lora_layers(model: nnx.Module) -> frozenset[tuple[str, ...]]:
    """Module paths of the model's ``Linear`` layers that have LoRA adapters."""
    return frozenset(path for path, _ in lora.adapted_linears(model))


def train_filter(config, model: nnx.Module):
    """The filter of what a run of ``config`` trains in ``model`` (``build_dit(..., adapters=True)``):
    ``trainable_filter`` of ``train.trainable`` plus the camera kind's own layers, with the model's
    adapters when ``train.lora_rank > 0``."""
    names = conditioning.of(config).trainable_names(tuple(config.train.trainable))
    if config.train.lora_rank <= 0:
        return trainable_filter(names)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"train.lora_rank={config.train.lora_rank} but the DiT has no LoRA adapters; "
                         "build it with build_dit(..., adapters=True)")
    return trainable_filter(names, layers)


# The adapters' random A matrices come from their own stream of config.seed (not the DiT's).
_LORA_STREAM = 0x10A


def add_adapters(dit: WanDiT, config, mesh=None, rules=sh.DEFAULT_RULES) -> WanDiT:
    """A run's LoRA adapters (``train.lora_rank > 0``; else nothing): rank ``train.lora_rank``,
    alpha ``train.lora_alpha`` (0: the rank), on every ``Linear`` that ``train.trainable``
    selects; fp32 (they are small, and AdamW on bf16 adapters would round their updates away),
    ``A`` drawn from ``config.seed`` (the same on every process), ``B = 0``; placed on ``mesh`` by
    the base kernel's logical axes (abstract adapters on an abstract model). Returns ``dit``."""
    t = config.train  # rank and alpha were checked where the config loaded
    if t.lora_rank == 0:
        return dit
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(config.seed), _LORA_STREAM))
    try:
        lora.add_lora(dit, int(t.lora_rank), t.lora_alpha or None, tuple(t.trainable), rngs=rngs,
                      param_dtype=jnp.float32, mesh=mesh, rules=rules)
    except ValueError as e:
        raise ValueError(f"train.lora_rank={t.lora_rank} with train.trainable={tuple(t.trainable)}: {e}") from e
    return dit


# ------------------------------------------------------------------ DiT


def _dit_kwargs(config) -> dict:
    m = config.model
    return dict(param_dtype=jnp.dtype(m.param_dtype), dtype=jnp.dtype(m.compute_dtype), attention=m.attention,
                remat=m.remat)


def build_dit(config, mesh, rules, *, seed: int | None = None, adapters: bool = False) -> WanDiT:
    """The DiT of ``config.model`` on ``mesh``: loaded (and overlaid) or random (``seed``,
    default ``config.seed``), made ready for the camera kind (``CameraKind.prepare``: FaceCam's
    landmarks widen the patch embedding to ``model.in_dim``), placed by its logical axes, its
    block linears quantized as ``model.quantize`` says (checked before anything loads).
    ``adapters``: the training model, with ``train.lora_rank``'s adapters (``add_adapters``)."""
    m = config.model
    quant.check_mode(m.quantize, list(mesh.devices.flat))
    kind = conditioning.of(config)
    if m.dit_checkpoint:
        # A kind's own layers come from the files when they hold them (a trained ReCamMaster), else
        # the kind adds them at their initial values below (fine-tuning from a Wan base).
        camera = kind.checkpoint_camera if kind.checkpoint_camera and holds_camera_layers(
            [m.dit_checkpoint, *m.dit_overlay]) else None
        dit = load_dit(m.dit_checkpoint, config=m.dit, dtype=m.param_dtype, compute_dtype=m.compute_dtype,
                       overlay=list(m.dit_overlay) or None, mesh=mesh, rules=rules, attention=m.attention,
                       remat=m.remat, quantize=m.quantize, camera=camera)
    else:
        dit = WanDiT(m.dit, rngs=nnx.Rngs(config.seed if seed is None else seed), **_dit_kwargs(config))
    dit = sh.shard_module(kind.prepare(dit, config), mesh, rules)
    if not m.dit_checkpoint and quant.quantization_mode(dit) != m.quantize:
        quant.quantize_dit(dit, m.quantize)
    return add_adapters(dit, config, mesh, rules) if adapters else dit


def abstract_dit(config, mesh, rules, *, adapters: bool = False) -> WanDiT:
    """``build_dit``'s model as shapes with their shardings (the preset; nothing is read)."""

    def make():
        return conditioning.of(config).prepare(WanDiT(config.model.dit, rngs=nnx.Rngs(0), **_dit_kwargs(config)), config)

    dit = quant.quantize_dit(nnx.eval_shape(make), config.model.quantize)
    if adapters:
        add_adapters(dit, config)
    return _with_shardings(dit, sh.state_shardings(nnx.state(dit), mesh, rules))


# ------------------------------------------------------------------ VAE


def build_vae(config, mesh) -> WanVAE:
    """The frozen VAE, replicated: its 127 M (Wan2.1) parameters are cheap to hold on every
    device, while its activations shard spatially under the mesh (``ACT_HEIGHT``)."""
    v = config.vae
    if v.checkpoint:
        vae = load_vae(v.checkpoint, dtype=jnp.dtype(v.dtype))
    else:
        vae = WanVAE(vae_config(v.config), dtype=jnp.dtype(v.dtype), rngs=nnx.Rngs(config.seed + 1))
    return replicate(vae, mesh)


def abstract_vae(config, mesh) -> WanVAE:
    """``build_vae``'s model (random-init architecture) as replicated shapes."""
    v = config.vae
    vae = nnx.eval_shape(lambda: WanVAE(vae_config(v.config), dtype=jnp.dtype(v.dtype), rngs=nnx.Rngs(0)))
    replicated = NamedSharding(mesh, PartitionSpec())
    return _with_shardings(vae, jax.tree.map(lambda _: replicated, nnx.state(vae)))


def replicate(module: nnx.Module, mesh) -> nnx.Module:
    """A module's variables replicated over ``mesh`` (in place); returns it."""
    nnx.update(module, jax.device_put(nnx.state(module), NamedSharding(mesh, PartitionSpec())))
    return module


def _with_shardings(module: nnx.Module, shardings) -> nnx.Module:
    state = nnx.state(module)
    nnx.update(module, jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings))
    return module


# ------------------------------------------------------------------ text


def text_contexts(config, dit: wan_dit.DiTConfig, *, negative: bool = False):
    """The text context ``[1, text_len, text_dim]`` of ``text.prompt`` (and, with ``negative``,
    of ``sample.negative_prompt`` as a second array), from one read of ``text.embeddings``;
    zeros without a file (the mini configs have no text encoder)."""
    if not config.text.embeddings:
        zeros = np.zeros((1, dit.text_len, dit.text_dim), np.float32)
        return (zeros, zeros) if negative else zeros
    embeddings = text.load_prompt_embeddings(config.text.embeddings)
    prompts = [config.text.prompt] + ([config.sample.negative_prompt] if negative else [])
    contexts = []
    for prompt in prompts:
        ctx = embeddings.context([prompt])
        if ctx.shape[-1] != dit.text_dim:
            raise ValueError(
                f"{config.text.embeddings} holds {ctx.shape[-1]}-d embeddings, the DiT expects text_dim "
                f"{dit.text_dim}; encode the prompt with the matching text encoder")
        contexts.append(np.asarray(ctx, np.float32))
    return tuple(contexts) if negative else contexts[0]
