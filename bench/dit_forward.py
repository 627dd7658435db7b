"""DiT forward: jitted JAX (this project) vs diffusers' WanTransformer3DModel, same weights and shapes.

    python bench/dit_forward.py                        # CPU: mid-size config, FaceCam layout
    python bench/dit_forward.py --preset wan2.1-t2v-1.3b --latent 21x88x60 --dtype bfloat16 \
        --attention cudnn                              # GPU: 1.3B at FaceCam shape (55,440 tokens)

The input is FaceCam's: two halves of F x H x W latents (target + source) concatenated along
frames with 36 channels, so a `--latent FxHxW` run has 2*F*H*W/4 tokens. One process, one
run: both models are timed back to back on the same machine and the ratio is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine  # noqa: E402  (bench/ is the script directory)

# Peak dense bf16 TFLOP/s used for MFU (spec sheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def forward_flops(cfg, n_tokens: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): projections, attention, FFN, head."""
    d, f, lt = cfg.dim, cfg.ffn_dim, cfg.text_len
    per_layer = (
        4 * 2 * n_tokens * d * d  # self-attn q, k, v, o
        + 2 * 2 * n_tokens * n_tokens * d  # self-attn scores and values
        + 2 * 2 * n_tokens * d * d + 2 * 2 * lt * d * d  # cross-attn q, o and k, v
        + 2 * 2 * n_tokens * lt * d  # cross-attn scores and values
        + 2 * 2 * n_tokens * d * f  # ffn
    )
    embed = 2 * n_tokens * d * (cfg.in_dim * math.prod(cfg.patch_size)) + 2 * 2 * lt * cfg.text_dim * d
    head = 2 * n_tokens * d * cfg.out_dim * math.prod(cfg.patch_size)
    return cfg.num_layers * per_layer + embed + head


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="a full preset; default: the mid-size CPU config")
    p.add_argument("--latent", default="4x16x16", help="F x H x W of ONE half (target or source)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="xla", help="xla | cudnn | chunked | auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-torch", action="store_true", help="time only JAX (e.g. when torch has no GPU build)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from facecam_jax.checkpoints import dit as ckpt
    from facecam_jax.checkpoints.io import write_safetensors
    from facecam_jax.models import wan_dit as W

    if args.preset:
        cfg = W.get_config(args.preset).replace(in_dim=36)
    else:
        cfg = W.DiTConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, in_dim=36, out_dim=16)
    f, h, w = (int(v) for v in args.latent.split("x"))
    n_tokens = 2 * f * (h // 2) * (w // 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2 * f, h, w, cfg.in_dim)).astype(np.float32)
    t = np.array([700.0], np.float32)
    ctx = (0.1 * rng.standard_normal((1, cfg.text_len, cfg.text_dim))).astype(np.float32)
    flops = forward_flops(cfg, n_tokens)
    print(f"machine: {machine()}")
    print(f"config: {cfg}\ninput: two halves of {f}x{h}x{w} latents -> {n_tokens:,} tokens, {args.dtype}, "
          f"attention={args.attention}, {flops / 1e12:.2f} TFLOP per forward")

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "dit.safetensors")
        torch_model = None
        if not args.skip_torch:
            import torch
            from diffusers import WanTransformer3DModel

            torch.manual_seed(0)
            torch_model = WanTransformer3DModel.from_config(ckpt.diffusers_config(cfg)).eval()
            write_safetensors(weights, {k: v.numpy() for k, v in torch_model.state_dict().items()})
        else:
            model = W.WanDiT(cfg, rngs=nnx.Rngs(0))
            ckpt.save_dit(model, weights)
            del model
        dtype = jnp.dtype(args.dtype)
        model = ckpt.load_dit(weights, config=cfg, dtype=dtype, attention=args.attention)

    fwd = nnx.jit(lambda m, x, t, c: m(x, t, c, out_frames=f))
    xj, tj, cj = jnp.asarray(x, dtype), jnp.asarray(t), jnp.asarray(ctx, dtype)
    start = time.perf_counter()
    out_j = fwd(model, xj, tj, cj).block_until_ready()
    compile_s = time.perf_counter() - start
    run_jax = lambda: fwd(model, xj, tj, cj).block_until_ready()  # noqa: E731

    run_torch = None
    if torch_model is not None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        torch_model = torch_model.to(device=device, dtype=tdtype)
        xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()).to(device, tdtype)
        tt, ct = torch.from_numpy(t).to(device), torch.from_numpy(ctx).to(device, tdtype)

        def run_torch():
            with torch.inference_mode():
                out = torch_model(xt, tt, ct, return_dict=False)[0][:, :, :f]
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        out_t = run_torch()

    # Interleaved, so both see the same machine load.
    jax_times, torch_times = [], []
    for _ in range(args.repeats):
        jax_times += timed(run_jax, 1)
        if run_torch is not None:
            torch_times += timed(run_torch, 1)
    jax_s = statistics.median(jax_times)
    tflops = flops / jax_s / 1e12
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    mfu = f", MFU {100 * tflops / peak:.1f}% of {peak:.0f}" if peak and jax.default_backend() == "gpu" else ""
    print(f"JAX      : {jax_s * 1e3:9.1f} ms/forward (median of {args.repeats}; first call incl. compile "
          f"{compile_s:.1f}s), {tflops:.2f} TFLOP/s{mfu}")
    if run_torch is not None:
        torch_s = statistics.median(torch_times)
        ref = out_t.float().cpu().numpy().transpose(0, 2, 3, 4, 1)
        err = float(np.abs(np.asarray(out_j, np.float32) - ref).max())
        print(f"diffusers: {torch_s * 1e3:9.1f} ms/forward (median of {args.repeats}, torch {torch.__version__}, "
              f"{device}), {flops / torch_s / 1e12:.2f} TFLOP/s")
        print(f"ratio    : diffusers / JAX = {torch_s / jax_s:.2f}x   (max abs output difference {err:.2e})")


if __name__ == "__main__":
    main()
