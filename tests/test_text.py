"""Prompt cleaning, the umT5 tokenizer, ``encode_prompts`` (parity, padding/trim semantics) and the
prompt-embedding file, with a sentencepiece model trained at test time."""

import importlib.util
import io
import os

import jax.numpy as jnp
import numpy as np
import pytest

from facecam_jax import text
from facecam_jax.checkpoints.io import CheckpointError, write_safetensors
from facecam_jax.checkpoints.umt5 import load_umt5
from facecam_jax.runtime.config_file import load_config

FACECAM = load_config()  # its text.prompt and sample.negative_prompt are FaceCam's prompts

SENTENCES = [
    "A portrait of a person talking to the camera.",
    "The camera pans slowly to the left while she smiles.",
    "Une personne parle devant la caméra, lumière douce.",
    "一个人在镜头前说话。",
    "Zoom in on the face, soft light, 4k video.",
    "A man with short hair and a beard nods his head.",
    "Das Gesicht dreht sich langsam nach rechts.",
]
PROMPTS = [FACECAM.text.prompt, "", "The camera &amp;amp; the  face:\tzoom in slowly, soft light."]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_spm(path, **ids):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20),
        model_writer=buf,
        vocab_size=120,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **{"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1, **ids},
    )
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def assets(torch, tmp_path_factory):
    """A checkpoint directory in HF layout (tiny random UMT5EncoderModel + spiece.model)."""
    pytest.importorskip("sentencepiece", reason="the umT5 tokenizer needs sentencepiece")
    from transformers import UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("text")
    spiece = train_spm(root / "spiece.model")
    torch.manual_seed(1)
    config = UMT5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    )
    model = UMT5EncoderModel(config).eval()
    model.save_pretrained(root)
    tokenizer = text.Tokenizer(root)
    encoder = load_umt5(root, dtype=jnp.float32)
    context, lengths = text.encode_prompts(PROMPTS, encoder, tokenizer, return_lengths=True)
    return dict(
        root=root, spiece=spiece, model=model, tokenizer=tokenizer, encoder=encoder, context=context, lengths=lengths
    )


def test_clean_prompt_follows_wan():
    assert text.clean_prompt("  a &amp;lt;b&amp;gt;  \n\t c ") == "a <b> c"  # html unescaped twice
    assert text.clean_prompt("") == ""
    with pytest.raises(TypeError, match="must be a str"):
        text.clean_prompt(None)


def test_tokenizer_layout(assets):
    tokenizer = assets["tokenizer"]
    tokens = tokenizer(PROMPTS)
    assert tokens.ids.shape == tokens.mask.shape == (3, text.TEXT_LEN)
    for row, n in zip(range(3), tokens.lengths):
        assert tokens.ids[row, n - 1] == text.EOS_ID and (tokens.ids[row, n:] == text.PAD_ID).all()
        assert tokens.mask[row, :n].all() and not tokens.mask[row, n:].any()
    assert tokens.lengths[1] == 1  # the empty negative prompt is EOS alone
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(assets["spiece"]))
    want = sp.encode("The camera & the face: zoom in slowly, soft light.") + [text.EOS_ID]
    assert list(tokens.ids[2, : tokens.lengths[2]]) == want  # cleaned before sentencepiece


def test_over_long_prompt_is_truncated_with_warning(assets):
    tokenizer = text.Tokenizer(assets["spiece"], max_length=16)
    with pytest.warns(UserWarning, match="truncated to 15 tokens"):
        tokens = tokenizer([" ".join(SENTENCES), "short"])
    assert tokens.lengths[0] == 16 and tokens.ids[0, -1] == text.EOS_ID and tokens.ids.shape == (2, 16)


def test_missing_or_wrong_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl/spiece.model"):
        text.Tokenizer(tmp_path)
    pytest.importorskip("sentencepiece", reason="the umT5 tokenizer needs sentencepiece")
    other = train_spm(tmp_path / "other.model", pad_id=3, eos_id=2, unk_id=0, bos_id=1)
    with pytest.raises(ValueError, match="expected the umT5 tokenizer"):
        text.Tokenizer(other)
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable sentencepiece model"):
        text.Tokenizer(tmp_path / "broken.model")


def test_encode_prompts_parity(assets, torch):
    """Tokenizer + JAX encoder vs transformers at Wan's full 512-token padding, then trimmed."""
    tokens = assets["tokenizer"](PROMPTS)
    with torch.no_grad():
        ref = assets["model"](
            input_ids=torch.from_numpy(tokens.ids.astype(np.int64)),
            attention_mask=torch.from_numpy(tokens.mask.astype(np.int64)),
        ).last_hidden_state.numpy()
    ref = ref * tokens.mask[..., None]  # Wan trims to the true length and zero-pads to 512
    context = np.asarray(assets["context"])
    assert context.shape == (3, text.TEXT_LEN, 32)
    err = np.abs(context - ref).max()
    print(f"encode_prompts vs transformers (512 padding): max abs err {err:.2e}")
    assert err <= 1e-4


def test_padding_and_trim_semantics(assets):
    context, lengths = np.asarray(assets["context"]), assets["lengths"]
    for row, n in enumerate(lengths):
        assert (context[row, n:] == 0).all() and np.abs(context[row, :n]).min() > 0
    # The same prompt alone, with far less padding (16) and with all 512 rows run: same features.
    encoder, tokenizer = assets["encoder"], assets["tokenizer"]
    alone = np.asarray(text.encode_prompts(PROMPTS[2], encoder, tokenizer, pad_multiple=16))
    full = np.asarray(text.encode_prompts(PROMPTS[2], encoder, tokenizer, pad_multiple=text.TEXT_LEN))
    err_alone = np.abs(alone[0] - context[2]).max()
    err_full = np.abs(full[0] - context[2]).max()
    print(f"padding independence: max abs diff {err_alone:.2e} (pad 16 vs 64 in a batch), {err_full:.2e} (512)")
    assert err_alone <= 1e-5 and err_full <= 1e-5
    assert (alone[0, lengths[2] :] == 0).all()


def test_encode_prompts_rejects_foreign_tokenizer(assets, tmp_path):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=buf, vocab_size=200, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
        model_type="bpe",
    )  # fmt: skip
    (tmp_path / "big.model").write_bytes(buf.getvalue())
    big = text.Tokenizer(tmp_path / "big.model")
    assert big.vocab_size > 128
    with pytest.raises(ValueError, match="does not belong to this encoder"):
        text.encode_prompts("hi", assets["encoder"], big)


def test_prompt_file_roundtrip(assets, tmp_path):
    path = tmp_path / "prompts.safetensors"
    written = text.encode_prompts_to_file(path, PROMPTS, assets["encoder"], assets["tokenizer"], source="tiny")
    cached = text.load_prompt_embeddings(path)
    assert cached.prompts == PROMPTS and cached.text_len == text.TEXT_LEN and cached.source == "tiny"
    assert [e.shape for e in cached.embeddings] == [(n, 32) for n in assets["lengths"]]
    np.testing.assert_array_equal(cached.context(PROMPTS), np.asarray(assets["context"]))
    np.testing.assert_array_equal(cached.context([PROMPTS[1]])[0], written.context(PROMPTS[1])[0])
    # Looked up after cleaning, so spacing differences do not matter; unknown prompts say what to do.
    np.testing.assert_array_equal(cached.lookup("  A portrait   of a person "), cached.embeddings[0])
    with pytest.raises(KeyError, match="tools/encode_prompt.py"):
        cached.lookup("A cat")

    other = tmp_path / "weights.safetensors"
    write_safetensors(str(other), {"x": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="not a prompt-embedding file"):
        text.load_prompt_embeddings(other)
    with pytest.raises(FileNotFoundError, match="tools/encode_prompt.py"):
        text.load_prompt_embeddings(tmp_path / "absent.safetensors")


def test_encode_prompt_tool(assets, tmp_path, capsys):
    """The CLI on a checkpoint directory (8 fake devices: it loads and runs FSDP-sharded)."""
    spec = importlib.util.spec_from_file_location("encode_prompt", os.path.join(ROOT, "tools", "encode_prompt.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "facecam_prompts.safetensors"
    written = tool.main(["--checkpoint", str(assets["root"]), "--out", str(out), "--dtype", "float32"])
    assert "wrote" in capsys.readouterr().out
    cached = text.load_prompt_embeddings(out)
    assert cached.prompts == [FACECAM.text.prompt, FACECAM.sample.negative_prompt] == written.prompts
    err = np.abs(cached.context(cached.prompts) - np.asarray(assets["context"])[:2]).max()
    print(f"tools/encode_prompt.py (sharded) vs encode_prompts: max abs diff {err:.2e}")
    assert err <= 1e-5
