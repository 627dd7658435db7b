"""The errors a user can cause, in one low module: every layer raises them, and the command
lines (``facecam_jax.runtime.cli``) turn them into one ``error:`` line without importing the layers.

Each is also importable from the module that raises it (``facecam_jax.video_io.VideoDecodeError``,
``facecam_jax.camera.landmarks.NoFaceError``, ``facecam_jax.checkpoints.io.CheckpointError``).
"""

from __future__ import annotations


class VideoDecodeError(RuntimeError):
    """A video (or a frame of it) could not be read: missing, corrupt, or shorter than claimed."""


class NoFaceError(ValueError):
    """No frame of the input has a face MediaPipe can find."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model it is loaded into."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that asks for something other than tensors and plain containers."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/Inf; the last finite state was kept."""


class DistributedSetupError(ValueError):
    """The processes of a multi-process run could not join (mismatched settings, a missing peer)."""


class OutputPathError(ValueError):
    """An output path that cannot or must not be written (a directory, under a file, read-only, an input)."""


class WorkdirLocked(ValueError):
    """Another live run holds the lock of a directory it writes (a training workdir); the message names it."""


class CheckpointSaveError(ValueError):
    """A training checkpoint could not be written (no space left on the disk); the checkpoints already
    there are kept."""
