"""FaceCam training-pair generation as Grain transforms (SPEC 6; paper Algorithms 1-3).

A multi-view record (sources.MultiViewSource) becomes a sample in three random steps, each a
Grain `RandomMap` drawing everything from the rng Grain hands it (so a sample depends only on
the seed and its position in the stream, not on worker count or timing):

1. `MultiShotStitch` (Alg. 3): one source camera; K ~ U{1..K_max} distinct target cameras;
   time-aligned shots (shot k covers the k-th window of `T // K + 1` frames, truncated to T);
   only those frames are decoded. Each shot's camera condition is the landmark map of its
   camera's frame at the clip start (the anchor), drawn once and held for the shot.
2. `ScaleAndColour` (Alg. 1): one random uniform background colour composited behind source
   and target (foreground masks); the source gets a still scale at a random position.
3. `SyntheticCameraMotion` (Alg. 2): the target frames and their landmark maps get the same
   moving zoom/pan, start/end scale and start/end position drawn once, linear in time.

An in-the-wild record becomes a sample with `InTheWildPairing` (the first frames, cropped to
the output size around the frame-0 nose tip; source = target; the condition is the frame-0
landmark map), then `ScaleAndColour` without compositing and `SyntheticCameraMotion`, with the
in-the-wild ranges. `ToSample` fixes the output structure for batching.

The geometry itself (cover crop, zoom/pan of frames, landmarks and intrinsics, compositing,
shots) is in augment.py. Frames are uint8 [T, H, W, 3].
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter

import grain
import numpy as np

from facecam_jax import video_io
from facecam_jax.camera import draw
from facecam_jax.camera import landmarks as landmarks_lib
from facecam_jax.camera import normals as normals_lib
from facecam_jax.data import augment, prepare, sources
from facecam_jax.data import store as store_lib

log = logging.getLogger(__name__)

NUM_LANDMARKS = 478
NOSE_TIP = 4  # the official crop centres the source on this landmark of frame 0 (SPEC 5)

# Samples dropped by the transforms in this process, by reason (a corrupt video, a frame
# without a face, a missing annotation). Each drop is also logged.
SKIP_REASONS = ("decode error", "no face", "missing landmarks", "missing masks")  # every reason raised here
_skips: Counter = Counter()
_skips_lock = threading.Lock()


def skip_counts() -> dict[str, int]:
    """Samples skipped in this process so far, by reason."""
    with _skips_lock:
        return dict(_skips)


def _skip(reason: str, detail: str) -> None:
    with _skips_lock:
        _skips[reason] += 1
    log.warning("skipping sample (%s): %s", reason, detail)


class SkipSample(Exception):
    """Raised inside a transform for a sample that cannot be built (it is dropped)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------
# Annotation access (prepared, or computed on the fly when allowed).
# ---------------------------------------------------------------------------------------------

def _anchor_landmarks(stream: sources.Stream, frame: int, detect_missing: bool) -> np.ndarray:
    """Landmarks [478, 3] (normalized, of the full frame) of `frame`; SkipSample if none."""
    points, status = stream.store.read_landmarks([frame])
    if status[0] == store_lib.FOUND:
        return points[0]
    if status[0] == store_lib.NO_FACE:
        raise SkipSample("no face", f"no face at anchor frame {frame} of {stream.path}")
    if not detect_missing:
        raise SkipSample("missing landmarks",
                         f"frame {frame} of {stream.path} has no prepared landmarks; run "
                         "tools/prepare_dataset.py or set data.detect_missing=True")
    try:
        points, _ = landmarks_lib.detect(_read(stream, [frame]), static=True)
    except landmarks_lib.NoFaceError:
        raise SkipSample("no face", f"no face at anchor frame {frame} of {stream.path}") from None
    return points[0]


def _masks(stream: sources.Stream, frames, images: np.ndarray | None, detect_missing: bool
           ) -> np.ndarray:
    try:
        return stream.read_masks(frames)
    except store_lib.MissingAnnotationError as e:
        if not detect_missing or images is None:
            raise SkipSample("missing masks", str(e)) from None
    return prepare.segment(images)


def _read(stream: sources.Stream, frames) -> np.ndarray:
    try:
        return stream.read(frames)
    except video_io.VideoDecodeError as e:
        raise SkipSample("decode error", str(e)) from None


def _nan_cameras(num_frames: int) -> dict:
    return {"source_world_2_cam": np.full((4, 4), np.nan), "source_intrinsics": np.full((3, 3), np.nan),
            "target_world_2_cam": np.full((num_frames, 4, 4), np.nan),
            "target_intrinsics": np.full((num_frames, 3, 3), np.nan)}


# ---------------------------------------------------------------------------------------------
# Grain transforms.
# ---------------------------------------------------------------------------------------------

MAX_CONSECUTIVE_SKIPS = 200  # then the data is broken, not a few files: stop with an error
_consecutive = [0]


class _SkipOnFailure:
    """Turns SkipSample into a dropped sample (None), counted and logged. The pipeline
    repeats its sources forever, so if every sample fails it would spin silently: after
    MAX_CONSECUTIVE_SKIPS failures in a row this raises instead."""

    def _guarded(self, fn, *args):
        try:
            out = fn(*args)
        except SkipSample as e:
            _skip(e.reason, e.detail)
            with _skips_lock:
                _consecutive[0] += 1
                failing = _consecutive[0]
            if failing >= MAX_CONSECUTIVE_SKIPS:
                raise RuntimeError(
                    f"{failing} training samples in a row could not be built (last: {e}); "
                    f"skipped so far by reason: {skip_counts()}. Check the data paths, run "
                    "tools/prepare_dataset.py, or set data.detect_missing=True") from e
            return None
        with _skips_lock:
            _consecutive[0] = 0
        return out


@dataclasses.dataclass
class MultiShotStitch(grain.transforms.RandomMap, _SkipOnFailure):
    """Alg. 3: source camera, 1..max_shots time-aligned target shots, their anchor landmark
    maps; decodes only the frames used and crops them to [height, width]. ``target_cameras``
    (camera positions in the sequence as given): targets only from these, the source from the
    others; (): any camera for either."""
    height: int
    width: int
    max_shots: int = 4
    composite: bool = True  # read foreground masks for ScaleAndColour
    detect_missing: bool = False  # run MediaPipe for annotations that were not prepared
    target_cameras: tuple[int, ...] = ()
    # The camera kind reads FaceCam's landmark maps (``camera``); without them no face is needed
    # (ReCamMaster on MultiCamVideo scenes), ``camera`` is black and the landmarks NaN.
    landmark_maps: bool = True
    # ``target_landmarks`` per target frame (the target camera's own landmarks at each time; every
    # frame needs a face) instead of each shot's anchor held: FactorPortrait's driving signals.
    frame_landmarks: bool = False

    def random_map(self, record: dict, rng: np.random.Generator):
        return self._guarded(self._stitch, record, rng)

    def _stitch(self, record: dict, rng: np.random.Generator) -> dict:
        seq: sources.MultiViewSequence = record["sequence"]
        num_frames, start, stride = record["frames"], record["start"], record["stride"]
        times = start + stride * np.arange(num_frames)
        # Cameras whose anchor frame shows a face (or is unknown, when detecting on the fly).
        if self.landmark_maps:
            status = np.array([c.store.read_landmarks([start])[1][0] for c in seq.cameras])
        else:  # no maps to draw: every camera will do
            status = np.full(len(seq.cameras), store_lib.FOUND)
        usable = status == store_lib.FOUND
        if self.detect_missing:
            usable |= status == store_lib.NOT_COMPUTED
        eligible = np.flatnonzero(usable)
        if eligible.size == 0:
            if np.all(status == store_lib.NOT_COMPUTED):
                raise SkipSample("missing landmarks",
                                 f"{seq.name} has no prepared landmarks at frame {start}; run "
                                 "tools/prepare_dataset.py or set data.detect_missing=True")
            raise SkipSample("no face", f"no camera of {seq.name} shows a face at frame {start}")
        target_eligible = eligible
        if self.target_cameras:
            is_target = np.isin(np.arange(len(seq.cameras)), self.target_cameras)
            target_eligible = np.flatnonzero(usable & is_target)
            eligible = np.flatnonzero(usable & ~is_target)  # sources
            if eligible.size == 0 or target_eligible.size == 0:
                raise SkipSample("no face", f"{seq.name} at frame {start}: no target camera "
                                 f"{list(self.target_cameras)} or no other camera shows a face")
        source_cam = int(rng.choice(eligible))
        num_shots = int(rng.integers(1, self.max_shots + 1))
        num_shots = min(num_shots, target_eligible.size)
        targets = rng.choice(target_eligible, size=num_shots, replace=False).astype(np.int64)
        starts = augment.shot_starts(num_frames, num_shots)
        targets = targets[:len(starts)]
        shot = augment.shot_of_frame(num_frames, starts)  # [T]

        def load(cam: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            stream = seq.cameras[cam]
            crop = augment.cover_crop_params(stream.height, stream.width, self.height, self.width)
            raw = _read(stream, times[idx])
            frames = augment.apply_cover_crop(raw, crop, self.height, self.width)
            masks = None
            if self.composite:
                masks = augment.apply_cover_crop(_masks(stream, times[idx], raw, self.detect_missing),
                                                 crop, self.height, self.width)
            return frames, masks

        all_idx = np.arange(num_frames)
        source, source_mask = load(source_cam, all_idx)
        target = np.empty_like(source)
        target_mask = np.empty_like(source_mask) if self.composite else None
        camera = np.empty_like(source) if self.landmark_maps else np.zeros_like(source)
        landmarks = np.full((num_frames, NUM_LANDMARKS, 3), np.nan, np.float32)
        for k, cam in enumerate(targets):
            idx = np.flatnonzero(shot == k)
            if cam == source_cam:  # a shot from the source camera reuses its frames
                target[idx] = source[idx]
                if self.composite:
                    target_mask[idx] = source_mask[idx]
            else:
                target[idx], masks = load(int(cam), idx)
                if self.composite:
                    target_mask[idx] = masks
            if self.frame_landmarks:
                landmarks[idx] = self._frame_landmarks(seq.cameras[int(cam)], times[idx])
            if not self.landmark_maps:
                continue
            stream = seq.cameras[int(cam)]
            crop = augment.cover_crop_params(stream.height, stream.width, self.height, self.width)
            anchor = augment.cover_crop_points(_anchor_landmarks(stream, start, self.detect_missing), crop,
                                               self.height, self.width)
            if not self.frame_landmarks:
                landmarks[idx] = anchor
            camera[idx] = draw.draw_landmark_map(anchor, self.height, self.width)
        cameras = _nan_cameras(num_frames)
        if seq.frame_world_2_cam is not None:  # moving cameras: the source's at the clip start, the targets' per frame
            cameras["source_world_2_cam"] = seq.frame_world_2_cam[source_cam, times[0]]
            cameras["target_world_2_cam"] = seq.frame_world_2_cam[targets][shot, times]
        if seq.world_2_cam is not None:
            def cropped_k(cam):
                stream = seq.cameras[cam]
                crop = augment.cover_crop_params(stream.height, stream.width, self.height, self.width)
                return augment.cover_crop_intrinsics(seq.intrinsics[cam], stream.height, stream.width, crop)

            cameras["source_world_2_cam"] = seq.world_2_cam[source_cam]
            cameras["source_intrinsics"] = cropped_k(source_cam)
            per_shot_k = np.stack([cropped_k(int(c)) for c in targets])
            cameras["target_world_2_cam"] = seq.world_2_cam[targets][shot]
            cameras["target_intrinsics"] = per_shot_k[shot]
        return {
            "kind": sources.MULTIVIEW, "index": record["index"], "source": source,
            "target": target, "camera": camera, "source_mask": source_mask,
            "target_mask": target_mask, "target_landmarks": landmarks,
            "frame_index": times, "cameras": np.r_[source_cam, targets],
            "shot_starts": starts, "shot_index": shot, **cameras,
        }


    def _frame_landmarks(self, stream: sources.Stream, frames: np.ndarray) -> np.ndarray:
        """Prepared landmarks [n, 478, 3] of ``frames`` of one camera, in the crop; SkipSample
        unless every frame has a face."""
        points, status = stream.store.read_landmarks(frames)
        if np.any(status == store_lib.NO_FACE):
            raise SkipSample("no face", f"a frame of {frames.tolist()} of {stream.path} has no face")
        if np.any(status != store_lib.FOUND):
            raise SkipSample("missing landmarks", f"frames {frames.tolist()} of {stream.path} lack prepared "
                             "landmarks; run tools/prepare_dataset.py")
        crop = augment.cover_crop_params(stream.height, stream.width, self.height, self.width)
        return augment.cover_crop_points(points, crop, self.height, self.width)


@dataclasses.dataclass
class NormalMaps(grain.transforms.Map):
    """FactorPortrait's head-pose condition: the normal maps (``camera.normals``) of the target
    frames' face meshes as the target camera sees them, from ``target_landmarks`` (per frame,
    after the synthetic camera motion) -> ``normals`` uint8 [T, H, W, 3]."""

    def map(self, clip: dict) -> dict:
        height, width = clip["target"].shape[1:3]
        return {**clip, "normals": normals_lib.landmark_normal_maps(clip["target_landmarks"], height, width)}


@dataclasses.dataclass
class InTheWildPairing(grain.transforms.Map, _SkipOnFailure):
    """An in-the-wild video as its own pair: its first frames, cropped to [height, width]
    around the frame-0 nose tip, are both source and target; the condition is the frame-0
    landmark map, held for every frame (SyntheticCameraMotion then moves target and map)."""
    height: int
    width: int
    detect_missing: bool = False

    def map(self, record: dict):
        return self._guarded(self._pair, record)

    def _pair(self, record: dict) -> dict:
        stream: sources.Stream = record["stream"]
        num_frames = record["frames"]
        times = record["start"] + record["stride"] * np.arange(num_frames)
        anchor = _anchor_landmarks(stream, int(times[0]), self.detect_missing)
        nose = anchor[NOSE_TIP, :2]
        crop = augment.cover_crop_params(stream.height, stream.width, self.height, self.width,
                                         center=(float(nose[0]), float(nose[1])))
        frames = augment.apply_cover_crop(_read(stream, times), crop, self.height, self.width)
        anchor = augment.cover_crop_points(anchor, crop, self.height, self.width)
        condition = draw.draw_landmark_map(anchor, self.height, self.width)
        return {
            "kind": sources.WILD, "index": record["index"], "source": frames,
            "target": frames.copy(), "camera": np.broadcast_to(condition, frames.shape).copy(),
            "source_mask": None, "target_mask": None,
            "target_landmarks": np.broadcast_to(anchor, (num_frames,) + anchor.shape).copy(),
            "frame_index": times, "cameras": np.array([-1]), "shot_starts": np.array([0]),
            "shot_index": np.zeros((num_frames,), np.int64), **_nan_cameras(num_frames),
        }


@dataclasses.dataclass
class ScaleAndColour(grain.transforms.RandomMap):
    """Alg. 1: one random background colour behind source and target (where masks exist),
    and a still scale ~ U(scale_range) of the source at a random position."""
    scale_range: tuple[float, float] = (0.75, 1.25)

    def random_map(self, clip: dict, rng: np.random.Generator) -> dict:
        color = rng.integers(0, 256, size=3)
        scale = float(rng.uniform(*self.scale_range))
        position = rng.uniform(0.0, 1.0, size=2)
        clip = dict(clip)
        if clip["source_mask"] is not None:
            clip["source"] = augment.composite(clip["source"], clip["source_mask"], color)
            clip["target"] = augment.composite(clip["target"], clip["target_mask"], color)
            clip["background"] = color
        else:
            clip["background"] = np.full((3,), -1)
        num_frames, height, width = clip["source"].shape[:3]
        clip["source"] = augment.apply_zoom_pan(clip["source"], np.full((num_frames,), scale),
                                                np.broadcast_to(position, (num_frames, 2)))
        clip["source_scale"], clip["source_position"] = scale, position
        clip["source_intrinsics"] = augment.zoom_pan_intrinsics(clip["source_intrinsics"], scale,
                                                                position, height, width)
        return clip


@dataclasses.dataclass
class SyntheticCameraMotion(grain.transforms.RandomMap):
    """Alg. 2: one zoom/pan moving linearly from (s0, p0) to (s1, p1) over the clip, the same
    on the target frames and on their landmark maps (and their landmarks and intrinsics)."""
    scale_range: tuple[float, float] = (1.0, 1.25)

    def random_map(self, clip: dict, rng: np.random.Generator) -> dict:
        zoom = rng.uniform(*self.scale_range, size=2)  # start, end
        pan = rng.uniform(0.0, 1.0, size=(2, 2))  # start (x, y), end (x, y)
        clip = dict(clip)
        num_frames, height, width = clip["target"].shape[:3]
        scales = augment.linear_motion(zoom[0], zoom[1], num_frames)  # [T]
        positions = augment.linear_motion(pan[0], pan[1], num_frames)  # [T, 2]
        clip["target"] = augment.apply_zoom_pan(clip["target"], scales, positions)
        clip["camera"] = augment.apply_zoom_pan(clip["camera"], scales, positions)
        clip["target_landmarks"] = augment.zoom_pan_points(clip["target_landmarks"], scales, positions)
        clip["target_intrinsics"] = np.stack([
            augment.zoom_pan_intrinsics(k, s, p, height, width)
            for k, s, p in zip(clip["target_intrinsics"], scales, positions)])
        clip["zoom"], clip["pan"] = zoom, pan
        return clip


@dataclasses.dataclass
class ToSample(grain.transforms.Map):
    """The fixed output structure of a sample (every leaf a numeric array, so Grain can batch
    it): videos uint8 [T, H, W, 3] and metadata, padded to `max_shots` where it varies."""
    max_shots: int = 4
    extra: tuple[str, ...] = ()  # further entries passed on as they are (a camera kind's, e.g. normals)

    def map(self, clip: dict) -> dict:
        num_frames = clip["source"].shape[0]
        k = self.max_shots

        def pad(values, size, fill):
            out = np.full((size,), fill, np.int32)
            out[:len(values)] = values
            return out

        return {
            "source": clip["source"], "target": clip["target"], "camera": clip["camera"],
            "kind": np.int32(clip["kind"]), "index": np.int32(clip["index"]),
            "num_shots": np.int32(len(clip["shot_starts"])),
            "shot_starts": pad(clip["shot_starts"], k, -1),
            "shot_index": clip["shot_index"].astype(np.int32),
            "cameras": pad(clip["cameras"], k + 1, -1),
            "frame_index": clip["frame_index"].astype(np.int32),
            "background": np.asarray(clip["background"], np.int32),
            "source_scale": np.float32(clip["source_scale"]),
            "source_position": np.asarray(clip["source_position"], np.float32),
            "zoom": np.asarray(clip["zoom"], np.float32),
            "pan": np.asarray(clip["pan"], np.float32),
            "target_landmarks": clip["target_landmarks"].astype(np.float32),
            "source_world_2_cam": np.asarray(clip["source_world_2_cam"], np.float32),
            "source_intrinsics": np.asarray(clip["source_intrinsics"], np.float32),
            "target_world_2_cam": np.asarray(clip["target_world_2_cam"], np.float32).reshape(
                num_frames, 4, 4),
            "target_intrinsics": np.asarray(clip["target_intrinsics"], np.float32).reshape(
                num_frames, 3, 3),
            **{key: clip[key] for key in self.extra},
        }
