"""FaceCam's camera (paper 3.3, SPEC 2 and 5): rasterized MediaPipe landmark maps of the target
view, VAE-encoded like any video and concatenated on channels with the noisy target and the
source, the two halves joined along frames (``wan_dit.facecam_input``).

Training batches carry the landmark-map video as ``camera`` (drawn by the data pipeline's
multi-shot stitching); sampling draws the proxy head's landmarks along the trajectory
(``camera.condition``). The patch embedding is widened to ``model.in_dim`` (36: noisy 16,
camera 16, zeros 4) with zero-initialised new channels, and trained with the self-attention.
"""

from __future__ import annotations

import numpy as np

from facecam_jax.camera.condition import build_condition
from facecam_jax.conditioning.base import CameraKind
from facecam_jax.models import wan_dit


class Landmarks(CameraKind):
    name = "landmarks"
    batch_videos = ("camera",)

    def prepare(self, model, config):
        if config.model.in_dim > model.config.in_dim:
            wan_dit.widen_patch_embedding(model, config.model.in_dim)
        return model

    def input_frames(self, frames: int) -> int:
        return 2 * frames  # target half, then source half

    def dit_input(self, model, noisy, source, condition):
        return wan_dit.facecam_input(model, noisy, condition["camera"], source)

    def make_condition(self, trajectory, *, height, width, framing, source_frames) -> dict[str, np.ndarray]:
        return {"camera": build_condition(trajectory, height=height, width=width, framing=framing,
                                          source_frames=source_frames)}


KIND = Landmarks()
