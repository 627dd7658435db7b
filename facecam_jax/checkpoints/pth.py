"""Torch ``.pth`` (zip) checkpoints read by a restricted unpickler into TensorRefs: no torch import, and no
pickle code is ever executed. Every tensor's view is checked against its storage in the archive."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from facecam_jax.checkpoints.tensor_ref import MAX_BYTES, TensorRef, reach, shape_problem
from facecam_jax.errors import CheckpointError, UnsafeCheckpointError

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


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds tensors and containers; refuses every other global the pickle names."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }

    def __init__(self, file, path: str):
        super().__init__(file)
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


# What a corrupt pickle can raise while it is unpickled (a CheckpointError from the callbacks aside).
_PICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError, OverflowError, RecursionError
)


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
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a torch zip checkpoint. Legacy (pre-1.6) or plain pickles are not read, since "
            "reading them safely is not possible here; re-save with torch.save() or convert to safetensors."
        )
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            return _read_pth_archive(path, zf, raw)
    except (zipfile.BadZipFile, zlib.error) as e:
        raise CheckpointError(f"{path}: corrupt zip archive ({e})") from None


def _read_pth_archive(path: str, zf: zipfile.ZipFile, raw) -> Any:
    """The unpickled tree of an open torch archive, each tensor a ref checked against its storage."""
    pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkls) != 1:
        raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {pkls}")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = f"{prefix}byteorder"
    if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
    try:
        obj = _SafeUnpickler(io.BytesIO(zf.read(pkls[0])), path).load()
    except CheckpointError:
        raise
    except _PICKLE_ERRORS as e:
        raise CheckpointError(f"{path}: corrupt {pkls[0]} ({type(e).__name__}: {e})") from None
    infos = {i.filename: i for i in zf.infolist()}
    file_size = os.path.getsize(path)

    def convert(x, name):
        if isinstance(x, _TensorSpec):
            return _pth_ref(path, name, x, prefix, infos, raw, file_size)
        if isinstance(x, Mapping):
            return {k: convert(v, f"{name}.{k}" if name else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(convert(v, f"{name}.{i}" if name else str(i)) for i, v in enumerate(x))
        return x

    try:
        return convert(obj, "")
    except RecursionError:  # the unpickler nests without recursing; walking the result does recurse
        raise CheckpointError(f"{path}: data.pkl nests containers too deeply to be a state dict") from None


def _pth_ref(path: str, name: str, spec: _TensorSpec, prefix: str, infos, raw, file_size: int) -> TensorRef:
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
            f"{dtype} elements ({info.file_size} bytes in the archive, {storage.numel} {storage.dtype} declared); "
            "the file is truncated or damaged"
        )
    if info.compress_type != zipfile.ZIP_STORED:
        return _OffsetRef(path, size, dtype, 0, stride, numel, member, offset)
    start = _member_data_offset(path, raw, info)
    if info.compress_size != info.file_size or start + info.file_size > file_size:
        raise CheckpointError(
            f"{path}: storage {member} of tensor {name!r} claims bytes {start}..{start + info.file_size} "
            f"of the {file_size}-byte file; the file is truncated or damaged"
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


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


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
    return {k: v for k, v in _flatten(obj) if isinstance(v, TensorRef)}
