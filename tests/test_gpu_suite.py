"""bench/gpu_suite.py --tiny: every GPU benchmark's code path at toy sizes, so the suite starts
on a GPU machine at the first try (its own test of the package set is in the closing note of
issue 18: a virtualenv with only that machine's packages plus bench/gpu_wheels.txt)."""

import json

import forked_runs


def test_gpu_suite_tiny_runs_every_section(tmp_path):
    out = str(tmp_path / "suite")
    # Its own process (forked before JAX starts), with one CPU device as on a one-GPU machine.
    run = forked_runs.run("bench/gpu_suite.py", "--tiny", "--out", out, timeout=900, env={"XLA_FLAGS": ""})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    with open(out + ".json") as f:
        report = json.load(f)
    sections = report["sections"]
    assert set(sections) == {"train_1p3b", "dit_vs_diffusers", "sample_1p3b", "sample_a14b", "sample_a14b_int8",
                             "fit_1p3b"}
    assert all("error" not in r for r in sections.values()), sections
    assert all("skipped" not in r for name, r in sections.items() if name != "fit_1p3b"), sections
    fit = sections["fit_1p3b"]  # the compile-only H100 verdict, where the CUDA plugin is installed (gpu-aot)
    assert "skipped" in fit or (fit["card"] == "h100" and fit["plan_bytes"] > 0 and fit["fits"]), fit
    assert sections["train_1p3b"]["tflops_per_device"] > 0 and sections["train_1p3b"]["plan_bytes"] > 0
    assert sections["sample_a14b"]["experts"] == 2 and sections["dit_vs_diffusers"]["ratio"] > 0
    with open(out + ".md") as f:
        assert "| train_1p3b |" in f.read()
