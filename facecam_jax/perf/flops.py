"""Analytic FLOPs of the DiT and the programs built on it: what a step costs at the chip's peak.

XLA's ``cost_analysis`` counts a scan body once and Pallas kernels not at all, so FLOPs are
counted here: the DiT from its shapes (``dit_flops``, equal to the dots JAX traces, see
tests/test_aot.py), the VAE from its traced convolutions (``vae_flops``). The fit tool and
training's TFLOP/s and MFU both use ``step_flops``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jex_core

from facecam_jax import build, conditioning
from facecam_jax.models.wan_vae import WanVAE
from facecam_jax.perf import chips


def jaxpr_flops(jaxpr) -> float:
    """Multiply-add FLOPs (2 per MAC) of the dots and convolutions in a (closed) jaxpr: scan
    bodies times their length, the larger branch of a cond, a while body once. Pallas kernels
    and elementwise work are not counted. Used for the VAE, whose convs are its cost."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
            total += 2.0 * math.prod(out) * rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
        jaxprs = (jex_core.Jaxpr, jex_core.ClosedJaxpr)
        subs = [v for v in eqn.params.values() if isinstance(v, jaxprs)]
        subs += [b for v in eqn.params.values() if isinstance(v, tuple) for b in v if isinstance(b, jaxprs)]
        if not subs:
            continue
        counts = [jaxpr_flops(s) for s in subs]
        if name == "cond":
            total += max(counts)
        elif name == "scan":
            total += eqn.params["length"] * sum(counts)
        else:
            total += sum(counts)
    return total


def vae_flops(vae_config, video_shape: tuple, *, decode: bool = False) -> float:
    """FLOPs of one Wan VAE encode of ``video_shape [B, T, H, W, 3]`` (or the decode back to it),
    counted from its traced convs (``jaxpr_flops``; shapes only, nothing is compiled)."""
    vae = nnx.eval_shape(lambda: WanVAE(vae_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(vae)
    b, t, h, w, _ = video_shape
    if decode:
        shape = build.latent_shape(vae_config, t, h, w, b)
        fn = lambda st, z: nnx.merge(graphdef, st).decode(z)  # noqa: E731
    else:
        shape = video_shape
        fn = lambda st, v: nnx.merge(graphdef, st).encode(v)  # noqa: E731
    return jaxpr_flops(jax.make_jaxpr(fn)(state, jax.ShapeDtypeStruct(shape, jnp.float32)))


def dit_flops(cfg, batch: int, tokens: int, out_tokens: int, trainable: Sequence[str] | None = None,
              remat: str = "none", lora_rank: int = 0, camera_linears: Sequence[tuple] = (),
              frames: int = 0) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one Wan DiT call on ``batch`` samples of ``tokens`` tokens
    whose head runs on the first ``out_tokens``: ``{"forward", "backward", "remat"}``.

    Forward: every matmul (patch embedding, text and time embeddings, per layer self-attn
    q/k/v/o, cross-attn q/o over the image tokens and k/v over the ``text_len`` text tokens,
    FFN, head) plus attention, 4 L^2 D per layer (QK^T and PV) and 4 L Lt D for cross
    attention. ``trainable`` (``config.train.trainable``; None: no backward) gives the
    backward: a matmul's input gradient costs its forward FLOPs when the input needs a
    gradient (the token stream does whenever the patch embedding or a block is trained; the
    text and time branches only when their embeddings are), and its weight gradient the same
    when that weight is trained; self-attention's backward is twice its forward (dQ, dK, dV,
    dP). ``lora_rank`` > 0 (``train.lora_rank``): every selected linear but the patch
    embedding (trained in full, ``build.trainable_filter``) keeps its base weight frozen (no
    weight gradient) and adds its adapter, ``(x @ A) @ B``: 2 R r (din + dout) forward for R
    rows, and backward dB, d(xA), dA (2 R r (2 dout + din)) plus dx through A when the input
    needs a gradient. ``camera_linears`` (``CameraKind.block_linears``) adds a camera kind's own
    layers to every block, per token or per input latent frame (``frames`` per sample).
    ``remat="full"`` recomputes each block's forward in the backward (less
    FFN fc2, whose output is the saved block output, and its adapter's second matmul); the
    "dots" policies keep the matmuls, so nothing is counted for them. With FaceCam's trainable
    subset, with or without LoRA, these counts equal the dots JAX traces for the step
    (tests/test_aot.py).
    """
    d, f, lt, layers = cfg.dim, cfg.ffn_dim, cfg.text_len, cfg.num_layers
    patch = math.prod(cfg.patch_size)
    b, l = batch, tokens
    names = tuple(trainable or ())
    train = trainable is not None
    tokens_grad = train and (build.is_trainable(("patch_embedding",), names) or build.is_trainable(("blocks",), names)
                             or any(build.is_trainable(("blocks", m, p), names) for m in ("self_attn", "cross_attn", "ffn")
                                    for p in ("q", "k", "v", "o", "fc1", "fc2", "norm_q", "norm_k"))
                             or any(build.is_trainable(path, names) for path, *_ in camera_linears))
    text_grad = train and build.is_trainable(("text_embedding",), names)
    time_grad = train and (build.is_trainable(("time_embedding",), names) or build.is_trainable(("time_projection",), names))

    # (path, rows, din, dout, the input needs a gradient, number of calls)
    linears = [
        (("patch_embedding",), b * l, patch * cfg.in_dim, d, False, 1),
        (("text_embedding", "fc1"), b * lt, cfg.text_dim, d, False, 1),
        (("text_embedding", "fc2"), b * lt, d, d, text_grad, 1),
        (("time_embedding", "fc1"), b, cfg.freq_dim, d, False, 1),
        (("time_embedding", "fc2"), b, d, d, time_grad, 1),
        (("time_projection",), b, d, 6 * d, time_grad, 1),
        (("head", "head"), b * out_tokens, d, cfg.out_dim * patch, tokens_grad, 1),
    ]
    block = [
        (("blocks", "self_attn", "q"), b * l, d, d, tokens_grad),
        (("blocks", "self_attn", "k"), b * l, d, d, tokens_grad),
        (("blocks", "self_attn", "v"), b * l, d, d, tokens_grad),
        (("blocks", "self_attn", "o"), b * l, d, d, tokens_grad),
        (("blocks", "cross_attn", "q"), b * l, d, d, tokens_grad),
        (("blocks", "cross_attn", "k"), b * lt, d, d, text_grad),
        (("blocks", "cross_attn", "v"), b * lt, d, d, text_grad),
        (("blocks", "cross_attn", "o"), b * l, d, d, tokens_grad),
        (("blocks", "ffn", "fc1"), b * l, d, f, tokens_grad),
        (("blocks", "ffn", "fc2"), b * l, f, d, tokens_grad),
    ]
    # A camera kind's own layers (``CameraKind.block_linears``): the input of a per-frame layer is
    # the camera, which needs no gradient; a per-token layer's input is on the tokens' path.
    per_block = [c for c in camera_linears if c[0][0] == "blocks"]
    block += [(path, b * (frames if rows == "frames" else l), din, dout, tokens_grad and rows == "tokens")
              for path, rows, din, dout in per_block]
    # Once per forward (a camera patchify): its input is the camera's, which needs no gradient.
    linears += [(path, b * (frames if rows == "frames" else l), din, dout, False, 1)
                for path, rows, din, dout in camera_linears if path[0] != "blocks"]
    linears += [(*entry, layers) for entry in block]
    r = lora_rank if train else 0
    adapted = lambda path: r > 0 and path != ("patch_embedding",) and build.is_trainable(path, names)  # noqa: E731
    self_attn = 4 * b * l * l * d
    cross_attn = 4 * b * l * lt * d

    def forward_of(path, rows, din, dout):
        return 2 * rows * din * dout + (2 * rows * r * (din + dout) if adapted(path) else 0)

    block_forward = layers * (sum(forward_of(p, *dims) for p, *dims, _ in block) + self_attn + cross_attn)
    forward = sum(n * forward_of(p, rows, din, dout) for p, rows, din, dout, _, n in linears)
    forward += layers * (self_attn + cross_attn)
    backward = 0.0
    if train:
        for path, rows, din, dout, grad, n in linears:
            fl = 2 * rows * din * dout
            if adapted(path):  # frozen base: its input gradient only; the adapter's dB, d(xA), dA (and dx)
                backward += n * (fl * int(grad) + 2 * rows * r * (2 * dout + din + din * int(grad)))
            else:
                backward += n * fl * (int(grad) + int(build.is_trainable(path, names)))
        if tokens_grad:  # self: dP, dV, dS->dQ, dK; cross: dP, dQ (+ dK, dV when the text needs grads)
            backward += layers * (2 * self_attn + cross_attn * (2 if text_grad else 1))
    # Full remat recomputes a block's forward except its last matmul (FFN fc2, and the second
    # matmul of fc2's adapter): that output only feeds the block's output, which the scan keeps
    # as the next block's input.
    fc2 = ("blocks", "ffn", "fc2")
    last = 2 * b * l * f * d + (2 * b * l * r * d if adapted(fc2) else 0)
    recompute = block_forward - layers * last if train and remat == "full" else 0.0
    return {"forward": float(forward), "backward": float(backward), "remat": float(recompute)}


def step_flops(config, program: str, *, windows: int = 1, evaluations: int | None = None) -> dict[str, float]:
    """Analytic FLOPs of one step of ``program`` ("train" or "sample") for ``config``.

    train: the DiT forward + backward (+ remat) on ``data.batch_size`` samples (``dit_flops``
    with ``train.trainable``, ``model.remat`` and ``train.lora_rank``; plus the camera kind's layers
    outside the blocks, ``CameraKind.side_flops``) and the frozen VAE encode of source, target
    and the camera kind's videos (3 x batch for FaceCam's landmark maps). sample: ``sample.num_steps`` DiT forwards on a batch of 2
    with CFG (1 without: ``sample.cfg_scale == 1``), one expert per step, plus the VAE encode
    of the source and the camera kind's videos and the decode of the output. VAE FLOPs are its convs counted from
    the traced program (``vae_flops``). A long video sampled in ``windows`` windows costs that
    many windows' forwards and VAE calls; ``evaluations``: the steps that run the block stack
    (a step cache's plan; default every step; a skipped step costs only the embeddings and the
    head, counted here as nothing). Returns the parts and their ``"total"``.
    """
    m, d = config.model, config.data
    dit_config = build.dit_config(config)
    vae_config = build.vae_config(config.vae.config)
    tokens, out_tokens = build.token_counts(config)
    kind = conditioning.of(config)
    videos = 2 + len(kind.batch_videos)  # source, target and the camera kind's videos
    camera = dict(camera_linears=kind.block_linears(dit_config),
                  frames=kind.input_frames(build.latent_shape(vae_config, d.frames, d.height, d.width)[1]))
    video = (d.frames, d.height, d.width, 3)
    if program == "train":
        b = d.batch_size
        parts = dit_flops(dit_config, b, tokens, out_tokens, kind.trainable_names(tuple(config.train.trainable)),
                          m.remat, config.train.lora_rank, **camera)
        side = b * kind.side_flops(dit_config, d.frames)  # trained whole: input and weight gradients
        parts["forward"] += side
        parts["backward"] += 2 * side
        parts["vae"] = vae_flops(vae_config, (videos * b, *video))
    elif program == "sample":
        s = config.sample
        cfg_batch = 1 + (s.cfg_scale != 1.0) + (s.get("camera_guidance", 1.0) != 1.0)  # passes per step
        one = dit_flops(dit_config, cfg_batch * windows, tokens, out_tokens, **camera)
        one["forward"] += cfg_batch * windows * kind.side_flops(dit_config, d.frames)
        parts = {"forward": (s.num_steps if evaluations is None else evaluations) * one["forward"]}
        parts["vae"] = (vae_flops(vae_config, ((videos - 1) * windows, *video))
                        + vae_flops(vae_config, (windows, *video), decode=True))
    else:
        raise ValueError(f"program must be 'train' or 'sample', got {program!r}")
    parts["total"] = sum(parts.values())
    return parts


@dataclasses.dataclass(frozen=True)
class Throughput:
    """TFLOP/s per device and MFU of a step: the analytic FLOPs of the step
    (``step_flops``, the fit tool's count) over its time and the mesh's devices, against
    the device's dense bf16 peak (``chips.CHIPS``, or ``train.peak_tflops``; no MFU without one)."""

    flops_per_step: float
    devices: int
    peak_per_device: float | None

    @classmethod
    def of(cls, config, mesh, program: str = "train") -> "Throughput":
        """Of one step of ``program`` ("train": a training step, "sample": one sampling run)."""
        peak = chips.peak_flops(mesh.devices.flat[0], config.train.peak_tflops)
        return cls(step_flops(config, program)["total"], mesh.size, peak)

    def __call__(self, seconds: float) -> dict[str, float]:
        per_device = self.flops_per_step / seconds / self.devices
        out = {"tflops_per_device": per_device / 1e12}
        if self.peak_per_device:
            out["mfu"] = per_device / self.peak_per_device
        return out

    @staticmethod
    def postfix(metrics: dict) -> dict[str, str]:
        out = {"tflops": f"{metrics['tflops_per_device']:.3g}"}
        if "mfu" in metrics:
            out["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        return out
