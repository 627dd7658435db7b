"""A manifest's evaluation run: one Row per video (every per-video failure becomes its `error`), the Report
with its overall numbers, written as JSON and a markdown table."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from facecam_jax.camera import landmarks as lm
from facecam_jax.camera import pose
from facecam_jax.camera import source as source_lib
from facecam_jax.evaluation import identity as identity_lib
from facecam_jax.evaluation.camera_correctness import MIN_FRAMES, REFERENCES, camera_from_detections
from facecam_jax.evaluation.manifest import Entry, entries_from_rows, read_manifest
from facecam_jax.evaluation.scores import psnr, ssim
from facecam_jax.video_io import VideoDecodeError, probe, read_video

log = logging.getLogger(__name__)


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
    warning: str | None = None  # scored, but with a caveat (an output shorter than its target)
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
            "warnings": sum(r.warning is not None for r in self.rows),
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
            "identity_note": None if self.identity_available else identity_lib.IDENTITY_UNAVAILABLE,
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
                "; ".join(filter(None, [r.error, r.warning and f"warning: {r.warning}"]))]) + " |")
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


def _frame_count(path: str) -> int | None:
    """The frame count a video's header states (None when it states none)."""
    try:
        return probe(path).num_frames
    except VideoDecodeError:
        return None


def _measure_dict(m: pose.MotionMeasure) -> dict[str, float]:
    return {k: _finite(v) for k, v in dataclasses.asdict(m).items()}


def evaluate_entry(entry: Entry, *, reference: str = "change", identity_frames: int = identity_lib.IDENTITY_FRAMES,
                   model: identity_lib.IdentityModel | None = None, identity: bool = True) -> Row:
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
            target, _ = read_video(entry.target, max_frames=num + 1)  # one more: is the output shorter?
            if target.shape[1:3] != (height, width):
                raise ValueError(f"target is {target.shape[1]}x{target.shape[2]}, the output {height}x{width}")
            if len(target) > num:  # a truncated output would score its few frames as if it were whole
                total = _frame_count(entry.target)
                row.warning = (f"the output has {num} frame(s), its target {total or 'more'}: PSNR/SSIM "
                               f"compare the first {num} only")
                log.warning("%s: %s", entry.output, row.warning)
            count = min(len(target), num)  # a shorter target is compared over its own frames
            row.psnr, row.ssim = psnr(output[:count], target[:count]), ssim(output[:count], target[:count])
        except (VideoDecodeError, ValueError, OSError) as e:
            errors.append(f"target: {e}")

    want_camera = entry.motion is not None
    want_identity = identity and model is not None
    if identity and model is None:
        row.identity_note = identity_lib.IDENTITY_UNAVAILABLE
    if want_camera or want_identity:
        try:
            source = source_lib.load_source(entry.source, num, height, width)  # the sampler's framing
        except (VideoDecodeError, ValueError, OSError) as e:
            errors.append(f"source: {e}")
            want_camera = want_identity = False
    if want_camera or want_identity:
        ends = [0, num - 1] if want_camera else []
        faces = identity_lib.identity_frame_indices(num, identity_frames) if want_identity else []
        source_marks, output_marks = lm.detect_stills(source, ends + faces), lm.detect_stills(output, ends + faces)
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
            result = camera_from_detections(source_marks, output_marks, num - 1, height, width, entry.motion,
                                            reference)
            row.intended = list(result.intended)
            row.camera_correct, row.camera_correct_change, row.camera_correct_last = (
                result.correct, result.correct_change, result.correct_last)
            row.measure, row.measure_last = _measure_dict(result.measure), _measure_dict(result.measure_last)
        except ValueError as e:  # no face in an end frame, too few frames, unknown motion, bad trajectory
            errors.append(f"camera: {e}")
    if want_identity:
        try:
            result = identity_lib.identity_from_detections(model, source, {i: source_marks[i] for i in faces}, output,
                                                           {i: output_marks[i] for i in faces})
            row.identity, row.identity_distance, row.identity_frames = (
                _finite(result.similarity), _finite(result.distance), result.frames)
        except ValueError as e:
            errors.append(f"identity: {e}")
    row.error = "; ".join(errors) or None
    return row


def evaluate_rows(rows: Iterable[Entry | Mapping[str, Any]], *, base: str | None = None, reference: str = "change",
                  identity: bool = True, identity_frames: int = identity_lib.IDENTITY_FRAMES) -> Report:
    """Evaluates entries (or manifest-style dicts, relative paths against `base`) -> Report."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    rows = list(rows)
    entries = [r if isinstance(r, Entry) else entries_from_rows([r], base or ".")[0] for r in rows]
    model = identity_lib.identity_model() if identity else None
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
