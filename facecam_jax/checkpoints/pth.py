"""Torch ``.pth`` (zip) checkpoints read into TensorRefs: no torch import, and no pickle code is ever executed.
Every tensor's view is checked against its storage in the archive.

The pickle is read by ``bounded_pickle``, so a hostile file costs work linear in its size, never more
("billion laughs": a list holding the same list twice, nested through the memo, is a few hundred bytes).
Limits, far above what a real Wan / ReCamMaster checkpoint needs (Wan 14B: ~1,100 tensors, ~35,000
opcodes, ~100 kB of pickle, containers nested ~5 deep; a training checkpoint with optimizer state a few
times that); past one, a CheckpointError names the file and the limit:

- data.pkl at most ``MAX_PICKLE_BYTES`` (64 MiB, ~100 bytes per tensor);
- at most ``bounded_pickle.MAX_OPS`` opcodes (5,000,000; each builds at most one object) and
  ``bounded_pickle.MAX_MEMO`` memo entries (2,000,000): reading one costs a few seconds at most;
- containers nested at most ``MAX_DEPTH`` (32) deep; the tree is walked visiting each shared
  container and tensor once, so a memo reference counts once, not once per place it appears;
- at most ``MAX_ENTRIES`` (1,000,000) names reached when the state dict is flattened to
  ``name -> tensor`` (a mapping shared under several keys is named once per key).

A zip without its central directory, or a pickle that ends before its STOP, is reported as truncated.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from facecam_jax.checkpoints.bounded_pickle import BoundedUnpickler, PickleLimitError, PickleTruncated
from facecam_jax.checkpoints.tensor_ref import MAX_BYTES, TensorRef, reach, shape_problem
from facecam_jax.errors import CheckpointError, UnsafeCheckpointError

MAX_PICKLE_BYTES = 64 << 20
MAX_DEPTH = 32
MAX_ENTRIES = 1_000_000
_HOSTILE = "not a checkpoint, or hostile"

_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {  # torch.<dtype> objects referenced by _rebuild_tensor_v3
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


class _Sealed:
    """What the unpickler hands to a pickle: BUILD on it is refused, so it keeps the fields it was checked with.

    ``frozen=True`` alone does not do that (BUILD writes ``__dict__`` directly), nor does ``slots=True``
    (frozen slotted dataclasses get a ``__setstate__`` that sets every field). torch never BUILDs these.
    """

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"the pickle sets state on a {type(self).__name__}, which torch never writes")


@dataclasses.dataclass(frozen=True)
class _TorchType(_Sealed):
    """A torch storage class or dtype the pickle names, standing for its numpy dtype.

    The pickle gets this wrapper rather than numpy's shared dtype object, so nothing it does can reach numpy.
    """

    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage(_Sealed):
    key: str
    dtype: np.dtype
    numel: int  # in elements of ``dtype``, as the pickle declares it


@dataclasses.dataclass(frozen=True)
class _TensorSpec(_Sealed):
    """A tensor as the pickle describes it; every field is unchecked until ``_pth_ref`` sees its name."""

    storage: Any
    offset: Any
    size: Any
    stride: Any
    dtype: Any  # a _TorchType, or None for the storage's dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused, dtype=None, **_kw):
    return _TensorSpec(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _TensorSpec(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *_args, **_kw):
    return data


def _ordered_dict(*args):
    # OrderedDict(pairs) would hash keys the bounded reader has not checked; torch pickles an
    # OrderedDict as OrderedDict() and SETITEMS.
    if args:
        raise pickle.UnpicklingError("an OrderedDict built from arguments, which torch never writes")
    return OrderedDict()


class _TorchHooks:
    """find_class and persistent_load for a torch pickle: tensors and containers; every other global is refused."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _ordered_dict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }

    def __init__(self, path: str):
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _TorchType(np.dtype(_TORCH_STORAGE_DTYPES[name]))
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchType(np.dtype(_TORCH_DTYPES[name]))
        raise UnsafeCheckpointError(
            f"{self._path}: refusing to unpickle {module}.{name}: only tensors and plain containers are "
            "allowed in a checkpoint, and this pickle asks for other code (it may be malicious). "
            "Convert the file to .safetensors in a trusted environment if you trust its source."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._path}: unexpected persistent id {reprlib.repr(pid)} in pickle")
        _, storage_type, key, _location, numel = pid
        # torch writes (storage class, str key, location, element count); anything else is not a torch file.
        if not (isinstance(storage_type, _TorchType) and isinstance(key, str) and type(numel) is int and numel >= 0):
            raise CheckpointError(f"{self._path}: malformed storage reference {reprlib.repr(pid)} in data.pkl")
        return _Storage(key, storage_type.dtype, numel)


# What a corrupt pickle can raise while it is unpickled (a CheckpointError from the hooks aside): the
# reader's own UnpicklingErrors, and what a call of an allowed function with wrong arguments raises.
_PICKLE_ERRORS = (pickle.UnpicklingError, ValueError, TypeError, LookupError, OverflowError)


def _member_data_offset(path: str, f, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes start: after its local header, whose length the central directory lacks."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(
            f"{path}: corrupt zip entry {info.filename} (no local header at byte {info.header_offset})"
        )
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_pth(path: str) -> dict[str, Any]:
    """Unpickles a torch zip checkpoint into nested containers of TensorRefs, executing nothing."""
    size = os.path.getsize(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if size == 0 or head == b"PK\x03\x04":  # a zip's first entry, with no central directory at the end
            raise CheckpointError(
                f"{path} is truncated ({size} bytes): the zip archive torch.save writes ends in a central "
                "directory, and this file has none; re-download or re-copy it"
            )
        raise CheckpointError(
            f"{path}: not a torch zip checkpoint. Legacy (pre-1.6) or plain pickles are not read, since "
            "reading them safely is not possible here; re-save with torch.save() or convert to safetensors."
        )
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            return _read_pth_archive(path, zf, raw, size)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt zip archive ({e}); re-download or re-copy it") from None


def _unpickle(path: str, zf: zipfile.ZipFile, member: str) -> Any:
    """The object in the archive's pickle ``member``, read with bounded work."""
    declared = zf.getinfo(member).file_size
    if declared > MAX_PICKLE_BYTES:
        raise CheckpointError(
            f"{path}: {member} is {declared} bytes, over the {MAX_PICKLE_BYTES} a state dict needs: {_HOSTILE}"
        )
    hooks = _TorchHooks(path)
    try:
        return BoundedUnpickler(zf.read(member), hooks.find_class, hooks.persistent_load).load()
    except CheckpointError:
        raise
    except PickleLimitError as e:
        raise CheckpointError(f"{path}: {member} {e}: {_HOSTILE}") from None
    except PickleTruncated as e:
        raise CheckpointError(
            f"{path}: {member} ends mid-pickle ({e}): the file is truncated or corrupt; re-download or re-copy it"
        ) from None
    except _PICKLE_ERRORS as e:
        raise CheckpointError(f"{path}: corrupt {member} ({type(e).__name__}: {e})") from None


def _read_pth_archive(path: str, zf: zipfile.ZipFile, raw, file_size: int) -> Any:
    """The unpickled tree of an open torch archive, each tensor a ref checked against its storage."""
    pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkls) != 1:
        raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {pkls[:5]}")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
    obj = _unpickle(path, zf, pkls[0])
    infos = {i.filename: i for i in zf.infolist()}
    starts: dict[str, int] = {}  # member -> where its bytes start, read once per member
    done: dict[int, Any] = {}  # id -> converted: a shared container or tensor is converted once
    keep = []  # what ``done`` is keyed by stays alive, so its ids stay unique

    def convert(x, name, depth):
        if id(x) in done:
            return done[id(x)]
        if depth > MAX_DEPTH:  # also how a container that holds itself ends
            raise CheckpointError(
                f"{path}: data.pkl nests containers deeper than {MAX_DEPTH} (at {name[:200]!r}): {_HOSTILE}"
            )
        if isinstance(x, _TensorSpec):
            out = _pth_ref(path, name, x, prefix, infos, raw, file_size, starts)
        elif isinstance(x, Mapping):
            out = {k: convert(v, f"{name}.{k}" if name else str(k), depth + 1) for k, v in x.items()}
        elif isinstance(x, (list, tuple)):
            out = type(x)(convert(v, f"{name}.{i}" if name else str(i), depth + 1) for i, v in enumerate(x))
        else:
            return x
        done[id(x)] = out
        keep.append(x)
        return out

    return convert(obj, "", 0)


def _pth_ref(path: str, name: str, spec: _TensorSpec, prefix: str, infos, raw, file_size: int, starts) -> TensorRef:
    """The ref for one pickled tensor, once its storage, sizes and strides are known to stay inside the file."""
    storage = spec.storage
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"{path}: tensor {name!r} refers to {reprlib.repr(storage)}, not a storage")
    if spec.dtype is not None and not isinstance(spec.dtype, _TorchType):
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {reprlib.repr(spec.dtype)}, not a torch dtype")
    dtype = storage.dtype if spec.dtype is None else spec.dtype.dtype
    problem = shape_problem(spec.size, dtype.itemsize)
    if problem:
        raise CheckpointError(f"{path}: tensor {name!r} has size {reprlib.repr(spec.size)}, which {problem}")
    size, stride, offset = tuple(spec.size), spec.stride, spec.offset
    # torch never writes negative strides (it has none), and a stride numpy cannot express in bytes
    # would only fail later, in as_strided.
    if not (
        isinstance(stride, (list, tuple))
        and len(stride) == len(size)
        and all(type(s) is int and 0 <= s * dtype.itemsize <= MAX_BYTES for s in stride)
    ):
        raise CheckpointError(
            f"{path}: tensor {name!r} has stride {reprlib.repr(stride)}; expected one non-negative integer "
            f"per dimension of its size {size}"
        )
    stride = tuple(stride)
    if type(offset) is not int or offset < 0:
        raise CheckpointError(f"{path}: tensor {name!r} has storage offset {reprlib.repr(offset)}, not an integer >= 0")
    member = f"{prefix}data/{storage.key}"
    if member not in infos:
        raise CheckpointError(f"{path}: storage {member} of tensor {name!r} is missing from the archive")
    info = infos[member]
    # The archive's byte count bounds what can be read; the count the pickle declares can only lower it.
    numel = min(info.file_size, storage.numel * storage.dtype.itemsize) // dtype.itemsize
    if math.prod(size) and offset + reach(size, stride) > numel:
        raise CheckpointError(
            f"{path}: tensor {name!r} reaches past its storage {member}: storage offset {offset}, size {size} "
            f"and stride {stride} reach element {offset + reach(size, stride) - 1}, but the storage holds {numel} "
            f"{dtype} elements ({info.file_size} bytes in the archive, {storage.numel} {storage.dtype} declared): "
            f"the file ({file_size} bytes) is truncated or damaged; re-download or re-copy it"
        )
    if info.compress_type != zipfile.ZIP_STORED:
        return _OffsetRef(path, size, dtype, 0, stride, numel, member, offset)
    if member not in starts:
        starts[member] = _member_data_offset(path, raw, info)
    start = starts[member]
    if info.compress_size != info.file_size or start + info.file_size > file_size:
        raise CheckpointError(
            f"{path}: storage {member} of tensor {name!r} claims bytes {start}..{start + info.file_size} "
            f"of the {file_size}-byte file: the file is truncated or damaged; re-download or re-copy it"
        )
    return TensorRef(path, size, dtype, start + offset * dtype.itemsize, stride, max(numel - offset, 0))


@dataclasses.dataclass(frozen=True)
class _OffsetRef(TensorRef):
    """A tensor in a compressed zip member (rare): read whole, then viewed at an offset."""

    element_offset: int = 0

    def load(self) -> np.ndarray:
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        try:
            with zipfile.ZipFile(self.path) as zf:
                data = zf.read(self.member)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise CheckpointError(f"{self.path}: compressed storage {self.member} is corrupt ({e})") from None
        # The member may inflate to fewer bytes than the archive declared, so the view is checked
        # against what was actually read.
        base = np.frombuffer(data, dtype=self.dtype, count=len(data) // self.dtype.itemsize)[self.element_offset :]
        self._guard(base.size)
        strided = np.lib.stride_tricks.as_strided(
            base, shape=self.shape, strides=tuple(s * self.dtype.itemsize for s in self.strides), writeable=False
        )
        return np.array(strided, copy=True, order="C")


def _flatten(path: str, tree: Mapping) -> dict[str, TensorRef]:
    """``name -> TensorRef`` for the tensors in nested mappings, their keys joined by dots (depth first, in order).

    Shared mappings are named once per key they sit under, so the names reached are counted.
    """
    out: dict[str, TensorRef] = {}
    todo: list[tuple[str, Any]] = [("", tree)]
    reached = 0
    while todo:
        prefix, node = todo.pop()
        reached += 1
        if reached > MAX_ENTRIES:
            raise CheckpointError(
                f"{path}: the state dict exceeds {MAX_ENTRIES} entries (counting each name a shared "
                f"mapping is reached by): {_HOSTILE}"
            )
        if isinstance(node, Mapping):
            todo.extend((f"{prefix}{k}.", v) for k, v in reversed(node.items()))
        elif isinstance(node, TensorRef):
            out[prefix[:-1]] = node
    return out


_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "params_ema", "ema")


def pth_state_dict(path: str) -> dict[str, TensorRef]:
    """A flat ``name -> TensorRef`` dict from a .pth, unwrapping ``{'state_dict': ...}``-style nesting."""
    obj = read_pth(path)
    while isinstance(obj, Mapping) and not any(isinstance(v, TensorRef) for v in obj.values()):
        inner = [k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)]
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return _flatten(path, obj)
