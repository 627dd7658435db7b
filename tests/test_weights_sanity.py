"""Weights sanity: the .pth reader does bounded work on hostile pickles, a truncated file says so, and a NaN or Inf
in a checkpoint, overlay or LoRA file (or an absurd LoRA strength) is one clear error naming what is wrong."""

import os
import pickle
import struct
import time
import zipfile

import jax
import numpy as np
import pytest
from flax import nnx

from facecam_jax.checkpoints import bounded_pickle as bp
from facecam_jax.checkpoints import io, load_dit, pth, save_dit
from facecam_jax.checkpoints.dit import overlay_dit
from facecam_jax.checkpoints.lora import MAX_STRENGTH, apply_loras, parse_lora_spec
from facecam_jax.checkpoints.vae import DIFFUSERS, export_state_dict, load_vae
from facecam_jax.errors import CheckpointError
from facecam_jax.models import wan_dit as W
from facecam_jax.models import wan_vae as wv

FAST_S = 2.0  # what "fails fast" means here; the unbounded reader took 5.8 s at depth 20 and never ended at 40


def _zip_pth(path, data: bytes, storages=()) -> str:
    """A .pth laid out as torch.save writes it (``archive/data.pkl``, ``archive/data/N``), around ``data``."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        for i, blob in enumerate(storages):
            zf.writestr(f"archive/data/{i}", blob)
    return str(path)


def _shared(kind: str, depth: int):
    """A "billion laughs": each level holds the level below twice, so the pickle memoises one object per level."""
    x = [] if kind == "list" else {}
    for _ in range(depth):
        x = [x, x] if kind == "list" else {"a": x, "b": x}
    return x


def _error(fn, *args):
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        fn(*args)
    return str(e.value), time.perf_counter() - t0


# ---------------------------------------------------------------------------- bounded work


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_a_shared_reference_bomb_fails_fast_naming_the_file_and_the_limit(tmp_path, kind):
    path = _zip_pth(tmp_path / "laughs.pth", pickle.dumps({"w": _shared(kind, 40)}, protocol=2))
    assert os.path.getsize(path) < 1000  # 2**40 containers, as the tree is written out
    msg, seconds = _error(io.open_checkpoint, path)
    assert path in msg and f"deeper than {pth.MAX_DEPTH}" in msg and "hostile" in msg, msg
    assert seconds < FAST_S, seconds


def test_shared_references_are_read_once_not_once_per_place(tmp_path):
    path = _zip_pth(tmp_path / "deep.pth", pickle.dumps({"w": _shared("list", 20)}, protocol=2))
    t0 = time.perf_counter()
    tree = pth.read_pth(path)  # within the depth limit: 2**20 places, 20 objects
    assert time.perf_counter() - t0 < FAST_S
    assert tree["w"][0] is tree["w"][1] and tree["w"][0][0] is tree["w"][1][1]


def test_a_mapping_shared_under_many_names_meets_the_entry_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(pth, "MAX_ENTRIES", 1000)
    path = _zip_pth(tmp_path / "names.pth", pickle.dumps(_shared("dict", 12), protocol=2))  # 2**12 names
    msg, _ = _error(io.open_checkpoint, path)
    assert path in msg and "exceeds 1000 entries" in msg, msg


def test_an_oversized_pickle_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(pth, "MAX_PICKLE_BYTES", 64)
    path = _zip_pth(tmp_path / "big.pth", pickle.dumps({"w": list(range(100))}, protocol=2))
    msg, _ = _error(io.open_checkpoint, path)
    assert path in msg and "over the 64" in msg, msg


def _load(data, **limits):
    return bp.BoundedUnpickler(data, lambda m, n: pytest.fail(f"{m}.{n}"), lambda pid: pid, **limits).load()


def test_bounded_pickle_reads_what_pickle_writes():
    shared = [1.5, "é"]
    obj = {"a": [shared, shared, (1, 2, 3, 4)], 7: {"n": None, "t": True, "i": -(2**70), "s": (), "b": (1,)}}
    for proto in range(2, 6):
        got = _load(pickle.dumps(obj, protocol=proto))
        assert got == obj and got["a"][0] is got["a"][1], proto
    assert _load(pickle.dumps([b"x" * 300, {1, (2, 3)}, frozenset("ab")], protocol=5)) == [b"x" * 300, {1, (2, 3)},
                                                                                           frozenset("ab")]


def test_bounded_pickle_limits_opcodes_and_memo_and_refuses_costly_keys():
    with pytest.raises(bp.PickleLimitError, match="exceeds 100 opcodes"):
        _load(pickle.dumps(list(range(200)), protocol=2), max_ops=100)
    with pytest.raises(bp.PickleLimitError, match="exceeds 10 memo entries"):
        _load(pickle.dumps([[i] for i in range(20)], protocol=2), max_memo=10)
    # Hashing a key that nests one tuple twice per level takes 2**depth steps (C pickle: 8 s at depth 30),
    # so the dict is written opcode by opcode: EMPTY_DICT, the key, BININT1 1, SETITEM.
    t = ()
    for _ in range(64):
        t = (t, t)
    t0 = time.perf_counter()
    with pytest.raises(pickle.UnpicklingError, match="dict key of type tuple"):
        _load(b"\x80\x02}" + pickle.dumps(t, protocol=2)[2:-1] + b"K\x01s.")
    assert time.perf_counter() - t0 < FAST_S
    # A memo index costs one entry, never an array up to it (C pickle allocates 2**33 pointers here).
    assert _load(b"\x80\x02N" + b"r" + struct.pack("<I", 2**32 - 1) + b".") is None


# ---------------------------------------------------------------------------- truncated files


@pytest.fixture
def saved_pth(tmp_path):
    data = pickle.dumps({"w": list(range(50)), "epoch": 3}, protocol=2)
    return open(_zip_pth(tmp_path / "full.pth", data, [bytes(4000)]), "rb").read()


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1], ids=["empty", "header", "half", "last-byte"])
def test_a_truncated_pth_says_truncated_and_its_size(tmp_path, saved_pth, keep):
    n = int(len(saved_pth) * keep) if isinstance(keep, float) else keep % len(saved_pth) if keep < 0 else keep
    path = str(tmp_path / "cut.pth")
    with open(path, "wb") as f:
        f.write(saved_pth[:n])
    msg, _ = _error(io.open_checkpoint, path)
    assert f"{path} is truncated ({n} bytes)" in msg and "re-download" in msg and "legacy" not in msg.lower(), msg


def test_a_pickle_that_ends_early_says_truncated(tmp_path):
    data = pickle.dumps({"w": list(range(50))}, protocol=2)
    path = _zip_pth(tmp_path / "short.pkl.pth", data[: len(data) // 2])
    msg, _ = _error(io.open_checkpoint, path)
    assert path in msg and "data.pkl ends mid-pickle" in msg and "truncated" in msg, msg


def test_a_storage_shorter_than_its_tensor_says_truncated(tmp_path, torch):
    saved = str(tmp_path / "saved.pth")
    torch.save({"w": torch.randn(1000)}, saved)
    path = str(tmp_path / "short.pth")
    with zipfile.ZipFile(saved) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, data[:400] if info.filename.endswith("data/0") else data)
    msg, _ = _error(io.open_checkpoint, path)
    assert path in msg and "'w'" in msg and "truncated" in msg and "re-download" in msg, msg


# ---------------------------------------------------------------------------- non-finite weights and strengths

CFG = W.PRESETS["tiny"]


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    model = W.WanDiT(CFG, rngs=nnx.Rngs(0))
    return model, save_dit(model, tmp_path_factory.mktemp("dit") / "dit.safetensors", naming="original")


def _rewrite(src, dst, key, index, value):
    tensors = {k: r.load() for k, r in io.open_checkpoint(src).items()}
    tensors[key][index] = value
    io.write_safetensors(str(dst), tensors)
    return str(dst)


def test_a_nan_in_a_dit_checkpoint_or_overlay_names_the_tensor_and_file(tmp_path, dit_file):
    model, path = dit_file
    bad = _rewrite(path, tmp_path / "nan.safetensors", "blocks.1.ffn.0.weight", (3, 5), np.nan)
    msg, _ = _error(lambda: load_dit(bad, config="tiny", progress=False))
    assert bad in msg and "'blocks.1.ffn.0.weight'" in msg and "1 NaN" in msg and "(3, 5)" in msg, msg
    overlay = str(tmp_path / "overlay.safetensors")
    io.write_safetensors(overlay, {"head.head.bias": np.array([0.0, -np.inf] + [0.0] * (CFG.out_dim * 4 - 2),
                                                             np.float32)})
    msg, _ = _error(overlay_dit, model, overlay)
    assert overlay in msg and "'head.head.bias'" in msg and "1 Inf" in msg, msg


def _lora(tmp_path, name, up_value=0.0):
    d = CFG.dim
    up = np.full((d, 2), 0.01, np.float32)
    up[1, 1] = up_value
    path = str(tmp_path / f"{name}.safetensors")
    io.write_safetensors(path, {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": np.ones((2, d), np.float32),
                                "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up})
    return path


def test_a_nan_in_a_lora_is_named_and_changes_nothing(tmp_path, dit_file):
    model, _ = dit_file
    before = [np.asarray(v).copy() for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    path = _lora(tmp_path, "nan", np.nan)
    msg, _ = _error(apply_loras, model, [(path, 1.0)])
    assert path in msg and "'diffusion_model.blocks.0.self_attn.q.lora_up.weight'" in msg and "NaN" in msg, msg
    after = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_a_lora_strength_beyond_the_bound_is_refused(tmp_path, dit_file):
    model, _ = dit_file
    path = _lora(tmp_path, "ok")
    assert parse_lora_spec(f"{path}:-{MAX_STRENGTH:g}") == (path, -MAX_STRENGTH)
    with pytest.raises(ValueError, match=rf"LoRA '{path}:1e38': strength 1e\+38 is beyond \+-100"):
        parse_lora_spec(f"{path}:1e38")
    with pytest.raises(ValueError, match=rf"LoRA '{path}': strength 1e\+38 is beyond"):
        apply_loras(model, [(path, 1e38)])


def test_a_nan_in_a_vae_checkpoint_names_the_tensor(tmp_path):
    cfg = wv.VAEConfig.tiny("2.1")
    tensors = export_state_dict(wv.WanVAE(cfg, rngs=nnx.Rngs(0)), DIFFUSERS)
    key = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[key] = tensors[key].astype(np.float32)
    tensors[key].reshape(-1)[0] = np.inf
    path = str(tmp_path / "vae.safetensors")
    io.write_safetensors(path, tensors)
    msg, _ = _error(lambda: load_vae(path, config=cfg))
    assert path in msg and repr(key) in msg and "1 Inf" in msg, msg
