"""The web page of ``python -m facecam_jax.app``: upload a portrait video (or take the bundled
clip), choose a trajectory (a canonical motion, ``random`` from the seed, the camera kind's
presets, or keyframes edited on the page), preview the camera condition, render, play and
download the result and its compare video.

``Studio`` is the page's logic without Gradio (what the handlers call): it prepares videos as
``sample`` does (``sampling.session.prepare``), loads the models once, at the first render
(``Session``), renders one video at a time, and writes every file atomically into its own
folder of ``out_dir``. A user's mistake (no face, an unreadable or too large file, a bad
keyframe) is a ``gr.Error`` message on the page, never a traceback. Gradio is imported only
here (the ``app`` extra).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import time

import gradio as gr

from facecam_jax import conditioning
from facecam_jax.camera import trajectories
from facecam_jax.runtime.cli import EXPECTED_ERRORS, message
from facecam_jax.sampling.batch import write_json_atomic, write_video_atomic
from facecam_jax.sampling.render import Result, default_source_video, side_by_side
from facecam_jax.sampling.session import Session, prepare

log = logging.getLogger(__name__)

KEYFRAMES = "keyframes (the table below)"
KEY_COLUMNS = ("t", "azimuth", "elevation", "fov", "shift_x", "shift_y")
DEFAULT_KEYS = [[0.0, 0.0, 0.0, 40.0, 0.0, 0.0], [1.0, -25.0, 10.0, 35.0, 0.0, 0.0]]
MAX_UPLOAD_MB = 200
FPS = 24.0
# Presets of the ReCamMaster camera files, for the kinds that read them.
PRESETS = tuple(f"cam{i:02d}" for i in range(1, 11))


class Studio:
    """What the page does, for one config (one model): preview and render. Thread-safe: renders
    take a lock (one at a time per model), previews do not need the model."""

    def __init__(self, config, *, workdir: str | None, out_dir: str, max_upload_mb: float = MAX_UPLOAD_MB):
        self.config, self.workdir, self.out_dir = config, workdir, out_dir
        self.kind = conditioning.of(config)
        self.max_upload_mb = max_upload_mb
        self._session: Session | None = None
        self._lock = threading.Lock()
        self._count = itertools.count(1)

    def trajectories(self) -> list[str]:
        """The page's trajectory choices for this camera kind."""
        presets = list(PRESETS) if self.kind.name in ("recammaster", "plucker") else []
        return [*trajectories.CANONICAL_MOTIONS, trajectories.RANDOM, *presets, KEYFRAMES]

    def _spec(self, choice: str, keys, folder: str) -> str:
        """A trajectory spec ``prepare`` reads: the choice, or the keyframes written to a file."""
        if choice != KEYFRAMES:
            if choice not in self.trajectories():
                raise ValueError(f"unknown trajectory {choice!r}; choose one of {', '.join(self.trajectories())}")
            return choice
        rows = [row for row in _table_rows(keys) if any(str(v).strip() for v in row)]
        try:
            keyframes = [{k: float(v) for k, v in zip(KEY_COLUMNS, row) if str(v).strip() != ""} for row in rows]
        except ValueError as e:
            raise ValueError(f"a keyframe holds something that is not a number ({e}); every cell is a number") from None
        spec = {"interpolation": "ease", "keyframes": keyframes}
        trajectories.load_trajectory(spec, 9)  # the keyframes' own errors, before the video is read
        path = os.path.join(folder, "trajectory.json")
        write_json_atomic(path, spec)
        return path

    def _video(self, video: str | None) -> str:
        video = video or default_source_video()
        if not os.path.isfile(video):
            raise FileNotFoundError(f"the video {os.path.basename(video)!r} did not arrive; upload it again")
        size_mb = os.path.getsize(video) / 2**20
        if size_mb > self.max_upload_mb:
            raise ValueError(f"the video is {size_mb:.0f} MB, more than this page takes ({self.max_upload_mb:.0f} MB); "
                             "trim it, or use python -m facecam_jax.sample")
        return video

    def folder(self) -> str:
        """A new folder of ``out_dir`` for one request's files."""
        folder = os.path.join(self.out_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._count)}")
        os.makedirs(folder, exist_ok=True)
        return folder

    def _prepare(self, video, choice, keys, seed, frames, folder):
        return prepare(self.config, self._video(video), self._spec(choice, keys, folder), int(seed),
                       frames=int(frames) if frames else None, require_face=True)

    def preview(self, video: str | None, choice: str, keys, seed, frames) -> tuple[str, str]:
        """The camera condition as a video (no model needed) and a line on the camera."""
        folder = self.folder()
        prepared = self._prepare(video, choice, keys, seed, frames, folder)
        path = os.path.join(folder, "camera.mp4")
        write_video_atomic(path, prepared.preview, FPS)
        return path, _describe(prepared)

    def render(self, video: str | None, choice: str, keys, seed, frames, progress=None) -> tuple[str, str, str]:
        """(result, compare video, a line on what was done)."""
        step = progress or (lambda *_, **__: None)
        step(0.0, desc="reading the video")
        folder = self.folder()
        prepared = self._prepare(video, choice, keys, seed, frames, folder)
        with self._lock:  # one render at a time per model
            if self._session is None:
                step(0.05, desc="loading the model (once)")
                self._session = Session(self.config, workdir=self.workdir)
            step(0.1, desc="rendering")
            t0 = time.perf_counter()
            result = self._session.render([prepared])[0]
            seconds = time.perf_counter() - t0
        out, compare = os.path.join(folder, "facecam.mp4"), os.path.join(folder, "facecam_compare.mp4")
        write_video_atomic(out, result, FPS)
        write_video_atomic(compare, side_by_side(Result(result, prepared.source, prepared.preview)), FPS)
        return out, compare, f"rendered in {seconds:.1f} s; {_describe(prepared)}"


def _table_rows(keys) -> list[list]:
    """The keyframe table's rows (a pandas DataFrame from the page, a dict or lists from the API)."""
    if keys is None:
        return []
    if hasattr(keys, "values") and hasattr(keys, "columns"):  # pandas
        return keys.values.tolist()
    if isinstance(keys, dict):
        return list(keys.get("data", []))
    return [list(row) for row in keys]


def _describe(prepared) -> str:
    t, h, w = prepared.shape
    text = f"{t} frames at {h}x{w}, seed {prepared.seed}"
    if prepared.drawn:
        text += "; random camera: " + ", ".join(f"{k} {v:.1f}" for k, v in prepared.drawn.items())
    return text


def _guarded(fn):
    """A handler whose expected errors are a message on the page (``gr.Error``), not a traceback."""
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED_ERRORS as e:
            text = message(e)
            for arg in args:  # an upload's path is Gradio's temporary copy: the page names the file
                if isinstance(arg, str) and os.path.isabs(arg) and arg in text:
                    text = text.replace(arg, os.path.basename(arg))
            log.info("the page's request failed: %s", text)
            raise gr.Error(text, print_exception=False) from None
    handler.__name__ = fn.__name__
    return handler


def build_page(studio: Studio) -> gr.Blocks:
    """The page: inputs on the left, the preview and the results on the right."""
    d = studio.config.data
    with gr.Blocks(title="FaceCam") as page:
        gr.Markdown(f"# FaceCam: move the camera of a portrait video\nCamera kind **{studio.kind.name}**, "
                    f"output {d.height}x{d.width}. Upload a video with a face in its first frame, or use the "
                    "bundled clip; pick a trajectory; preview the camera; render.")
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="portrait video", sources=["upload"], elem_id="source")
                bundled = gr.Button("use the bundled clip", elem_id="bundled")
                choice = gr.Dropdown(studio.trajectories(), value="arc_left", label="trajectory",
                                     elem_id="trajectory")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, label="seed (noise; random camera)", elem_id="seed")
                    frames = gr.Number(d.frames, precision=0, minimum=1, label="frames (4k + 1)", elem_id="frames")
                keys = gr.Dataframe(DEFAULT_KEYS, headers=list(KEY_COLUMNS), datatype="number", column_count=(6, "fixed"),
                                    label="keyframes: t in [0, 1], degrees, shift in render sizes", elem_id="keys")
                with gr.Row():
                    preview_button = gr.Button("preview camera", elem_id="preview")
                    render_button = gr.Button("render", variant="primary", elem_id="render")
            with gr.Column():
                camera = gr.Video(label="camera condition", interactive=False, elem_id="camera")
                status = gr.Markdown(elem_id="status")
                result = gr.Video(label="result", interactive=False, elem_id="result")
                compare = gr.Video(label="source | camera | result", interactive=False, elem_id="compare")

        def use_bundled():  # a copy the page may serve (Gradio serves its folders only)
            path = os.path.join(studio.folder(), "carphone.mp4")
            shutil.copyfile(default_source_video(), path)
            return path

        def render(video, choice, keys, seed, frames, progress=gr.Progress(track_tqdm=True)):
            return studio.render(video, choice, keys, seed, frames, progress=progress)

        inputs = [video, choice, keys, seed, frames]
        bundled.click(use_bundled, None, video, api_name="bundled")
        preview_button.click(_guarded(studio.preview), inputs, [camera, status], api_name="preview",
                             concurrency_limit=2)
        render_button.click(_guarded(render), inputs, [result, compare, status], api_name="render",
                            concurrency_limit=1, concurrency_id="model")
    return page
