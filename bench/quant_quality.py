"""Weight-only int8 / fp8 quantization of the shipped mini model: held-out quality, and distance to float.

    python bench/quant_quality.py                         # Euler-20 (the learn config's), 36 held-out pairs
    python bench/quant_quality.py --sample sample.solver=unipc,sample.num_steps=20

The `learn` model (data/learned_mini) is loaded as sampling loads it (``sampler.load_experts``
with ``model.quantize`` = none / int8 / fp8: the factory quantizes the block linears and the
shipped weights are quantized on the host as they are overlaid), in fp32 (the shipped
weights' dtype) and with bf16 weights and compute (``model.param_dtype`` /
``model.compute_dtype``). Each model re-renders the held-out pairs of bench/solvers.py (same
pairs, same seeds) through the sampling program; scores: PSNR / SSIM to the true target
views (``facecam_jax.evaluation.scores``), PSNR of the output to the float model's output
(uint8 videos), and the relative L2 distance of the sampled latents. Weight bytes are
``quant.weight_bytes``. A check compares the loaded int8 / fp8 kernels (fp32 rows) with
``quantize_dit`` of the loaded float model (the two routes must give the same values; with
bf16 weights they need not, as loading quantizes the file's fp32 values, not bf16-rounded ones).

The velocity error of the same quantization on a random 1.3B-shaped stack is bench/quant.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine  # noqa: E402
from bench.solvers import HeldoutBench, latent_rel, load_line, psnr_each, truth_scores  # noqa: E402

FORMS = (  # (label, dtype overrides, quantize)
    ("fp32", "", "none"),
    ("int8 (fp32 compute)", "", "int8"),
    ("fp8 (fp32 compute)", "", "fp8"),
    ("bf16", "model.param_dtype=bfloat16,model.compute_dtype=bfloat16", "none"),
    ("int8 (bf16 compute)", "model.param_dtype=bfloat16,model.compute_dtype=bfloat16", "int8"),
    ("fp8 (bf16 compute)", "model.param_dtype=bfloat16,model.compute_dtype=bfloat16", "fp8"),
)


def kernels_match(quantized, float_model, mode: str) -> bool:
    """The loaded quantized kernels and scales equal ``quantize_dit`` applied to the loaded float model."""
    from flax import nnx

    from facecam_jax.models import quant as Q

    ref = Q.quantize_dit(nnx.clone(float_model), mode)
    a = dict(nnx.to_flat_state(nnx.state(quantized)))
    b = dict(nnx.to_flat_state(nnx.state(ref)))
    paths = Q.kernel_paths() + Q.scale_paths()
    return all(np.array_equal(np.asarray(a[p].get_value()).astype(np.float32),
                              np.asarray(b[p].get_value()).astype(np.float32)) for p in paths)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="learn")
    p.add_argument("--sample", default="", help="sampling overrides, e.g. sample.solver=unipc,sample.num_steps=20")
    p.add_argument("--sources", default="0,2,5,7")
    p.add_argument("--targets", default="1,4,6")
    args = p.parse_args(argv)

    from facecam_jax import sampling as sampler
    from facecam_jax import sharding as sh
    from facecam_jax.models import quant as Q

    bench = HeldoutBench(args.config, tuple(map(int, args.sources.split(","))),
                         tuple(map(int, args.targets.split(","))))
    print(f"machine: {machine()} | {load_line()}")
    print(bench.describe())
    s = bench.config_with(args.sample).sample
    print(f"sampling: {s.solver}, {s.num_steps} steps, no CFG (no text), cache {s.cache}")
    results = {}
    floats = {}
    with sh.use_mesh(bench.mesh, bench.rules):
        bench.load()
        for label, dtypes, mode in FORMS:
            overrides = ",".join(x for x in (dtypes, f"model.quantize={mode}") if x)
            config = bench.config_with(overrides)
            experts = sampler.load_experts(config, bench.mesh, bench.rules, config.sample.weights)
            model = experts.models[0]
            check = "-"
            if mode == "none":
                floats[dtypes] = model
            elif not dtypes:  # bf16: the file's fp32 values are quantized, not the bf16-rounded model's
                check = "yes" if kernels_match(model, floats[dtypes], mode) else "NO"
            out = bench.run(",".join(x for x in (overrides, args.sample) if x), experts)
            results[label] = (out, Q.weight_bytes(model), check, dtypes)
            print(f"{label}: loop {out.loop_s:.1f} s, compile {out.compile_s:.1f} s | {load_line()}", flush=True)

    ref32 = results["fp32"][0]
    print(f"\n{len(bench.pairs)} held-out pairs; PSNR in dB (mean over pairs; worst pair in brackets); latent: "
          "relative L2 distance of the sampled latents to the fp32 model's.\n")
    print("| weights | block linears | all weights | PSNR / SSIM to truth, training cameras | PSNR / SSIM to truth, "
          "held-out camera | PSNR to fp32 output | latent to fp32 | PSNR to same-dtype float output | "
          "kernels = quantize_dit(float) | loop (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, (out, nbytes, check, dtypes) in results.items():
        t = truth_scores(bench, out.video)
        cells = [f"{t[g][0]:.2f} / {t[g][1]:.3f}" if g in t else "-" for g in ("training cameras", "held-out camera")]
        if label == "fp32":
            to32, lat, same = "-", "-", "-"
        else:
            p32 = psnr_each(out.video, ref32.video)
            to32, lat = f"{p32.mean():.2f} ({p32.min():.2f})", f"{latent_rel(out.latents, ref32.latents):.4f}"
            same_ref = results["fp32" if not dtypes else "bf16"][0]
            same = "-" if same_ref is out else (lambda q: f"{q.mean():.2f} ({q.min():.2f})")(
                psnr_each(out.video, same_ref.video))
        print(f"| {label} | {nbytes['block_linears'] / 2**20:.2f} MiB | {nbytes['total'] / 2**20:.2f} MiB | "
              f"{cells[0]} | {cells[1]} | {to32} | {lat} | {same} | {check} | {out.loop_s:.1f} |")
    print(f"\nloop (s): the compiled loop alone, one run each, all pairs in one batch, on a shared machine "
          f"({load_line()} at the end).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
