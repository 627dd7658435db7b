"""facecam_jax.aot --gpu: programs compiled for named NVIDIA GPUs without one (the CUDA PJRT
plugin's compile-only devices from the specs shipped in facecam_jax/fit/gpu_specs)."""

import os
import subprocess
import sys

import pytest

from facecam_jax.fit import gpus
from facecam_jax.fit import programs as fit
from facecam_jax.perf.chips import GiB
from facecam_jax.runtime.config_file import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
plugin = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import jax_plugins.xla_cuda12"], capture_output=True).returncode != 0,
    reason=f"the CUDA PJRT plugin is not installed ({gpus.INSTALL})")


def _aot(*args, env=None):
    return subprocess.run([sys.executable, "-m", "facecam_jax.aot", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), timeout=600)


@plugin
@pytest.mark.parametrize("name", list(gpus.GPUS))
def test_shipped_specs_parse_on_the_installed_jaxlib(name):
    """Each spec gives compile-only devices of the card it names; a spec from a newer XLA with a
    field this jaxlib does not know would fail here."""
    text = gpus.spec_text(name)
    (device,) = gpus.compile_only_devices(text, 1, 1)
    assert device.platform == "gpu" and f'"{device.device_kind}"' in text
    assert 16 * GiB < gpus.spec_memory(text) < 200 * GiB


@plugin
def test_a_field_the_installed_jaxlib_does_not_know_is_rejected():
    text = gpus.spec_text("h100").replace("ecc_enabled: true", "ecc_enabled: true\n  collective_memory_granularity: 2")
    with pytest.raises(fit.BadTarget, match="the installed CUDA plugin rejects the spec"):
        gpus.compile_only_devices(text, 1, 1)


@plugin
def test_tiny_program_compiled_for_h100s_reports_memory_and_verdict():
    """The mini sampling loop (bf16: attention auto -> cuDNN, as on a GPU) on one H100 and on two
    (fsdp 2 over --gpus 2): memory from XLA's GPU plan, judged against 0.75 of the card."""
    config = load_config("mini,model.compute_dtype=bfloat16,model.attention=auto")
    report = fit.analyze(config, "sample", target=gpus.make_target("h100"), with_vae=False)
    (loop,) = report.compiled
    assert report.attention == "auto -> cudnn" and report.chip == "NVIDIA H100 80GB HBM3"
    assert loop.arguments > 0 and loop.total == report.memory
    assert report.hbm == int(0.75 * 84942979072) and report.fits and report.exit_code == fit.FITS
    assert report.peak_flops == 989e12
    two = fit.analyze(load_config("mini,mesh.fsdp=2"), "sample", target=gpus.make_target("h100", "2"),
                      with_vae=False)
    assert two.devices == 2 and two.mesh["fsdp"] == 2 and two.compiled[0].arguments < loop.arguments


@plugin
def test_oversized_program_exits_3_and_names_the_usable_memory():
    """The mini sample against an H100 whose process may take a millionth of it: does not fit."""
    out = _aot("--config=configs/facecam.py:mini", "--gpu", "h100", "--program", "sample", "--novae",
               env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.000001"})
    assert out.returncode == 3, out.stderr[-2000:]
    assert "verdict    does not fit" in out.stdout and "1e-06 x 79.11 GiB (XLA_PYTHON_CLIENT_MEM_FRACTION)" in out.stdout


def test_unknown_gpu_and_bad_arguments_are_one_line_exit_2():
    out = _aot("--config=configs/facecam.py:mini", "--gpu", "gtx1080")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: unknown GPU 'gtx1080'; known: {', '.join(gpus.GPUS)}"
    both = _aot("--config=configs/facecam.py:mini", "--gpu", "h100", "--topology", "v5e:2x2")
    assert both.returncode == 2 and "--gpu and --topology name two targets" in both.stderr
    assert gpus.parse_topology("2x8") == (2, 8) and gpus.parse_topology(None) == (1, 1)
    with pytest.raises(fit.BadTarget, match="--gpus must be N or HOSTSxN"):
        gpus.parse_topology("8x")


def test_without_the_plugin_gpu_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_plugins.xla_cuda12", None)  # import fails as if not installed
    with pytest.raises(fit.BadTarget) as e:
        gpus.make_target("h100")
    assert str(e.value) == "compiling for a GPU without one needs the CUDA PJRT plugin: pip install -e '.[gpu-aot]'"


def test_usable_memory_follows_the_variables_a_run_reads(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    assert gpus.usable_memory(80 * GiB)[0] == 60 * GiB
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    assert gpus.usable_memory(80 * GiB)[0] == int(0.95 * 80 * GiB)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    assert gpus.usable_memory(80 * GiB) == (80 * GiB, "all 80.00 GiB (XLA_PYTHON_CLIENT_PREALLOCATE=false)")
    # The training step's cuDNN backward workspace: an fp32 dQ of one attention call per device.
    config = load_config("nersemble,batch_size=8,mesh.fsdp=8")
    assert gpus.attention_workspace(config, "train", 8) == 55_440 * 40 * 128 * 4
    assert gpus.attention_workspace(config, "sample", 8) == 0
    assert gpus.spec_cudnn_version(gpus.spec_text("h100")) == 91000
    assert gpus.spec_cudnn_version(gpus.spec_text("a100-80")) == 8904


@plugin
def test_block_streaming_is_refused_for_a_compile_only_gpu():
    config = load_config("mini,model.quantize=int8,sample.offload=blocks")
    with pytest.raises(fit.BadTarget, match="sample.offload=blocks cannot be compiled for a GPU without one"):
        fit.analyze(config, "sample", target=gpus.make_target("rtx4090"), with_vae=False)
