"""Wan DiT: parity with diffusers' WanTransformer3DModel, loading, saving, sharding, bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import sharding as sh
from facecam_jax.checkpoints import CheckpointError, load_dit, save_dit
from facecam_jax.checkpoints import dit as ckpt
from facecam_jax.checkpoints import dit_naming as naming
from facecam_jax.checkpoints.io import open_checkpoint, write_safetensors
from facecam_jax.checkpoints.tensor_ref import TensorRef
from facecam_jax.models import wan_dit as W

TOL = 1e-4  # fp32 parity bound (max abs error) required by the issue

# Tiny architectures: (name, DiTConfig, diffusers kwargs, per-token timesteps).
TINY = W.PRESETS["tiny"]
VARIANTS = {
    "t2v": TINY,
    "i2v": TINY.replace(in_dim=36),
    "ti2v": TINY.replace(in_dim=24, out_dim=24),
}


def _diffusers_model(cfg: W.DiTConfig):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_config(ckpt.diffusers_config(cfg))


def _reference_original_name(name: str) -> str:
    """diffusers -> original Wan naming, written independently of the loader's tables."""
    rules = [
        (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
        (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
        (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
        (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
        (r"^condition_embedder\.time_proj\.", "time_projection.1."),
        (r"^proj_out\.", "head.head."),
        (r"^scale_shift_table$", "head.modulation"),
        (r"\.scale_shift_table$", ".modulation"),
        (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
        (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
        (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
        (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
        (r"\.attn1\.norm_([qk])\.", r".self_attn.norm_\1."),
        (r"\.attn2\.norm_([qk])\.", r".cross_attn.norm_\1."),
        (r"\.norm2\.", ".norm3."),
        (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
        (r"\.ffn\.net\.2\.", ".ffn.2."),
    ]
    for pat, rep in rules:
        name = re.sub(pat, rep, name)
    return name


@pytest.fixture(scope="module")
def refs(torch, tmp_path_factory):
    """Per variant: the torch model and its weights saved in diffusers, original and ComfyUI naming."""
    out = {}
    root = tmp_path_factory.mktemp("dit")
    for i, (name, cfg) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        model = _diffusers_model(cfg).eval()
        with torch.no_grad():
            for p_name, p in model.named_parameters():
                # Non-trivial values everywhere, including norm scales, biases and the head.
                base = 1.0 if re.search(r"norm.*weight", p_name) else 0.0
                p.copy_(base + 0.15 * torch.randn_like(p))
        sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        files = {}
        files["diffusers"] = str(root / f"{name}_diffusers.safetensors")
        write_safetensors(files["diffusers"], sd)
        files["original"] = str(root / f"{name}_original.safetensors")
        write_safetensors(files["original"], {_reference_original_name(k): v for k, v in sd.items()})
        files["comfyui"] = str(root / f"{name}_comfy.safetensors")
        write_safetensors(files["comfyui"], {f"model.diffusion_model.{_reference_original_name(k)}": v for k, v in sd.items()})
        out[name] = (cfg, model, files)
    return out


def _inputs(cfg: W.DiTConfig, seed=0, frames=3, hw=(4, 6), batch=2, text_tokens=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, *hw, cfg.in_dim)).astype(np.float32)
    t = np.array([999.0, 437.5][:batch], np.float32)
    ctx = rng.standard_normal((batch, text_tokens, cfg.text_dim)).astype(np.float32)
    return x, t, ctx


def _torch_forward(torch, model, cfg, x, t, ctx):
    """diffusers forward on channels-first latents, context zero-padded to text_len by hand."""
    pad = np.zeros((ctx.shape[0], cfg.text_len, cfg.text_dim), np.float32)
    pad[:, : ctx.shape[1]] = ctx
    with torch.no_grad():
        out = model(
            torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()),
            torch.from_numpy(t),
            torch.from_numpy(pad),
            return_dict=False,
        )[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)


_forward = nnx.jit(lambda m, x, t, c: m(x, t, c))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("naming", ["diffusers", "original", "comfyui"])
def test_forward_parity(refs, torch, variant, naming):
    cfg, model, files = refs[variant]
    jmodel = load_dit(files[naming], config=cfg, dtype=jnp.float32)
    x, t, ctx = _inputs(cfg, seed=len(variant))
    if variant == "ti2v":  # Wan2.2 TI2V: a timestep per token, [B, L]
        n_tok = x.shape[1] * (x.shape[2] // 2) * (x.shape[3] // 2)
        t = np.linspace(0, 1000, 2 * n_tok, dtype=np.float32).reshape(2, n_tok)
        t[:, : n_tok // 3] = 0.0  # the clean first frame of TI2V
    ref = _torch_forward(torch, model, cfg, x, t, ctx)
    got = np.asarray(_forward(jmodel, x, t, ctx))
    err = float(np.abs(got - ref).max())
    print(f"\n[{variant}/{naming}] max abs err {err:.2e} (output scale {np.abs(ref).max():.2f})")
    assert got.shape == ref.shape
    assert err <= TOL


def _torch_facecam(torch, model, cfg, noisy, cam, src, t, ctx):
    """The FaceCam assembly around the diffusers model, in torch (channels-first)."""
    f = noisy.shape[1]
    zeros = np.zeros((*noisy.shape[:-1], cfg.in_dim - 2 * noisy.shape[-1]), np.float32)
    x = np.concatenate(
        [np.concatenate([noisy, cam, zeros], -1), np.concatenate([src, cam, zeros], -1)], axis=1
    )
    return _torch_forward(torch, model, cfg, x, t, ctx)[:, :f]


def test_facecam_velocity_parity(refs, torch):
    cfg, model, files = refs["i2v"]
    jmodel = load_dit(files["original"], config=cfg)
    rng = np.random.default_rng(3)
    noisy, cam, src = (rng.standard_normal((2, 2, 4, 4, 16)).astype(np.float32) for _ in range(3))
    _, t, ctx = _inputs(cfg)
    ref = _torch_facecam(torch, model, cfg, noisy, cam, src, t, ctx)
    got = np.asarray(nnx.jit(W.facecam_velocity)(jmodel, noisy, cam, src, t, ctx))
    err = float(np.abs(got - ref).max())
    print(f"\n[facecam_velocity] max abs err {err:.2e}")
    assert got.shape == noisy.shape and err <= TOL
    # The source half sees the same camera latents: changing the camera changes the output.
    other = np.asarray(nnx.jit(W.facecam_velocity)(jmodel, noisy, cam + 1.0, src, t, ctx))
    assert np.abs(other - got).max() > 1e-3


def test_widened_patch_embedding_keeps_the_t2v_function(refs):
    cfg, _, files = refs["t2v"]
    base = load_dit(files["diffusers"], config=cfg)
    x, t, ctx = _inputs(cfg, batch=1)
    want = np.asarray(_forward(base, x, t, ctx))
    wide = W.widen_patch_embedding(load_dit(files["diffusers"], config=cfg), 36)
    assert wide.config.in_dim == 36
    extra = np.random.default_rng(0).standard_normal((*x.shape[:-1], 20)).astype(np.float32)
    got = np.asarray(_forward(wide, np.concatenate([x, extra], -1), t, ctx))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_full_preset_parameter_counts(torch):
    for name, expected in W.REFERENCE_PARAM_COUNTS.items():
        count = W.param_count(W.abstract_model(name))
        cfg = W.PRESETS[name]
        with torch.device("meta"):
            ref = _diffusers_model(cfg)
        ref_count = sum(p.numel() for p in ref.parameters())
        print(f"\n[{name}] {count:,} parameters (diffusers {ref_count:,})")
        assert count == expected == ref_count


def test_config_is_inferred_from_shapes_for_every_preset():
    for name, cfg in W.PRESETS.items():
        if name == "tiny":
            continue
        variables = dict(naming.named_variables(nnx.state(W.abstract_model(cfg))))
        fake = {}
        for key, slot in naming.model_slots(cfg).items():
            shape = variables[slot.path].get_value().shape
            shape = shape[1:] if slot.layer is not None else shape
            fake[key] = TensorRef("unused", naming.torch_shape(slot.kind, shape), np.dtype(np.float32), 0)
        assert naming.infer_config(fake) == cfg, name


def test_bf16_forward_is_close_to_fp32(refs):
    cfg, _, files = refs["t2v"]
    x, t, ctx = _inputs(cfg)
    ref = np.asarray(_forward(load_dit(files["diffusers"], config=cfg, dtype=jnp.float32), x, t, ctx))
    bf16 = load_dit(files["diffusers"], config=cfg, dtype=jnp.bfloat16)
    assert bf16.blocks.ffn.fc1.kernel.get_value().dtype == jnp.bfloat16
    assert bf16.blocks.modulation.get_value().dtype == jnp.float32  # modulation stays fp32
    got = np.asarray(_forward(bf16, x, t, ctx))
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"\n[bf16 vs fp32] max abs err relative to output scale {rel:.2e}")
    assert rel < 3e-2  # bf16 has 8 mantissa bits; two blocks keep the error at the percent level


def test_save_load_round_trip_is_exact_and_diffusers_reads_it(refs, torch, tmp_path):
    from diffusers import WanTransformer3DModel

    cfg, model, files = refs["i2v"]
    jmodel = load_dit(files["original"], config=cfg)
    out_dir = tmp_path / "saved"
    save_dit(jmodel, out_dir)
    again = load_dit(str(out_dir), config=cfg)
    a, b = nnx.state(jmodel, nnx.Param), nnx.state(again, nnx.Param)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # diffusers itself accepts the directory: its config.json builds the same architecture and
    # the safetensors file loads strictly.
    from safetensors.torch import load_file

    back = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(str(out_dir)))
    back.load_state_dict(load_file(str(out_dir / "diffusion_pytorch_model.safetensors")), strict=True)
    ref_sd = model.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in back.state_dict().items())


def test_orbax_export_reloads_exactly(refs, tmp_path):
    cfg, _, files = refs["t2v"]
    jmodel = load_dit(files["diffusers"], config=cfg)
    ckpt.save_dit_orbax(jmodel, tmp_path / "orbax")
    again = load_dit(str(tmp_path / "orbax"))
    assert again.config == cfg
    leaves = zip(jax.tree.leaves(nnx.state(jmodel, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param)))
    assert all(np.array_equal(x, y) for x, y in leaves)


def test_overlay_replaces_and_reports(refs, tmp_path):
    cfg, _, files = refs["i2v"]
    base = load_dit(files["original"], config=cfg)
    before = np.asarray(base.blocks.self_attn.q.kernel.get_value()).copy()
    partial = {
        "blocks.1.self_attn.q.weight": np.full((cfg.dim, cfg.dim), 0.5, np.float32),
        "patch_embedding.weight": np.zeros((cfg.dim, cfg.in_dim, *cfg.patch_size), np.float32),
    }
    path = str(tmp_path / "facecam_high_noise.safetensors")
    write_safetensors(path, partial)
    report = ckpt.overlay_dit(base, path)
    assert report.replaced == sorted(partial)
    assert "replaced 2 of" in report.summary()
    after = np.asarray(base.blocks.self_attn.q.kernel.get_value())
    np.testing.assert_array_equal(after[0], before[0])  # untouched layer
    np.testing.assert_array_equal(after[1], 0.5)
    assert not np.asarray(base.patch_embedding.kernel.get_value()).any()
    write_safetensors(path, {"blocks.0.self_attn.q.weight": np.zeros((3, 3), np.float32), "lora_A": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=r"(?s)lora_A.*blocks\.0\.self_attn\.q\.weight"):
        ckpt.overlay_dit(base, path)


@pytest.mark.parametrize("attention", ["xla", "chunked"])  # chunked: the context-parallel shard_map path
def test_sharded_forward_matches_unsharded(refs, attention):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    cfg, _, files = refs["t2v"]
    x, t, ctx = _inputs(cfg, batch=2)
    want = np.asarray(_forward(load_dit(files["diffusers"], config=cfg), x, t, ctx))
    # fsdp x context x tensor: parameters over (fsdp, context) and tensor, sequence over context.
    mesh = sh.make_mesh(data=1, fsdp=2, context=2, tensor=2)
    model = load_dit(files["diffusers"], config=cfg, mesh=mesh, attention=attention)
    q = model.blocks.self_attn.q.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, (sh.FSDP, sh.CONTEXT), sh.TENSOR)
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 32)}
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sh.FSDP))
    with sh.use_mesh(mesh):
        got = _forward(model, jax.device_put(x, batch), jax.device_put(t, batch), jax.device_put(ctx, batch))
    err = float(np.abs(np.asarray(got) - want).max())
    print(f"\n[8-device fsdp x context x tensor, {attention}] max abs err vs unsharded {err:.2e}")
    assert err <= 1e-5


def test_chunked_attention_and_remat_match(refs):
    cfg, _, files = refs["t2v"]
    x, t, ctx = _inputs(cfg, batch=1)
    plain = load_dit(files["diffusers"], config=cfg)
    chunked = load_dit(files["diffusers"], config=cfg, attention="chunked", remat="full")
    want = np.asarray(_forward(plain, x, t, ctx))
    got = np.asarray(nnx.jit(lambda m, x, t, c: m(x, t, c))(chunked, x, t, ctx))
    np.testing.assert_allclose(got, want, atol=1e-5)

    def loss(m):
        return jnp.mean(m(x, t, ctx) ** 2)

    g1 = nnx.jit(nnx.grad(loss))(plain)
    g2 = nnx.jit(nnx.grad(loss))(chunked)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def _corrupt(files, tmp_path, edit):
    refs = open_checkpoint(files["original"])
    tensors = {k: r.load() for k, r in refs.items()}
    edit(tensors)
    path = str(tmp_path / "bad.safetensors")
    write_safetensors(path, tensors)
    return path


def test_missing_key_is_named(refs, tmp_path):
    cfg, _, files = refs["t2v"]
    path = _corrupt(files, tmp_path, lambda t: t.pop("blocks.1.cross_attn.k.bias"))
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\).*blocks\.1\.cross_attn\.k\.bias"):
        load_dit(path, config=cfg)


def test_unexpected_key_is_named(refs, tmp_path):
    cfg, _, files = refs["t2v"]
    path = _corrupt(files, tmp_path, lambda t: t.update({"blocks.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"(?s)unexpected keys \(1\).*blocks\.0\.self_attn\.extra\.weight"):
        load_dit(path, config=cfg)


def test_wrong_shape_is_named(refs, tmp_path):
    cfg, _, files = refs["t2v"]
    path = _corrupt(files, tmp_path, lambda t: t.update({"blocks.0.ffn.0.weight": np.zeros((7, cfg.dim), np.float32)}))
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatches.*blocks\.0\.ffn\.0\.weight: \(7, 64\) vs \(128, 64\)"):
        load_dit(path, config=cfg)
    # The wrong preset for a checkpoint lists every mismatch in one error.
    with pytest.raises(CheckpointError, match="in_dim=36"):
        load_dit(files["original"], config=VARIANTS["i2v"])


def test_bad_latents_are_clear_errors():
    model = W.WanDiT("tiny", rngs=nnx.Rngs(0))
    ctx = jnp.zeros((1, 3, 32))
    with pytest.raises(ValueError, match="expects in_dim=16"):
        model(jnp.zeros((1, 2, 4, 4, 36)), jnp.zeros((1,)), ctx)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(jnp.zeros((1, 2, 5, 4, 16)), jnp.zeros((1,)), ctx)
    with pytest.raises(ValueError, match="more than text_len"):
        model(jnp.zeros((1, 2, 4, 4, 16)), jnp.zeros((1,)), jnp.zeros((1, 17, 32)))


def test_convert_tool_writes_a_reloadable_orbax_checkpoint(refs, tmp_path):
    import importlib.util
    import pathlib

    tool = pathlib.Path(__file__).parents[1] / "tools" / "convert_wan_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_wan_checkpoint", tool)
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    cfg, _, files = refs["t2v"]  # the tiny preset's architecture
    overlay = str(tmp_path / "overlay.safetensors")
    write_safetensors(overlay, {"blocks.0.self_attn.o.bias": np.full((cfg.dim,), 2.0, np.float32)})
    out = convert.main(["--checkpoint", files["comfyui"], "--out", str(tmp_path / "conv"), "--config", "tiny",
                        "--dtype", "bfloat16", "--overlay", overlay])
    model = load_dit(out)
    base = load_dit(files["diffusers"], config=cfg, dtype=jnp.bfloat16)
    assert model.config == cfg and model.blocks.ffn.fc1.kernel.get_value().dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(model.blocks.self_attn.o.bias.get_value()[0], np.float32), 2.0)
    np.testing.assert_array_equal(np.asarray(model.blocks.ffn.fc1.kernel.get_value()), np.asarray(base.blocks.ffn.fc1.kernel.get_value()))


@pytest.mark.parametrize("heads", [4, 2])  # 4 heads: Ulysses all-to-all; 2 heads over 4 shards: KV all-gather
def test_context_parallel_attention_matches_single_device(heads):
    from facecam_jax.models.attention import attention

    rng = np.random.default_rng(heads)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, heads, 8)), jnp.float32) for _ in range(3))
    ctx_kv = jnp.asarray(rng.standard_normal((2, 6, heads, 8)), jnp.float32)
    want_self = attention(q, k, v, implementation="xla")
    want_cross = attention(q, ctx_kv, ctx_kv, implementation="xla")
    mesh = sh.make_mesh(data=1, fsdp=2, context=4, tensor=1)
    with sh.use_mesh(mesh):
        fn = jax.jit(lambda q, k, v, c: (attention(q, k, v, implementation="chunked", chunk=4),
                                         attention(q, c, c, implementation="chunked", chunk=4)))
        got_self, got_cross = fn(q, k, v, ctx_kv)
        hlo = fn.lower(q, k, v, ctx_kv).as_text()
    assert ("all_to_all" in hlo or "all-to-all" in hlo) if heads == 4 else ("all_gather" in hlo or "all-gather" in hlo)
    np.testing.assert_allclose(np.asarray(got_self), np.asarray(want_self), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_cross), np.asarray(want_cross), atol=1e-5)
