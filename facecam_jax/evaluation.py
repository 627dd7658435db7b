"""Evaluation of re-rendered portrait videos (paper 4.3, SPEC 9): camera correctness, PSNR/SSIM, identity.

One row per (output, source, motion[, target]) of a manifest (`read_manifest`):

- Camera correctness (binary): MediaPipe landmarks on the first and last frames of the source
  (preprocessed to the output's size and length as the sampler does, so both share one
  framing and one clock) and of the output; head pose by PnP against the proxy head
  (`camera.pose`); the observed change is compared with the intended motion. Two references:
    "change" (default): the output's first->last change minus the source's first->last change
      (face shifts subtract, sizes divide, head angles subtract). This removes the subject's
      own motion and any fixed offset between the source framing and the output's first
      frame (the official proxy framing puts the face elsewhere than the nose-centred source
      crop, which would otherwise read as a pan or a zoom for every video).
    "last": the paper's literal protocol: last frame of the source against the last frame of
      the output (`pose.camera_correctness`).
  Both labels are always computed and stored; the reference picks the one the accuracy uses.
- PSNR and SSIM against the true target video when the manifest gives one: per-frame on uint8
  RGB with data range 255, averaged over frames. SSIM is Wang et al.'s Gaussian-window SSIM
  (sigma 1.5, 11 taps, K1 0.01, K2 0.03), implemented here so scikit-image stays a test extra.
- Identity: cosine similarity of dlib's face-recognition ResNet embeddings (the
  `face_recognition_models` package; ArcFace weights are not installable here) between the
  source and the output faces. Optional: without dlib the column says how to install it.

Per-video failures (a missing or unreadable file, no face, too few frames, an unknown motion)
become the row's `error` text; the evaluation itself never stops for them.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from facecam_jax.camera import landmarks as lm
from facecam_jax.camera import pose
from facecam_jax.camera import source as source_lib
from facecam_jax.camera import trajectories as tr
from facecam_jax.video_io import VideoDecodeError, read_video

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("output", "source", "motion", "target")
REQUIRED_COLUMNS = ("output", "source")
REFERENCES = ("change", "last")
MIN_FRAMES = 2  # camera correctness compares a first and a last frame

# PSNR of identical frames is infinite; a cap keeps averages and JSON finite. One grey level of
# error on a single pixel of a 704x480 frame already reads ~108 dB, so nothing real is clipped
# below 100 dB.
PSNR_CAP = 100.0
# Wang et al. 2004: Gaussian window sigma 1.5 truncated to 11 taps (radius int(3.5 * 1.5 + 0.5)).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0

IDENTITY_FRAMES = 8  # frames, evenly spaced, whose faces the identity score averages over
IDENTITY_UNAVAILABLE = "n/a (install the eval extra: pip install -e '.[eval]')"
# The frame size `intended_motions` projects a trajectory's proxy head at: the official
# condition size, where pose's thresholds were set.
_INTENDED_HEIGHT, _INTENDED_WIDTH = tr.HEIGHT, tr.WIDTH


class ManifestError(ValueError):
    """The manifest itself cannot be used (missing, unparsable, or rows without required fields)."""


# ---------------------------------------------------------------------------------------------
# Manifest

@dataclasses.dataclass(frozen=True)
class Entry:
    """One video to evaluate; paths already resolved. motion: a canonical name, a trajectory
    JSON path, or None (no camera judgement, e.g. a static multi-view pair)."""

    output: str
    source: str
    motion: str | None = None
    target: str | None = None


def _resolve(value: str, base: str) -> str:
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _motion_spec(value: str, base: str) -> str:
    """A canonical motion name as written, or a trajectory JSON path resolved against `base`."""
    resolved = _resolve(value, base)
    return resolved if value.lower().endswith(".json") or os.path.isfile(resolved) else value


def entries_from_rows(rows: Iterable[Mapping[str, Any]], base: str = ".") -> list[Entry]:
    """Manifest rows (dicts with output, source, optional motion and target) -> entries.

    Relative paths resolve against `base`. Raises ManifestError for a row that is not an
    object, lacks a required field, or has a field this format does not know.
    """
    entries = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ManifestError(f"row {i} is a {type(row).__name__}, expected an object with the fields "
                                f"{', '.join(MANIFEST_COLUMNS)}")
        values = {k: ("" if v is None else str(v).strip()) for k, v in row.items()}
        missing = [k for k in REQUIRED_COLUMNS if not values.get(k)]
        unknown = sorted(set(values) - set(MANIFEST_COLUMNS))
        if missing or unknown:
            raise ManifestError(f"row {i} lacks {missing} or has unknown fields {unknown}; the fields are "
                                f"{', '.join(MANIFEST_COLUMNS)} (output and source required)")
        entries.append(Entry(
            output=_resolve(values["output"], base), source=_resolve(values["source"], base),
            motion=_motion_spec(values["motion"], base) if values.get("motion") else None,
            target=_resolve(values["target"], base) if values.get("target") else None))
    return entries


def read_manifest(path: str | os.PathLike) -> list[Entry]:
    """A JSON list of objects or a CSV with a header row -> entries (paths relative to the manifest's folder)."""
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="") as f:
            text = f.read()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror or e}") from e
    if path.lower().endswith(".json") or text.lstrip().startswith(("[", "{")):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {path} is not valid JSON: {e}") from e
        if not isinstance(rows, list):
            raise ManifestError(f"manifest {path} must hold a JSON list of rows, got a {type(rows).__name__}")
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not set(REQUIRED_COLUMNS) <= {c.strip() for c in reader.fieldnames}:
            raise ManifestError(f"CSV manifest {path} needs a header row naming at least "
                                f"{', '.join(REQUIRED_COLUMNS)} (columns: {', '.join(MANIFEST_COLUMNS)})")
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    try:
        return entries_from_rows(rows, base)
    except ManifestError as e:
        raise ManifestError(f"manifest {path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM

def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 RGB videos [T, H, W, 3] (or images [H, W, 3]) of one shape, as [T, H, W, 3]."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}; compare equal frame counts and sizes")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (data range 255), got {a.dtype} and {b.dtype}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, C] with T >= 1 or one image [H, W, C], got {a.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 videos (data range 255): per frame, capped at PSNR_CAP, averaged over frames."""
    a, b = _pair(a, b)
    values = []
    for x, y in zip(a, b):
        mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
        values.append(PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * math.log10(DATA_RANGE ** 2 / mse)))
    return float(np.mean(values))


def ssim_frame(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two images [H, W, C] (or [H, W]) in 0..255, channels averaged.

    Gaussian window (sigma 1.5, 11 taps), population covariances, K1 0.01, K2 0.03; the mean
    is taken where the whole window lies inside the image (a 5-pixel border is left out),
    i.e. Wang et al. 2004 and `skimage.metrics.structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=255)`.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if min(x.shape[:2]) < 2 * pad + 1:
        raise ValueError(f"SSIM needs frames of at least {2 * pad + 1}x{2 * pad + 1} pixels, got {x.shape[:2]}")

    def blur(image):  # [H, W, C], each channel on its own
        return ndimage.gaussian_filter(image, sigma=(SSIM_SIGMA, SSIM_SIGMA, 0.0), truncate=SSIM_TRUNCATE,
                                       mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 videos [T, H, W, 3] (or images): `ssim_frame` per frame, averaged over frames."""
    a, b = _pair(a, b)
    return float(np.mean([ssim_frame(x, y) for x, y in zip(a, b)]))


# ---------------------------------------------------------------------------------------------
# Camera correctness

def intended_motions(motion: str | tr.Trajectory) -> tuple[str, ...]:
    """The canonical motions a motion spec asks for.

    A canonical name asks for itself. A trajectory (or its JSON file) asks for what the proxy
    head's landmarks show between its first and last frame, judged by the same thresholds
    (`pose.judge_motion`): every arc, zoom and pan that passes, except that pans are dropped
    when an arc is present (circling the head also moves the face in the image). A trajectory
    that ends where it started asks for no motion.
    """
    if isinstance(motion, str) and not (motion.lower().endswith(".json") or os.path.isfile(motion)):
        return (tr.motion_name(motion),)
    trajectory = motion if isinstance(motion, tr.Trajectory) else tr.load_trajectory(motion)
    ends = dataclasses.replace(trajectory, azimuth=trajectory.azimuth[[0, -1]],
                               elevation=trajectory.elevation[[0, -1]], fov=trajectory.fov[[0, -1]],
                               shift=np.asarray(trajectory.shift)[[0, -1]])
    points = tr.condition_landmarks(ends, height=_INTENDED_HEIGHT, width=_INTENDED_WIDTH)
    measure = pose.measure_motion(points[0], points[1], _INTENDED_HEIGHT, _INTENDED_WIDTH)
    present = [m for m in tr.CANONICAL_MOTIONS if pose.judge_motion(m, measure)]
    if any(m.startswith("arc_") for m in present):
        present = [m for m in present if not m.startswith("pan_")]
    return tuple(present)


def judge(intended: Sequence[str], measure: pose.MotionMeasure) -> bool:
    """Every intended motion happened (`pose.judge_motion`); with none intended, no motion happened."""
    if not intended:
        return pose.classify_motion(measure) is None
    return all(pose.judge_motion(m, measure) for m in intended)


def relative_measure(output: pose.MotionMeasure, source: pose.MotionMeasure) -> pose.MotionMeasure:
    """The output's own change with the source's own change taken out (the "change" reference)."""
    return pose.MotionMeasure(shift_x=output.shift_x - source.shift_x, shift_y=output.shift_y - source.shift_y,
                              scale=output.scale / source.scale, yaw=output.yaw - source.yaw,
                              pitch=output.pitch - source.pitch)


@dataclasses.dataclass(frozen=True)
class CameraResult:
    """Camera correctness of one video: the label by the chosen reference, and both measures."""

    correct: bool
    reference: str
    intended: tuple[str, ...]
    measure: pose.MotionMeasure  # output first->last change minus source first->last change
    measure_last: pose.MotionMeasure  # source last frame -> output last frame (the paper's)
    correct_change: bool
    correct_last: bool


def camera_from_landmarks(source_first: np.ndarray, source_last: np.ndarray, output_first: np.ndarray,
                          output_last: np.ndarray, height: int, width: int, motion: str | tr.Trajectory, *,
                          reference: str = "change") -> CameraResult:
    """Camera correctness from landmarks [478, 2|3] of the four frames, normalized to one H x W frame."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    intended = intended_motions(motion)
    change = relative_measure(pose.measure_motion(output_first, output_last, height, width),
                              pose.measure_motion(source_first, source_last, height, width))
    last = pose.measure_motion(source_last, output_last, height, width)
    correct_change, correct_last = judge(intended, change), judge(intended, last)
    return CameraResult(correct=correct_change if reference == "change" else correct_last, reference=reference,
                        intended=intended, measure=change, measure_last=last, correct_change=correct_change,
                        correct_last=correct_last)


def align_source(source_frames: np.ndarray, num_frames: int, height: int, width: int) -> np.ndarray:
    """Source frames in the output's framing: the sampler's preprocessing (nose-centred cover crop
    to H x W, cut or padded to `num_frames`); frames already of that shape pass through."""
    source_frames = np.asarray(source_frames)
    if source_frames.shape[:3] == (num_frames, height, width):
        return source_frames
    return source_lib.prepare_source(source_frames, num_frames, height, width)


def _detect(frames: np.ndarray, indices: Sequence[int]) -> dict[int, np.ndarray | None]:
    """Landmarks [478, 3] of the frames at `indices` (each a still), None where no face is found."""
    indices = sorted(set(int(i) for i in indices))
    try:
        points, found = lm.detect(frames[indices], static=True)
    except lm.NoFaceError:
        return dict.fromkeys(indices)
    return {i: (points[k] if found[k] else None) for k, i in enumerate(indices)}


def _camera(source_marks: Mapping[int, np.ndarray | None], output_marks: Mapping[int, np.ndarray | None],
            last: int, height: int, width: int, motion: str | tr.Trajectory, reference: str) -> CameraResult:
    videos = (("source", source_marks), ("output", output_marks))
    missing = [f"the {which} frame of the {name}" for name, marks in videos
               for which, i in (("first", 0), ("last", last)) if marks[i] is None]
    if missing:
        raise ValueError(f"no face found in {' and '.join(missing)}")
    return camera_from_landmarks(source_marks[0], source_marks[last], output_marks[0], output_marks[last],
                                 height, width, motion, reference=reference)


def camera_correct(source_frames: np.ndarray, output_frames: np.ndarray, motion: str | tr.Trajectory, *,
                   reference: str = "change") -> CameraResult:
    """Camera correctness of an output video [T, H, W, 3] made from `source_frames` along `motion`.

    The source is brought to the output's framing first (`align_source`). Raises ValueError
    when a video is too short or a first/last frame has no face.
    """
    output_frames = np.asarray(output_frames)
    num, height, width = output_frames.shape[:3]
    if num < MIN_FRAMES:
        raise ValueError(f"the output has {num} frame(s); camera correctness needs at least {MIN_FRAMES}")
    source_frames = align_source(source_frames, num, height, width)
    return _camera(_detect(source_frames, [0, num - 1]), _detect(output_frames, [0, num - 1]), num - 1,
                   height, width, motion, reference)


# ---------------------------------------------------------------------------------------------
# Identity

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


def _identity(model: IdentityModel, source_frames: np.ndarray, source_marks: Mapping[int, np.ndarray | None],
              output_frames: np.ndarray, output_marks: Mapping[int, np.ndarray | None]) -> IdentityResult:
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
    return _identity(model, source_frames, _detect(source_frames, identity_frame_indices(len(source_frames), frames)),
                     output_frames, _detect(output_frames, identity_frame_indices(len(output_frames), frames)))


# ---------------------------------------------------------------------------------------------
# Rows and the report

@dataclasses.dataclass
class Row:
    """One evaluated video. Metrics are None where they were not asked for or could not be computed."""

    output: str
    source: str
    motion: str | None = None
    target: str | None = None
    frames: int | None = None
    size: str | None = None  # "HxW" of the output
    intended: list[str] | None = None
    camera_correct: bool | None = None  # by the report's reference
    camera_correct_change: bool | None = None
    camera_correct_last: bool | None = None
    measure: dict[str, float] | None = None  # the "change" measure
    measure_last: dict[str, float] | None = None
    psnr: float | None = None
    ssim: float | None = None
    identity: float | None = None
    identity_distance: float | None = None
    identity_frames: int | None = None
    identity_note: str | None = None  # why identity is missing when it is not an error
    error: str | None = None


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


@dataclasses.dataclass
class Report:
    rows: list[Row]
    reference: str = "change"
    base: str | None = None  # table paths are shown relative to this folder (the manifest's)
    identity_available: bool = True

    def overall(self) -> dict[str, Any]:
        judged = [r for r in self.rows if r.camera_correct is not None]
        judged_last = [r for r in self.rows if r.camera_correct_last is not None]
        return {
            "videos": len(self.rows),
            "errors": sum(r.error is not None for r in self.rows),
            "camera_reference": self.reference,
            "camera_judged": len(judged),
            "camera_correct": sum(bool(r.camera_correct) for r in judged),
            "camera_accuracy": (sum(bool(r.camera_correct) for r in judged) / len(judged)) if judged else None,
            "camera_accuracy_last": (sum(bool(r.camera_correct_last) for r in judged_last) / len(judged_last)
                                     if judged_last else None),
            "psnr_mean": _mean([r.psnr for r in self.rows]),
            "ssim_mean": _mean([r.ssim for r in self.rows]),
            "psnr_videos": sum(r.psnr is not None for r in self.rows),
            "identity_mean": _mean([r.identity for r in self.rows]),
            "identity_videos": sum(r.identity is not None for r in self.rows),
            "identity_note": None if self.identity_available else IDENTITY_UNAVAILABLE,
        }

    def to_json(self) -> dict[str, Any]:
        return {"rows": [dataclasses.asdict(r) for r in self.rows], "overall": self.overall()}

    def _name(self, path: str | None) -> str:
        if path is None:
            return "-"
        if self.base:
            rel = os.path.relpath(path, self.base)
            if not rel.startswith(".."):
                return rel
        return path

    def to_markdown(self) -> str:
        def num(value, digits):
            return "-" if value is None else f"{value:.{digits}f}"

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = [
            f"| video | motion | camera ({self.reference}) | shift x | shift y | scale | yaw | pitch "
            "| PSNR | SSIM | identity | error |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            m = r.measure if self.reference == "change" else r.measure_last
            camera = "-" if r.camera_correct is None else ("yes" if r.camera_correct else "no")
            motion = "-" if r.motion is None else (self._name(r.motion) if os.path.isabs(r.motion) else r.motion)
            if r.intended is not None and [motion] != r.intended:
                motion += f" ({', '.join(r.intended) or 'static'})"
            identity = num(r.identity, 4) if r.identity is not None else (r.identity_note or "-")
            measure = ["-"] * 5 if m is None else [num(m["shift_x"], 2), num(m["shift_y"], 2), num(m["scale"], 3),
                                                   num(m["yaw"], 1), num(m["pitch"], 1)]
            lines.append("| " + " | ".join(cell(c) for c in [
                self._name(r.output), motion, camera, *measure, num(r.psnr, 2), num(r.ssim, 4), identity,
                r.error or ""]) + " |")
        o = self.overall()
        accuracy = ("-" if o["camera_accuracy"] is None else
                    f"{100 * o['camera_accuracy']:.1f}% ({o['camera_correct']}/{o['camera_judged']} judged)")
        identity = o["identity_note"] or f"{num(o['identity_mean'], 4)} (n={o['identity_videos']})"
        lines += [
            "",
            "| videos | errors | camera accuracy | PSNR | SSIM | identity |",
            "|---|---|---|---|---|---|",
            f"| {o['videos']} | {o['errors']} | {accuracy} | {num(o['psnr_mean'], 2)} (n={o['psnr_videos']}) "
            f"| {num(o['ssim_mean'], 4)} | {cell(identity)} |",
        ]
        return "\n".join(lines) + "\n"

    def write(self, out_json: str | os.PathLike, out_md: str | os.PathLike) -> None:
        for path in (out_json, out_md):
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(self.to_json(), f, indent=2, allow_nan=False)
            f.write("\n")
        with open(out_md, "w") as f:
            f.write(self.to_markdown())


def _measure_dict(m: pose.MotionMeasure) -> dict[str, float]:
    return {k: _finite(v) for k, v in dataclasses.asdict(m).items()}


def evaluate_entry(entry: Entry, *, reference: str = "change", identity_frames: int = IDENTITY_FRAMES,
                   model: IdentityModel | None = None, identity: bool = True) -> Row:
    """Evaluates one video; every failure becomes part of the row's `error` text."""
    row = Row(output=entry.output, source=entry.source, motion=entry.motion, target=entry.target)
    errors: list[str] = []
    try:
        output, _ = read_video(entry.output)
    except (VideoDecodeError, OSError) as e:
        row.error = f"output: {e}"
        return row
    num, height, width = output.shape[:3]
    row.frames, row.size = int(num), f"{height}x{width}"

    if entry.target is not None:
        try:
            target, _ = read_video(entry.target, max_frames=num)
            if target.shape[1:3] != (height, width):
                raise ValueError(f"target is {target.shape[1]}x{target.shape[2]}, the output {height}x{width}")
            count = min(len(target), num)  # a shorter target is compared over its own frames
            row.psnr, row.ssim = psnr(output[:count], target[:count]), ssim(output[:count], target[:count])
        except (VideoDecodeError, ValueError, OSError) as e:
            errors.append(f"target: {e}")

    want_camera = entry.motion is not None
    want_identity = identity and model is not None
    if identity and model is None:
        row.identity_note = IDENTITY_UNAVAILABLE
    if want_camera or want_identity:
        try:
            source = source_lib.load_source(entry.source, num, height, width)  # the sampler's framing
        except (VideoDecodeError, ValueError, OSError) as e:
            errors.append(f"source: {e}")
            want_camera = want_identity = False
    if want_camera or want_identity:
        ends = [0, num - 1] if want_camera else []
        faces = identity_frame_indices(num, identity_frames) if want_identity else []
        source_marks, output_marks = _detect(source, ends + faces), _detect(output, ends + faces)
        if all(p is None for p in source_marks.values()):
            errors.append(f"source: no face found in any checked frame {sorted(source_marks)}")
            want_camera = want_identity = False
        elif all(p is None for p in output_marks.values()):
            errors.append(f"output: no face found in any checked frame {sorted(output_marks)}")
            want_camera = want_identity = False
    if want_camera:
        try:
            if num < MIN_FRAMES:
                raise ValueError(f"the output has {num} frame(s); camera correctness needs at least {MIN_FRAMES}")
            result = _camera(source_marks, output_marks, num - 1, height, width, entry.motion, reference)
            row.intended = list(result.intended)
            row.camera_correct, row.camera_correct_change, row.camera_correct_last = (
                result.correct, result.correct_change, result.correct_last)
            row.measure, row.measure_last = _measure_dict(result.measure), _measure_dict(result.measure_last)
        except ValueError as e:  # no face in an end frame, too few frames, unknown motion, bad trajectory
            errors.append(f"camera: {e}")
    if want_identity:
        try:
            result = _identity(model, source, {i: source_marks[i] for i in faces}, output,
                               {i: output_marks[i] for i in faces})
            row.identity, row.identity_distance, row.identity_frames = (
                _finite(result.similarity), _finite(result.distance), result.frames)
        except ValueError as e:
            errors.append(f"identity: {e}")
    row.error = "; ".join(errors) or None
    return row


def evaluate_rows(rows: Iterable[Entry | Mapping[str, Any]], *, base: str | None = None, reference: str = "change",
                  identity: bool = True, identity_frames: int = IDENTITY_FRAMES) -> Report:
    """Evaluates entries (or manifest-style dicts, relative paths against `base`) -> Report."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    rows = list(rows)
    entries = [r if isinstance(r, Entry) else entries_from_rows([r], base or ".")[0] for r in rows]
    model = identity_model() if identity else None
    out = []
    for i, entry in enumerate(entries):
        log.info("evaluating %d/%d: %s", i + 1, len(entries), entry.output)
        out.append(evaluate_entry(entry, reference=reference, identity_frames=identity_frames, model=model,
                                  identity=identity))
    return Report(out, reference=reference, base=base, identity_available=not identity or model is not None)


def evaluate_manifest(path: str | os.PathLike, **kwargs) -> Report:
    """`read_manifest` then `evaluate_rows`; ManifestError for an unusable manifest."""
    entries = read_manifest(path)
    return evaluate_rows(entries, base=os.path.dirname(os.path.abspath(path)), **kwargs)


def default_outputs(manifest: str | os.PathLike) -> tuple[str, str]:
    """<manifest folder>/<manifest name>_eval.json and .md."""
    stem = os.path.splitext(os.path.abspath(manifest))[0]
    return stem + "_eval.json", stem + "_eval.md"
