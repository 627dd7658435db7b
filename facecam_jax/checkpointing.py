"""Orbax checkpoints of a training run: {train state, data position} under ``workdir/checkpoints``.

Every process writes its shards and reads back onto the CURRENT mesh (restore targets carry
this run's shardings), so a run may resume on a different mesh or process count. The data
position is the global batch count (``facecam_jax.data.pipeline``).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from facecam_jax.train_step import TrainState


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _values(tree):
    """Variables -> their arrays (plain pytrees for orbax); other leaves unchanged."""
    return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def _into(template, values):
    return jax.tree.map(lambda v, a: v.replace(a) if _is_var(v) else a, template, values, is_leaf=_is_var)


def _abstract(tree):
    """Arrays (or ShapeDtypeStructs with a sharding) -> ShapeDtypeStructs with that sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """Orbax manager for {train state, data position} under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"), options=options, item_names=("train", "data")
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, batches: int) -> None:
        args = ocp.args.Composite(train=ocp.args.StandardSave(_values(state)), data=ocp.args.JsonSave({"batches": batches}))
        self.manager.save(step, args=args, force=True)

    def data_position(self, step: int) -> int:
        """The global batches consumed when ``step`` was saved."""
        restored = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return int(restored["data"]["batches"])

    def restore(self, step: int, state: TrainState) -> TrainState:
        """The train state at ``step``, placed on ``state``'s shardings (this run's mesh)."""
        args = ocp.args.Composite(train=ocp.args.StandardRestore(_abstract(_values(state))))
        return _into(state, self.manager.restore(step, args=args)["train"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
