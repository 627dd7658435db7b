"""Batch mode of ``python -m facecam_jax.sample --input DIR_OR_MANIFEST --output_dir OUT``: many
videos re-rendered in one run, as the official ``inference.py`` does, resumably.

The input is a folder (its ``VIDEO_EXTENSIONS`` files, sorted), one video file, or a manifest:
a JSON list or a CSV of rows with ``video`` and optionally ``trajectory`` (default: the
``--trajectory`` flag), ``seed``, ``target`` (a true target video, for ``evaluate``) and
``name`` (of the outputs; default: the video's file name without its extension). A video
without a seed gets ``video_seed(--seed, name)``: stable whatever else the folder holds.

Per video ``OUT/<name>.mp4`` (the result), ``<name>_input.mp4`` (the cropped source),
``<name>_camera.mp4`` (the camera condition), ``<name>_compare.mp4`` (the three side by side)
and, for ``--trajectory random``, ``<name>_trajectory.json`` (the drawn parameters: a file
``--trajectory`` and ``evaluate`` read). Every file is written under a temporary name and
renamed (atomic); a video's record (``OUT/.facecam_batch/<name>.json``) is written last, so a
restart skips the videos whose record and outputs exist and redoes the rest. A video that
cannot be read, has no face (``require_face``) or has a bad trajectory is a failed row, not
the end of the batch. At the end ``OUT/summary.json`` / ``summary.md`` (every video's row)
and ``OUT/manifest.json`` (the rendered ones, as ``evaluate --manifest`` reads them).

Processes (``config.distributed``, as training joins them): process p of P renders videos
``p, p + P, ...`` of the input on its own devices; each video's noise and camera come from its
seed alone, so the outputs are the same whatever the process count. Within a process, videos
of one shape render together, one per slice of the mesh's data axis (``Session.batch``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib
from collections.abc import Iterable, Sequence

import jax
import numpy as np

from facecam_jax.camera import trajectories
from facecam_jax.evaluation.manifest import ManifestError, read_rows
from facecam_jax.runtime.cli import EXPECTED_ERRORS, message
from facecam_jax.sampling.render import Result, side_by_side
from facecam_jax.sampling.session import Prepared, Session, prepare
from facecam_jax.training.distributed import initialize_distributed
from facecam_jax.video_io import write_video

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
MANIFEST_EXTENSIONS = (".json", ".csv")
INPUT_COLUMNS = ("video", "trajectory", "seed", "target", "name")
RECORDS = ".facecam_batch"  # per-video records, inside the output folder
SUMMARY_JSON, SUMMARY_MD, MANIFEST = "summary.json", "summary.md", "manifest.json"
DONE, FAILED = "done", "failed"
FPS = 24.0
BARRIER_TIMEOUT_MS = 7 * 24 * 3600 * 1000  # the processes' shares may take days to render


def _wait_for_every_process(name: str) -> None:
    """Waits for every process of the run at the coordination service's barrier ``name``. Not a
    device collective (``multihost_utils.sync_global_devices``): the processes arrive hours apart
    when their shares differ, longer than a collective's set-up waits (30 s on CPU)."""
    from jax._src import distributed  # private: JAX has no public barrier that does not use the devices

    distributed.global_state.client.wait_at_barrier(name, BARRIER_TIMEOUT_MS)


@dataclasses.dataclass(frozen=True)
class Job:
    """One video of the batch."""

    name: str  # the outputs' stem
    video: str
    trajectory: str  # a canonical motion, a trajectory file, a kind's preset, or "random"
    seed: int
    target: str | None = None

    def outputs(self, out_dir: str) -> dict[str, str]:
        """The files this video's run writes, by role (the official's three, the compare video,
        and a random trajectory's parameters)."""
        base = os.path.join(out_dir, self.name)
        files = {"output": base + ".mp4", "input": base + "_input.mp4", "camera": base + "_camera.mp4",
                 "compare": base + "_compare.mp4"}
        if self.trajectory == trajectories.RANDOM:
            files["trajectory"] = base + "_trajectory.json"
        return files

    def record_path(self, out_dir: str) -> str:
        return os.path.join(out_dir, RECORDS, self.name + ".json")


def video_seed(seed: int, name: str) -> int:
    """The seed of a video without one: ``--seed`` plus a hash of its name (mod 2^31)."""
    return (int(seed) + zlib.crc32(name.encode("utf-8"))) % 2**31


def _name_of(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _check_name(name: str, where: str) -> str:
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name) or name.startswith("."):
        raise ValueError(f"{where}: output name {name!r} must be a plain file name (no folder, not hidden)")
    return name


def _seed_of(value, where: str) -> int:
    try:
        seed = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: seed {value!r} is not an integer") from None
    if not 0 <= seed < 2**31:
        raise ValueError(f"{where}: seed {seed} must be in [0, 2^31)")
    return seed


def _from_rows(rows: Sequence, base: str, trajectory: str, seed: int, path: str) -> list[Job]:
    jobs = []
    for i, row in enumerate(rows):
        where = f"manifest {path} row {i}"
        if not isinstance(row, dict):
            raise ManifestError(f"{where} is a {type(row).__name__}, expected an object with the fields "
                                f"{', '.join(INPUT_COLUMNS)}")
        values = {k: ("" if v is None else str(v).strip()) for k, v in row.items()}
        unknown = sorted(set(values) - set(INPUT_COLUMNS))
        if unknown or not values.get("video"):
            raise ManifestError(f"{where} lacks 'video' or has unknown fields {unknown}; the fields are "
                                f"{', '.join(INPUT_COLUMNS)} (video required)")
        video = values["video"] if os.path.isabs(values["video"]) else os.path.join(base, values["video"])
        name = _check_name(values.get("name") or _name_of(video), where)
        spec = values.get("trajectory") or trajectory
        if spec != trajectories.RANDOM and (spec.lower().endswith(".json") or ".json:" in spec) \
                and not os.path.isabs(spec):
            spec = os.path.join(base, spec)  # a trajectory file, relative to the manifest
        target = values.get("target") or None
        if target and not os.path.isabs(target):
            target = os.path.join(base, target)
        jobs.append(Job(name, os.path.abspath(video), spec,
                        _seed_of(values["seed"], where) if values.get("seed") else video_seed(seed, name), target))
    return jobs


def read_jobs(source: str, *, trajectory: str, seed: int) -> list[Job]:
    """The videos of ``--input``: a folder, one video file, or a manifest (module docstring)."""
    if os.path.isdir(source):
        videos = sorted(os.path.join(os.path.abspath(source), f) for f in os.listdir(source)
                        if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith(".")
                        and os.path.isfile(os.path.join(source, f)))
        if not videos:
            raise FileNotFoundError(f"--input {source!r} holds no video ({', '.join(VIDEO_EXTENSIONS)})")
        stems = [_name_of(v) for v in videos]
        # Two videos of one stem (a.mp4, a.mov): each is named with its extension.
        names = [s if stems.count(s) == 1 else os.path.basename(v).replace(".", "_") for s, v in zip(stems, videos)]
        jobs = [Job(n, v, trajectory, video_seed(seed, n)) for n, v in zip(names, videos)]
    elif source.lower().endswith(MANIFEST_EXTENSIONS):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"--input manifest {source!r} does not exist")
        base = os.path.dirname(os.path.abspath(source))
        jobs = _from_rows(read_rows(source, INPUT_COLUMNS, ("video",)), base, trajectory, seed, source)
    elif os.path.isfile(source):
        jobs = [Job(_name_of(source), os.path.abspath(source), trajectory, video_seed(seed, _name_of(source)))]
    else:
        raise FileNotFoundError(f"--input {source!r} does not exist (give a folder of videos, a video, or a "
                                f"manifest {'/'.join(MANIFEST_EXTENSIONS)})")
    seen: dict[str, str] = {}
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"two videos of --input write the outputs {job.name!r} ({seen[job.name]} and "
                             f"{job.video}); give each row its own 'name'")
        seen[job.name] = job.video
    return jobs


def share(jobs: Sequence[Job], process: int, processes: int) -> list[Job]:
    """Process ``process`` of ``processes``' videos: every ``processes``-th from its index, over
    the whole input (the same split whatever each process finds finished)."""
    return list(jobs[process::processes])


# ------------------------------------------------------------------ atomic files


def _temporary(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}.partial{os.path.splitext(name)[1]}")


def write_video_atomic(path: str, frames: np.ndarray, fps: float = FPS) -> None:
    """``write_video`` under a temporary name, renamed over ``path`` when complete."""
    tmp = _temporary(path)
    try:
        write_video(tmp, frames, fps)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, value) -> None:
    """JSON under a temporary name, renamed over ``path`` when complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    tmp = _temporary(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_record(job: Job, out_dir: str) -> dict | None:
    """The record a run wrote for ``job`` (None: none, or unreadable: the video is redone)."""
    try:
        with open(job.record_path(out_dir), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def finished(job: Job, out_dir: str) -> bool:
    """Rendered by an earlier run of the same video, seed and trajectory, every output there."""
    record = read_record(job, out_dir)
    return (record is not None and record.get("status") == DONE and record.get("video") == job.video
            and record.get("seed") == job.seed and record.get("trajectory") == job.trajectory
            and all(os.path.isfile(p) for p in job.outputs(out_dir).values()))


def motion_of(job: Job, out_dir: str) -> str | None:
    """What ``evaluate`` judges the camera by: a canonical motion's name, the trajectory file
    (random: the drawn one), or None for a kind's own preset (no camera judgement)."""
    if job.trajectory == trajectories.RANDOM:
        return os.path.basename(job.outputs(out_dir)["trajectory"])
    if job.trajectory.lower().endswith(".json") and os.path.isfile(job.trajectory):
        return os.path.abspath(job.trajectory)
    try:
        return trajectories.motion_name(job.trajectory)
    except ValueError:
        return None


# ------------------------------------------------------------------ the run


@dataclasses.dataclass
class _Pending:
    job: Job
    video: Prepared
    started: float


def _record(job: Job, status: str, *, seconds: float, error: str | None = None, video: Prepared | None = None,
            out_dir: str) -> dict:
    record = {"name": job.name, "video": job.video, "status": status, "seed": job.seed, "trajectory": job.trajectory,
              "target": job.target, "seconds": round(seconds, 2), "error": error}
    if video is not None:
        record.update(frames=int(video.shape[0]), height=int(video.shape[1]), width=int(video.shape[2]),
                      camera=video.drawn)
    if status == DONE:
        record["outputs"] = {role: os.path.basename(p) for role, p in job.outputs(out_dir).items()}
    return record


def _fail(job: Job, error: BaseException, out_dir: str, started: float, video: Prepared | None = None) -> None:
    text = message(error)
    log.warning("%s failed: %s", job.name, text)
    write_json_atomic(job.record_path(out_dir), _record(job, FAILED, seconds=time.perf_counter() - started,
                                                        error=text, video=video, out_dir=out_dir))


def _write(job: Job, video: Prepared, result: np.ndarray, out_dir: str, started: float) -> None:
    files = job.outputs(out_dir)
    write_video_atomic(files["input"], video.source)
    write_video_atomic(files["camera"], video.preview)
    write_video_atomic(files["output"], result)
    write_video_atomic(files["compare"], side_by_side(Result(result, video.source, video.preview)))
    if "trajectory" in files:
        write_json_atomic(files["trajectory"], {**video.drawn, "num_frames": int(video.shape[0])})
    write_json_atomic(job.record_path(out_dir), _record(job, DONE, seconds=time.perf_counter() - started,
                                                        video=video, out_dir=out_dir))
    log.info("%s: wrote %s", job.name, ", ".join(os.path.basename(p) for p in files.values()))


def render_jobs(session: Session, jobs: Iterable[Job], out_dir: str, *, frames: int | None = None,
                height: int | None = None, width: int | None = None, aspect: str | None = None,
                require_face: bool = True, profile: str | None = None) -> None:
    """Renders ``jobs`` (those not ``finished``) into ``out_dir``, ``session.batch`` videos of one
    shape at a time, writing each video's outputs and record as soon as it is rendered."""
    groups: dict[tuple[int, ...], list[_Pending]] = {}

    def flush(key) -> None:
        chunk = groups.pop(key)
        try:
            results = session.render([p.video for p in chunk], profile=profile)
        except EXPECTED_ERRORS as e:  # e.g. a non-finite render: every video of the chunk
            for p in chunk:
                _fail(p.job, e, out_dir, p.started, p.video)
            return
        for p, result in zip(chunk, results):
            try:
                _write(p.job, p.video, result, out_dir, p.started)
            except (OSError, ValueError) as e:  # a disk that filled up, an output that became a folder
                _fail(p.job, e, out_dir, p.started, p.video)

    for job in jobs:
        if finished(job, out_dir):
            log.info("%s: already rendered, skipped", job.name)
            continue
        started = time.perf_counter()
        try:
            video = prepare(session.config, job.video, job.trajectory, job.seed, frames=frames, height=height,
                            width=width, aspect=aspect, require_face=require_face)
        except EXPECTED_ERRORS as e:
            _fail(job, e, out_dir, started)
            continue
        groups.setdefault(video.shape, []).append(_Pending(job, video, started))
        if len(groups[video.shape]) == session.batch:
            flush(video.shape)
    for key in list(groups):
        flush(key)


# ------------------------------------------------------------------ the summary


def summary_rows(jobs: Sequence[Job], out_dir: str) -> list[dict]:
    """Every video's record (a video without one: ``missing``, its process did not finish it)."""
    rows = []
    for job in jobs:
        record = read_record(job, out_dir)
        rows.append(record if record is not None else {"name": job.name, "video": job.video, "status": "missing",
                                                       "seed": job.seed, "trajectory": job.trajectory,
                                                       "error": "no record: its process did not finish it"})
    return rows


def manifest_rows(jobs: Sequence[Job], out_dir: str) -> list[dict]:
    """The rendered videos as ``evaluate`` reads them (paths relative to ``out_dir``)."""
    rows = []
    for job in jobs:
        if not finished(job, out_dir):
            continue
        files = job.outputs(out_dir)
        row = {"output": os.path.basename(files["output"]), "source": os.path.basename(files["input"])}
        motion = motion_of(job, out_dir)
        if motion:
            row["motion"] = motion
        if job.target:
            row["target"] = os.path.abspath(job.target)
        rows.append(row)
    return rows


def to_markdown(rows: Sequence[dict]) -> str:
    """The summary table."""
    def cell(value) -> str:
        return "-" if value in (None, "") else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| video | status | frames | size | trajectory | seed | seconds | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['height']}x{r['width']}" if r.get("height") else None
        lines.append("| " + " | ".join(cell(v) for v in (r["name"], r["status"], r.get("frames"), size,
                                                           r.get("trajectory"), r.get("seed"), r.get("seconds"),
                                                           r.get("error"))) + " |")
    done = sum(r["status"] == DONE for r in rows)
    lines.append("")
    lines.append(f"{done} of {len(rows)} videos rendered" + (f", {len(rows) - done} not" if done < len(rows) else ""))
    return "\n".join(lines) + "\n"


def write_summary(jobs: Sequence[Job], out_dir: str) -> tuple[list[dict], str]:
    """Writes ``summary.json``, ``summary.md`` and (when a video was rendered) ``manifest.json``;
    returns the rows and the markdown table."""
    rows = summary_rows(jobs, out_dir)
    table = to_markdown(rows)
    write_json_atomic(os.path.join(out_dir, SUMMARY_JSON), rows)
    write_text_atomic(os.path.join(out_dir, SUMMARY_MD), table)
    manifest, path = manifest_rows(jobs, out_dir), os.path.join(out_dir, MANIFEST)
    if manifest:
        write_json_atomic(path, manifest)
    elif os.path.isfile(path):  # an earlier run's, naming none of these videos' outputs
        os.remove(path)
    return rows, table


def run(config, jobs: Sequence[Job], out_dir: str, *, workdir: str | None = None, **options) -> tuple[list, str] | None:
    """The batch: joins the other processes (``config.distributed``), renders this process's
    ``share`` on its own devices, waits for every process, and (process 0) writes the summary:
    returns its rows and table (None on the other processes). ``options``: ``render_jobs``'."""
    initialize_distributed(config.distributed)  # before anything touches the devices
    process, processes = jax.process_index(), jax.process_count()
    mine = [job for job in share(jobs, process, processes) if not finished(job, out_dir)]
    log.info("process %d of %d: %d videos to render (%d of its share of the %d rendered before)", process, processes,
             len(mine), len(share(jobs, process, processes)) - len(mine), len(jobs))
    if mine:  # the models load only when there is something to render
        session = Session(config, workdir=workdir, devices=jax.local_devices() if processes > 1 else None)
        render_jobs(session, mine, out_dir, **options)
    if processes > 1:
        _wait_for_every_process("facecam_jax.sample batch: every share rendered")
        if process != 0:
            return None
    return write_summary(jobs, out_dir)
