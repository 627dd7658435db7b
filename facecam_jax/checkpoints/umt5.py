"""Loads umT5 encoder weights (HF ``UMT5EncoderModel`` or original Wan naming) into ``UMT5Encoder``.

Two namings are read, detected from the keys:

- original Wan ``models_t5_umt5-xxl-enc-bf16.pth`` (a torch pickle, read by the restricted
  unpickler in ``pth.py``): ``token_embedding.weight``, ``blocks.N.attn.q.weight``,
  ``blocks.N.pos_embedding.embedding.weight``, ``blocks.N.ffn.gate.0.weight``, ``norm.weight``;
- transformers / diffusers ``text_encoder`` safetensors (single or sharded):
  ``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight``,
  ``encoder.block.N.layer.1.DenseReluDense.wi_0.weight``, ``encoder.final_layer_norm.weight``.

The sizes (vocab, width, heads from the relative-bias table, head size, d_ff, layers) are
read from the tensor shapes when no config is given. Tensors are read one at a time
(memory-mapped) and each stacked parameter is placed on its devices as soon as it is built.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from facecam_jax import sharding
from facecam_jax.checkpoints.io import CheckpointError, format_key_problems, open_checkpoint, strip_prefix
from facecam_jax.checkpoints.tensor_ref import TensorRef
from facecam_jax.models.umt5 import UMT5Config, UMT5Encoder
from facecam_jax.runtime import progress as progress_lib

log = logging.getLogger(__name__)

WAN_T5_FILENAME = "models_t5_umt5-xxl-enc-bf16.pth"

# Per-layer checkpoint keys of each naming; "{i}" is the layer index.
_LAYER_KEYS = {
    "wan": {
        "attn_norm": "blocks.{i}.norm1.weight",
        "q": "blocks.{i}.attn.q.weight",
        "k": "blocks.{i}.attn.k.weight",
        "v": "blocks.{i}.attn.v.weight",
        "o": "blocks.{i}.attn.o.weight",
        "rel_bias": "blocks.{i}.pos_embedding.embedding.weight",
        "ffn_norm": "blocks.{i}.norm2.weight",
        "gate": "blocks.{i}.ffn.gate.0.weight",
        "fc1": "blocks.{i}.ffn.fc1.weight",
        "fc2": "blocks.{i}.ffn.fc2.weight",
    },
    "hf": {
        "attn_norm": "encoder.block.{i}.layer.0.layer_norm.weight",
        "q": "encoder.block.{i}.layer.0.SelfAttention.q.weight",
        "k": "encoder.block.{i}.layer.0.SelfAttention.k.weight",
        "v": "encoder.block.{i}.layer.0.SelfAttention.v.weight",
        "o": "encoder.block.{i}.layer.0.SelfAttention.o.weight",
        "rel_bias": "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
        "ffn_norm": "encoder.block.{i}.layer.1.layer_norm.weight",
        "gate": "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",  # goes through the GELU
        "fc1": "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",
        "fc2": "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
    },
}
_GLOBAL_KEYS = {
    "wan": {"token_embedding": ("token_embedding.weight",), "norm": ("norm.weight",)},
    # The embedding is tied: files hold `shared.weight`, `encoder.embed_tokens.weight`, or both.
    "hf": {
        "token_embedding": ("shared.weight", "encoder.embed_tokens.weight"),
        "norm": ("encoder.final_layer_norm.weight",),
    },
}
_LINEAR = {"q", "k", "v", "o", "gate", "fc1", "fc2"}  # torch [out, in] -> ours [in, out]

# Keys that may sit beside an encoder and are skipped: the decoder and LM head of a full
# encoder-decoder checkpoint, and the tokenizer that ComfyUI embeds as a byte tensor.
_SKIPPED = re.compile(r"^(decoder\.|lm_head\.|spiece_model$)")


def find_umt5_checkpoint(path: str | os.PathLike) -> str:
    """The umT5 weights behind ``path``: a file, or a Wan / diffusers / HF checkpoint directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    wan = os.path.join(path, WAN_T5_FILENAME)
    if os.path.exists(wan):
        return wan
    sub = os.path.join(path, "text_encoder")  # diffusers pipeline layout
    if os.path.isdir(sub):
        return sub
    named = [
        f
        for f in glob.glob(os.path.join(path, "*"))
        if re.search(r"t5", os.path.basename(f), re.I) and f.endswith((".pth", ".pt", ".safetensors", ".index.json"))
    ]
    if len(named) == 1:
        return named[0]
    return path  # a directory holding just the encoder (HF layout): open_checkpoint handles it


def _detect_naming(refs: Mapping[str, TensorRef], path: str) -> str:
    if "token_embedding.weight" in refs or "blocks.0.attn.q.weight" in refs:
        return "wan"
    if "shared.weight" in refs or "encoder.block.0.layer.0.SelfAttention.q.weight" in refs:
        return "hf"
    sample = sorted(refs)[:8]
    raise CheckpointError(
        f"{path}: not a umT5 encoder checkpoint: expected Wan keys (token_embedding.weight, blocks.N.attn.q.weight) "
        f"or transformers keys (shared.weight, encoder.block.N.layer.0.SelfAttention.q.weight); first keys: {sample}"
    )


def _read_hf_config(path: str) -> dict:
    """The transformers ``config.json`` next to the weights, if there is one (for max distance and eps)."""
    root = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(root, "config.json")
    if not os.path.exists(cfg_path):
        return {}
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{cfg_path}: corrupt config.json ({e})") from None
    return cfg if isinstance(cfg, dict) and cfg.get("model_type") in ("umt5", "t5", "mt5") else {}


def infer_config(refs: Mapping[str, TensorRef], naming: str, hf_config: Mapping | None = None) -> UMT5Config:
    """Encoder sizes from the tensor shapes (heads and buckets from the relative-bias table)."""
    keys = _LAYER_KEYS[naming]
    emb_key = next(k for k in _GLOBAL_KEYS[naming]["token_embedding"] if k in refs)
    vocab, dim = refs[emb_key].shape
    layer_re = re.compile(re.escape(keys["q"]).replace(r"\{i\}", r"(\d+)") + "$")
    indices = sorted(int(m.group(1)) for k in refs if (m := layer_re.match(k)))
    if not indices or indices != list(range(len(indices))):
        raise CheckpointError(f"layer indices of {keys['q']!r} are not 0..n-1: {indices[:10]}")
    num_buckets, num_heads = refs[keys["rel_bias"].format(i=0)].shape
    attn_dim = refs[keys["q"].format(i=0)].shape[0]
    ffn_dim = refs[keys["fc1"].format(i=0)].shape[0]
    if attn_dim % num_heads:
        raise CheckpointError(f"attention width {attn_dim} is not a multiple of {num_heads} heads")
    hf_config = hf_config or {}
    return UMT5Config(
        vocab_size=int(vocab),
        dim=int(dim),
        num_heads=int(num_heads),
        head_dim=int(attn_dim // num_heads),
        ffn_dim=int(ffn_dim),
        num_layers=len(indices),
        num_buckets=int(num_buckets),
        max_distance=int(hf_config.get("relative_attention_max_distance", 128)),
        eps=float(hf_config.get("layer_norm_epsilon", 1e-6)),
    )


def _expected_shapes(config: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Torch-layout shape of one layer's tensor for every per-layer name, and of the globals."""
    d, a, f = config.dim, config.attn_dim, config.ffn_dim
    return {
        "attn_norm": (d,),
        "q": (a, d),
        "k": (a, d),
        "v": (a, d),
        "o": (d, a),
        "rel_bias": (config.num_buckets, config.num_heads),
        "ffn_norm": (d,),
        "gate": (f, d),
        "fc1": (f, d),
        "fc2": (d, f),
        "token_embedding": (config.vocab_size, d),
        "norm": (d,),
    }


def _place(shape, build: Callable[[], np.ndarray], axes, mesh: Mesh | None, rules) -> jax.Array:
    """Builds a host array and puts it on the default device, or sharded over ``mesh`` by its axes."""
    host = build()
    if mesh is None:
        return jnp.asarray(host)
    named = sharding.logical_sharding(axes, shape, mesh, rules)
    return jax.make_array_from_callback(tuple(shape), named, lambda index: host[index])


def load_umt5(
    path: str | os.PathLike,
    *,
    config: UMT5Config | None = None,
    dtype=jnp.bfloat16,
    mesh: Mesh | None = None,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> UMT5Encoder:
    """Reads umT5 encoder weights into a ``UMT5Encoder`` (parameters in ``dtype``).

    ``path``: Wan's ``models_t5_umt5-xxl-enc-bf16.pth``, a transformers/diffusers safetensors
    file, sharded index, or a directory holding one (a Wan or diffusers checkpoint directory
    works). ``config`` defaults to the one read from the shapes; when given it must match them.
    With ``mesh``, every parameter is placed sharded by its logical axes as it is read.
    Raises ``CheckpointError`` naming every missing, unexpected or mis-shaped tensor, or one
    holding a NaN or Inf.
    """
    file = find_umt5_checkpoint(path)
    refs = strip_prefix(open_checkpoint(file), ("text_encoder.", "model.", "module."))
    naming = _detect_naming(refs, file)
    inferred = infer_config(refs, naming, _read_hf_config(file) if naming == "hf" else None)
    config = inferred if config is None else config
    shapes = _expected_shapes(config)
    layer_keys, global_keys = _LAYER_KEYS[naming], _GLOBAL_KEYS[naming]

    # Resolve every parameter to its checkpoint key(s), then check the whole file at once.
    wanted: dict[str, tuple[str, tuple[int, ...]]] = {}  # checkpoint key -> (param name, torch shape)
    missing = []
    for name, candidates in global_keys.items():
        present = [k for k in candidates if k in refs]
        if present:
            wanted[present[0]] = (name, shapes[name])
        else:
            missing.append(candidates[0])
    for i in range(config.num_layers):
        for name, pattern in layer_keys.items():
            key = pattern.format(i=i)
            if key in refs:
                wanted[key] = (name, shapes[name])
            else:
                missing.append(key)
    spare_tied = {k for k in global_keys["token_embedding"][1:] if k in refs and k not in wanted}
    skipped = sorted(k for k in refs if _SKIPPED.match(k))
    unexpected = sorted(set(refs) - set(wanted) - spare_tied - set(skipped))
    mismatched = [
        f"{k}: {tuple(refs[k].shape)} vs {shape}" for k, (_, shape) in wanted.items() if tuple(refs[k].shape) != shape
    ]
    for k in spare_tied:  # a tied copy must agree in shape with the one that is read
        if tuple(refs[k].shape) != shapes["token_embedding"]:
            mismatched.append(f"{k}: {tuple(refs[k].shape)} vs {shapes['token_embedding']}")
    if missing or unexpected or mismatched:
        read_from_file = "" if config == inferred else f" (the file's shapes say {inferred})"
        raise CheckpointError(
            f"{file}: the {naming}-named umT5 checkpoint does not fit {config}{read_from_file}:"
            + format_key_problems(missing, unexpected, mismatched)
        )
    if skipped:
        log.info("%s: skipped %d tensors that are not part of the encoder (e.g. %s)", file, len(skipped), skipped[0])

    np_dtype = np.dtype(jnp.dtype(dtype))

    bar = progress_lib.bar(total=len(wanted), desc="loading umT5", unit="tensor", delay=progress_lib.DELAY)

    def read(key: str, name: str) -> np.ndarray:
        arr = refs[key].load_finite(key)
        arr = arr.T if name in _LINEAR else arr
        bar.update()
        return np.asarray(arr, dtype=np_dtype)

    def stacked(name: str) -> Callable[[], np.ndarray]:
        def build():
            first = read(layer_keys[name].format(i=0), name)
            out = np.empty((config.num_layers, *first.shape), np_dtype)
            out[0] = first
            for i in range(1, config.num_layers):
                out[i] = read(layer_keys[name].format(i=i), name)
            return out

        return build

    key_of = {name: key for key, (name, _) in wanted.items() if name in global_keys}
    model = nnx.eval_shape(lambda: UMT5Encoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
    targets = {name: getattr(model, name) for name in global_keys}
    targets.update({name: getattr(model.blocks, name) for name in layer_keys})
    with bar:
        for name, var in targets.items():
            build = (lambda n=name: read(key_of[n], n)) if name in global_keys else stacked(name)
            var.set_value(_place(var.get_value().shape, build, sharding.variable_axes(var), mesh, rules))
    log.info("loaded umT5 encoder (%s naming, %s) from %s", naming, config, file)
    return model
