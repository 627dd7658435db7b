"""Training metrics from process 0 only: a log line, a JSON line (``metrics.jsonl``) and
TensorBoard scalars and images (event files in the workdir: ``tensorboard --logdir runs``)."""

from __future__ import annotations

import json
import logging
import os
import sys

import jax
import numpy as np


def _import_summary_writer():
    """tensorboardX's writer imports torch when torch is installed (4 s, for torch tensor
    inputs this project never passes); unless torch is already loaded, it is hidden for that
    one import, so ``python -m facecam_jax.train`` starts 4 s sooner. Later imports of torch work."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()

log = logging.getLogger(__name__)


class Logger:
    """The one writer of a run's metrics; every method is a no-op off process 0."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = SummaryWriter(workdir, flush_secs=10) if self.enabled else None

    def __call__(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        log.info("step %d %s", step, text)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def images(self, step: int, batch: dict, keys) -> None:
        """The first sample's ``keys`` videos side by side at their first, middle and last frame."""
        if not self.enabled:
            return
        t = batch[keys[0]].shape[1]
        rows = [np.concatenate([np.asarray(batch[k][0, i]) for k in keys], axis=1) for i in (0, t // 2, t - 1)]
        self.writer.add_image("batch/" + "_".join(keys), np.concatenate(rows, axis=0), step, dataformats="HWC")

    def info(self, msg: str, *args) -> None:
        if self.enabled:
            log.info(msg, *args)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
