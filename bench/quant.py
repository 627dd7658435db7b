"""Weight-only int8 / fp8 DiT: velocity error against the fp32 and bf16 models, and weight bytes.

    python bench/quant.py                                   # CPU: 1.3B-shaped blocks, 2 layers, 256 tokens
    python bench/quant.py --layers 30 --latent 21x88x60     # GPU: the whole 1.3B at FaceCam shape

A random model of the preset's shapes (FaceCam in_dim 36, ``--layers`` blocks) computes
FaceCam's velocity (the landmarks camera kind) in five forms: fp32 (the reference), bf16 (bf16 weights and compute),
int8 / fp8 quantized from the bf16 weights with bf16 compute (what ``load_dit(bf16 checkpoint,
quantize=...)`` gives), and int8 / fp8 quantized from the fp32 weights with fp32 compute (the
weight rounding alone). Errors are ``||v - v_ref|| / ||v_ref||``. Weight bytes are counted
for the benchmarked stack, from each compiled program's arguments, and for full presets.
Random weights have no outlier channels; real checkpoints can quantize worse.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine  # noqa: E402  (bench/ is the script directory)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--layers", type=int, default=2, help="blocks in the stack (the preset's own count: 0)")
    p.add_argument("--latent", default="2x16x16", help="F x H x W of ONE half (target or source)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from facecam_jax import conditioning
    from facecam_jax.models import quant as Q
    from facecam_jax.models import wan_dit as W
    from facecam_jax.options import DEFAULT_CAMERA_KIND

    cfg = W.get_config(args.preset).replace(in_dim=36)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    f, h, w = (int(v) for v in args.latent.split("x"))
    n_tokens = 2 * f * (h // 2) * (w // 2)
    rng = np.random.default_rng(args.seed)
    noisy, cam, src = (rng.standard_normal((1, f, h, w, 16)).astype(np.float32) for _ in range(3))
    t = np.array([700.0], np.float32)
    ctx = rng.standard_normal((1, 64, cfg.text_dim)).astype(np.float32)
    inputs = (noisy, cam, src, t, ctx)
    print(f"machine: {machine()}")
    print(f"preset {args.preset} shapes, {cfg.num_layers} blocks: dim {cfg.dim}, ffn {cfg.ffn_dim}, heads "
          f"{cfg.num_heads}, in_dim {cfg.in_dim}; input two halves of {f}x{h}x{w} latents -> {n_tokens} tokens, "
          f"text {ctx.shape[1]} tokens padded to {cfg.text_len}")

    def build(dtype):
        # Same key, so the bf16 model holds the fp32 model's weights rounded to bf16.
        return W.WanDiT(cfg, rngs=nnx.Rngs(args.seed), param_dtype=dtype, dtype=dtype)

    def run(model):
        graphdef, state = nnx.split(model)
        kind = conditioning.get(DEFAULT_CAMERA_KIND)  # FaceCam's: the camera is one latent video
        fn = jax.jit(lambda state, x, camera, source, t, c: kind.velocity(
            nnx.merge(graphdef, state), x, source, {k: camera for k in kind.batch_videos}, t, c))
        start = time.perf_counter()
        compiled = fn.lower(state, *inputs).compile()
        v = np.asarray(compiled(state, *inputs))
        return v, compiled.memory_analysis(), time.perf_counter() - start

    forms = [
        ("fp32", jnp.float32, "none"),
        ("bf16", jnp.bfloat16, "none"),
        ("int8 (bf16 compute)", jnp.bfloat16, "int8"),
        ("fp8 (bf16 compute)", jnp.bfloat16, "fp8"),
        ("int8 (fp32 compute)", jnp.float32, "int8"),
        ("fp8 (fp32 compute)", jnp.float32, "fp8"),
    ]
    results = {}
    for name, dtype, mode in forms:
        model = Q.quantize_dit(build(dtype), mode)
        v, mem, seconds = run(model)
        results[name] = (v, Q.weight_bytes(model), mem, seconds)
        del model
    ref32, ref16 = results["fp32"][0], results["bf16"][0]
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731

    print(f"\n{'model':<22}{'err vs fp32':>13}{'err vs bf16':>13}{'block linears':>16}{'all weights':>14}"
          f"{'program args':>15}{'compile+run':>13}")
    for name, (v, nbytes, mem, seconds) in results.items():
        e32 = "-" if name == "fp32" else f"{rel(v, ref32):.2e}"
        e16 = "-" if name in ("fp32", "bf16") else f"{rel(v, ref16):.2e}"
        print(f"{name:<22}{e32:>13}{e16:>13}{nbytes['block_linears'] / 2**20:>12.1f} MiB"
              f"{nbytes['total'] / 2**20:>10.1f} MiB{mem.argument_size_in_bytes / 2**20:>11.1f} MiB{seconds:>11.1f} s")

    print("\nfull presets (abstract, no memory): weight GiB, block linears / all")
    for preset in ("wan2.1-t2v-1.3b", "wan2.2-i2v-a14b"):
        row = []
        for dtype, mode in ((jnp.float32, "none"), (jnp.bfloat16, "none"), (jnp.bfloat16, "int8"),
                            (jnp.bfloat16, "fp8")):
            nbytes = Q.weight_bytes(Q.quantize_dit(W.abstract_model(preset, param_dtype=dtype), mode))
            label = mode if mode != "none" else np.dtype(dtype).name
            row.append(f"{label} {nbytes['block_linears'] / 2**30:.2f} / {nbytes['total'] / 2**30:.2f}")
        print(f"  {preset:<18} " + " | ".join(row))


if __name__ == "__main__":
    main()
