"""umT5 encoder: parity with transformers' UMT5EncoderModel (both checkpoint namings), presets,
sharding axes, and loader errors."""

import collections
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import sharding
from facecam_jax.checkpoints.io import CheckpointError, open_checkpoint, write_safetensors
from facecam_jax.checkpoints.umt5 import load_umt5
from facecam_jax.models import umt5

TINY = dict(
    vocab_size=128,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)

TINY_CONFIG = umt5.UMT5Config(vocab_size=128, dim=32, num_heads=4, head_dim=8, ffn_dim=48, num_layers=2)


def hf_to_wan_name(key: str) -> str:
    """transformers UMT5EncoderModel key -> original Wan T5Encoder key (test-side mapping)."""
    table = {
        "shared.weight": "token_embedding.weight",
        "encoder.final_layer_norm.weight": "norm.weight",
    }
    if key in table:
        return table[key]
    parts = key.split(".")  # encoder.block.{i}.layer.{j}.<rest>
    i, rest = parts[2], ".".join(parts[5:])
    per_layer = {
        "SelfAttention.q.weight": "attn.q.weight",
        "SelfAttention.k.weight": "attn.k.weight",
        "SelfAttention.v.weight": "attn.v.weight",
        "SelfAttention.o.weight": "attn.o.weight",
        "SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    if rest == "layer_norm.weight":
        return f"blocks.{i}.norm{int(parts[4]) + 1}.weight"
    return f"blocks.{i}.{per_layer[rest]}"


@pytest.fixture(scope="module")
def reference(torch, tmp_path_factory):
    """A tiny random UMT5EncoderModel, saved in HF naming (safetensors) and Wan naming (.pth)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(**TINY)).eval()
    root = tmp_path_factory.mktemp("umt5")
    model.save_pretrained(root / "hf")
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    wan = collections.OrderedDict((hf_to_wan_name(k), v.clone()) for k, v in state.items())
    torch.save(wan, root / "wan_fp32.pth")
    torch.save(collections.OrderedDict((k, v.to(torch.bfloat16)) for k, v in wan.items()), root / "wan_bf16.pth")

    rng = np.random.default_rng(0)
    ids = rng.integers(2, TINY["vocab_size"], size=(3, 64)).astype(np.int64)
    mask = np.zeros((3, 64), np.int64)
    for row, n in enumerate((64, 37, 5)):
        mask[row, :n] = 1
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    return dict(model=model, root=root, ids=ids, mask=mask, out=out)


@pytest.mark.parametrize("naming", ["hf", "wan"])
def test_umt5_encoder_parity(reference, naming):
    path = reference["root"] / ("hf" if naming == "hf" else "wan_fp32.pth")
    encoder = load_umt5(path, dtype=jnp.float32)
    assert encoder.config == TINY_CONFIG
    out = np.asarray(nnx.jit(lambda e, i, m: e(i, m))(encoder, reference["ids"], reference["mask"]))
    valid = reference["mask"].astype(bool)
    err = np.abs(out - reference["out"])[valid].max()
    print(f"umT5 {naming} naming: max abs err {err:.2e} (|ref| max {np.abs(reference['out']).max():.2f})")
    assert err <= 1e-4


def test_relative_position_buckets_match_transformers(torch):
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    attn = UMT5Attention(UMT5Config(**TINY), has_relative_attention_bias=True)
    length = 1024  # past max_distance, so every bucket branch and the cap are exercised
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = attn._relative_position_bucket(rel).numpy()
    ours = umt5.relative_position_buckets(length, num_buckets=32, max_distance=128)
    assert np.array_equal(ours, expected)
    assert set(np.unique(ours)) == set(range(32)) - {16}  # 16 would be "distance 0, to the right"


def test_bf16_pth_is_read_exactly(reference, torch):
    """The original Wan file is a bf16 torch pickle: values must arrive bit-exact."""
    encoder = load_umt5(reference["root"] / "wan_bf16.pth", dtype=jnp.float32)
    hf = reference["model"].state_dict()
    want = hf["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"].to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(np.asarray(encoder.blocks.gate.get_value()[1]), want)
    as_bf16 = load_umt5(reference["root"] / "wan_bf16.pth")  # default dtype: bf16, as released
    assert as_bf16.blocks.q.get_value().dtype == jnp.bfloat16 and as_bf16.token_embedding.get_value().dtype == jnp.bfloat16


def test_sharded_forward_matches(reference):
    """Tensor-parallel heads/mlp and FSDP embed on 8 fake devices give the same features."""
    mesh = sharding.make_mesh(data=1, fsdp=2, context=1, tensor=4)
    encoder = load_umt5(reference["root"] / "hf", dtype=jnp.float32, mesh=mesh)
    assert encoder.blocks.q.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert encoder.blocks.fc2.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert encoder.token_embedding.get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    ids, mask = reference["ids"][:2], reference["mask"][:2]
    with sharding.use_mesh(mesh):
        out = np.asarray(nnx.jit(lambda e, i, m: e(i, m))(encoder, ids, mask))
    valid = mask.astype(bool)
    err = np.abs(out - reference["out"][:2])[valid].max()
    print(f"umT5 sharded (fsdp 2 x tensor 4): max abs err {err:.2e}")
    assert err <= 1e-4


def test_xxl_preset_shapes_and_axes():
    config = umt5.get_config("umt5-xxl")
    abstract = nnx.eval_shape(lambda: umt5.UMT5Encoder(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    total = sum(int(np.prod(v.get_value().shape)) for v in leaves)
    # 256384 x 4096 embedding + 24 x (4 x 4096^2 + 3 x 4096 x 10240 + 32 x 64 + 2 x 4096) + 4096
    assert total == umt5.count_params(config) == 5_680_910_336
    for var in leaves:
        axes = sharding.variable_axes(var)
        assert axes is not None and len(axes) == var.get_value().ndim, var
    assert abstract.blocks.rel_bias.get_value().shape == (24, 32, 64)  # relative bias per layer
    ids = jax.ShapeDtypeStruct((2, 512), jnp.int32)
    out = nnx.eval_shape(lambda e, i, m: e(i, m), abstract, ids, ids)  # traces the full forward
    assert out.shape == (2, 512, 4096) and out.dtype == jnp.bfloat16
    mesh = sharding.make_mesh(data=1, fsdp=2, context=1, tensor=4)
    specs = sharding.state_shardings(state, mesh)
    assert specs["blocks"]["gate"].get_value().spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert specs["blocks"]["o"].get_value().spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")


def test_get_config_unknown_name():
    with pytest.raises(ValueError, match="umt5-xxl"):
        umt5.get_config("umt5-small")


def _rewrite(src, dst, edit):
    refs = open_checkpoint(src)
    tensors = {k: r.load() for k, r in refs.items()}
    edit(tensors)
    write_safetensors(str(dst), tensors)
    return dst


def test_loader_names_missing_and_mismatched_keys(reference, tmp_path):
    src = reference["root"] / "hf" / "model.safetensors"
    missing = _rewrite(
        src, tmp_path / "missing.safetensors", lambda t: t.pop("encoder.block.1.layer.0.SelfAttention.v.weight")
    )
    with pytest.raises(
        CheckpointError, match=r"missing keys \(1\):\s+encoder\.block\.1\.layer\.0\.SelfAttention\.v\.weight"
    ):
        load_umt5(missing)

    def widen(t):
        t["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 50), np.float32)

    wrong = _rewrite(src, tmp_path / "wrong.safetensors", widen)
    with pytest.raises(CheckpointError, match=r"DenseReluDense\.wo\.weight: \(32, 50\) vs \(32, 48\)"):
        load_umt5(wrong)

    extra = _rewrite(src, tmp_path / "extra.safetensors", lambda t: t.update(extra_head=np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="(?s)unexpected keys.*extra_head"):
        load_umt5(extra)

    # A config that the file does not fit is refused, naming the shapes.
    with pytest.raises(CheckpointError, match="vs"):
        load_umt5(src, config=dataclasses.replace(TINY_CONFIG, ffn_dim=64))


def test_loader_accepts_decoder_and_tied_copies(reference, tmp_path):
    """Full encoder-decoder files load their encoder; a duplicated tied embedding is fine."""
    src = reference["root"] / "hf" / "model.safetensors"

    def add(t):
        t["encoder.embed_tokens.weight"] = t["shared.weight"]
        t["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
        t["lm_head.weight"] = np.zeros((128, 32), np.float32)

    full = _rewrite(src, tmp_path / "full.safetensors", add)
    encoder = load_umt5(full, dtype=jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(encoder.token_embedding.get_value()), open_checkpoint(src)["shared.weight"].load()
    )


def test_loader_rejects_other_checkpoints(tmp_path):
    path = tmp_path / "dit.safetensors"
    write_safetensors(str(path), {"blocks.0.self_attn.q.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match="not a umT5 encoder checkpoint"):
        load_umt5(path)


def test_loader_finds_encoder_in_checkpoint_directory(reference, tmp_path):
    """A Wan checkpoint directory also holds the VAE and DiT: the T5 file must be picked by name."""
    import shutil

    shutil.copy(reference["root"] / "wan_fp32.pth", tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), {"x": np.zeros(2, np.float32)})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t2v"}))
    encoder = load_umt5(tmp_path, dtype=jnp.float32)
    assert encoder.config.num_layers == 2 and os.path.exists(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
