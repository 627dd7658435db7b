"""Prepared per-video annotations (face landmarks, foreground masks) as zarr arrays.

`tools/prepare_dataset.py` writes them once, beside the data, and the training pipeline reads
only the frames a sample needs. Each video stream (one camera of one sequence, or one
in-the-wild video) has its own directory holding:

  landmarks.zarr         float32 [N, 478, 3]  MediaPipe face mesh, normalized; NaN if unknown
  landmarks_status.zarr  uint8   [N]          NOT_COMPUTED / FOUND / NO_FACE per frame
  masks.zarr             uint8   [N, h, w]    foreground probability * 255 (selfie segmentation)
  masks_status.zarr      uint8   [N]          NOT_COMPUTED / FOUND per frame

Landmarks and masks are chunked one frame per chunk, so reading a frame touches one file and
preparing frames is resumable: a frame counts as done once its status is written, which
happens after its data. N is the frame count of the video.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import tensorstore as ts

NUM_LANDMARKS = 478
NOT_COMPUTED, FOUND, NO_FACE = 0, 1, 2


class MissingAnnotationError(LookupError):
    """A prepared annotation a sample needs has not been computed yet."""


@functools.lru_cache(maxsize=4096)
def _open(path: str):
    return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": path}},
                   open=True, read=True, write=True).result()


def _create(path: str, shape, chunks, dtype: str, fill_value):
    _open.cache_clear()  # a handle cached for an earlier array at this path is stale now
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path},
            "metadata": {"dtype": dtype, "shape": list(shape), "chunks": list(chunks),
                         "compressor": {"id": "zstd", "level": 3}, "fill_value": fill_value}}
    return ts.open(spec, create=True, open=True).result()


class StreamStore:
    """The prepared annotations of one video stream, in `directory`."""

    def __init__(self, directory: str):
        self.directory = directory

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name + ".zarr")

    def has(self, name: str) -> bool:
        return os.path.exists(os.path.join(self._path(name), ".zarray"))

    # Landmarks.
    def landmark_status(self, num_frames: int | None = None) -> np.ndarray:
        """uint8 [N] status per frame; all NOT_COMPUTED when nothing was prepared."""
        if not self.has("landmarks_status"):
            if num_frames is None:
                raise MissingAnnotationError(f"no prepared landmarks in {self.directory!r}")
            return np.zeros((num_frames,), np.uint8)
        return np.asarray(_open(self._path("landmarks_status")).read().result())

    def read_landmarks(self, frames) -> tuple[np.ndarray, np.ndarray]:
        """Landmarks float32 [n, 478, 3] and status uint8 [n] of the given frame indices."""
        frames = np.asarray(frames, np.int64).reshape(-1)
        if not self.has("landmarks"):
            return (np.full((frames.size, NUM_LANDMARKS, 3), np.nan, np.float32),
                    np.zeros((frames.size,), np.uint8))
        status = self.landmark_status()[frames]
        landmarks = np.asarray(_open(self._path("landmarks")).oindex[frames].read().result())
        return landmarks, status

    def write_landmarks(self, frames, landmarks: np.ndarray, found: np.ndarray,
                        num_frames: int) -> None:
        """Stores landmarks [n, 478, 3] of `frames` (status FOUND where `found`, else NO_FACE)."""
        frames = np.asarray(frames, np.int64).reshape(-1)
        if not self.has("landmarks"):
            _create(self._path("landmarks"), (num_frames, NUM_LANDMARKS, 3), (1, NUM_LANDMARKS, 3),
                    "<f4", "NaN")
            _create(self._path("landmarks_status"), (num_frames,), (num_frames,), "|u1", 0)
        _open(self._path("landmarks")).oindex[frames].write(
            np.asarray(landmarks, np.float32)).result()
        status = self.landmark_status()
        status[frames] = np.where(np.asarray(found, bool), FOUND, NO_FACE)
        _open(self._path("landmarks_status")).write(status).result()

    # Masks.
    def mask_status(self, num_frames: int) -> np.ndarray:
        if not self.has("masks_status"):
            return np.zeros((num_frames,), np.uint8)
        return np.asarray(_open(self._path("masks_status")).read().result())

    def read_masks(self, frames) -> np.ndarray:
        """uint8 [n, h, w] foreground masks of the given frames; MissingAnnotationError if any
        of them was not prepared."""
        frames = np.asarray(frames, np.int64).reshape(-1)
        if not self.has("masks"):
            raise MissingAnnotationError(
                f"no prepared foreground masks in {self.directory!r}; "
                "run tools/prepare_dataset.py on this dataset first")
        status = np.asarray(_open(self._path("masks_status")).read().result())[frames]
        if np.any(status != FOUND):
            missing = frames[status != FOUND]
            raise MissingAnnotationError(
                f"masks of frames {missing[:8].tolist()} in {self.directory!r} are not prepared; "
                "run tools/prepare_dataset.py (it resumes where it stopped)")
        return np.asarray(_open(self._path("masks")).oindex[frames].read().result())

    def write_masks(self, frames, masks: np.ndarray, num_frames: int) -> None:
        """Stores uint8 masks [n, h, w] of `frames`; h, w are fixed by the first write."""
        frames = np.asarray(frames, np.int64).reshape(-1)
        masks = np.asarray(masks, np.uint8)
        if not self.has("masks"):
            _create(self._path("masks"), (num_frames,) + masks.shape[1:], (1,) + masks.shape[1:],
                    "|u1", 0)
            _create(self._path("masks_status"), (num_frames,), (num_frames,), "|u1", 0)
        _open(self._path("masks")).oindex[frames].write(masks).result()
        status = self.mask_status(num_frames)
        status[frames] = FOUND
        _open(self._path("masks_status")).write(status).result()
