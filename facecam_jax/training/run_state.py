"""Orbax checkpoints of a training run: {train state, data position, config} under ``workdir/checkpoints``.

Every process writes its shards and reads back onto the CURRENT mesh (restore targets carry
this run's shardings), so a run may resume on a different mesh or process count. The data
position is the global batch count (``facecam_jax.data.pipeline``); the config is the run's
ConfigDict as JSON, kept to say which keys differ when a later config does not fit.

Saves are atomic: Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it
when complete (a commit file on file systems without atomic rename), so a crash mid-save
leaves the previous steps as they were and the half-written one is never listed.

``restore`` takes the newest step that is complete and readable. A damaged step (an empty
folder, a missing ``_METADATA`` or data position, arrays that cannot be read) is warned
about, renamed to ``<step>.damaged-<what>`` (kept aside, never deleted; Orbax no longer
lists it) and the next older step is tried; when none is usable, one ``CheckpointError`` says
so and nothing is renamed. A step that is intact but was written by another config (other
shapes or another state tree) is a ``CheckpointError`` naming the config keys that differ.

Every process reaches the same verdict: the file checks read the same files, and a restore
that fails is agreed by an all-gather. (When only some processes fail to read their shards,
the others wait in Orbax's restore barrier, 300 s by default, before all can agree; that case
is untested.)
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from facecam_jax.errors import CheckpointError
from facecam_jax.training.train_step import TrainState

log = logging.getLogger(__name__)

DAMAGED = ".damaged-"  # <step>.damaged-<what>: a step kept aside


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


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{dotted leaf path: shape} (Orbax names checkpointed arrays the same way)."""
    return {".".join(_key_name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def config_json(config) -> dict:
    """A ConfigDict as plain JSON (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: dict, new: dict, limit: int = 8) -> list[str]:
    """``key: old -> new`` for each config key that differs, the ones that shape the train
    state first (``distributed.*`` is per process and left out)."""
    a, b = _flat(old), _flat(new)
    shaping = ("model.", "vae.", "optimizer.", "train.trainable")
    keys = sorted((k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")
                   and not k.startswith("distributed.")), key=lambda k: (not k.startswith(shaping), k))
    out = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        out.append(f"and {len(keys) - limit} more")
    return out


def _short(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split("See full TensorStore details")[0].split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _all_ok(ok: bool) -> bool:
    """Whether every process found ``ok`` (one tiny all-gather; each process must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@dataclasses.dataclass
class Restored:
    step: int
    state: TrainState
    batches: int  # the data position: global batches consumed
    set_aside: list[str]  # damaged newer steps, renamed


class Checkpoints:
    """Orbax manager for {train state, data position, config} under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, keep: int, config=None):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        handlers = {"train": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.config = config_json(config) if config is not None else None
        self.written: list[int] = []  # steps this run saved

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, batches: int) -> None:
        items = {"train": ocp.args.StandardSave(_values(state)), "data": ocp.args.JsonSave({"batches": batches})}
        if self.config is not None:
            items["config"] = ocp.args.JsonSave(self.config)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.written.append(step)

    def wait(self) -> None:
        """Blocks until every save has been written (and committed)."""
        self.manager.wait_until_finished()

    def data_position(self, step: int) -> int:
        """The global batches consumed when ``step`` was saved."""
        restored = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return int(restored["data"]["batches"])

    # --------------------------------------------------------------- checks

    def problem(self, step: int) -> tuple[str, str] | None:
        """(short name, description) of what makes ``step`` unusable, from its files alone
        (cheap: no array is read), or None."""
        path = os.path.join(self.directory, str(step))
        if not os.path.isdir(path):
            return "missing", "its folder is missing"
        if not os.listdir(path):
            return "empty", "its folder is empty"
        train = os.path.join(path, "train")
        if not os.path.isdir(train):
            return "no-train-state", "train/ (the train state) is missing"
        if not os.path.isfile(os.path.join(train, "_METADATA")):
            return "no-train-metadata", "train/_METADATA is missing"
        if glob.glob(os.path.join(train, "ocdbt.process_*")) and not os.path.isfile(os.path.join(train, "manifest.ocdbt")):
            return "no-train-manifest", "train/manifest.ocdbt is missing"
        data = os.path.join(path, "data", "metadata")
        if not os.path.isfile(data):
            return "no-data-position", "data/metadata (the data position) is missing"
        try:
            with open(data) as f:
                batches = json.load(f)["batches"]
            if not isinstance(batches, int) or batches < 0:
                raise ValueError(f"batches is {batches!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return "bad-data-position", f"data/metadata (the data position) cannot be read ({_short(e, 80)})"
        return None

    def newest_intact(self) -> tuple[int, int] | None:
        """(step, data position) of the newest step whose files are complete (``problem``), or
        None: where the data stream starts before the state is restored (``restore`` has the
        last word)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if self.problem(step) is None:
                return step, self.data_position(step)
        return None

    def _stored_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        tree = self.manager.item_metadata(step)["train"]
        if tree is None:
            raise ValueError("no train metadata")
        return _shapes(tree)

    def stored_config(self, step: int) -> dict | None:
        """The config that wrote ``step`` (None for checkpoints written before configs were kept)."""
        if not os.path.isfile(os.path.join(self.directory, str(step), "config", "metadata")):
            return None
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001  only used to explain a mismatch
            return None

    def _mismatch(self, step: int, stored: dict, wanted: dict) -> CheckpointError:
        def params_first(k):  # the clearest example first
            return not k.startswith("params."), k

        missing = sorted(set(wanted) - set(stored), key=params_first)
        unexpected = sorted(set(stored) - set(wanted), key=params_first)
        reshaped = sorted((k for k in set(stored) & set(wanted) if stored[k] != wanted[k]), key=params_first)
        parts = []
        if reshaped:
            k = reshaped[0]
            parts.append(f"{len(reshaped)} array(s) of other shapes (e.g. {k}: {stored[k]} in the checkpoint, "
                         f"{wanted[k]} in this config)")
        if missing:
            parts.append(f"{len(missing)} array(s) this config has and the checkpoint lacks (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} array(s) only the checkpoint has (e.g. {unexpected[0]})")
        old = self.stored_config(step)
        if old is None:
            keys = "it stores no config to compare (written before checkpoints kept their config)"
        elif self.config is None:
            keys = "no config was given to compare"
        else:
            keys = "config keys that differ from the run that wrote it: " + (
                ", ".join(config_differences(old, self.config)) or "none (the code changed?)")
        hint = "use a new --workdir for this config, or go back to the config that wrote it"
        exported = sorted(glob.glob(os.path.join(self.workdir, "facecam*.safetensors")))
        loads_weights = bool(self.config and self.config.get("model", {}).get("dit_checkpoint"))
        if exported and not reshaped and loads_weights:  # overlays apply over a loaded checkpoint
            hint += (" (to start from its trained weights in a new workdir: --config.model.dit_overlay="
                     f"\"('{exported[0]}',)\")")
        return CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this config: "
                               f"{'; '.join(parts)}; {keys}. {hint[0].upper()}{hint[1:]}")


    # --------------------------------------------------------------- restore

    def restore(self, state: TrainState) -> Restored | None:
        """The newest usable step restored onto ``state``'s shardings (this run's mesh); None
        without checkpoints. Damaged newer steps are set aside with a warning; CheckpointError
        when no step is usable or the newest intact one was written by another config."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        wanted = _shapes(_values(state))
        damaged: list[tuple[int, tuple[str, str]]] = []
        for step in steps:
            what = self.problem(step)  # the same files for every process: the same answer
            if what is None:
                try:
                    stored = self._stored_shapes(step)
                except Exception as e:  # noqa: BLE001  unreadable metadata: Orbax raises many kinds
                    what = "unreadable-metadata", f"its array metadata cannot be read ({_short(e)})"
                else:
                    if stored != wanted:
                        raise self._mismatch(step, stored, wanted)
            restored = None
            if what is None:
                try:
                    restored = self._restore_step(step, state)
                except Exception as e:  # noqa: BLE001  a truncated or corrupt file: TensorStore raises many kinds
                    what = "unreadable-arrays", f"its arrays cannot be read ({_short(e)})"
            if not _all_ok(what is None):  # a process that could not read its shards
                what = what or ("unreadable-arrays", "its arrays cannot be read on another process")
            if what is None:
                set_aside = [self._keep_aside(s, w, step) for s, w in damaged]
                return Restored(step, restored[0], restored[1], set_aside)
            damaged.append((step, what))
        listing = "; ".join(f"step {s}: {w[1]}" for s, w in damaged)
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: {listing}. Nothing was renamed; move the folder away "
            "to start the run from scratch, or repair or remove the damaged steps")

    def _restore_step(self, step: int, state: TrainState) -> tuple[TrainState, int]:
        args = ocp.args.Composite(train=ocp.args.StandardRestore(_abstract(_values(state))),
                                  data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return _into(state, restored["train"]), int(restored["data"]["batches"])

    def _keep_aside(self, step: int, what: tuple[str, str], resume: int) -> str:
        """Renames a damaged step out of Orbax's listing (process 0; the others wait)."""
        base = os.path.join(self.directory, f"{step}{DAMAGED}{what[0]}")
        target, n = base, 1
        while os.path.exists(target):
            n += 1
            target = f"{base}-{n}"
        if jax.process_index() == 0:
            os.rename(os.path.join(self.directory, str(step)), target)
            log.warning("checkpoint step %d in %s is damaged: %s. Kept it aside as %s (nothing is deleted); "
                        "resuming from step %d", step, self.directory, what[1], os.path.basename(target), resume)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"facecam checkpoint {step} set aside")
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
