"""facecam_jax.aot: the analytic FLOP count against a hand count and against the dots JAX
traces, and ahead-of-time compiles for TPU topologies (libtpu's compile-only client) that
fit (exit 0), do not fit (exit 3) or cannot be built (exit 2)."""

import hashlib
import json
import os

import forked_runs
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from facecam_jax import build
from facecam_jax import sharding as sh
from facecam_jax.fit import programs as fit
from facecam_jax.models import lora, wan_dit
from facecam_jax.models.wan_vae import VAEConfig
from facecam_jax.perf import chips
from facecam_jax.perf import flops as flops_lib
from facecam_jax.runtime.config_file import load_config
from facecam_jax.training import train_step

TINY = wan_dit.PRESETS["tiny"].replace(in_dim=36)  # D 64, ffn 128, 2 layers, text 16 x 32
FACECAM_TRAINABLE = ("self_attn", "patch_embedding")


def test_dit_flops_hand_count():
    # One sample of 8 tokens (two halves of 1 x 2 x 2 patches), head on the 4 target tokens.
    patch = 2 * 8 * (4 * 36) * 64  # 147,456
    text = 2 * 16 * 32 * 64 + 2 * 16 * 64 * 64  # 196,608
    time = 2 * 32 * 64 + 2 * 64 * 64 + 2 * 64 * (6 * 64)  # 61,440
    head = 2 * 4 * 64 * (16 * 4)  # 32,768
    layer = (4 * 2 * 8 * 64 * 64  # self q, k, v, o
             + 4 * 8 * 8 * 64  # self QK^T, PV
             + 2 * 2 * 8 * 64 * 64 + 2 * 2 * 16 * 64 * 64  # cross q, o (image) and k, v (text)
             + 4 * 8 * 16 * 64  # cross QK^T, PV
             + 2 * 2 * 8 * 64 * 128)  # ffn
    hand = patch + text + time + head + 2 * layer
    assert hand == 2_371_584
    flops = flops_lib.dit_flops(TINY, 1, 8, 4)
    assert flops == {"forward": hand, "backward": 0.0, "remat": 0.0}
    assert flops_lib.dit_flops(TINY, 3, 8, 4)["forward"] == 3 * hand


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("trainable,lora_rank", [(FACECAM_TRAINABLE, 0), (FACECAM_TRAINABLE, 4), (("ffn",), 4)])
def test_dit_flops_equal_the_traced_step(remat, trainable, lora_rank):
    """The analytic forward, backward (FaceCam's trainable subset; with LoRA adapters, also on
    the FFN, whose fc2 remat leaves out) and remat FLOPs are exactly the dots JAX traces for the
    DiT's loss and gradient (scan bodies times their length)."""
    model = nnx.eval_shape(lambda: wan_dit.WanDiT(TINY, rngs=nnx.Rngs(0), remat=remat))
    if lora_rank:
        lora.add_lora(model, lora_rank, names=trainable)
    rule = build.trainable_filter(trainable, build.lora_layers(model) if lora_rank else None)
    graphdef, params, frozen = nnx.split(model, nnx.All(nnx.Param, rule), ...)
    lat = jax.ShapeDtypeStruct((1, 1, 4, 4, 16), jnp.float32)  # 2 x 4 tokens
    args = (lat, lat, lat, jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1, 16, 32), jnp.float32))

    def velocity(p, f, *a):
        return wan_dit.facecam_velocity(nnx.merge(graphdef, p, f), *a)

    loss = lambda p, f, *a: (velocity(p, f, *a) ** 2).sum()  # noqa: E731
    traced_forward = flops_lib.jaxpr_flops(jax.make_jaxpr(velocity)(params, frozen, *args))
    traced_step = flops_lib.jaxpr_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params, frozen, *args))
    flops = flops_lib.dit_flops(TINY, 1, 8, 4, trainable, remat, lora_rank)
    print(f"\n[remat {remat}, {trainable}, LoRA rank {lora_rank}] traced forward {traced_forward:.0f}, "
          f"step {traced_step:.0f}; analytic {flops}")
    assert flops["forward"] == traced_forward
    assert flops["forward"] + flops["backward"] + flops["remat"] == traced_step
    assert (flops["remat"] > 0) == (remat == "full")
    if lora_rank:  # the frozen base kernels' weight gradients are gone: a cheaper backward
        assert flops["backward"] < flops_lib.dit_flops(TINY, 1, 8, 4, trainable, remat)["backward"]


def test_vae_flops_count_the_scan_per_chunk():
    # The encoder runs frame 0 alone and then a scan over chunks of 4 frames: each chunk costs
    # the same, so the count is linear in the number of chunks (a scan body counted once is not).
    vc = VAEConfig(dim=8, z_dim=16)
    one, two, three = (flops_lib.vae_flops(vc, (1, t, 32, 32, 3)) for t in (1, 5, 9))
    assert two - one > 0 and three - two == two - one
    assert flops_lib.vae_flops(vc, (2, 5, 32, 32, 3)) == 2 * two
    assert flops_lib.vae_flops(vc, (1, 5, 32, 32, 3), decode=True) > 0


def test_step_flops_parts():
    config = load_config("mini,batch_size=2")
    train = flops_lib.step_flops(config, "train")
    tokens = 2 * 5 * 4 * 3  # 17 frames -> 5 latent frames; 64 x 48 -> 8 x 6 latents -> 4 x 3 patches
    dit = flops_lib.dit_flops(TINY, 2, tokens, tokens // 2, FACECAM_TRAINABLE, "none")
    assert {k: train[k] for k in dit} == dit
    assert train["total"] == pytest.approx(sum(dit.values()) + train["vae"])
    sample = flops_lib.step_flops(config, "sample")
    per_step = flops_lib.dit_flops(TINY, 2, tokens, tokens // 2)["forward"]  # CFG: cond and uncond in one batch
    assert sample["forward"] == config.sample.num_steps * per_step


def test_hbm_and_out_of_memory_messages():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
               "temporaries (1.00T) exceeds available HBM (95.74G).")
    assert chips.hbm_from_message(message) == int(95.74 * 2**30)
    assert chips.required_from_message(message) == 2**40


def test_local_devices_report_without_a_memory_limit():
    # No --topology: the local devices (here 8 fake CPU devices, which report no memory limit).
    report = fit.analyze(load_config("mini"), "sample", None, with_vae=False)
    assert report.target == "local" and report.devices == len(jax.devices()) and report.hbm is None
    (loop,) = report.compiled
    assert loop.arguments > 0 and loop.total == report.memory
    assert report.fits is None and report.exit_code == fit.FITS and "verdict    unknown" in report.text()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_fit_tool_compiles_the_program_a_run_builds(lora_rank):
    """The train step the fit tool lowers from shapes alone is the step a run builds from real
    weights: the same HLO (fingerprint of the lowered text), on a 2-device fsdp mesh; with LoRA
    adapters too (abstract in the fit tool, placed arrays in a run)."""
    config = load_config(f"mini,frames=5,batch_size=2,train.lora_rank={lora_rank}")
    mesh, rules = build.mesh_and_rules(config, devices=jax.devices()[:2])
    fingerprints = {}
    for abstract in (True, False):
        program = train_step.build_program(config, mesh, rules, abstract=abstract)
        with sh.use_mesh(mesh, rules):
            text = program.lower().as_text()
        fingerprints[abstract] = hashlib.sha256(text.encode()).hexdigest()
    assert fingerprints[True] == fingerprints[False]


# ------------------------------------------------------------------ the command line, TPU targets


def _aot(*args: str, timeout: float = 600):
    return forked_runs.run("-m", "facecam_jax.aot", *args, timeout=timeout)


def test_an_unwritable_json_path_fails_before_compiling(tmp_path):
    result = _aot("--json", str(tmp_path), "--config=configs/facecam.py:mini,frames=5")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --json {str(tmp_path)!r} is a directory, not a file; " \
                                                     "give a file path"
    assert "compiled" not in result.stdout and not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def libtpu():
    return pytest.importorskip("libtpu", reason="TPU-target compiles need libtpu's compile-only client")


def test_tiny_sampling_fits_a_v5e(libtpu, tmp_path):
    out = tmp_path / "report.json"
    result = _aot("--topology", "v5e:2x2", "--program", "sample", "--novae", "--json", str(out))
    print(result.stdout)
    assert result.returncode == fit.FITS, result.stderr
    report = json.loads(out.read_text())
    assert report["chip"] == "v5e" and report["devices"] == 4 and report["mesh"]["fsdp"] == 4
    assert 15 * 2**30 < report["hbm"] < 16 * 2**30  # the compiler's limit for a 16 GiB v5e chip
    (loop,) = report["compiled"]
    assert loop["arguments"] > 0 and loop["total"] == report["memory"] < report["hbm"]
    assert report["fits"] and report["flops"]["forward"] > 0 and report["step_seconds"] > 0
    for field in ("arguments", "temporaries", "code", "HBM", "FLOPs", "verdict    fits"):
        assert field in result.stdout


def test_bad_topology_or_mesh_exits_2(libtpu):
    result = _aot("--topology", "v5e:3x3")
    assert result.returncode == fit.BAD_ARGUMENTS and "unknown TPU topology 'v5e:3x3'" in result.stderr
    result = _aot("--topology", "v5e:2x2", "--config=configs/facecam.py:mini,mesh.fsdp=3")
    assert result.returncode == fit.BAD_ARGUMENTS and "set --config.mesh" in result.stderr


def test_14b_training_on_one_v5e_does_not_fit(libtpu):
    # One A14B expert's bf16 weights (28.6 GB) and AdamW moments of the 4.2 B trained parameters
    # (16.8 GB) are 43 GiB on one 16 GiB chip: the tool says so before compiling anything. (The
    # same model on four chips without remat needs 16.1 GiB of 15.75: exit 3 too, but its compile
    # takes ~7 minutes on two cores; bench/RESULTS.md.)
    result = _aot("--topology", "v5e:1x1", "--program", "train", "--config=configs/facecam.py:nersemble,batch_size=1")
    print(result.stdout)
    assert result.returncode == fit.DOES_NOT_FIT, result.stderr
    assert "the arguments alone need 43.07 GiB" in result.stdout and "verdict    does not fit" in result.stdout


def test_xla_out_of_memory_at_compile_does_not_fit(libtpu, tmp_path):
    # A tiny DiT sampled at FaceCam's 55,440 tokens with XLA's softmax attention: the full score
    # matrix (2 CFG samples x 2 heads x 55,440^2 fp32, 46 GiB) cannot fit a 16 GiB v5e chip, and
    # the TPU compiler refuses the program.
    out = tmp_path / "report.json"
    result = _aot("--topology", "v5e:2x2", "--program", "sample", "--novae", "--json", str(out),
                  "--config=configs/facecam.py:mini,frames=81,height=704,width=480")
    print(result.stdout)
    assert result.returncode == fit.DOES_NOT_FIT, result.stderr
    report = json.loads(out.read_text())
    assert report["fits"] is False and "RESOURCE_EXHAUSTED" in report["out_of_memory"]["message"]
    assert report["memory"] > 40 * 2**30 and report["hbm"] < 16 * 2**30
