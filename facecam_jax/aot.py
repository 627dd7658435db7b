"""Ahead-of-time compiles of the real programs: what fits where, before renting the chips.

    python -m facecam_jax.aot --config configs/facecam.py:nersemble --topology v5p:4x4x4 --program train
    python -m facecam_jax.aot --config configs/facecam.py:nersemble,mesh.context=2 --topology v6e:4x4 --program sample
    python -m facecam_jax.aot --config configs/facecam.py:nersemble,model.quantize=int8 --gpu rtx4090 --program sample
    python -m facecam_jax.aot --config configs/facecam.py:nersemble,batch_size=8,mesh.fsdp=8 --gpu h100 --gpus 8
    python -m facecam_jax.aot --config configs/facecam.py --program train      # the local devices (e.g. a GPU)

Compiles the training step or the sampling program (both A14B experts with CFG, and the VAE
encode and decode beside them) of a config from shapes only, for the devices of a named TPU
topology (libtpu's compile-only client: no TPU needed), for named NVIDIA GPUs (the CUDA PJRT
plugin's compile-only devices from a target spec, the ``gpu-aot`` extra: no GPU needed) or the
local devices, and prints
per-device memory (XLA's buffer plan: arguments + outputs - donated + temporaries + code,
plus what stays resident beside a program), the device's memory, the analytic FLOPs per
step, the time per step at the chips' bf16 peak, and a verdict (``facecam_jax.fit``).
Exit 0: fits; 3: does not fit (XLA's out-of-memory at compile, the total over the memory,
or arguments alone over it: then nothing is compiled); 2: bad arguments (unknown topology,
a mesh that does not divide it). Sampling is compiled with ``sample.cfg_scale`` as set.

Topology names: ``v5e:2x2``, ``v5e:4x8``, ``v5p:2x2x1``, ``v5p:4x4x4``, ``v6e:2x4``,
``v4:2x2x2``; ``1x1`` / ``1x1x1`` and ``1x2`` are single hosts smaller than the default
2x2 host. The memory is what the TPU compiler reports it may use.

GPU names: ``a100-40``, ``a100-80``, ``h100``, ``h100-pcie``, ``h200``, ``b200`` (XLA's specs),
``l40s``, ``rtx4090``, ``l4`` (specs written from published properties); ``--gpus 8`` is one host
of 8, ``--gpus 2x8`` two hosts of 8. The memory is what a JAX run may use there: the card's
memory times ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (0.75 unless set; all of it with
``XLA_PYTHON_CLIENT_PREALLOCATE=false``), less the cuDNN attention workspace that XLA's plan
does not count (``facecam_jax.fit.gpus``).
"""

import json
import os

import jax
from absl import flags
from ml_collections import config_flags

from facecam_jax import options
from facecam_jax.fit import gpus
from facecam_jax.fit import programs as fit
from facecam_jax.runtime import cli, paths

_CONFIG = cli.define_config("the config whose program is compiled (configs/facecam.py[:variant,key=value])")
_TOPOLOGY = flags.DEFINE_string("topology", None, "a TPU topology to compile for (v5e:2x2, v5p:2x2x2, v6e:2x4, "
                                "...); default: the local devices")
_GPU = flags.DEFINE_string("gpu", None, f"a named NVIDIA GPU to compile for without one ({', '.join(gpus.GPUS)})")
_GPUS = flags.DEFINE_string("gpus", None, "with --gpu: N GPUs on one host, or HOSTSxN (e.g. 8, 2x8); default 1")
_PROGRAM = flags.DEFINE_enum("program", "train", ["train", "sample"], "the training step or the sampling program")
_VAE = flags.DEFINE_bool("vae", True, "sample: also compile the VAE encode and decode that run beside the experts")
_JSON = flags.DEFINE_string("json", None, "also write the report as JSON here")
_FRAMES = flags.DEFINE_integer("frames", None, "sample: a video of this many frames (4k + 1), in windows of the "
                               "model's data.frames when longer (default: data.frames)")


def _target():
    """The named GPUs' compile-only target, or None (a TPU topology or the local devices)."""
    if _GPU.value is None:
        if _GPUS.value is not None:
            raise fit.BadTarget("--gpus needs --gpu NAME (e.g. --gpu h100 --gpus 8)")
        return None
    if _TOPOLOGY.value:
        raise fit.BadTarget("--gpu and --topology name two targets: give one")
    return gpus.make_target(_GPU.value, _GPUS.value)


def main(argv):
    if (_TOPOLOGY.value or _GPU.value) and not os.environ.get("JAX_PLATFORMS"):
        # Host-side work stays off any local accelerator; this also keeps the CUDA plugin's
        # start-up check for CUDA libraries from running on a machine without them.
        jax.config.update("jax_platforms", "cpu")
    config = cli.start(argv, _CONFIG)  # the compile cache: local targets; compile-only TPU targets switch it off
    name = os.path.relpath(config_flags.get_config_filename(flags.FLAGS["config"]))  # "path.py:variant"
    if _FRAMES.value is not None:  # the rule sample --frames passes; 0 is a value, not "unset"
        problem = options.frames_flag_problem("--frames", _FRAMES.value, window=config.data.frames,
                                              maximum=config.sample.max_frames, limit="sample.max_frames")
        if problem:
            raise ValueError(problem)
    paths.check_outputs({"--json": _JSON.value}, paths.read_paths(config, _CONFIG.path))
    try:
        report = fit.analyze(config, _PROGRAM.value, _TOPOLOGY.value, config_name=name, with_vae=_VAE.value,
                             frames=_FRAMES.value, target=_target())
    except fit.BadTarget as e:
        cli.fail(cli.message(e), code=fit.BAD_ARGUMENTS)
    print(report.text(), flush=True)
    if _JSON.value:
        os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
        with open(_JSON.value, "w") as out:
            json.dump(report.to_json(), out, indent=1)
    return report.exit_code


if __name__ == "__main__":
    cli.run(main)
