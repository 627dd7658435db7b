"""MediaPipe face-mesh landmarks (478 points: 468 mesh + 10 iris) for frames and stills.

FaceCam's camera condition is drawn from these landmarks (SPEC 5). We use the legacy
`mediapipe.solutions.face_mesh` graph with `refine_landmarks=True` because mediapipe 0.10.21
ships its models inside the wheel, so detection runs offline with no model download.
mediapipe is imported inside the functions so this module imports without it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np

from facecam_jax.errors import NoFaceError

# mediapipe 0.10.21 declares a stale numpy<2 pin (it runs bit-identically on numpy 2), so it is
# installed in a separate step without its dependencies; setup.py lists what it needs.
MEDIAPIPE_INSTALL = "pip install --no-deps mediapipe==0.10.21"

NUM_LANDMARKS = 478
NOSE_TIP = 4  # the landmark the official source crop centres on (SPEC 5)
LEFT_IRIS_CENTER = 473  # subject's left eye (image right in a frontal view)
RIGHT_IRIS_CENTER = 468


def mediapipe_solution(name: str, purpose: str):
    """``mediapipe.python.solutions.<name>``, or an ImportError that says how to install it."""
    try:
        return importlib.import_module(f"mediapipe.python.solutions.{name}")
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs MediaPipe, which is not installed (or failed to import: {e}); "
            f"install it with `{MEDIAPIPE_INSTALL}` (the README's set-up commands do)") from e


def _as_frames(frames: np.ndarray) -> np.ndarray:
    """Validates uint8 RGB input and returns it as a contiguous [T, H, W, 3] array."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected RGB frames of shape [T, H, W, 3] or one image [H, W, 3], got {frames.shape}; "
            "grayscale or RGBA input must be converted to RGB first"
        )
    if frames.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 RGB frames (0..255), got dtype {frames.dtype}; "
            "convert with np.clip(x * 255, 0, 255).astype(np.uint8) for float images in [0, 1]"
        )
    if frames.shape[0] == 0:
        raise ValueError("got 0 frames; pass at least one frame")
    return np.ascontiguousarray(frames)


def detect(frames: np.ndarray, *, static: bool = False,
           min_detection_confidence: float = 0.5,
           min_tracking_confidence: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Face-mesh landmarks of every frame.

    Args:
      frames: uint8 RGB, [T, H, W, 3] (a video) or [H, W, 3] (one image, treated as T=1).
      static: True treats frames as unrelated stills (a fresh face detection on each);
        False tracks the face from frame to frame, as MediaPipe does for videos.
      min_detection_confidence, min_tracking_confidence: MediaPipe's thresholds (its
        defaults, which the official release uses).

    Returns:
      landmarks: float32 [T, 478, 3], normalized: x, y in [0, 1] image coordinates (they can
        leave [0, 1] for a face near the border), z MediaPipe's relative depth in units of
        the image width. Rows of frames without a face are NaN.
      found: bool [T], True where a face was found.

    Raises:
      NoFaceError: no frame has a detectable face.
    """
    face_mesh = mediapipe_solution("face_mesh", "face-landmark detection")  # lazy: a heavy import

    frames = _as_frames(frames)  # [T, H, W, 3]
    num_frames = frames.shape[0]
    landmarks = np.full((num_frames, NUM_LANDMARKS, 3), np.nan, np.float32)
    found = np.zeros((num_frames,), bool)
    with face_mesh.FaceMesh(static_image_mode=static, max_num_faces=1, refine_landmarks=True,
                            min_detection_confidence=min_detection_confidence,
                            min_tracking_confidence=min_tracking_confidence) as mesh:
        for t in range(num_frames):
            result = mesh.process(frames[t])
            if not result.multi_face_landmarks:
                continue
            points = result.multi_face_landmarks[0].landmark
            landmarks[t] = [(p.x, p.y, p.z) for p in points]
            found[t] = True
    if not found.any():
        height, width = frames.shape[1:3]
        raise NoFaceError(
            f"none of the {num_frames} frame(s) ({height}x{width}) has a face MediaPipe can detect; "
            "pass a video or image where a face is visible and reasonably frontal "
            "(a face turned away, too small, or too dark is not detected)"
        )
    return landmarks, found


def detect_one(image: np.ndarray) -> np.ndarray:
    """Landmarks [478, 3] of a single still image (static mode); NoFaceError if none."""
    landmarks, _ = detect(image, static=True)
    return landmarks[0]


def detect_stills(frames: np.ndarray, indices: Sequence[int]) -> dict[int, np.ndarray | None]:
    """Landmarks [478, 3] of the frames at `indices` (each a still), None where no face is found."""
    indices = sorted(set(int(i) for i in indices))
    try:
        points, found = detect(frames[indices], static=True)
    except NoFaceError:
        return dict.fromkeys(indices)
    return {i: (points[k] if found[k] else None) for k, i in enumerate(indices)}
