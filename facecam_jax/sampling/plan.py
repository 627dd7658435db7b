"""What ``python -m facecam_jax.sample`` does once its flags are read: the output's shape and
length from the flags and the source (``plan_output``), then read, generate and write
(``run``). Kept out of the entry module, which defines absl flags when imported.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

from facecam_jax import conditioning
from facecam_jax.camera import source as source_lib
from facecam_jax.camera import trajectories
from facecam_jax.sampling.experts import weights_dir
from facecam_jax.sampling.program import window_layout
from facecam_jax.sampling.render import default_source_video, generate, side_by_side
from facecam_jax.video_io import probe, write_video

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
