"""Models loaded once, many videos rendered: what batch mode (``sampling.batch``) and the web
app (``facecam_jax.app``) share with the one-video script.

``prepare`` reads one video and its camera (cheap, no model: the app's preview, batch mode's
per-video checks); ``Session`` loads the experts, the VAE and the text contexts on a mesh once
and renders prepared videos of one shape together (``render.render``'s batch, over the data
axis of the mesh)::

    session = Session(config, workdir=None)
    video = session.render([prepare(config, "in.mp4", "arc_left", seed=0)])[0]
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from facecam_jax import build, conditioning
from facecam_jax import sharding as sh
from facecam_jax.camera import source as source_lib
from facecam_jax.sampling.experts import check_options, load_experts, place_experts, weights_dir
from facecam_jax.sampling.plan import load_camera, plan_output
from facecam_jax.sampling.render import contexts, render

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One video read and its camera drawn, ready to render."""

    config: object  # the run's config at this video's size (``plan_output``)
    source: np.ndarray  # uint8 [T, H, W, 3], preprocessed as the release does
    condition: dict  # the camera kind's raw condition (``CameraKind.make_condition``)
    preview: np.ndarray  # uint8 [T, H, W, 3]: the condition as a video (``CameraKind.preview``)
    seed: int
    drawn: dict | None  # the official random camera parameters (``--trajectory random``), else None

    @property
    def shape(self) -> tuple[int, ...]:
        """What videos must share to be rendered together: frames, height, width."""
        return self.source.shape[:3]


def prepare(config, video: str, trajectory: str, seed: int, *, frames: int | None = None,
            height: int | None = None, width: int | None = None, aspect: str | None = None,
            require_face: bool = False) -> Prepared:
    """Reads ``video`` as ``sample`` does (``plan_output``, ``load_source``) and makes the camera
    condition along ``trajectory`` (``load_camera``: a name, a file, or ``random`` from ``seed``).
    Raises the expected errors of a bad video or trajectory; loads no model."""
    config, count = plan_output(config, video, frames=frames, height=height, width=width, aspect=aspect)
    d = config.data
    source = source_lib.load_source(video, count, d.height, d.width, require_face=require_face)
    kind = conditioning.of(config)
    camera, drawn = load_camera(kind, trajectory, count, seed)
    raw = kind.make_condition(camera, height=d.height, width=d.width, framing=config.sample.framing,
                              source_frames=source)
    return Prepared(config, source, raw, kind.preview(raw, source), int(seed), drawn)


class Session:
    """The experts, the VAE and the text contexts of ``config`` on a mesh of ``devices``
    (default: every device; a batch process passes its local ones), loaded once."""

    def __init__(self, config, *, workdir: str | None = None, devices=None):
        if config.text.embeddings and not os.path.exists(config.text.embeddings):  # before any model loads
            raise FileNotFoundError(f"text.embeddings {config.text.embeddings!r} does not exist "
                                    "(write it with tools/encode_prompt.py, or set it to '' for the zero context)")
        self.config = config
        self.mesh, self.rules = build.mesh_and_rules(config, devices)
        check_options(config, self.mesh, build.num_experts(config))
        with sh.use_mesh(self.mesh, self.rules):
            experts = load_experts(config, self.mesh, self.rules, weights_dir(config, workdir))
            self.experts = place_experts(experts, self.mesh, self.rules, config.sample.offload)
            self.vae = build.build_vae(config, self.mesh)
            self.contexts = contexts(config, self.experts)

    @property
    def batch(self) -> int:
        """Videos rendered together: one per slice of the mesh's data axis."""
        return max(1, int(self.mesh.shape.get("data", 1)))

    def render(self, videos: Sequence[Prepared], *, show_progress: bool = True,
               profile: str | None = None) -> np.ndarray:
        """Re-renders prepared videos of one shape -> uint8 ``[N, T, H, W, 3]`` (video k's noise
        from its seed, whatever else is in the batch)."""
        if not videos or len({v.shape for v in videos}) != 1:
            raise ValueError(f"render takes videos of one shape, got {[v.shape for v in videos]}")
        raw = {key: np.stack([v.condition[key] for v in videos]) for key in videos[0].condition}
        with sh.use_mesh(self.mesh, self.rules):
            return render(videos[0].config, self.experts, self.vae, np.stack([v.source for v in videos]), raw,
                          [v.seed for v in videos], mesh=self.mesh, contexts_=self.contexts, batch=len(videos),
                          show_progress=show_progress, profile=profile)
