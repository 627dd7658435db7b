"""The camera condition of a trajectory: the proxy head's landmarks along it, drawn as the
official landmark-map video (paper 3.3, SPEC 5), framed officially or on the source face."""

from __future__ import annotations

import logging

import numpy as np

from facecam_jax.camera import draw, landmarks, trajectories

log = logging.getLogger(__name__)


def build_condition(trajectory: trajectories.Trajectory, *, height: int, width: int, framing: str,
                    source_frames: np.ndarray | None = None) -> np.ndarray:
    """The condition video uint8 [T, H, W, 3] of a trajectory (source frames needed for framing='source').

    framing='source' on a source whose first frame shows no face (which ``camera.source`` has
    already centre-cropped, with a warning) falls back to the official framing, with a warning:
    there is no source camera to start from."""
    source_landmarks = None
    if framing == "source":
        if source_frames is None:
            raise ValueError("--framing source needs --video: the source camera is estimated from its first frame")
        try:
            source_landmarks = landmarks.detect_one(source_frames[0])
        except landmarks.NoFaceError:
            log.warning("framing='source' needs a face in the source's first frame and it has none: the "
                        "condition uses the official framing (the proxy head centred in the top square)")
            framing = "official"
    points = trajectories.condition_landmarks(trajectory, height=height, width=width, framing=framing,
                                              source_landmarks=source_landmarks)
    return draw.draw_landmark_maps(points, height, width)
