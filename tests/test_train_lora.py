"""LoRA fine-tuning through the real trainer (train.lora_rank > 0): what it trains, the same
losses on 1 and 8 devices, an exact resume, and an export that reloads into the trained model.

Tolerances were measured (fp32, tiny DiT, mini VAE, 9 frames, rank 4): fsdp 8 agrees with one
device to ~1e-7 in the loss and ~1e-7 in the trained parameters; the reloaded export (adapters
merged into the kernels at strength 1) gives the trained model's velocity to ~1e-6.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import build
from facecam_jax import sampling as sampler
from facecam_jax import sharding as sh
from facecam_jax.checkpoints.dit import overlay_dit
from facecam_jax.checkpoints.dit_naming import named_variables
from facecam_jax.checkpoints.lora_files import read_lora
from facecam_jax.models.lora import LoRAParam
from facecam_jax.models.wan_dit import facecam_velocity
from facecam_jax.runtime.config_file import load_config as get_config
from facecam_jax.training import train_step, trainer

BASE = "mini,frames=9,batch_size=2,train.lora_rank=4,train.lora_alpha=8.0,optimizer.lr=1e-3"
TOL = 1e-5


def _mesh(fsdp=1):
    return sh.make_mesh(1, fsdp, 1, 1, devices=jax.devices()[:fsdp])


def _losses(workdir):
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def _params(model) -> dict:
    """Every parameter of a model by path, on the host."""
    return {p: np.asarray(v.get_value()) for p, v in named_variables(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """Two LoRA steps on one device, checkpointed after each."""
    workdir = str(tmp_path_factory.mktemp("lora_one_device"))
    config = get_config(BASE + ",steps=2,checkpoint_every=1")
    return config, workdir, trainer.train(config, workdir, mesh=_mesh())


def test_only_the_adapters_and_the_patch_embedding_train(one_device):
    config, _, result = one_device
    trainable = {p for p, _ in named_variables(nnx.state(result.model, build.train_filter(config, result.model)))}
    # Adapters on the self-attention linears, their q/k RMSNorm scales and the patch embedding in
    # full; no base kernel or bias of an adapted layer.
    attn = {("blocks", "self_attn", m, w) for m in "qkvo" for w in ("lora_a", "lora_b")}
    norms = {("blocks", "self_attn", n, "scale") for n in ("norm_q", "norm_k")}
    assert trainable == attn | norms | {("patch_embedding", "kernel"), ("patch_embedding", "bias")}
    initial = _params(build.build_dit(config, _mesh(), sh.DEFAULT_RULES, adapters=True))  # the run's start
    trained = _params(result.model)
    assert set(initial) == set(trained)
    for path in initial:
        if path in trainable:
            assert not np.array_equal(initial[path], trained[path]), path  # it trained
        else:
            np.testing.assert_array_equal(initial[path], trained[path], err_msg=str(path))  # bit-identical
    # The optimizer state exists for the trained parameters alone (AdamW: two moments each).
    program = train_step.build_program(config, _mesh(), sh.DEFAULT_RULES, abstract=True)
    dim, layers, rank = 64, 2, 4  # the tiny preset
    expected = layers * (4 * 2 * dim * rank + 2 * dim) + (4 * 36 * dim + dim)
    assert program.num_trainable == expected == 13_632
    moments = sum(x.size for x in jax.tree.leaves(program.state.opt_state) if x.ndim > 0)
    assert moments == 2 * expected


def test_the_export_reloads_into_the_trained_model(one_device, tmp_path):
    config, workdir, result = one_device
    assert result.exported == os.path.join(workdir, "facecam.safetensors")
    assert result.exported_lora == os.path.join(workdir, "facecam_lora.safetensors")
    lora = read_lora(result.exported_lora, result.model)
    assert len(lora.entries) == 2 * 4 and all(e.scale == pytest.approx(8.0 / 4) for e in lora.entries)  # alpha / rank
    base = build.build_dit(config, _mesh(), sh.DEFAULT_RULES)
    assert sorted(overlay_dit(base, result.exported).replaced) == [
        f"blocks.{i}.self_attn.{n}.weight" for i in range(2) for n in ("norm_k", "norm_q")] + [
        "patch_embedding.bias", "patch_embedding.weight"]
    # load_experts overlays the state dict and merges the adapters at strength 1.
    (reloaded,) = sampler.load_experts(config, _mesh(), sh.DEFAULT_RULES, workdir).models
    assert all(m.lora_a is None for m in (reloaded.blocks.self_attn.q, reloaded.blocks.self_attn.o))
    rng = np.random.default_rng(0)
    lat = [jnp.asarray(rng.standard_normal((2, 3, 8, 6, 16)), jnp.float32) for _ in range(3)]
    t, ctx = jnp.array([900.0, 300.0]), jnp.zeros((2, 4, 32), jnp.float32)
    want = np.asarray(facecam_velocity(result.model, *lat, t, ctx))
    got = np.asarray(facecam_velocity(reloaded, *lat, t, ctx))
    plain = np.asarray(facecam_velocity(base, *lat, t, ctx))  # the state dict without the adapters
    err = float(np.abs(got - want).max())
    print(f"\nreloaded export vs trained model: max velocity error {err:.2e} (|v| max {np.abs(want).max():.2f}, "
          f"without the LoRA {np.abs(plain - want).max():.2e})")
    assert err < 1e-5 and np.abs(plain - want).max() > 100 * err
    # sample.loras adds a LoRA on top at a strength: 0 changes nothing, -1 undoes the export's.
    undo = get_config(BASE)
    undo.sample.loras = (f"{result.exported_lora}:-1",)
    (undone,) = sampler.load_experts(undo, _mesh(), sh.DEFAULT_RULES, workdir).models
    np.testing.assert_allclose(np.asarray(facecam_velocity(undone, *lat, t, ctx)), plain, atol=1e-5)


def test_fsdp8_trains_like_one_device(one_device, tmp_path):
    _, workdir, result = one_device
    fsdp = str(tmp_path / "fsdp8")
    straight = trainer.train(get_config(BASE + ",steps=2,checkpoint_every=10"), fsdp, mesh=_mesh(8))
    want, got = _losses(workdir), _losses(fsdp)
    print(f"\nLoRA losses, 1 device {want[1]:.8f} {want[2]:.8f}; fsdp 8 {got[1]:.8f} {got[2]:.8f}")
    np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=TOL)
    a, b = _params(straight.model), _params(result.model)
    err = max(float(np.abs(a[p] - b[p]).max()) for p in a)
    print(f"fsdp 8 vs 1 device: trained parameters max abs diff {err:.2e}")
    assert err < TOL
    # Adapters shard like the kernels they adapt: the self-attention's A over fsdp on its input axis.
    spec = straight.model.blocks.self_attn.q.lora_a.get_value().sharding.spec
    assert "fsdp" in jax.tree.leaves(tuple(spec)), spec


def test_resume_from_a_checkpoint_is_exact(one_device, tmp_path):
    _, workdir, result = one_device
    moved = str(tmp_path / "moved")
    shutil.copytree(os.path.join(workdir, "checkpoints", "1"), os.path.join(moved, "checkpoints", "1"))
    resumed = trainer.train(get_config(BASE + ",steps=2,checkpoint_every=1"), moved, mesh=_mesh())
    assert resumed.step == 2 and list(_losses(moved)) == [2]  # it ran step 2 only
    assert _losses(moved)[2] == _losses(workdir)[2]
    a, b = _params(resumed.model), _params(result.model)
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    assert isinstance(resumed.model.blocks.self_attn.q.lora_a, LoRAParam)


def test_bad_lora_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train.lora_rank=-2 must be"):  # where the config loads
        get_config(BASE + ",train.lora_rank=-2")
    config = get_config(BASE)
    config.train.lora_rank = -1  # set in code, past the config load: the program builder checks it (the same check)
    with pytest.raises(ValueError, match=r"train.lora_rank=-1 must be an integer >= 0"):
        train_step.build_program(config, _mesh(), sh.DEFAULT_RULES, abstract=True)
    config = get_config(BASE)
    config.train.trainable = ("patch_embedding",)  # no Linear to adapt
    with pytest.raises(ValueError, match=r"train.trainable=\('patch_embedding',\).*match no Linear"):
        train_step.build_program(config, _mesh(), sh.DEFAULT_RULES, abstract=True)
    with pytest.raises(ValueError, match=r"model.quantize='int8': quantized kernels .* cannot be trained"):
        train_step.build_program(get_config(BASE + ",train.lora_rank=0,model.quantize=int8"), _mesh(), sh.DEFAULT_RULES, abstract=True)
    qlora = train_step.build_program(get_config(BASE + ",model.quantize=int8"), _mesh(),
                                     sh.DEFAULT_RULES, abstract=True)  # int8 base, fp32 adapters: QLoRA
    assert all(jnp.dtype(x.dtype) == jnp.float32 for x in jax.tree.leaves(qlora.state.params))
