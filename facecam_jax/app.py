"""A web page to re-render a portrait video along a camera trajectory (Gradio; the ``app`` extra).

    pip install -e '.[app]'
    python -m facecam_jax.app                        # the shipped mini model on http://127.0.0.1:7860
    python -m facecam_jax.app --config configs/facecam.py:nersemble ... --workdir runs/x --lora f.safetensors

The same config and options as ``python -m facecam_jax.sample`` (``--config``, ``--workdir``,
``--lora``); the page is ``facecam_jax.ui``. Renders run one at a time (a queue); the models
load at the first render. Every file the page makes goes to ``--output_dir`` (default: a new
temporary folder), each request in a folder of its own.
"""

import logging
import tempfile

from absl import flags

from facecam_jax.runtime import cli, paths
from facecam_jax.runtime.config_file import DEFAULT_CONFIG
from facecam_jax.sampling import experts

_CONFIG = cli.define_config("model / sampling config (default: configs/facecam.py:learn, the shipped mini model)",
                            default=f"{DEFAULT_CONFIG}:learn")
_WORKDIR = flags.DEFINE_string("workdir", None, "a training run whose exported weights to overlay")
_LORA = flags.DEFINE_multi_string("lora", [], "a LoRA file to merge into every expert, PATH or PATH:STRENGTH; "
                                   "repeatable, appended to sample.loras")
_PORT = flags.DEFINE_integer("port", 7860, "the port the page is served on")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "the address to serve on (0.0.0.0: every interface)")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "where the page's videos go (default: a new temporary folder)")


def main(argv):
    config = cli.start(argv, _CONFIG)
    config.sample.loras = tuple(config.sample.loras) + tuple(_LORA.value)
    out_dir = _OUTPUT_DIR.value or tempfile.mkdtemp(prefix="facecam-app-")
    paths.check_outputs(directories={"--output_dir": out_dir}, inputs=paths.read_paths(config, _CONFIG.path, {
        "the trained weights": experts.trained_files(experts.weights_dir(config, _WORKDIR.value)) or None,
        "the LoRA files": [path for path, _ in experts.lora_files(config)] or None}))
    from facecam_jax import ui  # gradio: the app extra

    page = ui.build_page(ui.Studio(config, workdir=_WORKDIR.value, out_dir=out_dir))
    logging.getLogger("facecam_jax").info("serving on http://%s:%d (files in %s)", _HOST.value, _PORT.value, out_dir)
    page.queue(default_concurrency_limit=1).launch(server_name=_HOST.value, server_port=_PORT.value,
                                                   allowed_paths=[out_dir], show_error=False)


if __name__ == "__main__":
    cli.run(main)
