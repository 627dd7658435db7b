"""Checks every camera kind's tests share (not a test module: imported by them)."""

import jax
import numpy as np

from facecam_jax import conditioning, sampling
from facecam_jax import sharding as sh


def grey_levels_one_vs_eight_devices(config, trajectory: str, frames: int = 9) -> int:
    """The largest difference, in grey levels, between a ``frames``-frame render of random source
    frames along ``trajectory`` (the config's camera kind reads it) on one device and on fsdp 8."""
    frames = np.random.default_rng(0).integers(0, 255, (frames, 64, 48, 3), dtype=np.uint8)
    path = conditioning.of(config).load_trajectory(trajectory, len(frames))
    videos = [sampling.generate(config, frames, path, mesh=sh.make_mesh(1, n, 1, 1, devices=jax.devices()[:n])).video
              for n in (1, 8)]
    return int(np.abs(videos[0].astype(int) - videos[1].astype(int)).max())
