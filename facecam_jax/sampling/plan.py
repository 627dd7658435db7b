"""What ``python -m facecam_jax.sample`` does once its flags are read: the output's shape and
length from the flags and the source (``plan_output``), then read, generate and write
(``run``). Kept out of the entry module, which defines absl flags when imported.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import cv2
import numpy as np

from facecam_jax import conditioning
from facecam_jax.camera import animation, trajectories
from facecam_jax.camera import source as source_lib
from facecam_jax.camera.landmarks import NoFaceError
from facecam_jax.sampling.experts import weights_dir
from facecam_jax.sampling.program import window_layout
from facecam_jax.sampling.render import default_source_video, generate, side_by_side
from facecam_jax.video_io import probe, read_images, write_video

log = logging.getLogger(__name__)


def plan_output(config, video: str, *, frames: int | None = None, height: int | None = None,
                width: int | None = None, aspect: str | None = None):
    """The config ``run`` samples with: ``data.height`` / ``data.width`` from ``height`` / ``width``
    or, with ``aspect="source"``, the source's aspect ratio at the config's pixel budget; and
    the output's frame count (``frames``, default every frame of the source up to
    ``sample.max_frames``). Returns ``(config, frames)``; the given config is not changed."""
    config = config.copy_and_resolve_references()
    d = config.data
    if aspect not in (None, "config", "source"):
        raise ValueError(f"--aspect must be 'config' or 'source', got {aspect!r}")
    # The flags first, before the source is read; 0 is a value (refused), not "unset".
    source_lib.check_frames(frames, d.frames, config.sample.max_frames)
    if aspect == "source":
        if height is not None or width is not None:
            raise ValueError("--aspect source picks the size itself; drop --height / --width, or drop --aspect")
        info = probe(video)
        d.height, d.width = source_lib.fit_aspect(info.height, info.width, d.height, d.width)
        log.info("output %dx%d (the source's %dx%d aspect at the model's %d-pixel budget)", d.height, d.width,
                 info.height, info.width, config.data.height * config.data.width)
    else:
        d.height = d.height if height is None else height
        d.width = d.width if width is None else width
    source_lib.check_size(d.height, d.width)
    count = source_lib.frame_count(video, frames, d.frames, config.sample.max_frames)
    return config, count


def load_camera(kind, spec: str, frames: int, seed: int):
    """The camera path ``spec`` names over ``frames`` frames, in the form ``kind.make_condition``
    takes, and the official random parameters it was drawn with (None unless ``spec`` is
    ``random``: ``trajectories.seeded_random`` from the video's ``seed``)."""
    if spec == trajectories.RANDOM:
        return trajectories.seeded_random(seed, frames)
    return kind.load_trajectory(spec, frames), None


def run(config, *, video: str | None, trajectory: str, out: str, workdir: str | None, seed: int,
        fps: float = 24.0, require_face: bool = False, profile: str | None = None, frames: int | None = None,
        height: int | None = None, width: int | None = None, aspect: str | None = None) -> Sequence[str]:
    """The sampling script: reads, generates, writes ``out`` and ``<out>_compare.mp4``. Without
    ``workdir`` the weights in ``config.sample.weights`` (if any) are overlaid. ``frames`` /
    ``height`` / ``width`` / ``aspect``: the output's shape (``plan_output``); the trajectory
    is stretched over the whole output (``random``: drawn from ``seed``, ``load_camera``)."""
    video = video or default_source_video()
    config, count = plan_output(config, video, frames=frames, height=height, width=width, aspect=aspect)
    d = config.data
    windows = window_layout(config, count)
    clips = config.sample.extend == "clip"
    log.info("re-rendering %d frames at %dx%d: %s", count, d.height, d.width,
             "one window" if windows is None else
             f"{windows.count} clips of {d.frames} frames, each continuing from the last "
             f"{config.sample.context_frames} latent frames of the one before" if clips else
             f"{windows.count} windows of {d.frames} frames overlapping by {config.sample.window_overlap} latent "
             "frames, denoised jointly")
    source = source_lib.load_source(video, count, d.height, d.width, require_face=require_face)
    path, drawn = load_camera(conditioning.of(config), trajectory, count, seed)
    if drawn is not None:
        log.info("random camera from seed %d: %s", seed, ", ".join(f"{k} {v:.2f}" for k, v in drawn.items()))
    result = generate(config, source, path, workdir=weights_dir(config, workdir), seed=seed, profile=profile)
    compare = os.path.splitext(out)[0] + "_compare.mp4"
    write_video(out, result.video, fps)
    write_video(compare, side_by_side(result), fps)
    return out, compare


def load_reference(path: str, height: int, width: int) -> np.ndarray:
    """A portrait image cropped as a source video's first frame is (the official nose-centred
    cover crop): uint8 ``[H, W, 3]``; an image without a detectable face is a one-line error."""
    image = read_images([path])
    try:
        return source_lib.prepare_source(image, 1, height, width, require_face=True, name=f"image {path!r}")[0]
    except NoFaceError:
        raise NoFaceError(f"image {path!r} has no face MediaPipe can detect: FactorPortrait animates the face of "
                          "its reference image; give a portrait where the face is visible and reasonably "
                          "frontal") from None


def fit_into(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 frames ``[T, h, w, 3]`` scaled to fit ``height x width`` whole, black around them."""
    h, w = frames.shape[1:3]
    scale = min(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((len(frames), height, width, 3), np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    for t, frame in enumerate(frames):
        out[t, top:top + new_h, left:left + new_w] = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return out


def animate(config, *, image: str, driving: str, trajectory: str, out: str, workdir: str | None, seed: int,
            fps: float = 24.0, profile: str | None = None, frames: int | None = None) -> Sequence[str]:
    """FactorPortrait's sampling script (``camera.kind=factorportrait``): the portrait ``image``
    animated by the ``driving`` video's expressions and head motion along ``trajectory``; writes
    ``out`` and ``<out>_compare.mp4`` (reference | driving | normal maps | output). ``frames``:
    the model's window (``data.frames``), the only length it animates. Every input is read and
    checked before a model loads."""
    d = config.data
    if frames is not None and frames != d.frames:
        raise ValueError(f"--frames {frames}: FactorPortrait animates one window of data.frames={d.frames} frames "
                         f"(its reference frame first); drop --frames or set it to {d.frames}")
    count = d.frames
    reference = load_reference(image, d.height, d.width)
    motion = animation.load_driving(driving, count)
    path, drawn = load_camera(conditioning.of(config), trajectory, count, seed)
    if drawn is not None:
        log.info("random camera from seed %d: %s", seed, ", ".join(f"{k} {v:.2f}" for k, v in drawn.items()))
    log.info("animating %s by %d frames of %s at %dx%d along %s", image, count, driving, d.height, d.width, trajectory)
    result = generate(config, np.repeat(reference[None], count, 0), animation.Animation(path, motion),
                      workdir=weights_dir(config, workdir), seed=seed, profile=profile)
    compare = os.path.splitext(out)[0] + "_compare.mp4"
    write_video(out, result.video, fps)
    write_video(compare, np.concatenate([result.source, fit_into(motion.frames, d.height, d.width), result.condition,
                                         result.video], axis=2), fps)
    return out, compare
