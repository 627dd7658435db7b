"""Fine-tunes FaceCam: ``python -m facecam_jax.train [--config configs/facecam.py[:variant,k=v]] [--workdir DIR]``.

With no flags it trains the small default (``mini``) on the shipped mini dataset. Overrides:
``--config.train.steps=100 --config.optimizer.lr=5e-5``. A restarted run resumes from the
newest usable checkpoint in its workdir. SIGTERM or Ctrl-C (a preemption) finishes the step,
saves a checkpoint and exits 0; a second one exits at once. The logic lives in
``facecam_jax.training.trainer``. A bad input or a diverged run ends in one ``error:`` line;
``--verbose`` adds the traceback.
"""

import logging
import os

from absl import flags

from facecam_jax.runtime import cli, paths
from facecam_jax.training import trainer

_CONFIG = cli.define_config("training config file")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/facecam-<variant>)")


def main(argv):
    config = cli.start(argv, _CONFIG)
    workdir = _WORKDIR.value or os.path.join("runs", f"facecam-{config.variant}")
    # A run resumes in its workdir (an existing one is fine), which must not be or hold what the
    # run reads: a dataset root, a checkpoint, the weights (the config file may sit beside it).
    paths.check_outputs(directories={"--workdir": workdir}, inputs=paths.read_paths(config))
    result = trainer.train(config, workdir)
    if not result.preempted:  # a preempted run has said where it stopped; it exits 0 too
        logging.getLogger("facecam_jax").info("finished at step %d; trained weights: %s", result.step,
                                              result.exported)


if __name__ == "__main__":
    cli.run(main)
