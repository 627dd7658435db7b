"""Dataset preparation: face landmarks and foreground masks, computed once and stored beside
the data (store.py), so training workers never run MediaPipe.

- Landmarks: the anchor frames of every (sequence, camera) (the first frame of each sample
  window, whose landmarks become the camera condition of a shot; SPEC 5), or every frame.
- Masks: MediaPipe selfie segmentation of every frame a sample can use, for datasets without
  masks (NeRSemble v2 ships none), stored at a reduced size (the model itself sees 256x256).

The work is split per stream (one camera of one sequence, or one video), runs in parallel
processes, shows a progress bar, and is resumable: frames whose status is already written
are not recomputed. `tools/prepare_dataset.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
from collections.abc import Sequence

import cv2
import numpy as np

from facecam_jax import video_io
from facecam_jax.camera import landmarks as landmarks_lib
from facecam_jax.data import sources
from facecam_jax.data import store as store_lib
from facecam_jax.runtime import progress as progress_lib

log = logging.getLogger(__name__)

MASK_LONG_SIDE = 512  # stored mask size: the long side is at most this many pixels
_CHUNK = 64  # frames decoded and processed at once (bounds memory on long 3208x2200 videos)


@dataclasses.dataclass(frozen=True)
class Job:
    """The frames of one stream that need landmarks and/or masks."""
    path: str
    prepared: str
    num_frames: int
    landmark_frames: tuple[int, ...]
    mask_frames: tuple[int, ...]


@dataclasses.dataclass
class Summary:
    streams: int = 0
    landmark_frames: int = 0  # newly computed
    faces_missing: int = 0  # of those, frames where MediaPipe found no face
    mask_frames: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(self, other: Summary) -> None:
        self.streams += other.streams
        self.landmark_frames += other.landmark_frames
        self.faces_missing += other.faces_missing
        self.mask_frames += other.mask_frames
        self.failed += other.failed


def window_frames(num_frames: int, frames: int, stride: int, window_step: int | None
                  ) -> tuple[list[int], list[int]]:
    """(anchor frames, all frames used) of a sequence's sample windows."""
    starts = sources.window_starts(num_frames, frames, stride, window_step)
    used = sorted({s + i * stride for s in starts for i in range(frames)})
    return starts, used


def multiview_jobs(sequences: Sequence[sources.MultiViewSequence], *, frames: int, stride: int,
                   window_step: int | None, all_frames: bool, masks: bool) -> list[Job]:
    jobs = []
    for seq in sequences:
        anchors, used = window_frames(seq.num_frames, frames, stride, window_step)
        if all_frames:
            anchors = used = list(range(seq.num_frames))
        for stream in seq.cameras:
            need_masks = masks and stream.mask_dir is None
            jobs.append(Job(stream.path, stream.prepared, stream.num_frames, tuple(anchors),
                            tuple(used) if need_masks else ()))
    return jobs


def wild_jobs(streams: Sequence[sources.Stream], *, all_frames: bool) -> list[Job]:
    """In-the-wild samples start at frame 0: its landmarks crop the video and draw the
    condition (SPEC 6); no masks (the background is kept)."""
    return [Job(s.path, s.prepared, s.num_frames,
                tuple(range(s.num_frames)) if all_frames else (0,), ()) for s in streams]


def _downscale(frames: np.ndarray, long_side: int) -> np.ndarray:
    height, width = frames.shape[1:3]
    scale = long_side / max(height, width)
    if scale >= 1.0:
        return frames
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


class _Segmenter:
    """MediaPipe selfie segmentation, one graph per process (graphs are not thread-safe)."""
    _graph = None
    _lock = threading.Lock()

    @classmethod
    def masks(cls, frames: np.ndarray) -> np.ndarray:
        with cls._lock:
            if cls._graph is None:
                selfie_segmentation = landmarks_lib.mediapipe_solution("selfie_segmentation", "background masks")
                # model 0: the general 256x256 model (portrait crops are not landscape).
                cls._graph = selfie_segmentation.SelfieSegmentation(model_selection=0)
            return np.stack([
                np.clip(cls._graph.process(np.ascontiguousarray(f)).segmentation_mask * 255.0
                        + 0.5, 0, 255).astype(np.uint8) for f in frames])


def segment(frames: np.ndarray, long_side: int = MASK_LONG_SIDE) -> np.ndarray:
    """Foreground masks uint8 [T, h, w] (probability * 255) of RGB frames [T, H, W, 3], at
    the frames' size shrunk so the long side is at most `long_side`."""
    return _Segmenter.masks(_downscale(np.asarray(frames), long_side))


def run_job(job: Job) -> Summary:
    """Computes what `job` still lacks and stores it; safe to rerun after an interruption."""
    summary = Summary(streams=1)
    store = store_lib.StreamStore(job.prepared)
    try:
        if not os.path.exists(os.path.join(job.prepared, "meta.json")):
            sources.write_stream_meta(job.path, job.prepared)
        lm_status = store.landmark_status(job.num_frames)
        mask_status = store.mask_status(job.num_frames)
        lm_todo = [f for f in job.landmark_frames if lm_status[f] == store_lib.NOT_COMPUTED]
        mask_todo = [f for f in job.mask_frames if mask_status[f] != store_lib.FOUND]
        todo = sorted(set(lm_todo) | set(mask_todo))
        lm_set, mask_set = set(lm_todo), set(mask_todo)
        # Consecutive frames are a video: track the face; scattered anchors are stills.
        static = not (len(lm_todo) > 1 and np.all(np.diff(lm_todo) == 1))
        for i in range(0, len(todo), _CHUNK):
            chunk = todo[i:i + _CHUNK]
            stream = sources.Stream("", job.path, job.num_frames, 0, 0, job.prepared)
            frames = stream.read(chunk)  # [n, H, W, 3]
            lm_idx = [k for k, f in enumerate(chunk) if f in lm_set]
            if lm_idx:
                try:
                    points, found = landmarks_lib.detect(frames[lm_idx], static=static)
                except landmarks_lib.NoFaceError:
                    points = np.full((len(lm_idx), 478, 3), np.nan, np.float32)
                    found = np.zeros((len(lm_idx),), bool)
                store.write_landmarks([chunk[k] for k in lm_idx], points, found, job.num_frames)
                summary.landmark_frames += len(lm_idx)
                summary.faces_missing += int((~found).sum())
            mask_idx = [k for k, f in enumerate(chunk) if f in mask_set]
            if mask_idx:
                store.write_masks([chunk[k] for k in mask_idx], segment(frames[mask_idx]),
                                  job.num_frames)
                summary.mask_frames += len(mask_idx)
    except (video_io.VideoDecodeError, OSError, ValueError) as e:
        log.warning("cannot prepare %s: %s", job.path, e)
        summary.failed.append((job.path, str(e)))
    return summary


def run(jobs: Sequence[Job], *, num_workers: int = 1, progress: bool = True,
        desc: str = "prepare") -> Summary:
    """Runs `jobs` over `num_workers` processes (1: in this process) with a progress bar."""
    total = Summary()
    if not jobs:
        return total
    bar = progress_lib.bar(total=len(jobs), unit="stream", desc=desc, disable=not progress)
    if num_workers <= 1:
        results = map(run_job, jobs)
        pool = None
    else:
        # spawn: MediaPipe and tensorstore hold threads that a fork would copy mid-state.
        pool = multiprocessing.get_context("spawn").Pool(num_workers)
        results = pool.imap_unordered(run_job, jobs)
    try:
        for result in results:
            total.add(result)
            bar.set_postfix(landmarks=total.landmark_frames, masks=total.mask_frames,
                            failed=len(total.failed), refresh=False)
            bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    return total


def prepare_multiview(layout: str, root: str, *, frames: int = 81, stride: int = 3,
                      window_step: int | None = None, all_frames: bool = False,
                      masks: bool = True, prepared_root: str | None = None,
                      num_workers: int = 1, progress: bool = True) -> Summary:
    """Prepares a 'nersemble' or 'processed' multi-view dataset for samples of `frames` frames
    at `stride` (the same values the training config uses)."""
    if layout == "nersemble":
        found, _ = sources.discover_nersemble(root, prepared_root=prepared_root)
    elif layout == "processed":
        found, _ = sources.discover_processed(root, prepared_root=prepared_root)
    else:
        raise ValueError(f"unknown multi-view layout {layout!r}; use 'nersemble' or 'processed'")
    jobs = multiview_jobs(found, frames=frames, stride=stride, window_step=window_step,
                          all_frames=all_frames, masks=masks)
    return run(jobs, num_workers=num_workers, progress=progress, desc=f"prepare {layout}")


def prepare_wild(root: str, *, all_frames: bool = False, prepared_root: str | None = None,
                 num_workers: int = 1, progress: bool = True) -> Summary:
    streams, _ = sources.discover_wild(root, prepared_root=prepared_root)
    return run(wild_jobs(streams, all_frames=all_frames), num_workers=num_workers,
               progress=progress, desc="prepare wild")
