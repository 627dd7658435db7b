"""Prompts -> Wan text context: cleaning, umT5 tokenizer, ``encode_prompts``, and the prompt-embedding file.

Wan (and FaceCam) condition the DiT on umT5 features of the prompt: the text is cleaned
(ftfy when installed, HTML unescaped twice, whitespace collapsed), tokenized with the
umT5 sentencepiece model (EOS id 1 appended, pad id 0, at most 512 tokens), encoded, then
trimmed to the true length and zero-padded to 512 rows (SPEC 3).

The prompt-embedding file lets a run skip the 5.7 B encoder entirely: it is a safetensors
file written by ``tools/encode_prompt.py`` (or ``save_prompt_embeddings``) holding, for each
prompt ``i``, a tensor ``embedding_{i}`` of shape [L_i, D] (the TRIMMED features, L_i the
token count including EOS), plus metadata: ``format`` (``PROMPT_FILE_FORMAT``), ``prompts``
(JSON list of the prompt texts, in order), ``text_len`` (the padded length, 512 for Wan)
and ``source`` (which encoder wrote it). Configs point to the file; ``load_prompt_embeddings``
reads it and ``PromptEmbeddings.context(prompts)`` gives the padded [B, text_len, D] context.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import logging
import os
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax.checkpoints.io import CheckpointError, read_safetensors_header, write_safetensors

log = logging.getLogger(__name__)

TEXT_LEN = 512  # Wan's text length: token limit and rows of the padded context
PAD_ID, EOS_ID = 0, 1
PROMPT_FILE_FORMAT = "facecam-jax/prompt-embeddings/v1"

# Where the umT5 sentencepiece model sits inside the checkpoint layouts people download.
TOKENIZER_CANDIDATES = (
    "spiece.model",  # a tokenizer directory itself
    "tokenizer/spiece.model",  # diffusers Wan pipeline
    "google/umt5-xxl/spiece.model",  # official Wan checkpoint directory
    "../tokenizer/spiece.model",  # beside a diffusers `text_encoder` directory
)


# ---------------------------------------------------------------------------- cleaning


@functools.cache
def _ftfy_fix():
    try:
        import ftfy
    except ImportError:
        log.info("ftfy is not installed: prompts are cleaned without ftfy.fix_text (only mojibake text differs)")
        return None
    return ftfy.fix_text


def clean_prompt(text: str) -> str:
    """Wan's ``whitespace`` cleaning: ftfy (when installed), HTML unescape twice, collapse whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
    fix = _ftfy_fix()
    if fix is not None:
        text = fix(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split())


# ---------------------------------------------------------------------------- tokenizer


def find_tokenizer(path: str | os.PathLike) -> str:
    """The umT5 ``spiece.model`` at ``path``: the file itself, or inside a checkpoint directory."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    tried = [os.path.join(path, c) for c in TOKENIZER_CANDIDATES] if os.path.isdir(path) else [path]
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        "no umT5 sentencepiece tokenizer found; looked for " + ", ".join(tried) + ". Pass the spiece.model of "
        "google/umt5-xxl: it is google/umt5-xxl/spiece.model in an official Wan checkpoint directory and "
        "tokenizer/spiece.model in a diffusers Wan pipeline."
    )


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A tokenized batch: ``ids`` and ``mask`` int32 [B, L] (pad 0 / mask 0 after EOS); ``lengths`` [B]."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray


class Tokenizer:
    """umT5 sentencepiece tokenizer with Wan's cleaning, EOS appended, padded to ``max_length``."""

    def __init__(self, path: str | os.PathLike, *, max_length: int = TEXT_LEN):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(
                "the umT5 tokenizer needs the `sentencepiece` package: pip install sentencepiece"
            ) from None
        self.path = find_tokenizer(path)
        self.max_length = max_length
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a readable sentencepiece model ({e})") from None
        if self._sp.eos_id() != EOS_ID or self._sp.pad_id() != PAD_ID:
            raise ValueError(
                f"{self.path}: expected the umT5 tokenizer (pad id {PAD_ID}, EOS id {EOS_ID}), but this model has "
                f"pad id {self._sp.pad_id()} and EOS id {self._sp.eos_id()}; pass google/umt5-xxl's spiece.model"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of one cleaned prompt, EOS included, truncated (with a warning) to ``max_length``."""
        ids = self._sp.encode(clean_prompt(text)) + [EOS_ID]
        if len(ids) > self.max_length:
            warnings.warn(
                f"prompt has {len(ids)} tokens (with EOS), more than the {self.max_length} the text encoder "
                f"takes; truncated to {self.max_length - 1} tokens + EOS, as Wan does: {text[:80]!r}...",
                stacklevel=3,
            )
            ids = ids[: self.max_length - 1] + [EOS_ID]
        return ids

    def __call__(self, texts: str | Sequence[str]) -> Tokens:
        """Tokenizes a prompt or a batch of prompts into [B, max_length] ids and mask."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no prompts given")
        ids = np.full((len(texts), self.max_length), PAD_ID, np.int32)
        mask = np.zeros((len(texts), self.max_length), np.int32)
        lengths = np.zeros((len(texts),), np.int32)
        for i, text in enumerate(texts):
            row = self.encode(text)
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            lengths[i] = len(row)
        return Tokens(ids, mask, lengths)


# ---------------------------------------------------------------------------- encoding


@functools.partial(nnx.jit, static_argnames=("text_len",))
def _encode_padded(encoder, ids, mask, text_len: int):
    out = encoder(ids, mask)  # [B, L, D]
    out = jnp.where(mask[..., None] != 0, out, jnp.zeros((), out.dtype))  # trim to the true length
    return jnp.pad(out, ((0, 0), (0, text_len - ids.shape[1]), (0, 0)))  # [B, text_len, D]


def encode_prompts(
    texts: str | Sequence[str],
    encoder,
    tokenizer: Tokenizer,
    *,
    text_len: int = TEXT_LEN,
    pad_multiple: int = 64,
    return_lengths: bool = False,
):
    """Wan text context of ``texts``: [B, text_len, D], rows past each prompt's tokens exactly zero.

    The encoder runs on the batch padded only to a multiple of ``pad_multiple`` (not to
    ``text_len``): padded keys are masked, so the features of real tokens do not depend on
    the amount of padding (up to float summation order; ``pad_multiple=text_len`` runs at the
    full length exactly like the reference). With ``return_lengths`` also returns the token
    counts [B] (EOS included).
    """
    if tokenizer.max_length > text_len:
        raise ValueError(f"tokenizer max_length {tokenizer.max_length} exceeds text_len {text_len}")
    if tokenizer.vocab_size > encoder.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the encoder embeds only "
            f"{encoder.config.vocab_size}: the tokenizer does not belong to this encoder"
        )
    tokens = tokenizer(texts)
    longest = int(tokens.lengths.max())
    run_len = min(tokenizer.max_length, -(-longest // pad_multiple) * pad_multiple)
    context = _encode_padded(
        encoder, jnp.asarray(tokens.ids[:, :run_len]), jnp.asarray(tokens.mask[:, :run_len]), text_len=text_len
    )
    return (context, tokens.lengths) if return_lengths else context


def trim(context, lengths) -> list[np.ndarray]:
    """Per-prompt [L_i, D] host arrays from a padded [B, text_len, D] context."""
    context = np.asarray(jax.device_get(context))
    return [context[i, : int(n)] for i, n in enumerate(np.asarray(lengths))]


# ---------------------------------------------------------------------------- prompt-embedding file


@dataclasses.dataclass
class PromptEmbeddings:
    """Cached prompt features: ``prompts[i]`` has the trimmed features ``embeddings[i]`` [L_i, D]."""

    prompts: list[str]
    embeddings: list[np.ndarray]
    text_len: int = TEXT_LEN
    source: str = ""

    def lookup(self, prompt: str) -> np.ndarray:
        """Features [L, D] of ``prompt`` (matched after Wan's cleaning, so spacing does not matter)."""
        wanted = clean_prompt(prompt)
        for text, emb in zip(self.prompts, self.embeddings):
            if clean_prompt(text) == wanted:
                return emb
        raise KeyError(
            f"prompt {prompt!r} is not in the prompt-embedding file (it holds {self.prompts!r}); add it with "
            "tools/encode_prompt.py, or point the config at the umT5 checkpoint instead"
        )

    def context(self, prompts: str | Sequence[str], text_len: int | None = None) -> np.ndarray:
        """Zero-padded Wan context [B, text_len, D] for ``prompts``, as ``encode_prompts`` returns it."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text_len = self.text_len if text_len is None else text_len
        rows = [self.lookup(p) for p in prompts]
        out = np.zeros((len(rows), text_len, rows[0].shape[-1]), rows[0].dtype)
        for i, row in enumerate(rows):
            if row.shape[0] > text_len:
                raise ValueError(
                    f"prompt {prompts[i]!r} has {row.shape[0]} cached tokens, more than text_len {text_len}"
                )
            out[i, : row.shape[0]] = row
        return out


def save_prompt_embeddings(
    path: str | os.PathLike,
    prompts: Sequence[str],
    embeddings: Sequence[np.ndarray],
    *,
    text_len: int = TEXT_LEN,
    source: str = "",
) -> None:
    """Writes trimmed features ``embeddings[i]`` [L_i, D] of ``prompts[i]`` (format in the module doc)."""
    prompts = list(prompts)
    if len(prompts) != len(embeddings) or not prompts:
        raise ValueError(f"need one embedding per prompt, got {len(prompts)} prompts and {len(embeddings)} embeddings")
    arrays = [np.asarray(jax.device_get(e)) for e in embeddings]
    dims = {a.shape[-1] for a in arrays}
    if any(a.ndim != 2 for a in arrays) or len(dims) != 1:
        raise ValueError(f"embeddings must all be [L_i, D] with one D, got shapes {[a.shape for a in arrays]}")
    write_safetensors(
        os.fspath(path),
        {f"embedding_{i}": a for i, a in enumerate(arrays)},
        metadata={
            "format": PROMPT_FILE_FORMAT,
            "prompts": json.dumps(prompts),
            "text_len": str(text_len),
            "source": source,
        },
    )


def load_prompt_embeddings(path: str | os.PathLike) -> PromptEmbeddings:
    """Reads a file written by ``save_prompt_embeddings`` / ``tools/encode_prompt.py``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such prompt-embedding file; write one with tools/encode_prompt.py")
    refs, metadata = read_safetensors_header(path)
    if metadata.get("format") != PROMPT_FILE_FORMAT:
        raise CheckpointError(
            f"{path}: not a prompt-embedding file (format {metadata.get('format')!r}, expected "
            f"{PROMPT_FILE_FORMAT!r}); write one with tools/encode_prompt.py"
        )
    prompts = json.loads(metadata["prompts"])
    missing = [f"embedding_{i}" for i in range(len(prompts)) if f"embedding_{i}" not in refs]
    if missing:
        raise CheckpointError(f"{path}: prompt-embedding file lacks {missing} for its {len(prompts)} prompts")
    embeddings = [refs[f"embedding_{i}"].load() for i in range(len(prompts))]
    return PromptEmbeddings(prompts, embeddings, int(metadata["text_len"]), metadata.get("source", ""))


def encode_prompts_to_file(
    out: str | os.PathLike,
    prompts: Sequence[str],
    encoder,
    tokenizer: Tokenizer,
    *,
    text_len: int = TEXT_LEN,
    source: str = "",
) -> PromptEmbeddings:
    """Encodes ``prompts`` and writes their trimmed features to ``out``; returns what was written."""
    context, lengths = encode_prompts(prompts, encoder, tokenizer, text_len=text_len, return_lengths=True)
    embeddings = trim(context, lengths)
    save_prompt_embeddings(out, prompts, embeddings, text_len=text_len, source=source)
    return PromptEmbeddings(list(prompts), embeddings, text_len, source)
