"""Checkpoint readers: safetensors header parsing, the restricted .pth unpickler, the writer."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from facecam_jax.checkpoints import io


def test_safetensors_round_trip_streams_callables(tmp_path):
    path = str(tmp_path / "w.safetensors")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.linspace(-2, 2, 7).astype(ml_dtypes.bfloat16)
    io.write_safetensors(path, {"a": a, "b": lambda: b}, metadata={"format": "pt"})
    refs, meta = io.read_safetensors_header(path)
    assert meta == {"format": "pt"}
    assert refs["a"].shape == (3, 4) and refs["b"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(refs["a"].load(), a)
    np.testing.assert_array_equal(refs["b"].load(), b)


def test_safetensors_is_readable_by_the_reference_library(tmp_path, torch):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "ref.safetensors")
    ref = {"x": torch.randn(4, 5), "y": torch.randn(3, dtype=torch.bfloat16), "z": torch.arange(6)}
    save_file(ref, path)
    refs = io.open_checkpoint(path)
    for k, v in ref.items():
        np.testing.assert_array_equal(refs[k].load().astype(np.float64), v.double().numpy())
    mine = str(tmp_path / "mine.safetensors")
    io.write_safetensors(mine, {k: r.load() for k, r in refs.items()})
    back = load_file(mine)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = str(tmp_path / "t.safetensors")
    io.write_safetensors(path, {"a": np.ones((64, 64), np.float32)})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(io.CheckpointError, match="truncated"):
        io.open_checkpoint(path)


def test_pth_reader_rebuilds_views_dtypes_and_nesting_without_torch_code(tmp_path, torch):
    base = torch.randn(6, 5)
    sd = {
        "plain": torch.randn(3, 4),
        "transposed": base.t(),  # non-contiguous strides
        "slice": torch.arange(20)[5:12],  # storage offset
        "bf16": torch.randn(4, 3).to(torch.bfloat16),
        "half": torch.randn(2, 2).half(),
        "param": torch.nn.Parameter(torch.randn(3)),
        "flag": torch.tensor([True, False]),
    }
    path = str(tmp_path / "m.pth")
    torch.save({"state_dict": sd, "epoch": 7}, path)
    refs = io.pth_state_dict(path)
    assert set(refs) == set(sd)
    for k, t in sd.items():
        got = refs[k].load()
        assert got.shape == tuple(t.shape)
        np.testing.assert_array_equal(got.astype(np.float64), t.detach().double().numpy(), err_msg=k)


def test_malicious_pth_is_refused_and_runs_nothing(tmp_path, torch):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "evil.pth")
    torch.save({"weight": torch.zeros(2), "payload": Evil()}, path)
    with pytest.raises(io.UnsafeCheckpointError, match="refusing to unpickle .*system"):
        io.open_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_is_refused_unread(tmp_path):
    import pickle

    path = str(tmp_path / "legacy.pth")
    with open(path, "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(io.CheckpointError, match="not a torch zip checkpoint"):
        io.open_checkpoint(path)


def test_sharded_index_and_directory(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    io.write_safetensors(str(d / "a-00001.safetensors"), {"x": np.ones(2, np.float32)})
    io.write_safetensors(str(d / "a-00002.safetensors"), {"y": np.zeros(3, np.float32)})
    index = {"weight_map": {"x": "a-00001.safetensors", "y": "a-00002.safetensors"}}
    (d / "a.safetensors.index.json").write_text(json.dumps(index))
    for path in (d, d / "a.safetensors.index.json"):
        refs = io.open_checkpoint(str(path))
        assert sorted(refs) == ["x", "y"] and refs["y"].shape == (3,)
    os.remove(d / "a-00002.safetensors")
    with pytest.raises(io.CheckpointError, match="missing"):
        io.open_checkpoint(str(d))


def test_strip_prefix_only_when_every_key_has_it():
    refs = {"model.diffusion_model.a": 1, "model.diffusion_model.b": 2}
    assert io.strip_prefix(refs, ["model.diffusion_model."]) == {"a": 1, "b": 2}
    mixed = {"model.diffusion_model.a": 1, "b": 2}
    assert io.strip_prefix(mixed, ["model.diffusion_model."]) == mixed


# ---------------------------------------------------------------------------- hostile safetensors files

_KEY = "blocks.0.attn.q.weight"


_VALID = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}  # fits the 16 data bytes each test writes


def _entry(**changes):
    return {**_VALID, **changes}


@pytest.mark.parametrize(
    "header, expected",
    [
        ({_KEY: _entry(data_offsets=[16, 32])}, "past the end of the 16-byte data section"),
        ({_KEY: _entry(data_offsets=[-4, 12])}, "negative or reversed data_offsets"),
        ({_KEY: _entry(data_offsets=[16, 0])}, "negative or reversed data_offsets"),
        ({_KEY: _entry(shape=[3])}, "spans 16 bytes, but shape (3,) of F32 needs 12"),
        ({_KEY: _entry(shape=[-4])}, "not a list of non-negative integers"),
        ({_KEY: _entry(shape=[2.5])}, "not a list of non-negative integers"),
        ({_KEY: _entry(shape=[True, 4])}, "not a list of non-negative integers"),
        ({_KEY: _entry(shape="4")}, "not a list of non-negative integers"),
        ({_KEY: _entry(shape=[0, 2**62, 2**62], data_offsets=[0, 0])}, "larger than numpy can address"),
        ({_KEY: _entry(shape=[1] * 65)}, "more than numpy's 64"),
        ({_KEY: _entry(dtype="F128")}, "unsupported dtype 'F128'"),
        ({_KEY: _entry(dtype=["F32"])}, "unsupported dtype ['F32']"),
        ({_KEY: _entry(data_offsets=[0])}, "expected [begin, end] byte offsets"),
        ({_KEY: _entry(data_offsets=[0, 16.0])}, "expected [begin, end] byte offsets"),
        ({_KEY: {k: v for k, v in _VALID.items() if k != "data_offsets"}}, "lacks ['data_offsets']"),
        ({_KEY: [1, 2]}, "not an object with dtype, shape and data_offsets"),
        ({_KEY: _entry(), "__metadata__": {"format": 1}}, "'__metadata__'"),
        ({_KEY: _entry(), "__metadata__": ["pt"]}, "'__metadata__'"),
    ],
    ids=[
        "offsets-past-end", "negative-offset", "reversed-offsets", "size-mismatch", "negative-shape",
        "float-shape", "bool-shape", "string-shape", "huge-shape", "too-many-dims", "unknown-dtype",
        "unhashable-dtype", "one-offset", "float-offset", "no-offsets", "entry-not-object",
        "metadata-value", "metadata-list",
    ],
)
def test_hostile_safetensors_entry_names_file_and_key(tmp_path, header, expected):
    path = str(tmp_path / "h.safetensors")
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + bytes(16))
    with pytest.raises(io.CheckpointError) as e:
        io.open_checkpoint(path)
    msg = str(e.value)
    key = "__metadata__" if "__metadata__" in header else _KEY
    assert path in msg and repr(key) in msg and expected in msg, msg


@pytest.mark.parametrize(
    "raw, expected",
    [
        (struct.pack("<Q", 10**6) + b"{}", "header length 1000000 runs past the end of the 10-byte file"),
        (struct.pack("<Q", 9) + b"{not json", "corrupt safetensors header"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "corrupt safetensors header"),
        (struct.pack("<Q", 6) + b"[1, 2]", "a JSON list, not an object"),
    ],
    ids=["header-length-past-file", "malformed-json", "not-utf8", "header-not-object"],
)
def test_hostile_safetensors_header_names_file(tmp_path, raw, expected):
    path = str(tmp_path / "h.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(io.CheckpointError) as e:
        io.open_checkpoint(path)
    assert path in str(e.value) and expected in str(e.value), str(e.value)
