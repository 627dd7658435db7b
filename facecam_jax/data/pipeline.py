"""The FaceCam training input pipeline on Grain: `make_train_iterator(config, rows, start_batch)`.

One GLOBAL sample stream, the same whatever the number of processes: per source
(multi-view, in-the-wild) a seeded shuffle that changes every epoch, infinite repetition,
then the source's transforms (transforms.py); the two streams are mixed with a fixed ratio.
Global batch s is elements [s*B, (s+1)*B) of that stream; a process loads only its
contiguous slice `rows` of each global batch (the rows its devices hold), reads ahead with
threads and (with data.workers > 0) worker processes. Every random choice comes from Grain's
per-element rngs, seeded from data.seed and the element's global position, so batch s is the
same set of samples with the same augmentation draws on 1 process or 64. The data position
is therefore one global number, the count of batches consumed: a checkpoint written by N
processes resumes with M (`start_batch`). A sample a transform had to drop (unreadable
video, no face) is replaced by a fixed other position of the stream, again the same for
every process count. Windows and cameras named by data.holdout_windows / holdout_cameras never
enter the stream; `heldout_source` returns the held-out windows for evaluation. With
data.target_cameras, multi-view targets come from those cameras only (sources from the others).

A batch is a dict of numpy arrays with a leading per-process batch dimension B:
  source, target, camera   uint8 [B, T, H, W, 3]   (camera: the landmark-map video)
  kind                     int32 [B]      0 multi-view, 1 in-the-wild
  index                    int32 [B]      sample index within its source
  num_shots, shot_starts   int32 [B], [B, K_max]   (-1 padded)
  shot_index, frame_index  int32 [B, T]   shot of each target frame; video frame of each
                                          output frame (source and target share it)
  cameras                  int32 [B, 1 + K_max]   source camera, target cameras (-1 padded)
  background               int32 [B, 3]   composited colour (-1 when none)
  source_scale, source_position, zoom, pan   float32 [B], [B, 2], [B, 2], [B, 2, 2]
  target_landmarks         float32 [B, T, 478, 3]  the drawn landmarks, after the motion (per
                                          frame when the consumer needs ``normals``)
  normals                  uint8 [B, T, H, W, 3]   only when needed: the target frames' face
                                          normal maps (FactorPortrait)
  source_world_2_cam, source_intrinsics      float32 [B, 4, 4], [B, 3, 3]
  target_world_2_cam, target_intrinsics      float32 [B, T, 4, 4], [B, T, 3, 3]
                                          (intrinsics at the output size, after the
                                          augmentation; NaN where unknown)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import cv2
import grain
import numpy as np

from facecam_jax.data import mini_dataset
from facecam_jax.data import sources as sources_lib
from facecam_jax.data import transforms as tr

log = logging.getLogger(__name__)

_MULTIVIEW_TAG, _WILD_TAG = 1, 2


def _seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (distinct streams for distinct parts)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _data_roots(data) -> tuple[str, str, str]:
    """(multi-view root, in-the-wild root, multi-view layout) of `data`."""
    if data.dataset == "mini":
        built = mini_dataset.build(data.mini.height, data.mini.width, data.mini.num_cameras,
                                   scales=tuple(data.mini.get("scales", ())))
        return built.nersemble_root, built.wild_root, "nersemble"
    if data.dataset != "files":
        raise ValueError(f"data.dataset must be 'mini' or 'files', got {data.dataset!r}")
    return data.multiview_root, data.wild_root, data.multiview_layout


def target_positions(data, multiview: sources_lib.MultiViewSource) -> tuple[int, ...]:
    """data.target_cameras (positions in serial order) as positions in the training split's
    sequences, which lack the held-out cameras; checked against every sequence."""
    targets = tuple(int(c) for c in data.get("target_cameras", ()))
    if not targets:
        return ()
    held = {int(c) for c in data.get("holdout_cameras", ())}
    if held & set(targets):
        raise ValueError(f"data.target_cameras {list(targets)} and data.holdout_cameras {sorted(held)} overlap: "
                         "a held-out camera is never a training target")
    positions = tuple(c - sum(h < c for h in held) for c in targets)
    for seq in multiview.sequences:
        if max(positions) >= len(seq.cameras) or min(positions) < 0 or len(seq.cameras) <= len(set(positions)):
            raise ValueError(f"data.target_cameras {list(targets)} do not fit sequence {seq.name}: it has "
                             f"{len(seq.cameras) + len(held)} cameras, and a source needs a camera that is no target")
    return positions


def _holdout(data) -> dict:
    return {"holdout_windows": tuple(data.get("holdout_windows", ())),
            "holdout_cameras": tuple(data.get("holdout_cameras", ()))}


def build_sources(data) -> tuple[sources_lib.MultiViewSource | None,
                                 sources_lib.WildVideoSource | None]:
    """The multi-view and in-the-wild sources `data` names (None where it names none).

    The multi-view source is the training split: without data.holdout_windows and
    data.holdout_cameras (`heldout_source` gives the held-out windows)."""
    multiview_root, wild_root, layout = _data_roots(data)
    prepared = data.prepared_root or None
    multiview = wild = None
    if multiview_root:
        multiview = sources_lib.multiview_source(
            layout, multiview_root, frames=data.frames, stride=data.stride,
            window_step=data.window_step or None, prepared_root=prepared, **_holdout(data))
    if wild_root and data.wild_ratio != 0.0:
        wild = sources_lib.wild_source(wild_root, frames=data.frames, stride=data.wild_stride,
                                       prepared_root=prepared)
        if data.dataset == "mini" and multiview is not None and data.get("holdout_windows"):
            _check_mini_wild_clip(data, multiview)
    if multiview is not None and data.wild_ratio == 1.0:
        multiview = None
    for source in (multiview, wild):
        if source is not None:
            log.info("%r", source)
    if (multiview is None or len(multiview) == 0) and (wild is None or len(wild) == 0):
        raise ValueError(
            "no training samples: set data.multiview_root and/or data.wild_root (or use "
            f"data.dataset='mini'); found multi-view {multiview!r}, in-the-wild {wild!r}")
    return multiview, wild


def _check_mini_wild_clip(data, multiview: sources_lib.MultiViewSource) -> None:
    """The mini dataset's in-the-wild video is the footage its cameras render: its training
    clip (the first frames) must not reach into a held-out window."""
    clip_end = (data.frames - 1) * data.wild_stride + 1
    for seq in multiview.sequences:
        for start in sources_lib.heldout_starts(seq.num_frames, data.frames, data.stride,
                                                data.holdout_windows):
            if start < clip_end:
                raise ValueError(
                    f"held-out window starting at frame {start} overlaps the mini dataset's in-the-wild "
                    f"clip (frames 0..{clip_end - 1} of the same footage); hold out later windows or "
                    "set data.wild_ratio=0.0")


def heldout_source(data) -> sources_lib.MultiViewSource:
    """The held-out windows of `data`'s multi-view dataset (every camera): evaluation samples.

    Records as in training (`source[i]`: sequence, start, stride, frames); the windows are
    those data.holdout_windows names, which the training split never touches."""
    multiview_root, _, layout = _data_roots(data)
    if not multiview_root:
        raise ValueError("held-out windows need a multi-view dataset: set data.multiview_root "
                         "(or data.dataset='mini')")
    if not data.get("holdout_windows"):
        raise ValueError("no held-out windows: set data.holdout_windows (e.g. (2, -1)); see "
                         "configs/facecam.py:learn")
    return sources_lib.multiview_source(
        layout, multiview_root, frames=data.frames, stride=data.stride,
        prepared_root=data.prepared_root or None, split="heldout", **_holdout(data))


def _branch(source, transforms: list, *, seed: int, tag: int, shuffle: bool) -> grain.MapDataset:
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=_seed(seed, tag, 0))
    ds = ds.repeat()  # infinite; the shuffle order changes every epoch
    for k, transform in enumerate(transforms, start=1):
        if isinstance(transform, grain.transforms.RandomMap):
            ds = ds.random_map(transform, seed=_seed(seed, tag, k))
        else:
            ds = ds.map(transform)
    return ds


# A dropped sample at global position g is replaced by the first readable one of
# g + k * _REPLACEMENT_STRIDE (k = 1, 2, ...): far away in the stream, so not its neighbour.
_REPLACEMENT_STRIDE = 1_000_003
_MAX_REPLACEMENTS = 64


class _GlobalBatchRows(grain.MapDataset):
    """Element j of a process: row ``lo + j % n`` of global batch ``start + j // n`` (n = hi - lo).

    Maps the process's local element order onto the global stream, so that every process
    count sees the same global batches, and replaces dropped (None) samples deterministically.
    """

    def __init__(self, parent: grain.MapDataset, batch_size: int, rows: tuple[int, int], start_batch: int):
        super().__init__(parent)
        self._batch, (self._lo, self._hi), self._start = batch_size, rows, start_batch

    def __len__(self) -> int:
        return sys.maxsize // self._batch  # the stream is infinite

    def __str__(self) -> str:
        return f"_GlobalBatchRows(batch={self._batch}, rows={self._lo}:{self._hi}, start={self._start})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = self._hi - self._lo
        position = (self._start + index // n) * self._batch + self._lo + index % n
        for k in range(_MAX_REPLACEMENTS + 1):
            element = self._parent[position + k * _REPLACEMENT_STRIDE]
            if element is not None:
                return element
        raise RuntimeError(
            f"{_MAX_REPLACEMENTS + 1} samples in a row could not be read (from stream position "
            f"{position}); the data is broken: see the skipped-sample log lines and "
            "facecam_jax.data.transforms.skip_counts()")


def make_dataset(data, rows: tuple[int, int] | None = None, start_batch: int = 0,
                 needs: Sequence[str] | None = None) -> grain.IterDataset:
    """The batched Grain dataset of `data` (a config's data section) for one process.

    `rows`: the [lo, hi) rows of every global batch (of data.batch_size) this process loads
    (default: all of them); `start_batch`: the global batches already consumed (resume).
    `needs`: the batch entries the consumer reads (a camera kind's ``batch_keys``; None: all).
    Without ``camera`` no landmark map is drawn and no face is needed (``camera`` is black).
    """
    lo, hi = rows or (0, data.batch_size)
    if not 0 <= lo < hi <= data.batch_size:
        raise ValueError(f"rows {lo}:{hi} are not a slice of the global batch of {data.batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    multiview, wild = build_sources(data)
    ratio = data.wild_ratio
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ValueError(f"data.wild_ratio must be in [0, 1] (or None), got {ratio}")
    if ratio is not None and 0.0 < ratio < 1.0:
        missing = [name for name, source in (("multi-view", multiview), ("in-the-wild", wild))
                   if source is None or len(source) == 0]
        if missing:
            raise ValueError(f"data.wild_ratio={ratio} mixes both kinds, but there are no "
                             f"{' and no '.join(missing)} samples; set the data roots or "
                             "data.wild_ratio to 0.0 / 1.0")
    common = {"seed": data.seed, "shuffle": data.shuffle}
    # FactorPortrait's driving signals: per-frame target landmarks (its expression codes) and
    # their normal maps (unless its C2 ablation leaves them out).
    normals = needs is not None and "normals" in needs
    per_frame = needs is not None and bool({"normals", "target_landmarks"} & set(needs))
    if per_frame and wild is not None and len(wild):
        raise ValueError("FactorPortrait's driving signals need per-frame landmarks of a multi-view target: set "
                         "data.wild_ratio=0.0 (an in-the-wild sample holds its first frame's landmarks)")
    finish = tr.ToSample(max_shots=data.max_shots, extra=("normals",) if normals else ())
    branches, weights = [], []
    if multiview is not None and len(multiview):
        branches.append(_branch(multiview, [
            tr.MultiShotStitch(data.height, data.width, max_shots=data.max_shots,
                               composite=data.composite, detect_missing=data.detect_missing,
                               target_cameras=target_positions(data, multiview),
                               landmark_maps=needs is None or "camera" in needs, frame_landmarks=per_frame),
            tr.ScaleAndColour(tuple(data.multiview_source_scale)),
            tr.SyntheticCameraMotion(tuple(data.multiview_target_zoom)),
            *([tr.NormalMaps()] if normals else []),
            finish], tag=_MULTIVIEW_TAG, **common))
        weights.append(len(multiview))
    if wild is not None and len(wild):
        branches.append(_branch(wild, [
            tr.InTheWildPairing(data.height, data.width, detect_missing=data.detect_missing),
            tr.ScaleAndColour(tuple(data.wild_source_scale)),
            tr.SyntheticCameraMotion(tuple(data.wild_target_zoom)),
            finish], tag=_WILD_TAG, **common))
        weights.append(len(wild))
    if len(branches) == 2 and ratio is not None:
        weights = [1.0 - ratio, ratio]
    ds = branches[0] if len(branches) == 1 else grain.MapDataset.mix(branches, weights)
    ds = _GlobalBatchRows(ds, data.batch_size, (lo, hi), start_batch)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                              prefetch_buffer_size=data.prefetch))
    ds = ds.batch(hi - lo, drop_remainder=True)
    if data.workers > 0:
        ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
            num_workers=data.workers, per_worker_buffer_size=data.worker_buffer_size),
            worker_init_fn=_init_worker)
    return ds


def _init_worker(worker_index: int, worker_count: int) -> None:
    """Worker processes are the parallelism: one OpenCV thread each, not one per core each."""
    del worker_index, worker_count
    cv2.setNumThreads(1)


def make_train_iterator(config, rows: tuple[int, int] | None = None,
                        start_batch: int = 0, needs: Sequence[str] | None = None) -> grain.DatasetIterator:
    """The training batch iterator of `config.data`: rows [lo, hi) of every global batch
    (default: all), from global batch `start_batch` on. Its Grain state (`get_state()` /
    `set_state(state)`) restores it within one run; across runs the global batch count is
    the position (`start_batch`), valid for any number of processes."""
    return iter(make_dataset(config.data, rows, start_batch, needs))
