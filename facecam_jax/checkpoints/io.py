"""Checkpoint files -> ``name -> TensorRef``: the safetensors reader and writer, and ``open_checkpoint``
for a safetensors file, a sharded index, a torch ``.pth`` (read by pth.py) or a directory of these.

A ref knows its shape and dtype and reads its bytes only when ``load()`` is called, so a loader
holds one tensor at a time and never a whole state dict.

Both readers treat a file as hostile: every tensor's byte range is checked against the file
when the header is read, before anything is mapped, so a damaged or crafted file fails with
one ``CheckpointError`` naming the file and the tensor instead of faulting (SIGBUS) or quietly
reading the bytes of its neighbours.
"""

from __future__ import annotations

import glob
import json
import math
import os
import reprlib
import struct
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from facecam_jax.checkpoints.pth import pth_state_dict
from facecam_jax.checkpoints.tensor_ref import TensorRef, shape_problem
from facecam_jax.errors import CheckpointError

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
    problem = shape_problem(shape, dtype.itemsize)
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
        try:
            with open(path) as f:
                index = json.load(f)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointError(f"{path}: corrupt safetensors index ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not weight_map or not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{path}: index has no weight_map of tensor names to shard files")
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

