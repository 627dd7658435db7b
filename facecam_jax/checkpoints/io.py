"""Memory-mapped tensor readers for safetensors and torch ``.pth`` files, and a safetensors writer.

Both readers return a mapping ``name -> TensorRef``; a ref knows its shape and dtype and
reads its bytes only when ``load()`` is called, so a loader holds one tensor at a time and
never a whole state dict. ``.pth`` files are read by a restricted unpickler that rebuilds
tensors and plain containers only: no torch import, and no pickle code is ever executed.

Both readers treat a file as hostile: every tensor's byte range is checked against the file
when the header is read, before anything is mapped, so a damaged or crafted file fails with
one ``CheckpointError`` naming the file and the tensor instead of faulting (SIGBUS) or quietly
reading the bytes of its neighbours.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import math
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from facecam_jax.errors import CheckpointError, UnsafeCheckpointError

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

_MAX_BYTES = np.iinfo(np.intp).max  # numpy counts an array's bytes and strides in a signed machine word
_MAX_NDIM = 64  # numpy's limit on dimensions


def _shape_problem(shape: Any, itemsize: int) -> str | None:
    """Why ``shape`` (read from a file) cannot be an array's shape, or None when it can."""
    # type() rather than isinstance(): JSON true and pickled True are bools, and no size is a bool.
    if not isinstance(shape, (list, tuple)) or not all(type(n) is int and n >= 0 for n in shape):
        return "is not a list of non-negative integers"
    if len(shape) > _MAX_NDIM:
        return f"has {len(shape)} dimensions, more than numpy's {_MAX_NDIM}"
    # numpy refuses shapes whose non-zero sizes multiply past its byte range even when another size is 0,
    # and a size check alone cannot catch those (their byte count is 0).
    if math.prod(n for n in shape if n) * itemsize > _MAX_BYTES:
        return "is larger than numpy can address"
    return None


def _reach(shape: tuple[int, ...], strides: tuple[int, ...] | None) -> int:
    """How many storage elements a non-empty view touches: one past its furthest element."""
    if strides is None:
        return math.prod(shape)
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides))


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """A tensor inside a file: shape, dtype and where its bytes are; ``load()`` reads it."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # byte offset of element 0 of the underlying storage
    strides: tuple[int, ...] | None = None  # element strides (torch); None means C-contiguous
    storage_numel: int | None = None
    member: str | None = None  # set for a compressed zip member, which is read, not mapped

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _guard(self, count: int) -> None:
        """Refuses a view that would reach outside the ``count`` storage elements it is taken from.

        The readers have checked every ref they make against its file; this keeps a hand-made ref, or
        a compressed member that inflates to less than it declared, from reading past its bytes.
        """
        strides = self.strides
        bad_strides = strides is not None and (len(strides) != len(self.shape) or min(strides, default=0) < 0)
        if bad_strides or _reach(self.shape, strides) > count:
            raise CheckpointError(
                f"{self.path}: a tensor of shape {self.shape} and strides {strides} at byte {self.offset} "
                f"reaches past its {count}-element storage; the file is truncated or damaged"
            )

    def load(self) -> np.ndarray:
        """Reads this tensor (memory-mapped) and returns a C-contiguous numpy copy."""
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        count = self.storage_numel if self.storage_numel is not None else self.size
        self._guard(count)
        base = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(count,))
        if self.strides is None:
            out = base[: self.size].reshape(self.shape)
        else:
            item = self.dtype.itemsize
            out = np.lib.stride_tricks.as_strided(
                base, shape=self.shape, strides=tuple(s * item for s in self.strides), writeable=False
            )
        return np.array(out, copy=True, order="C")


# ---------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: str) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Parses a safetensors header into refs (no tensor bytes are read), checking every entry against the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(
                f"{path}: header length {n} runs past the end of the {size}-byte file "
                "(truncated, or not a safetensors file)"
            )
        if n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausible)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path}: header key '__metadata__' is {reprlib.repr(metadata)}; it must map strings to strings"
        )
    refs = {name: _safetensors_ref(path, name, info, 8 + n, size - 8 - n) for name, info in header.items()}
    return refs, metadata


def _safetensors_ref(path: str, name: str, info: Any, base: int, data_size: int) -> TensorRef:
    """The ref for one header entry, once its dtype, shape and byte range are known to fit the file."""
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{path}: tensor {name!r} is {reprlib.repr(info)} in the header, not an object with "
            "dtype, shape and data_offsets"
        )
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"{path}: tensor {name!r} lacks {missing} in the header")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in _ST_DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has unsupported dtype {reprlib.repr(dtype_name)} "
            f"(readable: {', '.join(_ST_DTYPES)})"
        )
    dtype = _ST_DTYPES[dtype_name]
    problem = _shape_problem(shape, dtype.itemsize)
    if problem:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {reprlib.repr(shape)}, which {problem}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets {reprlib.repr(offsets)}; expected [begin, end] byte offsets"
        )
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{path}: tensor {name!r} has negative or reversed data_offsets [{begin}, {end}]")
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] past the end of the "
            f"{data_size}-byte data section (truncated file?)"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - begin} bytes, but shape {tuple(shape)} of {dtype_name} "
            f"needs {nbytes}"
        )
    return TensorRef(path, tuple(shape), dtype, base + begin)


def write_safetensors(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``name -> array`` as safetensors, converting and writing one tensor at a time.

    Values may be numpy/jax arrays or zero-argument callables returning one (to stream
    tensors that do not exist yet). Shapes and dtypes are taken from a first pass that
    calls ``np.shape``/``.dtype`` on arrays; callables are materialised twice at most.
    """
    names = sorted(tensors)
    specs = {}
    offset = 0
    for name in names:
        value = tensors[name]
        arr = value() if callable(value) else value
        dtype = np.dtype(arr.dtype)
        if dtype not in _ST_NAMES:
            raise CheckpointError(f"cannot write {name!r}: dtype {dtype} has no safetensors name")
        nbytes = int(np.prod(np.shape(arr), dtype=np.int64)) * dtype.itemsize
        specs[name] = {"dtype": _ST_NAMES[dtype], "shape": list(np.shape(arr)), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = dict(specs)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            value = tensors[name]
            arr = np.ascontiguousarray(np.asarray(value() if callable(value) else value))
            f.write(arr.tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- torch .pth

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
    problem = _shape_problem(spec.size, dtype.itemsize)
    if problem:
        raise CheckpointError(f"{path}: tensor {name!r} has size {reprlib.repr(spec.size)}, which {problem}")
    size, stride, offset = tuple(spec.size), spec.stride, spec.offset
    # torch never writes negative strides (it has none), and a stride numpy cannot express in bytes
    # would only fail later, in as_strided.
    if not (
        isinstance(stride, (list, tuple))
        and len(stride) == len(size)
        and all(type(s) is int and 0 <= s * dtype.itemsize <= _MAX_BYTES for s in stride)
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
    if math.prod(size) and offset + _reach(size, stride) > numel:
        raise CheckpointError(
            f"{path}: tensor {name!r} reaches past its storage {member}: storage offset {offset}, size {size} "
            f"and stride {stride} reach element {offset + _reach(size, stride) - 1}, but the storage holds {numel} "
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


# ---------------------------------------------------------------------------- any checkpoint

_PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def checkpoint_files(path: str) -> list[str]:
    """The tensor files behind ``path``: a file, a sharded index, or a directory of either."""
    if os.path.isdir(path):
        indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several safetensors indexes {indexes}; pass one of them")
        if indexes:
            return checkpoint_files(indexes[0])
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(_PTH_SUFFIXES))
        if not files:
            raise CheckpointError(f"{path}: directory holds no .safetensors, index or .pth file")
        return files
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.endswith(".index.json"):
        with open(path) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{path}: index has no weight_map")
        root = os.path.dirname(path)
        files = sorted({os.path.join(root, v) for v in weight_map.values()})
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"{path}: shards listed in the index are missing: {missing}")
        return files
    return [path]


def open_checkpoint(path: str | os.PathLike) -> dict[str, TensorRef]:
    """``name -> TensorRef`` for a safetensors file, sharded index, .pth, or directory of these."""
    refs: dict[str, TensorRef] = {}
    for file in checkpoint_files(os.fspath(path)):
        if file.endswith(".safetensors"):
            part, _ = read_safetensors_header(file)
        elif file.endswith(_PTH_SUFFIXES):
            part = pth_state_dict(file)
        else:
            raise CheckpointError(f"{file}: unknown checkpoint format (expected .safetensors or .pth)")
        dup = set(part) & set(refs)
        if dup:
            raise CheckpointError(f"{file}: tensors also found in another shard: {sorted(dup)[:5]}")
        refs.update(part)
    return refs


def strip_prefix(refs: Mapping[str, TensorRef], prefixes: Iterable[str]) -> dict[str, TensorRef]:
    """Removes the first of ``prefixes`` that every key starts with (e.g. ComfyUI's)."""
    for p in prefixes:
        if refs and all(k.startswith(p) for k in refs):
            return {k[len(p) :]: v for k, v in refs.items()}
    return dict(refs)


def format_key_problems(missing=(), unexpected=(), mismatched=(), limit: int = 20) -> str:
    """One readable message listing missing, unexpected and mis-shaped keys."""

    def block(title, items):
        items = list(items)
        if not items:
            return ""
        shown = "\n    ".join(str(i) for i in items[:limit])
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}"

    return (
        block("missing keys", missing)
        + block("unexpected keys", unexpected)
        + block("shape mismatches (key: checkpoint vs model)", mismatched)
    )

