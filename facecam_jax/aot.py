"""Ahead-of-time compiles of the real programs: what fits where, before renting the chips.

    python -m facecam_jax.aot --config configs/facecam.py:nersemble --topology v5p:4x4x4 --program train
    python -m facecam_jax.aot --config configs/facecam.py:nersemble,mesh.context=2 --topology v6e:4x4 --program sample
    python -m facecam_jax.aot --config configs/facecam.py --program train      # the local devices (e.g. a GPU)

Compiles the training step or the sampling program (both A14B experts with CFG, and the VAE
encode and decode beside them) of a config from shapes only, for the devices of a named TPU
topology (libtpu's compile-only client: no TPU needed) or the local devices, and prints
per-device memory (XLA's buffer plan: arguments + outputs - donated + temporaries + code,
plus what stays resident beside a program), the device's memory, the analytic FLOPs per
step, the time per step at the chips' bf16 peak, and a verdict (``facecam_jax.fit``).
Exit 0: fits; 3: does not fit (XLA's out-of-memory at compile, the total over the memory,
or arguments alone over it: then nothing is compiled); 2: bad arguments (unknown topology,
a mesh that does not divide it). Sampling is compiled with ``sample.cfg_scale`` as set.

Topology names: ``v5e:2x2``, ``v5e:4x8``, ``v5p:2x2x1``, ``v5p:4x4x4``, ``v6e:2x4``,
``v4:2x2x2``; ``1x1`` / ``1x1x1`` and ``1x2`` are single hosts smaller than the default
2x2 host. The memory is what the TPU compiler reports it may use.
"""

import json
import os

import jax
from absl import flags
from ml_collections import config_flags

from facecam_jax import options
from facecam_jax.fit import programs as fit
from facecam_jax.runtime import cli, paths

_CONFIG = cli.define_config("the config whose program is compiled (configs/facecam.py[:variant,key=value])")
_TOPOLOGY = flags.DEFINE_string("topology", None, "a TPU topology to compile for (v5e:2x2, v5p:2x2x2, v6e:2x4, "
                                "...); default: the local devices")
_PROGRAM = flags.DEFINE_enum("program", "train", ["train", "sample"], "the training step or the sampling program")
_VAE = flags.DEFINE_bool("vae", True, "sample: also compile the VAE encode and decode that run beside the experts")
_JSON = flags.DEFINE_string("json", None, "also write the report as JSON here")
_FRAMES = flags.DEFINE_integer("frames", None, "sample: a video of this many frames (4k + 1), in windows of the "
                               "model's data.frames when longer (default: data.frames)")


def main(argv):
    if _TOPOLOGY.value and not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # host-side work stays off any local accelerator
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
                             frames=_FRAMES.value)
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
