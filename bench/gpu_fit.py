"""What fits which NVIDIA GPU: runs ``python -m facecam_jax.aot --gpu NAME`` over FaceCam's recipes
(the CUDA plugin's compile-only devices: no GPU needed, the ``gpu-aot`` extra) and prints the
table of bench/RESULTS.md.

    python bench/gpu_fit.py                     # every case not yet in --out, one compile at a time
    python bench/gpu_fit.py --only rtx4090      # the cases whose name contains this
    python bench/gpu_fit.py --table             # just print the table from the reports in --out

Recipes as in bench/tpu_fit.py (``nersemble``: 81 x 704 x 480, 55,440 tokens, bf16, attention
auto -> cuDNN flash), plus the sampling modes of issue 20 (int8 weights; experts or blocks
offloaded to host memory; the guidance passes one after the other). Sampling cases compile
the experts' loop only (``--novae``: the full-size VAE programs take 30+ min each on two cores);
the VAE encode / decode need 7-10 GiB beside nothing else when the experts are offloaded.
Memory is judged against what a JAX run may use: 0.75 of the card (jax's default
XLA_PYTHON_CLIENT_MEM_FRACTION), less the cuDNN attention workspace for training.
"""

from __future__ import annotations

import os
import sys

import tpu_fit

ROOT = tpu_fit.ROOT

# Block streaming (sample.offload=blocks) is not here: it places weights in host memory inside the
# program, and the CUDA plugin's compile-only devices have no host memory space (the fit tool
# refuses it, exit 2); it can only be checked on the GPU itself.
SAMPLE_MODES = {
    "bf16": "",
    "bf16-seqcfg": ",sample.cfg=sequential",
    "int8": ",model.quantize=int8",
    "int8-experts": ",model.quantize=int8,sample.offload=experts",
    "int8-experts-seqcfg": ",model.quantize=int8,sample.offload=experts,sample.cfg=sequential",
}


def case(recipe: str, gpu: str, gpus: int = 1, mode: str = "bf16", context: int = 1, fraction: float = 0.75) -> dict:
    program, variant = tpu_fit.RECIPES[recipe]
    groups = gpus // context
    if program == "train":
        overrides = f"batch_size={groups},mesh.fsdp={groups},mesh.context={context}"
    else:
        overrides = f"mesh.fsdp={groups},mesh.context={context}" + SAMPLE_MODES[mode]
    name = f"{recipe}-{mode}_{gpu}x{gpus}_c{context}" if program == "sample" else f"{recipe}_{gpu}x{gpus}_c{context}"
    name += "" if fraction == 0.75 else f"_f{fraction:g}"
    return {"name": name, "recipe": recipe, "mode": mode if program == "sample" else "-", "program": program,
            "gpu": gpu, "gpus": gpus, "config": f"configs/facecam.py:{variant},{overrides}", "vae": False,
            "fraction": fraction}


# In the order they are compiled: the questions asked most first (the A14B sample on a 24 GB
# card; full fine-tuning on 8 H100s), then the rest of the table.
CASES = [case(*c) for c in [
    ("a14b-sample", "h100", 1, "bf16"),
    ("a14b-sample", "rtx4090", 1, "int8-experts"),
    ("a14b-sample", "l40s", 1, "int8-experts"),
    ("a14b-lora64-train", "h100", 1),
    ("a14b-qlora64-train", "h100", 1),
    ("a14b-sample", "rtx4090", 1, "int8-experts-seqcfg"),
    ("a14b-sample", "rtx4090", 1, "int8-experts-seqcfg", 1, 0.95),
    ("a14b-sample", "h200", 1, "bf16"),
    ("a14b-sample", "h100", 1, "bf16", 1, 0.95),
    ("a14b-sample", "h100", 1, "bf16-seqcfg"),
    ("a14b-sample", "h100", 1, "int8"),
    ("a14b-sample", "l40s", 1, "bf16"),
    ("a14b-sample", "l40s", 1, "int8"),
    ("a14b-train", "h100", 8, "bf16", 1),
    ("a14b-lora64-train", "h100", 8, "bf16", 1),
    ("a14b-qlora64-train", "h100", 8, "bf16", 1),
    ("a14b-train", "h100", 8, "bf16", 2),
    ("a14b-lora64-train", "h100", 8, "bf16", 2),
    ("a14b-train", "h100", 1),
    ("1.3b-sample", "rtx4090", 1, "bf16"),
    ("rcm-1.3b-sample", "rtx4090", 1, "bf16"),
    ("cc2-1.3b-sample", "rtx4090", 1, "bf16"),
    ("1.3b-train", "rtx4090", 1),
]]


def run(c: dict, out_dir: str) -> dict:
    path = os.path.join(out_dir, c["name"] + ".json")
    cmd = [sys.executable, "-m", "facecam_jax.aot", f"--config={c['config']}", "--gpu", c["gpu"], "--gpus",
           str(c["gpus"]), "--program", c["program"], "--json", path] + ([] if c["vae"] else ["--novae"])
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_PYTHON_CLIENT_MEM_FRACTION=str(c["fraction"]))
    return tpu_fit.run_aot(cmd, path, c, env)


def table(reports: list[dict]) -> str:
    rows = ["| recipe | mode | GPUs | mesh (data/fsdp/context) | per-GPU memory / usable (GiB) at fraction | fits | "
            "step at bf16 peak | compile |",
            "|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(tpu_fit.RECIPES)}
    modes = {name: i for i, name in enumerate([*SAMPLE_MODES, "-"])}
    reports = sorted(reports, key=lambda r: (order[r["case"]["recipe"]], modes[r["case"]["mode"]], r["hbm"],
                                             r["devices"]))
    for r in reports:
        m = r["mesh"]
        mesh = f"{m['data']}/{m['fsdp']}/{m['context']}"
        oom = r.get("out_of_memory")
        memory = tpu_fit._gib(r["memory"]) + ("" if not oom else " (arguments alone)" if not oom["seconds"] else
                                              " (XLA OOM)")
        step = r["step_seconds"]
        step_text = (f"{step:.1f} s" if step < 600 else tpu_fit._duration(step)) if step else "?"
        if r["program"] == "sample":
            step_text += " per video"
        gpus = f"{r['devices']} x {r['chip'].replace('NVIDIA ', '')}"
        rows.append(f"| {r['case']['recipe']}{' (loop only)' if r['program'] == 'sample' else ''} | "
                    f"{r['case']['mode']} | {gpus} | {mesh} | {memory} / {tpu_fit._gib(r['hbm'])} at "
                    f"{r['case'].get('fraction', 0.75):g} | "
                    f"{'yes' if r['fits'] else 'no'} | {step_text} | {tpu_fit._duration(r['seconds'])} |")
    return "\n".join(rows)


def main(argv=None):
    tpu_fit.cli(argv, __doc__, os.path.join(ROOT, "bench", "gpu_fit"), CASES, run, table)


if __name__ == "__main__":
    main()
