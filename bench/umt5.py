"""umT5 encoder forward: JAX (this repo) vs transformers' UMT5EncoderModel (torch), side by side.

    python bench/umt5.py                       # a 1/4-width, 4-layer umT5 on the CPU
    python bench/umt5.py --dim 4096 --heads 64 --ffn 10240 --layers 24   # full XXL sizes

Both run the same random weights in fp32 (or ``--dtype bfloat16``) on the same token batch.
Rows: the reference at Wan's full 512-token padding; JAX at 512; JAX at the bucketed length
``encode_prompts`` uses (the prompt's tokens rounded up to 64). Prints median seconds per
forward over ``--repeats`` runs after a warm-up (JAX: compile excluded, reported apart) and
the max abs difference to the reference on real tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax.checkpoints.umt5 import load_umt5


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=2560)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=24, help="real tokens per prompt (FaceCam's prompt has ~6)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = UMT5Config(
        vocab_size=args.vocab,
        d_model=args.dim,
        d_kv=args.head_dim,
        d_ff=args.ffn,
        num_layers=args.layers,
        num_heads=args.heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    ref_model = UMT5EncoderModel(config).eval().to(torch_dtype)
    rng = np.random.default_rng(0)
    ids = np.zeros((args.batch, 512), np.int32)
    mask = np.zeros((args.batch, 512), np.int32)
    ids[:, : args.tokens] = rng.integers(2, args.vocab, size=(args.batch, args.tokens))
    mask[:, : args.tokens] = 1

    with tempfile.TemporaryDirectory() as tmp:
        ref_model.save_pretrained(tmp)
        encoder = load_umt5(tmp, dtype=jnp.dtype(args.dtype))

    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    with torch.no_grad():
        ref = ref_model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.float().numpy()
        t_ref = median_time(lambda: ref_model(input_ids=t_ids, attention_mask=t_mask), args.repeats)

    forward = nnx.jit(lambda e, i, m: e(i, m))
    rows = [("transformers UMT5EncoderModel, L=512", t_ref, None, 0.0)]
    bucket = -(-args.tokens // 64) * 64
    for length in (512, bucket):
        i, m = jnp.asarray(ids[:, :length]), jnp.asarray(mask[:, :length])
        start = time.perf_counter()
        out = jax.block_until_ready(forward(encoder, i, m))
        compile_s = time.perf_counter() - start
        t = median_time(lambda: jax.block_until_ready(forward(encoder, i, m)), args.repeats)
        err = float(np.abs(np.asarray(out, np.float32) - ref[:, :length])[mask[:, :length] == 1].max())
        rows.append((f"facecam_jax UMT5Encoder, L={length}", t, err, compile_s))

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), torch threads {torch.get_num_threads()}")
    print(
        f"config: D={args.dim} N={args.heads} H={args.head_dim} F={args.ffn} layers={args.layers} "
        f"vocab={args.vocab}, batch {args.batch} x {args.tokens} real tokens, {args.dtype}"
    )
    print(f"{'run':42s} {'s/forward':>10s} {'vs torch':>9s} {'max abs err':>12s} {'compile s':>10s}")
    for name, t, err, compile_s in rows:
        err_s = "-" if err is None else f"{err:.2e}"
        print(f"{name:42s} {t:10.4f} {t_ref / t:8.2f}x {err_s:>12s} {compile_s:10.2f}")


if __name__ == "__main__":
    main()
