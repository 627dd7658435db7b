"""DiT forward: jitted JAX (this project) vs diffusers' WanTransformer3DModel, same weights and shapes.

    python bench/dit_forward.py                        # CPU: mid-size config, FaceCam layout
    python bench/dit_forward.py --preset wan2.1-t2v-1.3b --latent 21x88x60 --dtype bfloat16 \
        --attention cudnn                              # GPU: 1.3B at FaceCam shape (55,440 tokens)

The input is FaceCam's: two halves of F x H x W latents (target + source) concatenated along
frames with 36 channels, so a `--latent FxHxW` run has 2*F*H*W/4 tokens. One process, one
run: both models are timed back to back (interleaved) on the same machine and the ratio is
printed. FLOPs are ``flops.dit_flops``; MFU is against the chip's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import machine  # noqa: E402
from facecam_jax.checkpoints import dit as ckpt  # noqa: E402
from facecam_jax.checkpoints.io import write_safetensors  # noqa: E402
from facecam_jax.models import wan_dit as W  # noqa: E402
from facecam_jax.perf import chips
from facecam_jax.perf.flops import dit_flops  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def run(cfg, latent: tuple[int, int, int], *, dtype: str = "float32", attention: str = "xla", repeats: int = 5,
        with_torch: bool = True) -> dict:
    """Times the jitted forward of this project and diffusers' on the same random weights and
    FaceCam input (two halves of ``latent`` = F x H x W); returns the numbers."""
    f, h, w = latent
    n_tokens = 2 * f * (h // 2) * (w // 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2 * f, h, w, cfg.in_dim)).astype(np.float32)
    t = np.array([700.0], np.float32)
    ctx = (0.1 * rng.standard_normal((1, cfg.text_len, cfg.text_dim))).astype(np.float32)
    flops = dit_flops(cfg, 1, n_tokens, n_tokens // 2)["forward"]
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "dit.safetensors")
        torch_model = None
        if with_torch:
            import torch
            from diffusers import WanTransformer3DModel

            torch.manual_seed(0)
            torch_model = WanTransformer3DModel.from_config(ckpt.diffusers_config(cfg)).eval()
            write_safetensors(weights, {k: v.numpy() for k, v in torch_model.state_dict().items()})
        else:
            model = W.WanDiT(cfg, rngs=nnx.Rngs(0))
            ckpt.save_dit(model, weights)
            del model
        model = ckpt.load_dit(weights, config=cfg, dtype=jnp.dtype(dtype), attention=attention)

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
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
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
    for _ in range(repeats):
        jax_times += timed(run_jax, 1)
        if run_torch is not None:
            torch_times += timed(run_torch, 1)
    jax_s = statistics.median(jax_times)
    peak = chips.peak_flops(jax.devices()[0])
    out = {"config": str(cfg), "tokens": n_tokens, "dtype": dtype, "attention": attention, "flops": flops,
           "repeats": repeats, "jax_s": jax_s, "jax_compile_s": compile_s, "jax_tflops": flops / jax_s / 1e12,
           "jax_mfu": flops / jax_s / peak if peak else None}
    if run_torch is not None:
        torch_s = statistics.median(torch_times)
        ref = out_t.float().cpu().numpy().transpose(0, 2, 3, 4, 1)
        out.update(torch_s=torch_s, torch=f"torch {torch.__version__}, {device}", torch_tflops=flops / torch_s / 1e12,
                   ratio=torch_s / jax_s, max_abs_diff=float(np.abs(np.asarray(out_j, np.float32) - ref).max()))
    return out


def report(r: dict) -> str:
    mfu = f", MFU {100 * r['jax_mfu']:.1f}%" if r["jax_mfu"] else ""
    lines = [f"input: {r['tokens']:,} tokens, {r['dtype']}, attention={r['attention']}, "
             f"{r['flops'] / 1e12:.2f} TFLOP per forward",
             f"JAX      : {r['jax_s'] * 1e3:9.1f} ms/forward (median of {r['repeats']}; first call incl. compile "
             f"{r['jax_compile_s']:.1f}s), {r['jax_tflops']:.2f} TFLOP/s{mfu}"]
    if "torch_s" in r:
        lines += [f"diffusers: {r['torch_s'] * 1e3:9.1f} ms/forward (median of {r['repeats']}, {r['torch']}), "
                  f"{r['torch_tflops']:.2f} TFLOP/s",
                  f"ratio    : diffusers / JAX = {r['ratio']:.2f}x   (max abs output difference {r['max_abs_diff']:.2e})"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="a full preset; default: the mid-size CPU config")
    p.add_argument("--latent", default="4x16x16", help="F x H x W of ONE half (target or source)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="xla", help="xla | cudnn | chunked | auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-torch", action="store_true", help="time only JAX (e.g. when torch has no GPU build)")
    args = p.parse_args(argv)
    if args.preset:
        cfg = W.get_config(args.preset).replace(in_dim=36)
    else:
        cfg = W.DiTConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, in_dim=36, out_dim=16)
    latent = tuple(int(v) for v in args.latent.split("x"))
    print(f"machine: {machine()}")
    print(f"config: {cfg}")
    print(report(run(cfg, latent, dtype=args.dtype, attention=args.attention, repeats=args.repeats,
                     with_torch=not args.skip_torch)))


if __name__ == "__main__":
    main()
