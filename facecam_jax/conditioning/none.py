"""No camera at all: the floor of the comparison of camera representations (bench/camera_kinds.py).

The DiT sees what the other re-rendering kinds see but the camera: target and source latents
concatenated along frames (16 channels, ``wan_dit.recammaster_input``), no extra layers. What
it renders can follow only what the training pairs have in common (the source video, the
text); a kind that beats it has learned something from its camera.
"""

from __future__ import annotations

from facecam_jax.conditioning.base import CameraKind
from facecam_jax.models import wan_dit


class NoCamera(CameraKind):
    name = "none"
    has_null_camera = True  # every condition is the null camera

    def input_frames(self, frames: int) -> int:
        return 2 * frames  # target half, then source half

    def dit_input(self, model, noisy, source, condition):
        return wan_dit.recammaster_input(model, noisy, source)

    def make_condition(self, trajectory, *, height, width, framing, source_frames):
        return {}


KIND = NoCamera()
