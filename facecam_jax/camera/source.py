"""Source-video preprocessing as the official inference does it (SPEC 5).

The release (`load_video` + `crop_video`): keep every k-th frame with k = max(1, int(fps / 24))
until 81 frames are read, resize so the frame covers 704x480 (scale = max(H / h, W / w),
sizes truncated to int, OpenCV bilinear), crop H x W centred on the nose tip (landmark 4) of
frame 0 and clamped to the image (centre crop when no face is found), and pad to 81 frames by
repeating the last frame. Differences: the release hands OpenCV's BGR frame 0 to MediaPipe as
if it were RGB; we detect on RGB, which can move the nose estimate, and so the crop, by a pixel
or two. And where the release centre-crops silently, we warn (or raise with ``require_face``).
"""

from __future__ import annotations

import logging
import math
import os

import cv2
import numpy as np

from facecam_jax import options
from facecam_jax.camera import landmarks as lm
from facecam_jax.video_io import probe, read_video

log = logging.getLogger(__name__)

TARGET_FPS = 24


def official_stride(fps: float, target_fps: float = TARGET_FPS) -> int:
    """The release's frame step for reaching ~24 fps: max(1, int(fps / 24)), 1 for unknown fps."""
    return max(1, int(fps / target_fps)) if fps > 0 else 1


def crop_window(frame: np.ndarray, height: int, width: int, *, require_face: bool = False,
                name: str = "the source video") -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left) of the official nose-centred cover crop of one RGB frame.

    Without a face the crop is centred, as the release does, with a warning naming ``name``;
    ``require_face=True`` raises ``NoFaceError`` instead.
    """
    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    resized = cv2.resize(frame, (new_w, new_h))
    try:
        nose = lm.detect_one(resized)[lm.NOSE_TIP]
        centre_x, centre_y = int(nose[0] * new_w), int(nose[1] * new_h)
    except lm.NoFaceError:
        if require_face:
            raise lm.NoFaceError(
                f"{name} has no detectable face in its first frame (FaceCam crops around the face and "
                "conditions on it); give a video whose first frame shows a face") from None
        log.warning("%s has no detectable face in its first frame: the crop falls back to the centre "
                    "of the frame and the result may miss the face (require_face / --require_face "
                    "makes this an error)", name)
        centre_x, centre_y = new_w // 2, new_h // 2  # the release's fallback: a centre crop
    left = min(max(0, centre_x - width // 2), new_w - width) if new_w > width else 0
    top = min(max(0, centre_y - height // 2), new_h - height) if new_h > height else 0
    return new_h, new_w, top, left


def prepare_source(frames: np.ndarray, num_frames: int = 81, height: int = 704,
                   width: int = 480, *, require_face: bool = False, name: str = "the source video") -> np.ndarray:
    """Official crop of already-subsampled RGB frames [T, h, w, 3] -> [num_frames, H, W, 3].

    Frames beyond num_frames are dropped; a short clip is padded with its last frame. No face
    in frame 0: see ``crop_window``.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected RGB frames [T, H, W, 3] with T >= 1, got {frames.shape}")
    frames = frames[:num_frames]
    new_h, new_w, top, left = crop_window(frames[0], height, width, require_face=require_face, name=name)
    out = np.stack([cv2.resize(f, (new_w, new_h))[top:top + height, left:left + width] for f in frames])
    if len(out) < num_frames:
        out = np.concatenate([out, np.repeat(out[-1:], num_frames - len(out), 0)])
    return out


def load_source(path: str | os.PathLike, num_frames: int = 81, height: int = 704, width: int = 480, *,
                require_face: bool = False) -> np.ndarray:
    """A source video file preprocessed as the release does: uint8 RGB [num_frames, H, W, 3].

    When its first frame has no detectable face the crop is centred with a warning, or
    ``NoFaceError`` is raised with ``require_face=True``.
    """
    fps = probe(os.fspath(path)).fps
    frames, _ = read_video(path, max_frames=num_frames, stride=official_stride(fps))
    return prepare_source(frames, num_frames, height, width, require_face=require_face,
                          name=f"video {os.fspath(path)!r}")


def available_frames(path: str | os.PathLike) -> int:
    """How many frames ``load_source`` can read from a video (its frames at the official stride)."""
    info = probe(os.fspath(path))
    return -(-info.num_frames // official_stride(info.fps))


def check_frames(requested: int | None, window: int, maximum: int) -> None:
    """A ``--frames`` value (None: not given) is ``1 + 4k``, at most ``maximum``
    (``sample.max_frames``) and no shorter than the model's ``window`` (``data.frames``):
    ``options.frames_flag_problem``, the rule ``data.frames`` passes too."""
    if requested is not None:
        problem = options.frames_flag_problem("--frames", requested, window=window, maximum=maximum,
                                              limit="sample.max_frames")
        if problem:
            raise ValueError(problem)


def frame_count(path: str | os.PathLike, requested: int | None, window: int, maximum: int) -> int:
    """The output length for a source video: ``requested`` (checked by ``check_frames``), or every
    frame the source has, cut to 4k + 1 and to ``maximum``, and at least the model's ``window``
    (a shorter source is padded with its last frame, as the release pads, with a warning)."""
    check_frames(requested, window, maximum)
    have = available_frames(path)
    if requested is not None:
        count = requested
    else:
        count = min(have, maximum)
        count = 4 * ((count - 1) // 4) + 1
        if count != have:
            log.info("the source has %d frames; re-rendering the first %d (4k + 1%s)", have, count,
                     f", at most sample.max_frames={maximum}" if have > maximum else "")
        count = max(count, window)
    if have < count:
        log.warning("%s has %d frames, fewer than the %d asked for: its last frame is repeated to fill them",
                    os.fspath(path), have, count)
    return count


def check_size(height: int, width: int) -> None:
    """An output size is positive multiples of 16 (the VAE's 8 x the DiT's 2 x 2 patches), at
    most ``options.MAX_SIZE``: ``options.size_flag_problem``, the rule ``data.height`` /
    ``data.width`` pass too."""
    for name, value in (("--height", height), ("--width", width)):
        problem = options.size_flag_problem(name, value)
        if problem:
            raise ValueError(problem)


def fit_aspect(source_height: int, source_width: int, height: int, width: int) -> tuple[int, int]:
    """The size (multiples of 16) nearest the source's aspect ratio with about ``height x width``
    pixels, the model's token budget: a landscape source stays landscape."""
    ratio = source_width / source_height
    h = math.sqrt(height * width / ratio)
    h16 = max(16, int(round(h / 16)) * 16)
    w16 = max(16, int(round(h16 * ratio / 16)) * 16)
    return h16, w16