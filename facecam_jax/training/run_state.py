"""Orbax checkpoints of a training run: {train state, data position, config, checksums} under ``workdir/checkpoints``.

Every process writes its shards and reads back onto the CURRENT mesh (restore targets carry
this run's shardings), so a run may resume on a different mesh or process count. The data
position is the global batch count (``facecam_jax.data.pipeline``); the config is the run's
ConfigDict as JSON, kept to say which keys differ when a later config does not fit.

Saves are atomic: Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it
when complete (a commit file on file systems without atomic rename), so a crash mid-save
leaves the previous steps as they were and the half-written one is never listed.

Orbax checks no array data (TensorStore's OCDBT keeps no checksum of chunks: random bytes
written into an array file restore silently), so each step also keeps a checksum of every
array of the state (``checksums``: computed on the devices, one pass over the state in device
memory, a few bytes an array; independent of the mesh). A save first checks the disk has room
for a step (the newest one's size, or the state's arrays, plus ``integrity.SPACE_MARGIN``); a full disk,
found then or by a save running in the background (``check`` after every step), is one
``CheckpointSaveError`` line naming the folder and the space, with the checkpoints there kept.

``restore`` takes the newest step that is complete, readable and matches its checksums. A
damaged step (an empty folder, a missing ``_METADATA`` or data position, arrays that cannot be
read or that differ from their checksums) is warned
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
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from facecam_jax.errors import CheckpointError, CheckpointSaveError
from facecam_jax.training import integrity
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


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{dotted leaf path: shape} (Orbax names checkpointed arrays the same way)."""
    return {".".join(integrity.key_name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


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
                    "config": ocp.JsonCheckpointHandler(), "checksums": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.config = integrity.config_json(config) if config is not None else None
        self.written: list[int] = []  # steps this run saved
        self.pending: int | None = None  # the step being written in the background
        self.failed = False  # a save failed (reported); closing does not report it again
        self._estimate: tuple[int | None, str] = (None, "")  # the size of the last save, and what it is based on
        self._quiet = integrity.QuietNoSpace()
        logging.getLogger("absl").addFilter(self._quiet)  # Orbax logs through absl

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, batches: int) -> None:
        """Starts writing ``step`` in the background (with the checksums of its arrays); a
        CheckpointSaveError at once when the disk has no room for it (nothing is written)."""
        self.wait()  # Orbax would wait for the previous save too: its failure is its own
        values = _values(state)
        self._check_space(step, values)
        items = {"train": ocp.args.StandardSave(values), "data": ocp.args.JsonSave({"batches": batches}),
                 "checksums": ocp.args.JsonSave({"method": integrity.CHECKSUM_METHOD, "arrays": integrity.checksums(values)})}
        if self.config is not None:
            items["config"] = ocp.args.JsonSave(self.config)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._save_failed(step, e) from e
        self.pending = step
        self.written.append(step)

    def check(self) -> None:
        """Reports a background save that has failed (CheckpointSaveError when the disk is
        full) without waiting for one still running: called after every step, so a failed save
        stops the run at once rather than at the next save."""
        if self.pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until every save has been written (and committed)."""
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(step, e) from e

    def _check_space(self, step: int, values) -> None:
        """CheckpointSaveError unless the disk has room for one more step (as large as the newest
        one, or the state's arrays): Orbax deletes old steps only after a new one is complete.
        Every process agrees (they may read slightly different free space)."""
        needed, basis = sum(int(x.nbytes) for x in jax.tree.leaves(values) if hasattr(x, "nbytes")), "its arrays"
        latest = self.manager.latest_step()
        if latest is not None:
            size = integrity.folder_bytes(os.path.join(self.directory, str(latest)))
            if size > needed:
                needed, basis = size, f"step {latest}"
        needed += integrity.SPACE_MARGIN
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:  # not a local file system: let the save say
            free = None
        self._estimate = needed, basis
        if _all_ok(free is None or free >= needed):
            return
        self.failed = True
        raise CheckpointSaveError(self._no_room(step, "not enough free space", needed, basis, free))

    def _save_failed(self, step: int | None, error: BaseException) -> BaseException:
        """A CheckpointSaveError for a save that failed for lack of space (the half-written
        step is deleted, the others kept); other errors unchanged."""
        reason = integrity.no_space(error)
        if reason is None:
            return error
        self.failed = True
        if step in self.written:
            self.written.remove(step)
        if jax.process_index() == 0 and step is not None:  # Orbax's temporary folder of the failed step
            for partial in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(partial, ignore_errors=True)
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            free = None
        return CheckpointSaveError(self._no_room(step, reason, *self._estimate, free))

    def _no_room(self, step: int | None, reason: str, needed: int | None, basis: str, free: int | None) -> str:
        self.manager.reload()
        kept = sorted(self.manager.all_steps())
        space = "; ".join(([f"a step needs about {integrity.size_text(needed)}, judged by {basis}"] if needed else []) +
                          ([f"{integrity.size_text(free)} free"] if free is not None else []))
        resume = f"resume from step {kept[-1]}" if kept else "start over"
        return (f"could not save checkpoint step {step} in {self.directory}: {reason}"
                f"{f' ({space})' if space else ''}. The checkpoints there are kept "
                f"({', '.join(map(str, kept)) if kept else 'none'}); free space on that disk, lower "
                f"train.keep_checkpoints or use a workdir on a larger disk, then start the same command again to "
                f"{resume}")

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
                ", ".join(integrity.config_differences(old, self.config)) or "none (the code changed?)")
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
            if what is None:  # all processes together: the sums are global, the answer the same
                what = self._verify(step, restored[0], restored[2])
            if what is None:
                set_aside = [self._keep_aside(s, w, step) for s, w in damaged]
                return Restored(step, restored[0], restored[1], set_aside)
            damaged.append((step, what))
        listing = "; ".join(f"step {s}: {w[1]}" for s, w in damaged)
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: {listing}. Nothing was renamed; move the folder away "
            "to start the run from scratch, or repair or remove the damaged steps")

    def _restore_step(self, step: int, state: TrainState) -> tuple[TrainState, int, dict | None]:
        """(state, data position, the checksums saved with it: None for steps written before
        checksums were kept)."""
        items = {"train": ocp.args.StandardRestore(_abstract(_values(state))), "data": ocp.args.JsonRestore()}
        if os.path.isfile(os.path.join(self.directory, str(step), "checksums", "metadata")):
            items["checksums"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return (_into(state, restored["train"]), int(restored["data"]["batches"]),
                restored["checksums"] if "checksums" in items else None)

    def _verify(self, step: int, state: TrainState, saved: dict | None) -> tuple[str, str] | None:
        """What is wrong with the restored arrays of ``step`` by the checksums saved with them, or None."""
        if saved is None or saved.get("method") != integrity.CHECKSUM_METHOD or not isinstance(saved.get("arrays"), dict):
            log.info("checkpoint step %d has no checksums this code knows (written before they were kept, or by "
                     "a newer version): its arrays are not verified", step)
            return None
        got = integrity.checksums(_values(state))
        bad = sorted(k for k in set(saved["arrays"]) | set(got) if saved["arrays"].get(k) != got.get(k))
        if not bad:
            return None
        return "checksum-mismatch", (f"{len(bad)} of {len(got)} arrays differ from the checksums taken when it was "
                                     f"saved (e.g. {bad[0]}): its files were changed or corrupted on disk")

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
        """Waits for the last save and closes; after a failed save (already reported) it only closes."""
        try:
            if not self.failed:
                self.wait()  # a failure found only now is reported
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self.failed:
                    raise
            finally:
                logging.getLogger("absl").removeFilter(self._quiet)
