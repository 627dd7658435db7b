"""Joins the processes of a multi-process run (``config.distributed``): TPU pods, SLURM and
Open MPI by auto-detection, or an explicit coordinator for clusters without it and for
localhost runs. Must run before anything touches the devices."""

from __future__ import annotations

import logging

import jax

from facecam_jax.errors import DistributedSetupError

log = logging.getLogger(__name__)

__all__ = ["DistributedSetupError", "initialize_distributed"]


def initialize_distributed(d) -> None:
    """Joins the processes of a multi-process run (``config.distributed``); must run before
    anything touches the devices. ``auto``: cluster auto-detection (TPU pods, SLURM, Open MPI);
    else an explicit ``coordinator_address`` / ``num_processes`` / ``process_id``."""
    if not (d.auto or d.coordinator_address):
        return
    if jax.distributed.is_initialized():
        return
    # CPU processes all-reduce over gloo (no-op for GPU/TPU clients).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if d.auto:
        jax.distributed.initialize(initialization_timeout=d.initialization_timeout)
        return
    if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
        raise DistributedSetupError(f"distributed.process_id must be in [0, num_processes={d.num_processes}), "
                         f"got {d.process_id}")
    hint = ("start every process with the same distributed.coordinator_address and num_processes and "
            "its own process_id")
    log.info("process %d of %d: joining the run at %s (waiting up to %ds for the others)", d.process_id,
             d.num_processes, d.coordinator_address, d.initialization_timeout)
    try:
        jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id,
                                   initialization_timeout=d.initialization_timeout)
    except Exception as e:  # the coordination service's errors are long and cryptic
        raise DistributedSetupError(
            f"process {d.process_id} of {d.num_processes} could not join the run at {d.coordinator_address} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); {hint}") from e
    if jax.process_count() != d.num_processes:  # the coordinator's count wins, silently: say so
        raise DistributedSetupError(
            f"this process was started with distributed.num_processes={d.num_processes}, but the coordinator "
            f"at {d.coordinator_address} runs {jax.process_count()} processes; {hint}")
