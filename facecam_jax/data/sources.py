"""Grain random-access sources: multi-view captures and in-the-wild videos (SPEC 6).

A source is an index of samples; `source[i]` is a small record naming a sequence, its cameras
and a frame range. No pixel is read here: the transforms (transforms.py) pick cameras and shot
windows first and then decode only the frames the sample needs. What is on disk (layouts,
streams, camera parameters, skipped sequences) is found by `discovery`; each skip is kept in
`source.skipped` as (path, reason).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grain

from facecam_jax.data.discovery import (  # noqa: F401  (re-exported: the data layer's one import)
    EXCLUDED_SEQUENCES,
    MULTIVIEW,
    PREPARED_DIR,
    WILD,
    MultiViewSequence,
    Stream,
    discover_multicamvideo,
    discover_nersemble,
    discover_processed,
    discover_wild,
    heldout_starts,
    load_camera_params,
    window_starts,
    without_cameras,
    write_stream_meta,
)

log = logging.getLogger(__name__)


class MultiViewSource(grain.sources.RandomAccessDataSource):
    """Samples of multi-view sequences: one per (sequence, window of `frames` at `stride`).

    `source[i]` is a record {"kind", "index", "sequence", "start", "stride", "frames"}; the
    source camera, target cameras and shot windows are drawn later (transforms.MultiShotStitch).

    Held-out evaluation data: `holdout_windows` indexes each sequence's non-overlapping windows
    (`heldout_starts`) and `holdout_cameras` its cameras (positions in serial order). The
    "train" split keeps only windows that share no frame with a held-out window and drops the
    held-out cameras; the "heldout" split is exactly the held-out windows, with every camera.
    """

    def __init__(self, sequences: Sequence[MultiViewSequence], *, frames: int, stride: int,
                 window_step: int | None = None, skipped: Sequence[tuple[str, str]] = (),
                 holdout_windows: Sequence[int] = (), holdout_cameras: Sequence[int] = (),
                 split: str = "train"):
        if frames < 1 or stride < 1:
            raise ValueError(f"frames and stride must be >= 1, got {frames} and {stride}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.split = split
        self.sequences = list(sequences)
        if split == "train" and holdout_cameras:
            self.sequences = [without_cameras(seq, holdout_cameras) for seq in self.sequences]
        self.frames, self.stride = frames, stride
        self.skipped = list(skipped)
        span = (frames - 1) * stride + 1
        self._index: list[tuple[int, int]] = []
        for k, seq in enumerate(self.sequences):
            held = heldout_starts(seq.num_frames, frames, stride, holdout_windows) if holdout_windows else []
            if split == "heldout":
                starts = held
            else:  # no training frame inside a held-out window
                starts = [s for s in window_starts(seq.num_frames, frames, stride, window_step)
                          if all(s + span <= h or h + span <= s for h in held)]
            if not starts:
                reason = f"{seq.num_frames} frames, fewer than one sample ({frames} at stride {stride} = {span})"
                if split == "heldout" and not holdout_windows:
                    reason = "no held-out windows were asked for (data.holdout_windows)"
                elif held and window_starts(seq.num_frames, frames, stride, None):
                    reason = f"every training window overlaps a held-out window (starts {held})"
                log.warning("skipping sequence %s: %s", seq.name, reason)
                self.skipped.append((seq.name, reason))
            self._index += [(k, s) for s in starts]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        k, start = self._index[index]
        return {"kind": MULTIVIEW, "index": index, "sequence": self.sequences[k], "start": start,
                "stride": self.stride, "frames": self.frames}

    def __repr__(self) -> str:
        split = "" if self.split == "train" else "held-out split, "
        return (f"MultiViewSource({split}{len(self.sequences)} sequences, {len(self)} samples, "
                f"{self.frames} frames at stride {self.stride}, {len(self.skipped)} skipped)")


class WildVideoSource(grain.sources.RandomAccessDataSource):
    """Samples of in-the-wild videos: the first `frames` frames (at `stride`) of each video."""

    def __init__(self, streams: Sequence[Stream], *, frames: int, stride: int = 1,
                 skipped: Sequence[tuple[str, str]] = ()):
        self.frames, self.stride = frames, stride
        self.skipped = list(skipped)
        span = (frames - 1) * stride + 1
        self.streams = []
        for stream in streams:
            if stream.num_frames < span:
                reason = f"{stream.num_frames} frames, fewer than {span} ({frames} at stride {stride})"
                log.warning("skipping video %s: %s", stream.path, reason)
                self.skipped.append((stream.path, reason))
            else:
                self.streams.append(stream)

    def __len__(self) -> int:
        return len(self.streams)

    def __getitem__(self, index: int) -> dict:
        return {"kind": WILD, "index": index, "stream": self.streams[index], "start": 0,
                "stride": self.stride, "frames": self.frames}

    def __repr__(self) -> str:
        return (f"WildVideoSource({len(self)} videos, {self.frames} frames at stride "
                f"{self.stride}, {len(self.skipped)} skipped)")


def multiview_source(layout: str, root: str, *, frames: int, stride: int,
                     window_step: int | None = None, prepared_root: str | None = None,
                     participants: Sequence[int] | None = None,
                     sequences: Sequence[str] | None = None, holdout_windows: Sequence[int] = (),
                     holdout_cameras: Sequence[int] = (), split: str = "train") -> MultiViewSource:
    """The multi-view source of a `layout` ('nersemble', 'processed' or 'multicamvideo') dataset at `root`
    (its training split, or with split='heldout' its held-out windows: see MultiViewSource)."""
    if layout == "nersemble":
        found, skipped = discover_nersemble(root, participants=participants, sequences=sequences,
                                            prepared_root=prepared_root)
    elif layout == "processed":
        found, skipped = discover_processed(root, prepared_root=prepared_root)
    elif layout == "multicamvideo":
        found, skipped = discover_multicamvideo(root, prepared_root=prepared_root)
    else:
        raise ValueError(f"unknown multi-view layout {layout!r}; use 'nersemble', 'processed' or 'multicamvideo'")
    return MultiViewSource(found, frames=frames, stride=stride, window_step=window_step,
                           skipped=skipped, holdout_windows=holdout_windows,
                           holdout_cameras=holdout_cameras, split=split)


def wild_source(root: str, *, frames: int, stride: int = 1,
                prepared_root: str | None = None) -> WildVideoSource:
    streams, skipped = discover_wild(root, prepared_root=prepared_root)
    return WildVideoSource(streams, frames=frames, stride=stride, skipped=skipped)
