"""Wan VAE encode/decode: jitted JAX (this project) vs diffusers' AutoencoderKLWan, same weights and input.

    python bench/vae.py                                    # CPU: real Wan2.1 config, 9 x 128 x 128
    python bench/vae.py --config wan22 --video 5x128x128   # the Wan2.2 (z 48) design
    python bench/vae.py --video 81x704x480 --dtype bfloat16 --no-torch   # GPU: FaceCam clip size
    python bench/vae.py --analyze --video 81x704x480       # any machine: XLA's memory plan only

One process, one timed run per model after one untimed warm-up (JAX's warm-up is its
compile): both models are timed back to back on the same machine and the ratio printed.
Weights are random (diffusers' init) and copied into the JAX model. On a GPU the peak
device memory of the JAX run is printed; ``--analyze`` compiles encode and decode for the
given size without running them and prints XLA's buffer plan (arguments, outputs, scratch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import machine  # noqa: E402  (bench/ is the script directory)


def parse_video(text: str) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in text.lower().split("x"))
    return t, h, w


def build_config(name: str):
    from facecam_jax.models import wan_vae as wv

    return {"wan21": wv.VAEConfig.wan21, "wan22": wv.VAEConfig.wan22}.get(name, lambda: wv.VAEConfig.tiny(name))()


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def analyze(cfg, video_shape, dtype, tile, chunked=True) -> None:
    """XLA's buffer plan for encode and decode at this size (compile only, nothing runs)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from facecam_jax.models import wan_vae as wv

    graphdef, state = nnx.split(nnx.eval_shape(lambda: wv.WanVAE(cfg, dtype=dtype)))
    t, h, w = video_shape
    s = cfg.spatial_stride
    opts = wv._RunOptions(chunked=chunked, tile=tile, tile_overlap=(tile[0] // 4 if tile else 0), mesh=None, rules=None)
    video = jax.ShapeDtypeStruct((1, t, h, w, 3), dtype)
    latents = jax.ShapeDtypeStruct((1, 1 + (t - 1) // 4, h // s, w // s, cfg.z_dim), jnp.float32)
    for name, lowered in (
        ("encode", lambda: wv._encode_jit.lower(graphdef, state, video, True, opts)),
        ("decode", lambda: wv._decode_jit.lower(graphdef, state, latents, True, True, opts)),
    ):
        start = time.perf_counter()
        mem = lowered().compile().memory_analysis()
        took = time.perf_counter() - start
        if mem is None:
            print(f"{name}: this backend gives no memory analysis")
            continue
        total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        print(
            f"{name}: weights+inputs {fmt_bytes(mem.argument_size_in_bytes)}, outputs "
            f"{fmt_bytes(mem.output_size_in_bytes)}, scratch {fmt_bytes(mem.temp_size_in_bytes)}, "
            f"total {fmt_bytes(total)} (compile {took:.1f} s)"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="wan21", help="wan21 | wan22 | 2.1 | 2.2 (tiny test configs)")
    parser.add_argument("--video", default="9x128x128", type=parse_video, help="TxHxW of the input clip")
    parser.add_argument("--dtype", default="float32", help="JAX parameter/compute dtype (torch runs fp32)")
    parser.add_argument("--tile", default=None, type=int, help="JAX spatial tile size in pixels (default: none)")
    parser.add_argument("--no-torch", action="store_true", help="time the JAX model only")
    parser.add_argument("--unchunked", action="store_true", help="JAX: the whole clip at once instead of the scan")
    parser.add_argument("--analyze", action="store_true", help="print XLA's memory plan for this size and exit")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from facecam_jax.checkpoints.vae import diffusers_config, load_vae_state_dict

    cfg = build_config(args.config)
    dtype = jnp.dtype(args.dtype)
    t, h, w = args.video
    tile = (args.tile, args.tile) if args.tile else None
    print(f"machine: {machine()}")
    print(f"config {args.config} (z {cfg.z_dim}, stride 4x{cfg.spatial_stride}x{cfg.spatial_stride}), "
          f"video 1x{t}x{h}x{w}x3, jax dtype {dtype.name}, tile {tile}, chunked {not args.unchunked}")  # fmt: skip
    if args.analyze:
        analyze(cfg, (t, h, w), dtype, tile, chunked=not args.unchunked)
        return

    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(**diffusers_config(cfg)).eval()
    vae = load_vae_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, config=cfg, dtype=dtype)
    video = np.random.default_rng(0).uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32)
    mean, std = np.asarray(cfg.latents_mean, np.float32), np.asarray(cfg.latents_std, np.float32)

    def run_jax_encode():
        return jax.block_until_ready(vae.encode(jnp.asarray(video, dtype), tile=tile, chunked=not args.unchunked))

    start = time.perf_counter()
    latents = run_jax_encode()
    compile_enc = time.perf_counter() - start
    start = time.perf_counter()
    latents = run_jax_encode()
    jax_enc = time.perf_counter() - start

    def run_jax_decode():
        return jax.block_until_ready(vae.decode(latents, tile=tile, chunked=not args.unchunked))

    start = time.perf_counter()
    decoded = run_jax_decode()
    compile_dec = time.perf_counter() - start
    start = time.perf_counter()
    decoded = run_jax_decode()
    jax_dec = time.perf_counter() - start
    print(f"jax     encode {jax_enc:8.3f} s (first call incl. compile {compile_enc:.1f} s)")
    print(f"jax     decode {jax_dec:8.3f} s (first call incl. compile {compile_dec:.1f} s)")
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        print(f"jax peak device memory: {fmt_bytes(stats['peak_bytes_in_use'])}")

    if args.no_torch:
        return
    x = torch.from_numpy(video).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        ref.encode(x[:, :, :1])  # warm-up
        start = time.perf_counter()
        posterior = ref.encode(x).latent_dist.mean
        torch_enc = time.perf_counter() - start
        ref.decode(posterior[:, :, :1])  # warm-up
        start = time.perf_counter()
        expected = ref.decode(posterior).sample
        torch_dec = time.perf_counter() - start
    expected_latents = (posterior.permute(0, 2, 3, 4, 1).numpy() - mean) / std
    enc_err = np.abs(np.asarray(latents, np.float32) - expected_latents).max()
    dec_err = np.abs(np.asarray(decoded, np.float32) - expected.permute(0, 2, 3, 4, 1).numpy()).max()
    print(f"torch   encode {torch_enc:8.3f} s, decode {torch_dec:8.3f} s (threads {torch.get_num_threads()})")
    print(f"speed-up (diffusers / jax): encode {torch_enc / jax_enc:.2f}x, decode {torch_dec / jax_dec:.2f}x")
    print(f"max abs err vs diffusers: latents {enc_err:.2e}, video {dec_err:.2e}")


if __name__ == "__main__":
    main()
