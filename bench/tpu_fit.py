"""What fits where: runs ``python -m facecam_jax.aot`` over FaceCam's recipes on v5e, v5p and v6e
slices (libtpu's compile-only client: no TPU needed) and prints the table of bench/RESULTS.md.

    python bench/tpu_fit.py                    # every case not yet in --out, one compile at a time
    python bench/tpu_fit.py --only a14b-train  # the cases whose name contains this
    python bench/tpu_fit.py --table            # just print the table from the reports in --out

Recipes (configs/facecam.py:nersemble, 81 x 704 x 480, bf16, attention auto -> splash; the rcm-
recipes are configs/facecam.py:recammaster, 81 x 480 x 832):
  a14b-train   one Wan2.2-I2V-A14B expert, FaceCam's trainable subset, AdamW, full remat
  a14b-lora64-train  the same with LoRA rank 64 adapters on the self-attention (patch embedding in full)
  a14b-qlora64-train the same over an int8 base (weight-only, per output channel; adapters fp32)
  1.3b-train   wan2.1-t2v-1.3b widened to 36 channels, the same recipe
  a14b-sample  both A14B experts resident, 50 Euler steps with CFG (batch 2), VAE encode/decode
  1.3b-sample  the 1.3B, 50 steps with CFG
  rcm-1.3b-train / rcm-1.3b-sample  ReCamMaster: wan2.1-t2v-1.3b with its camera layers, its
               trainable set (camera layers and self-attention), full remat; 50 steps with CFG
  fp-14b-train / fp-1.3b-train  FactorPortrait (configs/facecam.py:factorportrait-14b and
               factorportrait): Wan2.1-T2V-14B / -1.3B, 54 input channels, the expression
               controller, every parameter trained, full remat, 81 x 480 x 832
Training meshes put one sample on each group of `context` chips (batch = chips / context,
fsdp over those groups, parameters over fsdp x context); context 1 is "batch 1 per chip".
Sampling meshes split the CFG batch of 2 over fsdp and the sequence over context.

Each case is compiled only where the analytic estimate puts it near the edge: the smallest
slice expected to fit and the next smaller one (to show that it does not). Each compile
takes minutes on a CPU; reports are kept in --out (JSON, one per case) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPES = {
    "a14b-train": ("train", "nersemble"),
    "a14b-lora64-train": ("train", "nersemble,train.lora_rank=64"),
    "a14b-qlora64-train": ("train", "nersemble,train.lora_rank=64,model.quantize=int8"),
    "1.3b-train": ("train", "nersemble,model.dit=wan2.1-t2v-1.3b"),
    "a14b-sample": ("sample", "nersemble,num_steps=50"),
    "1.3b-sample": ("sample", "nersemble,model.dit=wan2.1-t2v-1.3b,num_steps=50"),
    # ReCamMaster (camera.kind=recammaster) on Wan2.1-T2V-1.3B at its own shape, 81 x 480 x 832:
    # 2 x 32,760 tokens, camera layers in every block, its trainable set (issue 30).
    "rcm-1.3b-train": ("train", "recammaster"),
    "rcm-1.3b-sample": ("sample", "recammaster"),
    # CameraCtrl II (camera.kind=plucker) on Wan2.1-T2V-1.3B, the whole DiT trained, at the same
    # shape; sampling with text and camera guidance: 3 passes per step (issue 31).
    "cc2-1.3b-train": ("train", "cameractrl2"),
    "cc2-1.3b-sample": ("sample", "cameractrl2"),
    # FactorPortrait (camera.kind=factorportrait) on Wan2.1-T2V-14B and -1.3B, every parameter
    # trained, 81 x 480 x 832 after the reference latent frame: 22 x 1,560 tokens (issue 33).
    "fp-14b-train": ("train", "factorportrait-14b"),
    "fp-1.3b-train": ("train", "factorportrait"),
}


def topology(chip: str, chips: int) -> str:
    """A slice of ``chips`` chips: v5e/v6e 2D (1x1 ... 16x16), v5p 3D (1x1x1 ... 4x4x4)."""
    if chip == "v5p":
        shapes = {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"}
    else:
        shapes = {1: "1x1", 2: "1x2", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    return f"{chip}:{shapes[chips]}"


def case(recipe: str, chip: str, chips: int, context: int = 1, vae: bool = True) -> dict:
    program, variant = RECIPES[recipe]
    groups = chips // context  # training: one sample per group; sampling: the CFG batch over them (<= 2)
    if program == "train":
        overrides = f"batch_size={groups},mesh.fsdp={groups},mesh.context={context}"
    else:
        assert groups <= 2, "sampling splits a batch of 2: use context for the rest"
        overrides = f"mesh.fsdp={groups},mesh.context={context}"
    name = f"{recipe}_{chip}x{chips}_c{context}"
    return {"name": name, "recipe": recipe, "program": program, "topology": topology(chip, chips),
            "config": f"configs/facecam.py:{variant},{overrides}", "vae": vae}


# Per recipe and chip: the smallest slice the analytic estimate expects to fit, then the next
# smaller one (to show that it does not), in the order they are compiled. (recipe, chip, chips, context)
CASES = [case(*c) for c in [
    # One A14B expert, batch 1 per chip (context 1), fits a 4-chip v5p at 88 GiB per chip: 11 GiB
    # of weights, moments and the VAE, and 77 GiB of temporaries, mostly the fp32 residual stream
    # that full remat keeps per block (40 x 55,440 x 5120 x 4 B = 42 GiB) and one block's backward.
    # The temporaries shrink with context parallelism (the sequence split over `context` chips).
    ("a14b-train", "v5p", 4, 1),
    ("a14b-sample", "v5p", 1, 1),  # 53 GiB of bf16 experts + one block's activations at batch 2
    ("a14b-train", "v5p", 2, 2),
    ("a14b-train", "v6e", 8, 4),
    ("a14b-train", "v5e", 16, 8),
    # 1.3B: 4 GB of state, ~10 GiB of residual stream per sample.
    ("1.3b-train", "v6e", 1, 1),
    ("1.3b-train", "v5e", 2, 2),
    ("1.3b-sample", "v5e", 1, 1),
    # The next smaller slice, to show that it does not fit.
    ("a14b-train", "v5p", 1, 1),
    ("a14b-sample", "v6e", 4, 2),
    ("a14b-sample", "v5e", 8, 4),
    # More next-smaller slices. Sampling slices that cannot hold the experts' loop: its VAE
    # programs (5-15 min compiles each on two cores) are not compiled.
    ("1.3b-train", "v5e", 1, 1),
    ("a14b-sample", "v6e", 2, 1, False),
    ("a14b-sample", "v5e", 4, 2, False),
    ("a14b-train", "v6e", 4, 4),
    ("a14b-train", "v5e", 8, 8),
    ("a14b-train", "v5p", 2, 1),  # batch 1 per chip on 2 chips
    # LoRA rank 64 (issue 19): 0.1 B trained parameters instead of 4.2 B, so no 4.2 B gradients
    # and 16 GiB less AdamW state; from the slice one size below the full subset's smallest.
    ("a14b-lora64-train", "v5p", 1, 1),
    ("a14b-lora64-train", "v5e", 8, 8),
    ("a14b-lora64-train", "v6e", 4, 4),
    ("a14b-lora64-train", "v5p", 2, 2),
    ("a14b-lora64-train", "v5e", 16, 8),
    ("a14b-lora64-train", "v6e", 8, 4),
    ("a14b-lora64-train", "v6e", 2, 2),  # 4 chips fit with LoRA: the next smaller one
    ("a14b-qlora64-train", "v5p", 1, 1),  # the frozen base in int8 (QLoRA): one v5p chip fits
    # ReCamMaster 1.3B (issue 30): one chip of each kind, and the smallest v5e slice for training.
    ("rcm-1.3b-train", "v5p", 1, 1),
    ("rcm-1.3b-sample", "v5e", 1, 1),
    ("rcm-1.3b-train", "v5e", 2, 2),
    ("rcm-1.3b-train", "v6e", 1, 1),
    # CameraCtrl II 1.3B (issue 31): one chip of each kind.
    ("cc2-1.3b-train", "v5p", 1, 1),
    ("cc2-1.3b-sample", "v5e", 1, 1),
    # FactorPortrait (issue 33): the whole 14B trained (AdamW state for 14.3 B parameters) on a v5p
    # slice; the 1.3B on one v5p chip.
    ("fp-14b-train", "v5p", 8, 1),
    ("fp-1.3b-train", "v5p", 1, 1),
    ("fp-14b-train", "v5p", 4, 1),  # the next smaller slice
]]


def run(c: dict, out_dir: str) -> dict:
    path = os.path.join(out_dir, c["name"] + ".json")
    cmd = [sys.executable, "-m", "facecam_jax.aot", f"--config={c['config']}", "--topology", c["topology"],
           "--program", c["program"], "--json", path] + ([] if c.get("vae", True) else ["--novae"])
    return run_aot(cmd, path, c)


def run_aot(cmd: list[str], path: str, c: dict, env: dict | None = None) -> dict:
    """Runs one ``facecam_jax.aot`` command line that writes its JSON report to ``path``; returns the
    report with the case and the wall time added (and written back), or {} if it failed."""
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    print(result.stdout, flush=True)
    if result.returncode not in (0, 3):
        print(result.stderr[-3000:], flush=True)
        return {}
    with open(path) as f:
        report = json.load(f)
    report.update(case=c, exit_code=result.returncode, wall_seconds=wall)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    return report


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def table(reports: list[dict]) -> str:
    rows = ["| recipe | slice | mesh (data/fsdp/context) | batch | remat | per-chip memory / HBM (GiB) | fits | "
            "step at bf16 peak | compile |",
            "|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(RECIPES)}
    reports = sorted(reports, key=lambda r: (order[r["case"]["recipe"]], r["chip"], r["chips"], r["mesh"]["context"]))
    for r in reports:
        m = r["mesh"]
        mesh = f"{m['data']}/{m['fsdp']}/{m['context']}" + (f"/t{m['tensor']}" if m["tensor"] > 1 else "")
        memory = _gib(r["memory"]) + (" (XLA OOM)" if r.get("out_of_memory") else "")
        step = r["step_seconds"]
        step_text = (f"{step:.1f} s" if step < 600 else _duration(step)) if step else "?"
        if r["program"] == "sample":
            step_text += " per video"
        programs = "" if r["program"] == "train" or r["case"].get("vae", True) else " (loop only)"
        chips = f"{r['chips']} chip{'s' if r['chips'] > 1 else ''}"
        remat = r["remat"] if r["program"] == "train" else "-"
        rows.append(f"| {r['case']['recipe']}{programs} | {r['target']} ({chips}) | {mesh} | {r['batch']} | "
                    f"{remat} | {memory} / {_gib(r['hbm'])} | {'yes' if r['fits'] else 'no'} | {step_text} | "
                    f"{_duration(r['seconds'])} |")
    return "\n".join(rows)


def cli(argv, doc: str, out: str, cases: list, run_case, make_table) -> None:
    """The command line of a fit table (this one, bench/gpu_fit.py): compile the ``cases`` not yet
    reported in ``--out`` (``run_case(case, out)``), then print ``make_table`` of every report there."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="where the JSON reports go")
    p.add_argument("--only", default="", help="run the cases whose name contains this")
    p.add_argument("--table", action="store_true", help="print the table of the reports in --out; compile nothing")
    p.add_argument("--force", action="store_true", help="compile again cases that already have a report")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.table:
        for c in cases:
            if args.only not in c["name"]:
                continue
            if not args.force and os.path.exists(os.path.join(args.out, c["name"] + ".json")):
                continue
            run_case(c, args.out)
    reports = []
    for name in sorted(os.listdir(args.out)):
        if name.endswith(".json"):
            with open(os.path.join(args.out, name)) as f:
                report = json.load(f)
            if "case" in report:
                reports.append(report)
    print(make_table(reports))


def main(argv=None):
    cli(argv, __doc__, os.path.join(ROOT, "bench", "tpu_fit"), CASES, run, table)


if __name__ == "__main__":
    main()
