"""ReCamMaster's camera (KwaiVGI/ReCamMaster; paper in shared/papers/recammaster.txt; SPEC 12):
camera extrinsics, one 3x4 pose per latent frame relative to the source camera, injected in
every DiT block. Target and source latents are concatenated along frames (no extra channels);
each block's ``cam_encoder`` (zero-initialised) maps a frame's pose to an offset added to the
normed input of self-attention over that frame's tokens (both halves, the source half getting
the target's cameras as in the original), and its ``projector`` (the identity at first) maps
the self-attention output before its gate (``wan_dit.recammaster_velocity``).

Training pairs take their poses from the dataset's cameras (``source_world_2_cam``,
``target_world_2_cam``: each target frame's camera relative to the source camera; a sample
without cameras gets identity poses). Sampling takes ReCamMaster's ten presets (``cam01``..``cam10``
or their names), a ReCamMaster camera file (``path.json:N``) or any project trajectory
(``camera.extrinsics.trajectory_poses``). The poses of a long video's windows are the
timeline's, relative to the same source camera.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from facecam_jax.camera import extrinsics, trajectories
from facecam_jax.conditioning.base import CameraKind
from facecam_jax.models import wan_dit


class ReCamMaster(CameraKind):
    name = "recammaster"
    batch_arrays = ("source_world_2_cam", "target_world_2_cam")
    trainable = ("cam_encoder", "projector")
    checkpoint_camera = "recammaster"

    def prepare(self, model, config):
        return wan_dit.add_camera_layers(model)

    def input_frames(self, frames: int) -> int:
        return 2 * frames  # target half, then source half

    def block_linears(self, config):
        return ((("blocks", "cam_encoder"), "frames", 12, config.dim), (("blocks", "projector"), "tokens", config.dim,
                                                                        config.dim))

    def dit_input(self, model, noisy, source, condition):
        return wan_dit.recammaster_input(model, noisy, source)

    def velocity(self, model, noisy, source, condition, t, context):
        return wan_dit.recammaster_velocity(model, noisy, source, condition["cameras"], t, context)

    def velocity_cached(self, model, noisy, source, condition, t, context, *, skip, residual):
        camera = wan_dit.recammaster_cameras(condition["cameras"], noisy.shape[1])
        return wan_dit.cached_forward(model, self.dit_input(model, noisy, source, condition), t, context,
                                      out_frames=noisy.shape[1], skip=skip, residual=residual, camera=camera)

    # ------------------------------------------------------------------ training

    def batch_spec(self, data):
        spec = super().batch_spec(data)
        spec["source_world_2_cam"] = ((4, 4), np.float32)
        spec["target_world_2_cam"] = ((data.frames, 4, 4), np.float32)
        return spec

    def condition(self, latents, batch, *, rng=None, dropout=0.0):
        poses = extrinsics.relative_poses(batch["source_world_2_cam"].astype(jnp.float32),
                                          batch["target_world_2_cam"].astype(jnp.float32), xp=jnp)
        return {"cameras": jax.lax.stop_gradient(poses)}

    # ------------------------------------------------------------------ sampling

    def load_trajectory(self, spec, frames: int) -> extrinsics.Poses:
        """``cam01``..``cam10`` or a preset's name, ``path.json:N`` (a ReCamMaster camera file and
        its camera number), or any trajectory the project reads."""
        poses = extrinsics.load_poses(spec, frames)
        if poses is not None:
            return poses
        return extrinsics.Poses(extrinsics.trajectory_poses(trajectories.load_trajectory(spec, frames)), frames)

    def make_condition(self, trajectory, *, height, width, framing, source_frames):
        if isinstance(trajectory, trajectories.Trajectory):
            trajectory = extrinsics.Poses(extrinsics.trajectory_poses(trajectory), trajectory.num_frames)
        return {"cameras": np.asarray(trajectory.poses, np.float32)}

    def abstract_condition(self, latent_shape, sharding):
        return {"cameras": jax.ShapeDtypeStruct((*latent_shape[:2], extrinsics.POSE_SIZE), jnp.float32,
                                                sharding=sharding)}


KIND = ReCamMaster()
