"""What multi-view captures and in-the-wild videos are on disk: the layouts, the streams of a
sequence, camera parameters, and the index of sequences and videos a source is built from.

Three layouts are read:
- NeRSemble v2: `{pid:03d}/sequences/{SEQ}/images/cam_{serial}.mp4` and
  `{pid:03d}/calibration/camera_params.json` (`world_2_cam` per serial, OpenCV 4x4, and
  `intrinsics`, one 3x3 shared by all cameras or one per serial).
- The processed layout: a sequence directory with `rgb_images/cam_{serial}/frame_{idx:06d}.jpg`
  and `masks/cam_{serial}/mask_{idx:06d}.png` (`camera_params.json` in the sequence
  directory, its parent, or the parent's `calibration/`, optional).
- A folder (searched recursively) of monocular in-the-wild videos.

Sequences or videos that cannot be opened, or are too short for one sample, are skipped when
the index is built; each skip is logged and returned as (path, reason). Prepared annotations
(landmarks, masks; store.py) of a stream live in `facecam/<name>/` beside its sequence (or its
video), or mirrored under `prepared_root` when the data is read-only.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from collections.abc import Sequence

import numpy as np

from facecam_jax import video_io
from facecam_jax.camera import extrinsics
from facecam_jax.data import store as store_lib

log = logging.getLogger(__name__)

PREPARED_DIR = "facecam"  # prepared annotations live in <sequence or folder>/facecam/<stream>
# NeRSemble sequences without a person (static background plates) are never samples.
EXCLUDED_SEQUENCES = ("BACKGROUND",)
MULTIVIEW, WILD = 0, 1  # sample kinds, as stored in a sample's "kind"


@dataclasses.dataclass(frozen=True)
class Stream:
    """One video stream: a camera of a multi-view sequence, or an in-the-wild video."""
    name: str  # camera serial, or the video's path relative to the wild root
    path: str  # a video file, or a directory of frame_{idx:06d}.jpg images
    num_frames: int
    height: int
    width: int
    prepared: str  # directory of its prepared annotations (store.StreamStore)
    mask_dir: str | None = None  # processed layout: directory of mask_{idx:06d}.png

    @property
    def store(self) -> store_lib.StreamStore:
        return store_lib.StreamStore(self.prepared)

    def read(self, indices) -> np.ndarray:
        """uint8 RGB frames [n, H, W, 3] at `indices` (only those are decoded)."""
        if os.path.isdir(self.path):
            return video_io.read_images(
                [os.path.join(self.path, f"frame_{int(i):06d}.jpg") for i in indices])
        return video_io.read_frames(self.path, indices)

    def read_masks(self, indices) -> np.ndarray:
        """uint8 foreground masks [n, h, w] (dataset masks if any, else prepared ones)."""
        if self.mask_dir is not None:
            return video_io.read_images(
                [os.path.join(self.mask_dir, f"mask_{int(i):06d}.png") for i in indices],
                grayscale=True)
        return self.store.read_masks(indices)


@dataclasses.dataclass(frozen=True)
class MultiViewSequence:
    """A multi-view sequence: synchronised streams and (optionally) their calibration."""
    name: str
    cameras: tuple[Stream, ...]
    world_2_cam: np.ndarray | None  # float64 [K, 4, 4] OpenCV world-to-camera, or None
    intrinsics: np.ndarray | None  # float64 [K, 3, 3] at each stream's own resolution, or None
    # float64 [K, T, 4, 4] per-frame world-to-camera of moving cameras (MultiCamVideo), or None
    frame_world_2_cam: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return min(c.num_frames for c in self.cameras)


def window_starts(num_frames: int, frames: int, stride: int, window_step: int | None) -> list[int]:
    """Start frames of the sample windows of a sequence: `frames` frames at `stride`, a new
    window every `window_step` frames (None: windows do not overlap)."""
    span = (frames - 1) * stride + 1
    step = window_step or span
    return list(range(0, num_frames - span + 1, step))


def heldout_starts(num_frames: int, frames: int, stride: int, windows: Sequence[int]) -> list[int]:
    """Start frames of the held-out windows: indices (negative from the end) into the
    sequence's NON-overlapping windows (`window_starts` with no step), sorted."""
    grid = window_starts(num_frames, frames, stride, None)
    out = set()
    for w in windows:
        if not -len(grid) <= int(w) < len(grid):
            raise ValueError(f"held-out window {w} does not exist: a sequence of {num_frames} frames has "
                             f"{len(grid)} non-overlapping windows of {frames} frames at stride {stride}; "
                             f"use indices in [-{len(grid)}, {len(grid)})")
        out.add(grid[int(w)])
    return sorted(out)


def without_cameras(seq: "MultiViewSequence", cameras: Sequence[int]) -> "MultiViewSequence":
    """The sequence without the cameras at positions `cameras` (and their calibration rows)."""
    drop = {int(c) for c in cameras}
    bad = sorted(c for c in drop if not 0 <= c < len(seq.cameras))
    if bad:
        raise ValueError(f"held-out cameras {bad} do not exist: sequence {seq.name} has cameras "
                         f"0..{len(seq.cameras) - 1} ({', '.join(c.name for c in seq.cameras)})")
    keep = [k for k in range(len(seq.cameras)) if k not in drop]
    pick = (lambda a: None if a is None else a[keep])  # noqa: E731
    return MultiViewSequence(seq.name, tuple(seq.cameras[k] for k in keep), pick(seq.world_2_cam),
                             pick(seq.intrinsics), pick(seq.frame_world_2_cam))


def _stream_info(path: str, prepared: str | None) -> tuple[int, int, int]:
    """(num_frames, height, width) of a video or image directory; from the prepared
    meta.json when there is one (written by tools/prepare_dataset.py)."""
    meta = os.path.join(prepared, "meta.json") if prepared else None
    if meta and os.path.exists(meta):
        with open(meta) as f:
            info = json.load(f)
        return int(info["num_frames"]), int(info["height"]), int(info["width"])
    if os.path.isdir(path):
        names = sorted(glob.glob(os.path.join(path, "frame_*.jpg")))
        if not names:
            raise video_io.VideoDecodeError(f"{path!r} holds no frame_*.jpg images")
        last = int(re.findall(r"frame_(\d+)", os.path.basename(names[-1]))[0])
        if last + 1 != len(names):
            raise video_io.VideoDecodeError(
                f"{path!r} has {len(names)} frame images but the last is frame {last}; "
                "frames are missing")
        first = video_io.read_images(names[:1])
        return len(names), first.shape[1], first.shape[2]
    info = video_io.probe(path)
    return info.num_frames, info.height, info.width


def write_stream_meta(stream_path: str, prepared: str) -> None:
    """Caches (num_frames, height, width) of a stream in its prepared directory, so building
    the index of a large dataset reads no video header."""
    num_frames, height, width = _stream_info(stream_path, None)
    os.makedirs(prepared, exist_ok=True)
    with open(os.path.join(prepared, "meta.json"), "w") as f:
        json.dump({"num_frames": num_frames, "height": height, "width": width}, f)


def _prepared_dir(base: str, name: str, root: str, prepared_root: str | None) -> str:
    """`<base>/facecam/<name>`, mirrored under `prepared_root` when given."""
    if prepared_root is None:
        return os.path.join(base, PREPARED_DIR, name)
    return os.path.join(prepared_root, os.path.relpath(base, root), PREPARED_DIR, name)


def load_camera_params(path: str, serials: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """world_2_cam [K, 4, 4] and intrinsics [K, 3, 3] of `serials` from a camera_params.json."""
    with open(path) as f:
        params = json.load(f)
    try:
        world_2_cam = np.stack([np.asarray(params["world_2_cam"][s], np.float64) for s in serials])
        intrinsics = params["intrinsics"]
        if isinstance(intrinsics, dict):
            intrinsics = np.stack([np.asarray(intrinsics[s], np.float64) for s in serials])
        else:
            intrinsics = np.broadcast_to(np.asarray(intrinsics, np.float64), (len(serials), 3, 3))
    except KeyError as e:
        raise ValueError(f"{path} has no calibration for camera {e}; it needs 'world_2_cam' and "
                         "'intrinsics' for every camera of the sequence") from e
    if world_2_cam.shape[1:] != (4, 4) or intrinsics.shape[1:] != (3, 3):
        raise ValueError(f"{path}: expected 4x4 world_2_cam and 3x3 intrinsics, got "
                         f"{world_2_cam.shape[1:]} and {intrinsics.shape[1:]}")
    return world_2_cam, np.array(intrinsics)


def _intrinsics_at(intrinsics: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rescales intrinsics calibrated at another resolution to a stream of [height, width].

    camera_params.json does not say which image size it was calibrated for (NeRSemble's
    refers to the 3208x2200 captures, which releases also ship downscaled); the principal
    point sits near the image centre, so a size mismatch above 5% is taken as a rescale.
    """
    calib_w, calib_h = 2.0 * intrinsics[0, 2] + 1.0, 2.0 * intrinsics[1, 2] + 1.0
    sx, sy = width / calib_w, height / calib_h
    if abs(sx - 1.0) < 0.05 and abs(sy - 1.0) < 0.05:
        return intrinsics
    scale = np.diag([sx, sy, 1.0])
    shifted = intrinsics.copy()
    shifted[:2, 2] += 0.5  # pixel centres at integers: scale continuous coordinates
    scaled = scale @ shifted
    scaled[:2, 2] -= 0.5
    return scaled


class _Skips:
    """Collects (path, reason) of what the index leaves out, logging each once."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, reason: str) -> None:
        log.warning("skipping %s: %s", path, reason)
        self.items.append((path, reason))


def _multiview_sequence(name: str, streams: list[Stream], calibration: str | None,
                        skips: _Skips) -> MultiViewSequence | None:
    world_2_cam = intrinsics = None
    if calibration is not None and os.path.exists(calibration):
        try:
            world_2_cam, intrinsics = load_camera_params(calibration, [s.name for s in streams])
            intrinsics = np.stack([_intrinsics_at(k, s.height, s.width)
                                   for k, s in zip(intrinsics, streams)])
        except (ValueError, json.JSONDecodeError) as e:
            skips.add(calibration, f"unusable calibration ({e}); sequence {name} has no cameras")
            world_2_cam = intrinsics = None
    return MultiViewSequence(name, tuple(streams), world_2_cam, intrinsics)


def _open_streams(candidates: list[tuple[str, str, str, str | None]], skips: _Skips
                  ) -> list[Stream]:
    """Streams of (name, path, prepared, mask_dir) that open; the others are skipped."""
    streams = []
    for name, path, prepared, mask_dir in candidates:
        try:
            num_frames, height, width = _stream_info(path, prepared)
        except video_io.VideoDecodeError as e:
            skips.add(path, str(e))
            continue
        streams.append(Stream(name, path, num_frames, height, width, prepared, mask_dir))
    return streams


def discover_nersemble(root: str, *, participants: Sequence[int] | None = None,
                       sequences: Sequence[str] | None = None, prepared_root: str | None = None,
                       min_cameras: int = 2) -> tuple[list[MultiViewSequence], list[tuple[str, str]]]:
    """Sequences of a NeRSemble v2 download (sorted, so every host builds the same index)."""
    skips = _Skips()
    found = []
    if not os.path.isdir(root):
        raise FileNotFoundError(f"NeRSemble root {root!r} does not exist")
    for pid_dir in sorted(glob.glob(os.path.join(root, "[0-9][0-9][0-9]"))):
        pid = int(os.path.basename(pid_dir))
        if participants is not None and pid not in participants:
            continue
        calibration = os.path.join(pid_dir, "calibration", "camera_params.json")
        for seq_dir in sorted(glob.glob(os.path.join(pid_dir, "sequences", "*"))):
            seq = os.path.basename(seq_dir)
            if seq in EXCLUDED_SEQUENCES or (sequences is not None and seq not in sequences):
                continue
            videos = sorted(glob.glob(os.path.join(seq_dir, "images", "cam_*.mp4")))
            candidates = []
            for path in videos:
                serial = os.path.basename(path)[len("cam_"):-len(".mp4")]
                candidates.append((serial, path,
                                   _prepared_dir(seq_dir, f"cam_{serial}", root, prepared_root),
                                   None))
            streams = _open_streams(candidates, skips)
            if len(streams) < min_cameras:
                skips.add(seq_dir, f"{len(streams)} readable camera(s), fewer than {min_cameras}")
                continue
            found.append(_multiview_sequence(f"{pid:03d}/{seq}", streams, calibration, skips))
    return found, skips.items


def discover_processed(root: str, *, prepared_root: str | None = None, min_cameras: int = 2
                       ) -> tuple[list[MultiViewSequence], list[tuple[str, str]]]:
    """Sequences of the processed layout: every directory under `root` with `rgb_images/`."""
    skips = _Skips()
    found = []
    if not os.path.isdir(root):
        raise FileNotFoundError(f"processed-layout root {root!r} does not exist")
    seq_dirs = sorted(os.path.dirname(p) for p in
                      glob.glob(os.path.join(root, "**", "rgb_images"), recursive=True))
    for seq_dir in seq_dirs:
        candidates = []
        for cam_dir in sorted(glob.glob(os.path.join(seq_dir, "rgb_images", "cam_*"))):
            cam = os.path.basename(cam_dir)
            mask_dir = os.path.join(seq_dir, "masks", cam)
            candidates.append((cam[len("cam_"):], cam_dir,
                               _prepared_dir(seq_dir, cam, root, prepared_root),
                               mask_dir if os.path.isdir(mask_dir) else None))
        streams = _open_streams(candidates, skips)
        if len(streams) < min_cameras:
            skips.add(seq_dir, f"{len(streams)} readable camera(s), fewer than {min_cameras}")
            continue
        parent = os.path.dirname(seq_dir)
        calibration = next((p for p in (os.path.join(seq_dir, "camera_params.json"),
                                        os.path.join(parent, "camera_params.json"),
                                        os.path.join(parent, "calibration", "camera_params.json"))
                            if os.path.exists(p)), None)
        name = os.path.relpath(seq_dir, root)
        found.append(_multiview_sequence(name, streams, calibration, skips))
    return found, skips.items


def discover_multicamvideo(root: str, *, prepared_root: str | None = None, min_cameras: int = 2
                           ) -> tuple[list[MultiViewSequence], list[tuple[str, str]]]:
    """Scenes of ReCamMaster's MultiCamVideo layout: every directory under ``root`` with
    ``videos/camNN.mp4`` and ``cameras/camera_extrinsics.json`` (per frame and camera, in
    Unreal units: ``camera.extrinsics.recammaster_c2w``). The cameras move, so each sequence
    carries per-frame cameras (``frame_world_2_cam``); there are no intrinsics."""
    skips = _Skips()
    found = []
    if not os.path.isdir(root):
        raise FileNotFoundError(f"MultiCamVideo root {root!r} does not exist")
    for scene in sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "videos"), recursive=True)):
        calibration = os.path.join(scene, "cameras", "camera_extrinsics.json")
        videos = sorted(glob.glob(os.path.join(scene, "videos", "cam[0-9][0-9].mp4")))
        candidates = [(os.path.basename(v)[:-len(".mp4")], v,
                       _prepared_dir(scene, os.path.basename(v)[:-len(".mp4")], root, prepared_root), None)
                      for v in videos]
        streams = _open_streams(candidates, skips)
        if len(streams) < min_cameras:
            skips.add(scene, f"{len(streams)} readable camera(s), fewer than {min_cameras}")
            continue
        if not os.path.exists(calibration):
            skips.add(scene, f"no {os.path.relpath(calibration, scene)}: the cameras are unknown")
            continue
        try:
            frame_c2w = np.stack([extrinsics.recammaster_c2w(calibration, int(s.name[3:]),
                                                             min(x.num_frames for x in streams)) for s in streams])
        except ValueError as e:
            skips.add(calibration, f"unusable cameras ({e})")
            continue
        found.append(MultiViewSequence(os.path.relpath(scene, root), tuple(streams), None, None,
                                       np.linalg.inv(frame_c2w)))
    return found, skips.items


def discover_wild(root: str, *, prepared_root: str | None = None
                  ) -> tuple[list[Stream], list[tuple[str, str]]]:
    """In-the-wild videos under `root` (recursive, sorted; prepared dirs are not searched)."""
    skips = _Skips()
    if not os.path.isdir(root):
        raise FileNotFoundError(f"in-the-wild video folder {root!r} does not exist")
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != PREPARED_DIR)
        for filename in sorted(filenames):
            if filename.lower().endswith(video_io.VIDEO_EXTENSIONS):
                path = os.path.join(dirpath, filename)
                name = os.path.relpath(path, root)
                stem = os.path.splitext(filename)[0]
                candidates.append((name, path, _prepared_dir(dirpath, stem, root, prepared_root),
                                   None))
    candidates.sort(key=lambda c: c[0])
    return _open_streams(candidates, skips), skips.items
