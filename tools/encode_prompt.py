"""Encodes prompts with umT5 once and writes them to a prompt-embedding file for configs to point to.

    python tools/encode_prompt.py --checkpoint /ckpt/Wan2.2-I2V-A14B --out prompts/facecam.safetensors \
        "A portrait of a person" ""

With no prompts, writes the prompt and negative prompt of ``--config`` (default: FaceCam's,
"A portrait of a person" and the empty one). ``--checkpoint``
takes Wan's ``models_t5_umt5-xxl-enc-bf16.pth``, a diffusers/transformers ``text_encoder``,
or a checkpoint directory holding either; the tokenizer is looked up in the same directory
unless ``--tokenizer`` is given. The file format is described in ``facecam_jax/text.py``.
"""

from __future__ import annotations

import argparse
import logging
import os

import jax
import jax.numpy as jnp

from facecam_jax import sharding, text
from facecam_jax.checkpoints.umt5 import load_umt5
from facecam_jax.runtime import cli, paths
from facecam_jax.runtime.config_file import config_path, load_config

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prompts", nargs="*", help="prompts to encode (default: the config's prompt and negative prompt)")
    p.add_argument("--config", default=None, help="config whose text.prompt / sample.negative_prompt are the default "
                   "prompts (configs/facecam.py[:variant])")
    p.add_argument("--checkpoint", required=True, help="umT5 weights: Wan .pth, HF safetensors, or a checkpoint dir")
    p.add_argument("--tokenizer", help="spiece.model or a directory holding it (default: looked up from --checkpoint)")
    p.add_argument("--out", required=True, help="output .safetensors prompt-embedding file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weights and compute (Wan: bfloat16)")
    p.add_argument("--text-len", type=int, default=text.TEXT_LEN, help="token limit and padded context length")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree; other devices shard FSDP-style")
    return p.parse_args(argv)


def main(argv=None) -> text.PromptEmbeddings:
    args = parse_args(argv)
    if args.prompts:
        prompts = args.prompts
    else:
        config = load_config(args.config)
        prompts = [config.text.prompt, config.sample.negative_prompt]
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must be a .safetensors path, got {args.out!r}")
    checkpoint_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(args.checkpoint)
    # Before umT5 loads: --out is none of the inputs (the config is read for its prompts only).
    paths.check_outputs({"--out": args.out}, paths.read_paths(
        config_file=None if args.prompts else config_path(args.config),
        inputs={"--checkpoint": args.checkpoint, "--tokenizer": args.tokenizer}))
    tokenizer = text.Tokenizer(args.tokenizer or checkpoint_dir, max_length=args.text_len)

    mesh = sharding.make_mesh(fsdp=-1, tensor=args.tensor) if jax.device_count() > 1 else None
    encoder = load_umt5(args.checkpoint, dtype=DTYPES[args.dtype], mesh=mesh)
    source = f"umT5 {args.checkpoint} ({args.dtype}), tokenizer {tokenizer.path}"
    if mesh is None:
        written = text.encode_prompts_to_file(
            args.out, prompts, encoder, tokenizer, text_len=args.text_len, source=source
        )
    else:
        with sharding.use_mesh(mesh):
            written = text.encode_prompts_to_file(
                args.out, prompts, encoder, tokenizer, text_len=args.text_len, source=source
            )
    for prompt, emb in zip(written.prompts, written.embeddings):
        print(f"{prompt!r}: {emb.shape[0]} tokens x {emb.shape[1]} ({emb.dtype})")
    print(f"wrote {args.out}")
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    cli.run_script(main)
