"""The camera condition of a trajectory: the proxy head's landmarks along it, drawn as the
official landmark-map video (paper 3.3, SPEC 5), framed officially or on the source face."""

from __future__ import annotations

import numpy as np

from facecam_jax.camera import draw, landmarks, trajectories


def build_condition(trajectory: trajectories.Trajectory, *, height: int, width: int, framing: str,
                    source_frames: np.ndarray | None = None) -> np.ndarray:
    """The condition video uint8 [T, H, W, 3] of a trajectory (source frames needed for framing='source')."""
    source_landmarks = None
    if framing == "source":
        if source_frames is None:
            raise ValueError("--framing source needs --video: the source camera is estimated from its first frame")
        source_landmarks = landmarks.detect_one(source_frames[0])
    points = trajectories.condition_landmarks(trajectory, height=height, width=width, framing=framing,
                                              source_landmarks=source_landmarks)
    return draw.draw_landmark_maps(points, height, width)
