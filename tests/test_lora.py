"""LoRA: parity with diffusers + PEFT in every Wan naming, adapters, merging, export, sharding, bad input."""

import copy
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from facecam_jax import sharding as sh
from facecam_jax.checkpoints import CheckpointError, dit_naming, load_dit, save_dit
from facecam_jax.checkpoints import dit as ckpt
from facecam_jax.checkpoints.io import open_checkpoint, write_safetensors
from facecam_jax.checkpoints.lora import apply_loras, parse_lora_spec, save_lora
from facecam_jax.models import lora as L
from facecam_jax.models import wan_dit as W

REL_TOL = 1e-5  # fp32 parity bound: max abs error relative to the output's max abs value
CFG = W.PRESETS["tiny"]
RANK, ALPHA, OUT_ALPHA = 4, 8.0, 3.0  # PEFT adapter: scale 2, and 0.75 on to_out.0 (alpha_pattern)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "patch_embedding"]  # + a Conv3d LoRA


def _to_original(module: str) -> str:
    """diffusers -> original Wan module name, written independently of the loader's tables."""
    for pat, rep in [
        (r"\.attn1\.to_out\.0$", ".self_attn.o"),
        (r"\.attn2\.to_out\.0$", ".cross_attn.o"),
        (r"\.attn1\.to_([qkv])$", r".self_attn.\1"),
        (r"\.attn2\.to_([qkv])$", r".cross_attn.\1"),
        (r"\.ffn\.net\.0\.proj$", ".ffn.0"),
        (r"\.ffn\.net\.2$", ".ffn.2"),
    ]:
        module = re.sub(pat, rep, module)
    return module


def _rel(got, ref) -> float:
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


def _inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, 4, 6, CFG.in_dim)).astype(np.float32)
    t = np.array([999.0, 437.5][:batch], np.float32)
    ctx = rng.standard_normal((batch, 5, CFG.text_dim)).astype(np.float32)
    return x, t, ctx


def _torch_forward(torch, model, x, t, ctx):
    pad = np.zeros((ctx.shape[0], CFG.text_len, CFG.text_dim), np.float32)
    pad[:, : ctx.shape[1]] = ctx
    with torch.no_grad():
        out = model(torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()), torch.from_numpy(t),
                    torch.from_numpy(pad), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)


_forward = nnx.jit(lambda m, x, t, c: m(x, t, c))


@pytest.fixture(scope="module")
def ref(torch, tmp_path_factory):
    """A tiny diffusers Wan DiT (random weights), the same with a PEFT LoRA, and their files."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders import WanLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    base = WanTransformer3DModel.from_config(ckpt.diffusers_config(CFG)).eval()
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.copy_((1.0 if re.search(r"norm.*weight", name) else 0.0) + 0.15 * torch.randn_like(p))
    base_file = str(root / "base.safetensors")
    write_safetensors(base_file, {k: v.numpy() for k, v in base.state_dict().items()})
    adapted = copy.deepcopy(base)
    adapted.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, alpha_pattern={"to_out.0": OUT_ALPHA}))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:  # PEFT zero-inits B: make the adapter do something
                p.copy_(0.2 * torch.randn_like(p))
    peft_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(adapted).items()}
    WanLoraLoaderMixin.save_lora_weights(
        str(root / "peft"), transformer_lora_layers=peft_sd,
        transformer_lora_adapter_metadata=adapted.peft_config["default"].to_dict(),
    )
    # module (diffusers naming) -> (A [r, in], B [out, r], alpha) for the conversions below
    factors = {}
    for key, a in peft_sd.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            alpha = OUT_ALPHA if module.endswith("to_out.0") else ALPHA
            factors[module] = (a.numpy(), peft_sd[f"{module}.lora_B.weight"].numpy(), alpha)
    assert len(factors) == CFG.num_layers * 10 + 1 and factors["patch_embedding"][0].shape == (RANK, 16, 1, 2, 2)
    return {"base": base, "adapted": adapted, "base_file": base_file, "root": root, "factors": factors,
            "peft_file": str(root / "peft" / "pytorch_lora_weights.safetensors")}


def _write(ref, name, naming):
    """The PEFT LoRA rewritten in another naming by the test itself."""
    out = {}
    for module, (a, b, alpha) in ref["factors"].items():
        orig = _to_original(module)
        if naming == "peft-bare":  # get_peft_model_state_dict keys, no prefix and no alpha: fold it into B
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b * (alpha / RANK)
        elif naming == "original":  # original Wan naming, no alpha
            out[f"{orig}.lora_A.weight"], out[f"{orig}.lora_B.weight"] = a, b * (alpha / RANK)
        elif naming == "kohya":
            p = f"diffusion_model.{orig}"
            out[f"{p}.lora_down.weight"], out[f"{p}.lora_up.weight"] = a, b
            out[f"{p}.alpha"] = np.array(alpha, np.float32)
        elif naming == "kohya-flat":
            p = "lora_unet_" + orig.replace(".", "_")
            out[f"{p}.lora_down.weight"], out[f"{p}.lora_up.weight"] = a, b
            out[f"{p}.alpha"] = np.array(alpha, np.float32)
    path = str(ref["root"] / f"{name}.safetensors")
    write_safetensors(path, out)
    return path


NAMINGS = ["peft", "peft-bare", "kohya", "kohya-flat", "original"]


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lora_parity_with_diffusers_peft(ref, torch, strength):
    x, t, ctx = _inputs()
    ref["adapted"].set_adapters(["default"], weights=[strength])
    try:
        want = _torch_forward(torch, ref["adapted"], x, t, ctx)
    finally:
        ref["adapted"].set_adapters(["default"], weights=[1.0])
    base_out = _torch_forward(torch, ref["base"], x, t, ctx)
    assert _rel(base_out, want) > 0.05  # the adapter changes the output well beyond the tolerance
    for naming in NAMINGS:
        path = ref["peft_file"] if naming == "peft" else _write(ref, naming, naming)
        model = load_dit(ref["base_file"], config=CFG, loras=[(path, strength)])
        err = _rel(_forward(model, x, t, ctx), want)
        print(f"\n[{naming} @ {strength}] max rel err {err:.2e}")
        assert err <= REL_TOL, naming


def test_diff_and_diff_b_entries(ref, torch, tmp_path):
    """Full-tensor diffs (norms, modulation, patch embedding, a weight, biases) next to a kohya LoRA."""
    rng = np.random.default_rng(1)
    d, strength = CFG.dim, 0.5
    # (original key in the file, diffusers parameter it changes, torch shape)
    diffs = [
        ("blocks.0.norm3.diff", "blocks.0.norm2.weight", (d,)),
        ("blocks.0.norm3.diff_b", "blocks.0.norm2.bias", (d,)),
        ("blocks.1.self_attn.norm_q.diff", "blocks.1.attn1.norm_q.weight", (d,)),
        ("blocks.1.modulation.diff", "blocks.1.scale_shift_table", (1, 6, d)),
        ("blocks.0.self_attn.q.diff_b", "blocks.0.attn1.to_q.bias", (d,)),
        ("blocks.1.ffn.0.diff", "blocks.1.ffn.net.0.proj.weight", (CFG.ffn_dim, d)),
        ("head.modulation.diff", "scale_shift_table", (1, 2, d)),
        ("patch_embedding.diff", "patch_embedding.weight", (d, CFG.in_dim, 1, 2, 2)),
        ("head.head.diff_b", "proj_out.bias", (CFG.out_dim * 4,)),
    ]
    tensors = open_checkpoint(_write(ref, "kohya_for_diff", "kohya"))
    tensors = {k: r.load() for k, r in tensors.items()}
    torch_model = copy.deepcopy(ref["adapted"])
    params = dict(torch_model.named_parameters())
    for key, target, shape in diffs:
        value = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        tensors[f"diffusion_model.{key}"] = value
        if target not in params:  # a layer PEFT wrapped
            module, leaf = target.rsplit(".", 1)
            target = f"{module}.base_layer.{leaf}"
        with torch.no_grad():
            params[target] += strength * torch.from_numpy(value)
    path = str(tmp_path / "with_diffs.safetensors")
    write_safetensors(path, tensors)
    x, t, ctx = _inputs()
    torch_model.set_adapters(["default"], weights=[strength])
    want = _torch_forward(torch, torch_model, x, t, ctx)
    without = np.asarray(_forward(load_dit(ref["base_file"], config=CFG, loras=[(_write(ref, "k2", "kohya"), strength)]), x, t, ctx))
    assert _rel(without, want) > 1e-2  # the diffs matter
    model = load_dit(ref["base_file"], config=CFG, loras=[(path, strength)])
    err = _rel(_forward(model, x, t, ctx), want)
    print(f"\n[kohya + diff/diff_b @ {strength}] max rel err {err:.2e}")
    assert err <= REL_TOL


# ------------------------------------------------------------------ adapters in the model


def _randomize_b(model, seed=0):
    key = jax.random.key(seed)
    for i, (_, layer) in enumerate(L.adapted_linears(model)):
        b = layer.lora_b.get_value()
        layer.lora_b.set_value(0.2 * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.dtype))


def _adapt(model, **kw):
    """The adapter configuration the model tests share (one forward compile for all of them)."""
    return L.add_lora(model, 4, 8.0, ("self_attn", "ffn"), **kw)


def test_fresh_adapters_leave_the_output_unchanged_and_the_filter_selects_them(ref):
    model = load_dit(ref["base_file"], config=CFG)
    x, t, ctx = _inputs()
    before = np.asarray(_forward(model, x, t, ctx))
    n_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    _adapt(model)
    assert [".".join(p) for p, _ in L.adapted_linears(model)] == [
        "blocks.ffn.fc1", "blocks.ffn.fc2", *(f"blocks.self_attn.{p}" for p in "koqv")]
    a = model.blocks.self_attn.q.lora_a.get_value()
    assert a.shape == (CFG.num_layers, CFG.dim, 4) and np.abs(np.asarray(a)).min() > 0  # random A
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # each layer its own draw
    assert not np.asarray(model.blocks.self_attn.q.lora_b.get_value()).any()  # zero B
    lora_state = nnx.state(model, L.LoRAParam)
    assert len(jax.tree.leaves(lora_state)) == 12  # 6 layers x (A, B): the filter selects adapters only
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == n_params + 12
    np.testing.assert_array_equal(np.asarray(_forward(model, x, t, ctx)), before)
    L.add_lora(model, 2, names=("cross_attn", "text_embedding", "time_embedding", "time_projection", "head"))
    assert len(L.adapted_linears(model)) == 16 == len(L.linears(model))  # every Linear
    assert not hasattr(model.patch_embedding, "lora_a")  # the patch embedding is trained in full
    with pytest.raises(ValueError, match="already have LoRA adapters"):
        L.add_lora(model, 2, names=("q",))
    with pytest.raises(ValueError, match="match no Linear"):
        L.add_lora(load_dit(ref["base_file"], config=CFG), 2, names=("nothing",))
    abstract = L.add_lora(W.abstract_model("wan2.1-t2v-14b"), 16, names=("blocks",))  # no memory
    assert abstract.blocks.ffn.fc2.lora_a.get_value().shape == (40, 13824, 16)


def test_gradients_through_the_scanned_blocks_reach_the_adapters(ref):
    model = _adapt(load_dit(ref["base_file"], config=CFG))
    x, t, ctx = _inputs(batch=1)
    wrt = nnx.DiffState(0, L.LoRAParam)
    grads = nnx.jit(nnx.grad(lambda m: (m(x, t, ctx) ** 2).mean(), argnums=wrt))(model)
    leaves = dict(dit_naming.named_variables(grads))
    assert set(leaves) == {(*p, ab) for p, _ in L.adapted_linears(model) for ab in ("lora_a", "lora_b")}
    g_b = np.asarray(leaves[("blocks", "self_attn", "q", "lora_b")].get_value())
    g_a = np.asarray(leaves[("blocks", "self_attn", "q", "lora_a")].get_value())
    assert g_b.shape == (CFG.num_layers, 4, CFG.dim)
    assert (np.abs(g_b).max(axis=(1, 2)) > 0).all()  # every layer's B learns from the first step
    assert not g_a.any()  # with B = 0, A gets no gradient yet (as in PEFT)


def test_merge_lora_equals_the_adapted_forward_and_saves_as_a_plain_checkpoint(ref, tmp_path):
    model = load_dit(ref["base_file"], config=CFG)
    x, t, ctx = _inputs()
    base = np.asarray(_forward(model, x, t, ctx))
    _adapt(model)
    _randomize_b(model)
    adapted = np.asarray(_forward(model, x, t, ctx))
    assert _rel(base, adapted) > 0.05
    L.merge_lora(model)
    assert not L.adapted_linears(model) and not jax.tree.leaves(nnx.state(model, L.LoRAParam))
    err = _rel(_forward(model, x, t, ctx), adapted)
    print(f"\n[merge_lora vs adapter forward] max rel err {err:.2e}")
    assert err <= REL_TOL
    # The merged model is a plain Wan checkpoint for any other tool.
    again = load_dit(save_dit(model, tmp_path / "merged.safetensors"), config=CFG)
    assert _rel(_forward(again, x, t, ctx), adapted) <= REL_TOL


def test_save_lora_reloads_exactly_here_and_in_diffusers(ref, torch, tmp_path):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders import WanLoraLoaderMixin

    model = load_dit(ref["base_file"], config=CFG)
    L.add_lora(model, 4, 6.0, ("self_attn", "ffn"))
    L.add_lora(model, 2, 1.0, ("cross_attn", "head", "time_projection", "text_embedding"))  # other rank and alpha
    _randomize_b(model, seed=3)
    x, t, ctx = _inputs()
    want = np.asarray(_forward(model, x, t, ctx))
    path = save_lora(model, tmp_path / "export", metadata={"expert": "high_noise"})
    assert path.endswith("pytorch_lora_weights.safetensors")
    keys = set(open_checkpoint(path))
    assert "transformer.blocks.1.attn1.to_out.0.lora_A.weight" in keys and "transformer.proj_out.lora_B.weight" in keys
    back = load_dit(ref["base_file"], config=CFG, loras=[path])
    err = _rel(_forward(back, x, t, ctx), want)
    print(f"\n[save_lora -> load_dit(loras=)] max rel err {err:.2e}")
    assert err <= REL_TOL
    # diffusers' own Wan loader (load_lora_weights without a pipeline) reads the same file.
    state_dict, metadata = WanLoraLoaderMixin.lora_state_dict(path, return_lora_metadata=True)
    torch_model = WanTransformer3DModel.from_config(ckpt.diffusers_config(CFG)).eval()
    torch_model.load_state_dict(copy.deepcopy(ref["base"].state_dict()))
    WanLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=torch_model, metadata=metadata)
    err = _rel(_torch_forward(torch, torch_model, x, t, ctx), want)
    print(f"[save_lora -> diffusers load_lora_weights] max rel err {err:.2e}")
    assert err <= REL_TOL


def test_adapters_and_merged_loras_are_sharded_on_8_devices(ref, tmp_path):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    mesh = sh.make_mesh(data=1, fsdp=2, context=2, tensor=2)
    fc = (sh.FSDP, sh.CONTEXT)
    model = load_dit(ref["base_file"], config=CFG, mesh=mesh)
    _adapt(model, mesh=mesh)
    L.add_lora(model, 4, names=("head", "text_embedding"), mesh=mesh)
    specs = {
        "blocks.self_attn.q": (P(None, fc, None), P(None, None, sh.TENSOR)),  # kernel (layers, embed, heads)
        "blocks.self_attn.o": (P(None, sh.TENSOR, None), P(None, None, fc)),  # (layers, heads, embed)
        "blocks.ffn.fc1": (P(None, fc, None), P(None, None, sh.TENSOR)),  # (layers, embed, mlp)
        "head.head": (P(fc, None), P(None, None)),  # (embed, None)
        "text_embedding.fc1": (P(None, None), P(None, fc)),  # (None, embed)
    }
    layers = {".".join(p): m for p, m in L.adapted_linears(model)}
    for name, (a_spec, b_spec) in specs.items():
        a, b = layers[name].lora_a.get_value(), layers[name].lora_b.get_value()
        assert (a.sharding.spec, b.sharding.spec) == (a_spec, b_spec), name
    want_specs = sh.state_shardings(nnx.state(model, L.LoRAParam), mesh)
    for var, want in zip(jax.tree.leaves(nnx.state(model, L.LoRAParam)), jax.tree.leaves(want_specs)):
        assert var.sharding == want  # what a trainer derives from the axes is what add_lora placed
    # apply_loras on a sharded model keeps every parameter on its sharding and matches unsharded.
    x, t, ctx = _inputs()
    plain = load_dit(ref["base_file"], config=CFG, loras=[ref["peft_file"]])
    want = np.asarray(_forward(plain, x, t, ctx))
    sharded = load_dit(ref["base_file"], config=CFG, mesh=mesh, loras=[ref["peft_file"]])
    q = sharded.blocks.self_attn.q.kernel.get_value()
    assert q.sharding.spec == P(None, fc, sh.TENSOR)
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 32)}
    with sh.use_mesh(mesh):
        got = np.asarray(_forward(sharded, x, t, ctx))
    err = _rel(got, want)
    print(f"\n[8-device sharded apply_loras vs unsharded] max rel err {err:.2e}")
    assert err <= REL_TOL


# ------------------------------------------------------------------ bad input


def _lora_file(tmp_path, name, tensors):
    path = str(tmp_path / f"{name}.safetensors")
    write_safetensors(path, tensors)
    return path


def _pair(prefix, din, dout, rank=2, seed=0):
    rng = np.random.default_rng(seed)
    return {f"{prefix}.lora_down.weight": rng.standard_normal((rank, din)).astype(np.float32),
            f"{prefix}.lora_up.weight": rng.standard_normal((dout, rank)).astype(np.float32)}


def test_unmatched_keys_error_or_warn_with_a_count(ref, tmp_path):
    d = CFG.dim
    good = _pair("diffusion_model.blocks.0.self_attn.q", d, d)
    extra = {**_pair("diffusion_model.blocks.0.cross_attn.k_img", d, d, seed=1),  # a Wan2.1-I2V layer
             "diffusion_model.img_emb.proj.1.diff_b": np.zeros(d, np.float32)}
    path = _lora_file(tmp_path, "extra", {**good, **extra})
    with pytest.raises(CheckpointError, match=r"(?s)extra\.safetensors.*match no layer.*unexpected keys \(3\).*k_img"):
        load_dit(ref["base_file"], config=CFG, loras=[path])
    with pytest.warns(UserWarning, match=r"skipped 3 LoRA keys"):
        model = load_dit(ref["base_file"], config=CFG, loras=[path], lora_unmatched="warn")
    only_good = load_dit(ref["base_file"], config=CFG, loras=[_lora_file(tmp_path, "good", good)])
    np.testing.assert_array_equal(np.asarray(model.blocks.self_attn.q.kernel.get_value()),
                                  np.asarray(only_good.blocks.self_attn.q.kernel.get_value()))
    base = load_dit(ref["base_file"], config=CFG)
    assert not np.array_equal(np.asarray(base.blocks.self_attn.q.kernel.get_value()),
                              np.asarray(only_good.blocks.self_attn.q.kernel.get_value()))


def test_wrong_shapes_and_incomplete_pairs_are_named_and_change_nothing(ref, tmp_path):
    d = CFG.dim
    model = load_dit(ref["base_file"], config=CFG)
    before = [np.asarray(v).copy() for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    bad = {**_pair("diffusion_model.blocks.0.self_attn.q", d, d),
           **_pair("diffusion_model.blocks.1.ffn.0", d, 7, seed=2)}  # ffn.0 is [128, 64], not [7, 64]
    with pytest.raises(CheckpointError, match=r"(?s)does not fit.*blocks\.1\.ffn\.0\.lora_down\.weight.*\(128, 64\)"):
        apply_loras(model, [(_lora_file(tmp_path, "shape", bad), 1.0)])
    half = {**_pair("diffusion_model.blocks.0.self_attn.q", d, d),
            "diffusion_model.blocks.0.self_attn.k.lora_down.weight": np.zeros((2, d), np.float32)}
    with pytest.raises(CheckpointError, match=r"(?s)incomplete.*blocks\.0\.self_attn\.k\.lora_down\.weight"):
        apply_loras(model, [_lora_file(tmp_path, "half", half)])
    diff = {"diffusion_model.blocks.0.norm3.diff": np.zeros(d + 1, np.float32)}
    with pytest.raises(CheckpointError, match=r"blocks\.0\.norm3\.diff: \(65,\) vs \(64,\)"):
        apply_loras(model, [_lora_file(tmp_path, "diff", diff)])
    dora = {**_pair("diffusion_model.blocks.0.self_attn.q", d, d),
            "diffusion_model.blocks.0.self_attn.q.dora_scale": np.ones((d, 1), np.float32)}
    with pytest.raises(CheckpointError, match="DoRA"):
        apply_loras(model, [_lora_file(tmp_path, "dora", dora)])
    after = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # every file is checked before any change


def test_a_lora_for_another_model_size_is_one_clear_error(ref, tmp_path):
    other = {}  # a LoRA for a 3-layer model of width 128 and ffn 256, in PEFT naming
    for i in range(3):
        for module, din, dout in [("attn1.to_q", 128, 128), ("ffn.net.0.proj", 128, 256)]:
            other[f"transformer.blocks.{i}.{module}.lora_A.weight"] = np.zeros((4, din), np.float32)
            other[f"transformer.blocks.{i}.{module}.lora_B.weight"] = np.zeros((dout, 4), np.float32)
    path = _lora_file(tmp_path, "other", other)
    with pytest.raises(CheckpointError, match=r"(?s)other\.safetensors: this LoRA was made for another model size.*"
                                              r"dim 64.*2 layers.*imply dim 128, ffn_dim 256, at least 3 layers"):
        load_dit(ref["base_file"], config=CFG, loras=[path])
    with pytest.raises(CheckpointError, match="another model size"):  # also in warn mode
        load_dit(ref["base_file"], config=CFG, loras=[path], lora_unmatched="warn")


def test_lora_specs_parse_path_and_strength_and_bad_ones_are_one_clear_error(tmp_path):
    plain = tmp_path / "style.safetensors"
    colon = tmp_path / "run:7" / "facecam_lora.safetensors"  # a POSIX path may hold ':'
    odd = tmp_path / "v:2"  # ... even where it ends in something like a number
    for f in (plain, colon, odd):
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"")
    assert parse_lora_spec(str(plain)) == (str(plain), 1.0)
    assert parse_lora_spec(f"{plain}:0.75") == (str(plain), 0.75)
    assert parse_lora_spec(f" {plain}:-1e-1 ") == (str(plain), -0.1)
    assert parse_lora_spec(str(colon)) == (str(colon), 1.0)
    assert parse_lora_spec(f"{colon}:2") == (str(colon), 2.0)
    assert parse_lora_spec(f"{odd}:0.5") == (str(odd), 0.5)
    with pytest.raises(ValueError, match=r"strength 'strong' is not a number .*style.safetensors:0.8"):
        parse_lora_spec(f"{plain}:strong")
    with pytest.raises(ValueError, match="strength 'nan' is not a finite number"):
        parse_lora_spec(f"{plain}:nan")
    with pytest.raises(FileNotFoundError, match=r"LoRA file '.*missing.safetensors' does not exist"):
        parse_lora_spec(f"{tmp_path}/missing.safetensors:0.5")
    with pytest.raises(ValueError, match="has no file"):
        parse_lora_spec(":0.5")
