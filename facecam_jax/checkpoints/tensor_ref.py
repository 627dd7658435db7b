"""TensorRef, a tensor inside a checkpoint file read only on ``load()``, the bounds checks both readers
(io.py's safetensors, pth.py's torch) apply to what a file declares before anything is mapped, and the
check the loaders apply to every tensor's values as it is read (``check_finite``: no NaN or Inf)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_dtypes
import numpy as np

from facecam_jax.errors import CheckpointError

MAX_BYTES = np.iinfo(np.intp).max  # numpy counts an array's bytes and strides in a signed machine word
_MAX_NDIM = 64  # numpy's limit on dimensions
_FLOATS = frozenset(
    np.dtype(t)
    for t in (np.float16, np.float32, np.float64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
)
_CHUNK = 1 << 22  # elements checked at once: bounds the mask np.isfinite allocates (4 MiB)


def check_finite(array: np.ndarray, path: str, name: str) -> np.ndarray:
    """``array`` unchanged when every value is finite; else a CheckpointError naming tensor ``name`` and its file.

    One NaN or Inf in a weight turns every output it touches into NaN, so a damaged file (or one saved
    from a diverged run) fails here, naming the tensor, instead of as a black video. Integers pass.
    """
    if array.dtype not in _FLOATS:
        return array
    flat = array.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        if not np.isfinite(flat[start : start + _CHUNK]).all():
            break
    else:
        return array
    nan = inf = 0
    first = None
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        nan += int(np.isnan(chunk).sum())
        inf += int(np.isinf(chunk).sum())
        if first is None and not np.isfinite(chunk).all():
            first = start + int(np.argmin(np.isfinite(chunk)))
    index = tuple(int(i) for i in np.unravel_index(first, array.shape))
    raise CheckpointError(
        f"{path}: tensor {name!r} holds {nan} NaN and {inf} Inf values among its {flat.size} (the first at "
        f"index {index}); the file is damaged or was saved from a diverged run: re-download it or use another"
    )


def shape_problem(shape: Any, itemsize: int) -> str | None:
    """Why ``shape`` (read from a file) cannot be an array's shape, or None when it can."""
    # type() rather than isinstance(): JSON true and pickled True are bools, and no size is a bool.
    if not isinstance(shape, (list, tuple)) or not all(type(n) is int and n >= 0 for n in shape):
        return "is not a list of non-negative integers"
    if len(shape) > _MAX_NDIM:
        return f"has {len(shape)} dimensions, more than numpy's {_MAX_NDIM}"
    # numpy refuses shapes whose non-zero sizes multiply past its byte range even when another size is 0,
    # and a size check alone cannot catch those (their byte count is 0).
    if math.prod(n for n in shape if n) * itemsize > MAX_BYTES:
        return "is larger than numpy can address"
    return None


def reach(shape: tuple[int, ...], strides: tuple[int, ...] | None) -> int:
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
        if bad_strides or reach(self.shape, strides) > count:
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

    def load_finite(self, name: str) -> np.ndarray:
        """``load()``, refusing a NaN or Inf with a CheckpointError naming ``name`` and the file."""
        return check_finite(self.load(), self.path, name)
