"""Identity similarity of source and output faces: cosine similarity of dlib's face-recognition ResNet embeddings.

Optional: dlib and face_recognition_models come with the eval extra; without them `identity_model` is None.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
from collections.abc import Mapping

import numpy as np

from facecam_jax.camera import landmarks as lm

log = logging.getLogger(__name__)

IDENTITY_FRAMES = 8  # frames, evenly spaced, whose faces the identity score averages over
IDENTITY_UNAVAILABLE = "n/a (install the eval extra: pip install -e '.[eval]')"


def _face_models_dir() -> str:
    # Located without importing the package: its __init__ imports pkg_resources, which
    # setuptools >= 81 no longer ships.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face_recognition_models is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


class IdentityModel:
    """dlib's face-recognition ResNet (128-d embeddings) with its 5-point alignment.

    Faces are found by MediaPipe (already run for camera correctness), not by dlib's HOG
    detector: HOG misses small faces (carphone's ~50 px face in some frames) and turned ones (an
    arc's end), which would silently drop exactly the frames that matter. A square box around
    the MediaPipe landmarks, sized like dlib's detector boxes, seeds dlib's 5-point shape
    predictor, which aligns the face chip the ResNet was trained on.
    """

    def __init__(self):
        import dlib

        models = _face_models_dir()
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(self, frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """Embedding float64 [128] of the face at MediaPipe `landmarks` [478, 2|3] in `frame` [H, W, 3] uint8 RGB."""
        height, width = frame.shape[:2]
        xy = np.asarray(landmarks, np.float64)[:, :2] * [width, height]
        (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
        # dlib's frontal-detector boxes are squares ~0.9x the mean side of the landmark box
        # (measured on carphone and astronaut: the 5-point fit is the same within 0.15 in distance).
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 0.45 * ((x1 - x0) + (y1 - y0)) / 2
        box = self._dlib.rectangle(int(round(cx - half)), int(round(cy - half)),
                                   int(round(cx + half)), int(round(cy + half)))
        frame = np.ascontiguousarray(frame)
        return np.asarray(self._net.compute_face_descriptor(frame, self._predictor(frame, box)), np.float64)


@functools.lru_cache(maxsize=1)
def identity_model() -> IdentityModel | None:
    """The shared identity model, or None when dlib / face_recognition_models are not installed."""
    try:
        return IdentityModel()
    except ImportError as e:
        log.warning("identity similarity is off: %s; %s", e, IDENTITY_UNAVAILABLE)
        return None


def identity_frame_indices(num_frames: int, count: int = IDENTITY_FRAMES) -> list[int]:
    """`count` evenly spaced frame indices, first and last included."""
    return sorted(set(np.linspace(0, num_frames - 1, max(1, min(count, num_frames))).round().astype(int).tolist()))


@dataclasses.dataclass(frozen=True)
class IdentityResult:
    similarity: float  # mean cosine similarity of output faces to the source's mean embedding
    distance: float  # mean Euclidean distance of the same (dlib's same-person threshold: 0.6)
    frames: int  # output frames with a face that entered the mean


def identity_from_detections(model: IdentityModel, source_frames: np.ndarray,
                             source_marks: Mapping[int, np.ndarray | None], output_frames: np.ndarray,
                             output_marks: Mapping[int, np.ndarray | None]) -> IdentityResult:
    """Identity of the faces found at the detections (`lm.detect_stills`); ValueError when either video has none."""
    source_emb = [model.embed(source_frames[i], p) for i, p in source_marks.items() if p is not None]
    output_emb = [model.embed(output_frames[i], p) for i, p in output_marks.items() if p is not None]
    if not source_emb or not output_emb:
        which = "source" if not source_emb else "output"
        raise ValueError(f"no face found in the {which}'s frames {sorted(source_marks)}")
    reference = np.mean(source_emb, 0)  # [128]
    output_emb = np.stack(output_emb)  # [N, 128]
    cosine = output_emb @ reference / (np.linalg.norm(output_emb, axis=-1) * np.linalg.norm(reference))
    distance = np.linalg.norm(output_emb - reference, axis=-1)
    return IdentityResult(float(cosine.mean()), float(distance.mean()), len(output_emb))


def identity_similarity(source_frames: np.ndarray, output_frames: np.ndarray, *,
                        frames: int = IDENTITY_FRAMES, model: IdentityModel | None = None) -> IdentityResult:
    """Identity similarity of the faces in two videos [T, H, W, 3] (or images [H, W, 3]).

    `frames` evenly spaced frames of each; the source faces' mean embedding is the reference.
    Raises ImportError without dlib / face_recognition_models, ValueError without faces.
    """
    model = model or identity_model()
    if model is None:
        raise ImportError(f"identity similarity needs dlib and face_recognition_models: {IDENTITY_UNAVAILABLE}")
    source_frames, output_frames = np.asarray(source_frames), np.asarray(output_frames)
    source_frames = source_frames[None] if source_frames.ndim == 3 else source_frames
    output_frames = output_frames[None] if output_frames.ndim == 3 else output_frames
    return identity_from_detections(
        model, source_frames, lm.detect_stills(source_frames, identity_frame_indices(len(source_frames), frames)),
        output_frames, lm.detect_stills(output_frames, identity_frame_indices(len(output_frames), frames)))
