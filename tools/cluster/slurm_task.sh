#!/bin/bash
# One SLURM task of tools/cluster/slurm_train.sbatch: the training process of this node.
#   bash tools/cluster/slurm_task.sh CONFIG WORKDIR [--config.key=value ...]
# With SLURM_NTASKS > 1, jax.distributed.initialize() reads the coordinator (the first node of
# SLURM_STEP_NODELIST, a port from SLURM_JOB_ID), the process count and this process's id from
# SLURM_NTASKS / SLURM_PROCID / SLURM_LOCALID; with one task it runs alone.
set -euo pipefail
CONFIG=${1:?usage: slurm_task.sh CONFIG WORKDIR [flags]}
WORKDIR=${2:?usage: slurm_task.sh CONFIG WORKDIR [flags]}
shift 2
DISTRIBUTED=()
if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  DISTRIBUTED=(--config.distributed.auto=True)
fi
# Memory a process may take on each GPU (jax's default is 0.75; the fit tool's verdict reads the same variable).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "${PYTHON:-python}" -m facecam_jax.train --config "$CONFIG" --workdir "$WORKDIR" "${DISTRIBUTED[@]}" "$@"
