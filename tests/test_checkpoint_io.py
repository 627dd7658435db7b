"""Checkpoint readers: safetensors header parsing, the restricted .pth unpickler, the writer."""

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from io import BytesIO

import forked_runs
import ml_dtypes
import numpy as np
import pytest

from facecam_jax.checkpoints import io, pth
from facecam_jax.errors import UnsafeCheckpointError


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
        "expanded": torch.randn(3, 1).expand(3, 4),  # stride 0
        "empty": torch.zeros(0, 3),
    }
    path = str(tmp_path / "m.pth")
    torch.save({"state_dict": sd, "epoch": 7}, path)
    refs = pth.pth_state_dict(path)
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
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle .*system"):
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


# ---------------------------------------------------------------------------- hostile .pth files


def _rewrite_zip(src, dst, compression=zipfile.ZIP_STORED, truncate=None):
    """Copies a torch archive, optionally compressing its storages or cutting ``truncate=(member, nbytes)`` short."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if truncate and info.filename.endswith(truncate[0]):
                data = data[: truncate[1]]
            storage = "/data/" in info.filename
            zout.writestr(info.filename, data, compression if storage else zipfile.ZIP_STORED)


def _hand_pth(path, torch, tensors, storage, numel=None, compression=zipfile.ZIP_STORED):
    """A .pth whose tensors ``name -> (offset, size, stride[, state])`` view one float32 storage, pickled as torch does.

    torch.save refuses to write a view that overruns its storage, so the pickle is written here, with the
    same globals and persistent ids torch uses; ``numel`` is the element count the pickle declares, and a
    ``state`` is BUILT onto the rebuilt tensor (torch never writes one).
    """
    marker = object()

    class View:
        def __init__(self, offset, size, stride, state=None):
            self.args = (marker, offset, size, stride, False, OrderedDict())
            self.state = state

        def __reduce__(self):
            rebuild = torch._utils._rebuild_tensor_v2
            return (rebuild, self.args) if self.state is None else (rebuild, self.args, self.state)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is marker:
                return ("storage", torch.FloatStorage, "0", "cpu", len(storage) // 4 if numel is None else numel)
            return None

    buf = BytesIO()
    Pickler(buf, protocol=2).dump({k: View(*v) for k, v in tensors.items()})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", storage, compression)
    return path


def _patch_central_sizes(path, member, nbytes):
    """Makes the zip's central directory claim ``nbytes`` for ``member`` (its local header is left alone)."""
    with open(path, "r+b") as f:
        buf = bytearray(f.read())
        i = buf.find(b"PK\x01\x02")
        while i >= 0:
            name_len = struct.unpack_from("<H", buf, i + 28)[0]
            if buf[i + 46 : i + 46 + name_len].decode() == member:
                struct.pack_into("<II", buf, i + 20, nbytes, nbytes)
            i = buf.find(b"PK\x01\x02", i + 46)
        f.seek(0)
        f.write(buf)


def _error(path):
    """The message of the CheckpointError that opening ``path`` and loading its tensor ``w`` raises."""
    with pytest.raises(io.CheckpointError) as e:
        io.open_checkpoint(path)["w"].load()
    return str(e.value)


def test_pth_with_a_truncated_storage_is_refused_without_a_crash(tmp_path, torch):
    saved, path = str(tmp_path / "saved.pth"), str(tmp_path / "short.pth")
    torch.save({"w": torch.randn(100_000)}, saved)
    _rewrite_zip(saved, path, truncate=("data/0", 4096))
    # Unchecked, the view ran ~400 kB past the end of the file and the process died of SIGBUS (-7),
    # so the first load happens in a child that may die.
    script = (
        "import sys\nfrom facecam_jax.checkpoints import io\n"
        f"try:\n    io.open_checkpoint({path!r})['w'].load()\n"
        "except io.CheckpointError:\n    sys.exit(3)\n"
    )
    run = forked_runs.run("-c", script, timeout=120)
    assert run.returncode == 3, (run.returncode, run.stderr[-2000:])
    msg = _error(path)
    assert path in msg and "'w'" in msg and "1024 float32 elements" in msg and "element 99999" in msg, msg


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_hand_pickled_pth_view_reaching_the_last_element_loads(tmp_path, torch, compression):
    storage = np.arange(10, dtype=np.float32)
    # Storage offset 2 plus strides (1, 3) over size (2, 3) end exactly at the last element, 9.
    path = _hand_pth(str(tmp_path / "ok.pth"), torch, {"w": (2, (2, 3), (1, 3))}, storage.tobytes(), None, compression)
    np.testing.assert_array_equal(io.open_checkpoint(path)["w"].load(), [[2, 5, 8], [3, 6, 9]])


@pytest.mark.parametrize(
    "view, numel, expected",
    [
        ((8, (3,), (1,)), None, "reach element 10"),  # storage offset pushes the end past element 9
        ((0, (11,), (1,)), None, "reach element 10"),  # size
        ((0, (2, 5), (6, 1)), None, "reach element 10"),  # stride
        ((0, (100,), (1,)), 100, "40 bytes in the archive, 100 float32 declared"),  # storage shorter than declared
        ((0, (3,), (-1,)), None, "non-negative integer"),
        ((-1, (3,), (1,)), None, "storage offset -1"),
        ((0, (-3,), (1,)), None, "non-negative integers"),
        ((0, (3, 3), (1,)), None, "one non-negative integer per dimension"),
    ],
    ids=["offset", "size", "stride", "declared", "negative-stride", "negative-offset", "negative-size", "rank"],
)
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_pth_view_outside_its_storage_is_refused(tmp_path, torch, view, numel, expected, compression):
    storage = np.arange(10, dtype=np.float32).tobytes()
    path = _hand_pth(str(tmp_path / "bad.pth"), torch, {"w": view}, storage, numel, compression)
    msg = _error(path)
    assert path in msg and "'w'" in msg and expected in msg, msg


def test_pth_pickle_unlike_what_torch_writes_is_refused(tmp_path, torch):
    negative = _hand_pth(str(tmp_path / "n.pth"), torch, {"w": (0, (3,), (1,))}, bytes(40), numel=-1)
    msg = _error(negative)
    assert negative in msg and "malformed storage reference" in msg, msg
    # torch never BUILDs onto what it rebuilds; refusing it keeps every field the reader checks as it was made.
    rebuilt = _hand_pth(str(tmp_path / "b.pth"), torch, {"w": (0, (3,), (1,), {"size": (10**6,)})}, bytes(40))
    msg = _error(rebuilt)
    assert rebuilt in msg and "sets state on a _TensorSpec" in msg, msg


def test_pth_storage_claiming_bytes_past_the_file_is_refused(tmp_path, torch):
    path = _hand_pth(str(tmp_path / "long.pth"), torch, {"w": (0, (10**6,), (1,))}, b"\0" * 40, numel=10**6)
    _patch_central_sizes(path, "archive/data/0", 4 * 10**6)
    msg = _error(path)
    assert path in msg and "'w'" in msg and "archive/data/0" in msg and "-byte file" in msg, msg


def test_compressed_pth_member_that_inflates_short_is_refused(tmp_path, torch):
    path = _hand_pth(str(tmp_path / "z.pth"), torch, {"w": (0, (20,), (1,))}, b"\0" * 40, 20, zipfile.ZIP_DEFLATED)
    _patch_central_sizes(path, "archive/data/0", 80)  # a DEFLATE stream ends where it ends: 40 bytes, not 80
    msg = _error(path)
    assert path in msg and "10-element storage" in msg, msg


def test_compressed_pth_loads_bit_identically(tmp_path, torch):
    sd = {"a": torch.randn(5, 4), "b": torch.arange(20)[3:9], "c": torch.randn(4, 3).to(torch.bfloat16).t()}
    saved, path = str(tmp_path / "saved.pth"), str(tmp_path / "deflated.pth")
    torch.save(sd, saved)
    _rewrite_zip(saved, path, zipfile.ZIP_DEFLATED)
    refs = io.open_checkpoint(path)
    for k, t in sd.items():
        assert refs[k].member is not None  # the compressed reader, not the memmap
        np.testing.assert_array_equal(refs[k].load().astype(np.float64), t.double().numpy(), err_msg=k)


def test_corrupt_pickle_is_a_checkpoint_error(tmp_path, torch):
    saved, path = str(tmp_path / "saved.pth"), str(tmp_path / "cut.pth")
    torch.save({"w": torch.randn(3)}, saved)
    _rewrite_zip(saved, path, truncate=("data.pkl", 20))
    msg = _error(path)
    assert path in msg and "corrupt" in msg and "data.pkl" in msg, msg


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
