"""Every GPU benchmark of the project in ONE command, sized for a short rented slot (<= 8 min on
one H200, compiles included), writing one JSON and one markdown report.

    python bench/gpu_suite.py                            # GPU: the suite -> bench/gpu_suite.{json,md}
    python bench/gpu_suite.py --out $OUT/gpu_suite       # elsewhere
    python bench/gpu_suite.py --tiny                     # CPU: the same code at toy sizes (a test runs it)
    python bench/gpu_suite.py --only train_1p3b,dit_vs_diffusers

Sections, in priority order (each gets what is left of ``--budget`` seconds, fewer repeats
rather than a timeout, and on a GPU runs in its own process, so its peak memory is its own
and one failure costs only that section):
  train_1p3b        the real train step, Wan2.1-1.3B at 81 x 704 x 480 (55,440 tokens), bf16,
                    cuDNN attention, full remat, batch 1: step time, TFLOP/s, MFU, compiled plan
                    vs measured peak memory                                  (bench/train_step.py)
  dit_vs_diffusers  the 1.3B DiT forward at the same shape, this project vs diffusers on the same
                    GPU and weights                                          (bench/dit_forward.py)
  sample_1p3b       the 1.3B sampling loop with CFG and the VAE around it: seconds per step and
                    for a 50-step video                                      (bench/sample.py)
  sample_a14b       two Wan2.2-A14B-shaped experts resident in bf16: seconds per step, plan vs peak
  sample_a14b_int8  the same with int8 weights (model.quantize)
  fit_1p3b          train_1p3b's program compiled ahead of time for this card by name (the fit
                    tool's compile-only GPU verdict, ``aot --gpu``): its predicted memory beside
                    train_1p3b's measured peak (--tiny on a CPU: for an H100, as a code check)
Only what the GPU machine has is imported (jax, flax, optax, orbax, tensorstore, torch,
transformers, ...) plus the pure-Python wheels in bench/gpu_wheels.txt: synthetic batches, no
Grain, no video I/O. Targets (issue 18, not asserted): train MFU >= 45 %, a 50-step 1.3B video
<= 150 s, DiT forward >= 1.4x faster than diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import dit_forward, sample, train_step  # noqa: E402
from bench.common import machine  # noqa: E402
from facecam_jax.models import wan_dit  # noqa: E402
from facecam_jax.runtime.config_file import load_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (full-size spec, tiny spec, seconds it needs at least on an H200, compile included).
# The a14b sections sample two experts of the config's preset (tiny: two tiny DiTs).
SECTIONS = {
    "train_1p3b": ("nersemble,model.dit=wan2.1-t2v-1.3b,batch_size=1", "mini,frames=5,batch_size=1", 150),
    "dit_vs_diffusers": ("wan2.1-t2v-1.3b:21x88x60", "tiny:2x4x4", 60),
    "sample_1p3b": ("nersemble,model.dit=wan2.1-t2v-1.3b,num_steps=4", "mini,frames=5,num_steps=2", 120),
    "sample_a14b": ("nersemble,num_steps=2", "mini,frames=5,num_steps=2", 150),
    "sample_a14b_int8": ("nersemble,num_steps=2,model.quantize=int8", "mini,frames=5,num_steps=2,model.quantize=int8",
                         150),
    "fit_1p3b": ("nersemble,model.dit=wan2.1-t2v-1.3b,batch_size=1", "mini,frames=5,batch_size=1", 60),
}


def fit_section(config, tiny: bool) -> dict:
    """The fit tool's compile-only verdict for this GPU (by its name: ``fit.gpus.name_of``)."""
    import jax

    from facecam_jax.fit import gpus, programs
    from facecam_jax.perf.chips import BadTarget

    device = jax.devices()[0]
    name = gpus.name_of(device.device_kind) if device.platform == "gpu" else ("h100" if tiny else None)
    if name is None:
        return {"skipped": f"no GPU spec for {device.device_kind!r} (known: {', '.join(gpus.GPUS)})"}
    try:
        report = programs.analyze(config, "train", target=gpus.make_target(name, "1"), with_vae=False)
    except BadTarget as e:
        return {"skipped": str(e)}
    return {"card": name, "plan_bytes": report.memory, "usable_bytes": report.hbm, "fits": report.fits,
            "report": report.text()}


def run_section(name: str, tiny: bool) -> dict:
    full, small, _ = SECTIONS[name]
    spec = small if tiny else full
    if name == "dit_vs_diffusers":
        preset, latent = spec.split(":")
        cfg = wan_dit.get_config(preset).replace(in_dim=36)
        return dit_forward.run(cfg, tuple(int(v) for v in latent.split("x")), dtype="float32" if tiny else "bfloat16",
                               attention="xla" if tiny else "cudnn", repeats=2 if tiny else 5)
    config = load_config(spec)
    if name.startswith("fit"):
        return fit_section(config, tiny)
    if name.startswith("train"):
        return train_step.run(config, steps=1 if tiny else 2, time_vae=not tiny)
    return sample.run(config, with_vae=name == "sample_1p3b", experts=2 if "a14b" in name else 1)


def _in_subprocess(name: str, tiny: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--result", result] + (["--tiny"] if tiny else [])
        try:
            proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish within its {timeout:.0f} s of the budget"}
        if os.path.exists(result):
            with open(result) as f:
                return json.load(f)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def markdown(report: dict) -> str:
    lines = [f"# GPU suite ({report['size']})", "", f"`{report['machine']}`; {report['seconds']:.0f} s in all.", ""]
    s = report["sections"]
    lines += ["| section | result | compiled plan | measured peak |", "|---|---|---|---|"]
    gib = lambda b: "-" if not b else f"{b / 2**30:.2f} GiB"  # noqa: E731
    for name, r in s.items():
        if "error" in r or "skipped" in r:
            lines.append(f"| {name} | {r.get('error') or r.get('skipped')} | | |")
            continue
        if name.startswith("fit"):
            measured = s.get("train_1p3b", {}).get("peak_bytes")
            text = (f"compile-only for {r['card']}: predicts {gib(r['plan_bytes'])} of {gib(r['usable_bytes'])} usable "
                    f"({'fits' if r['fits'] else 'does not fit'}); train_1p3b measured {gib(measured)}")
            lines.append(f"| {name} | {text} | {gib(r.get('plan_bytes'))} | {gib(measured)} |")
            continue
        if name.startswith("train"):
            text = f"{r['step_s']:.3f} s/step, {r['tflops_per_device']:.1f} TFLOP/s" + (
                f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
        elif name == "dit_vs_diffusers":
            text = f"JAX {1e3 * r['jax_s']:.1f} ms" + (
                f", diffusers {1e3 * r['torch_s']:.1f} ms: {r['ratio']:.2f}x" if "torch_s" in r else "")
        else:
            text = f"{r['step_s']:.3f} s/step ({r['experts']} expert{'s' if r['experts'] > 1 else ''})" + (
                f", MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
            if "vae_decode_s" in r:
                text += f"; 50-step video {r['video_50_steps_s']:.1f} s"
        lines.append(f"| {name} | {text} | {gib(r.get('plan_bytes'))} | {gib(r.get('peak_bytes'))} |")
    lines += ["", "Targets (issue 18): train MFU >= 45%, a 50-step 1.3B video <= 150 s, forward >= 1.4x diffusers.",
              "", "Details:", ""]
    for name, r in s.items():
        if name.startswith("fit") and "report" in r:
            lines += [f"{name}:", "```", r["report"], "```", ""]
        elif "error" not in r and "skipped" not in r:
            module = {"train": train_step, "dit": dit_forward}.get(name.split("_")[0], sample)
            lines += [f"{name}:", "```", module.report(r), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes on any machine (the CPU check)")
    p.add_argument("--only", default="", help="comma-separated section names (default: all)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all sections together")
    p.add_argument("--out", default=os.path.join(HERE, "gpu_suite"), help="report path without extension")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="one process per section (auto: on an accelerator)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section, write --result
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section:
        with open(args.result, "w") as f:
            json.dump(run_section(args.section, args.tiny), f, default=str)
        return 0

    import jax

    names = [n for n in args.only.split(",") if n] or list(SECTIONS)
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and jax.default_backend() != "cpu")
    start = time.perf_counter()
    report = {"machine": machine(), "size": "tiny" if args.tiny else "full", "sections": {}}
    print(report["machine"], flush=True)
    for name in names:
        left = args.budget - (time.perf_counter() - start)
        need = 0 if args.tiny else SECTIONS[name][2]
        if left < need:
            report["sections"][name] = {"skipped": f"budget: {left:.0f} s left, needs ~{need} s"}
            continue
        t0 = time.perf_counter()
        if isolate:
            result = _in_subprocess(name, args.tiny, timeout=left)
        else:
            try:
                result = run_section(name, args.tiny)
            except Exception as e:  # noqa: BLE001  one section's failure is a row of the report
                traceback.print_exc()
                result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        result["seconds"] = time.perf_counter() - t0
        report["sections"][name] = result
        done = result.get("error") or f"done in {result['seconds']:.0f} s"
        print(f"{name}: {done}", flush=True)
    report["seconds"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    text = markdown(report)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    return 1 if any("error" in r for r in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
