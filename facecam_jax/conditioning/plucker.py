"""CameraCtrl II's camera (paper in shared/papers/cameractrl2.txt; SPEC 12): per-pixel Plücker
ray maps ``(o x d, d)`` of the target camera relative to the first source frame, one per latent
frame on the latent grid, patchified by their own zero-initialised patch embedding and added
to the video tokens before the first block (``wan_dit.add_camera_patch``), with the binary
mask channel of clip-level extension (1 on clean context frames: ``sampling.extend``).

For video re-rendering the source video enters as in FaceCam and ReCamMaster: target and
source latents concatenated along frames (16 channels), the ray maps on the target half and
zero on the source half. We chose frame concatenation over channel concatenation because it
is what both re-rendering systems in this project do (so the three kinds differ only in the
camera), it needs no wider input layer, and the source tokens attend to the target through
the same self-attention that carries the camera.

The condition is compact and resolution-free: per latent frame the camera-to-world pose
relative to the source camera (``c2w [B, F, 4, 4]``, metres), the intrinsics as fractions of
the frame (``k [B, F, 4]``: fx / W, fy / H, cx / W, cy / H in ray_map's pixel-centre
convention) and whether the sample has a camera (``has [B]``); the maps are computed on the
latent grid inside the DiT's forward. The null camera (camera dropout in training, in-the-wild
videos, camera guidance's null pass) is ``has = 0``: an all-zero ray map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from facecam_jax.camera import extrinsics, geometry, plucker, trajectories
from facecam_jax.conditioning.base import CameraKind
from facecam_jax.models import wan_dit


class Plucker(CameraKind):
    name = "plucker"
    batch_arrays = ("source_world_2_cam", "target_world_2_cam", "target_intrinsics")
    trainable = ("camera_patch",)
    has_null_camera = True
    has_context = True

    def prepare(self, model, config):
        return wan_dit.add_camera_patch(model)

    def input_frames(self, frames: int) -> int:
        return 2 * frames  # target half, then source half

    def block_linears(self, config):
        return ((("camera_patch",), "tokens", wan_dit.CAMERA_PATCH_CHANNELS * int(np.prod(config.patch_size)),
                 config.dim),)

    def dit_input(self, model, noisy, source, condition):
        return wan_dit.recammaster_input(model, noisy, source)  # [noisy; source] along frames, no extra channels

    def rays(self, noisy, condition):
        """The camera patchify's input ``[B, 2F, h, w, 7]``: on the target half the ray maps on the
        latent grid (zero for samples without a camera) and the context mask (``condition["mask"]
        [B, F]``, 1 on clip extension's clean context frames; absent: none); zero on the source half."""
        b, f, h, w = noisy.shape[:4]
        k = condition["k"] * jnp.asarray([w, h, w, h], jnp.float32)  # fractions -> latent-grid pixels
        maps = plucker.ray_map(k, condition["c2w"], h, w, xp=jnp)  # [B, F, h, w, 6]
        maps = maps * condition["has"].astype(maps.dtype)[:, None, None, None, None]
        mask = condition.get("mask")
        mask = jnp.zeros((b, f), maps.dtype) if mask is None else mask.astype(maps.dtype)
        maps = jnp.concatenate([maps, jnp.broadcast_to(mask[:, :, None, None, None], (b, f, h, w, 1))], axis=-1)
        return jnp.concatenate([maps, jnp.zeros_like(maps)], axis=1)

    def velocity(self, model, noisy, source, condition, t, context):
        x = self.dit_input(model, noisy, source, condition)
        return model(x, t, context, out_frames=noisy.shape[1], rays=self.rays(noisy, condition))

    def velocity_cached(self, model, noisy, source, condition, t, context, *, skip, residual):
        x = self.dit_input(model, noisy, source, condition)
        return wan_dit.cached_forward(model, x, t, context, out_frames=noisy.shape[1], skip=skip, residual=residual,
                                      rays=self.rays(noisy, condition))

    def null_camera(self, condition):
        return {**condition, "has": jnp.zeros_like(condition["has"])}

    # ------------------------------------------------------------------ training

    def batch_spec(self, data):
        spec = super().batch_spec(data)
        spec["source_world_2_cam"] = ((4, 4), np.float32)
        spec["target_world_2_cam"] = ((data.frames, 4, 4), np.float32)
        spec["target_intrinsics"] = ((data.frames, 3, 3), np.float32)
        return spec

    def condition(self, latents, batch, *, rng=None, dropout=0.0):
        height, width = batch["target"].shape[2:4]
        c2w, k, has = plucker.training_cameras(batch["source_world_2_cam"], batch["target_world_2_cam"],
                                               batch["target_intrinsics"], xp=jnp)
        if dropout and rng is not None:
            has = has & (jax.random.uniform(rng, has.shape) >= dropout)
        return jax.lax.stop_gradient({"c2w": c2w.astype(jnp.float32),
                                      "k": plucker.frame_fractions(k, height, width, xp=jnp).astype(jnp.float32),
                                      "has": has.astype(jnp.float32)})

    # ------------------------------------------------------------------ sampling

    def load_trajectory(self, spec, frames: int):
        """A project trajectory (its orbit and field of view), or ReCamMaster's presets and camera
        files (poses only: the base field of view)."""
        return extrinsics.load_poses(spec, frames) or trajectories.load_trajectory(spec, frames)

    def make_condition(self, trajectory, *, height, width, framing, source_frames):
        if isinstance(trajectory, extrinsics.Poses):  # relative 3x4 poses of the latent frames, base field of view
            rows = trajectory.poses.reshape(-1, 3, 4)
            c2w = np.concatenate([rows, np.broadcast_to([[[0.0, 0.0, 0.0, 1.0]]], (len(rows), 1, 4))], axis=1)
            k = np.broadcast_to(geometry.camera_matrix(height, width, fov=geometry.BASE_FOV), (len(rows), 3, 3))
        else:
            c2w, k = trajectories.orbit_cameras(trajectory, render_size=min(height, width))
            c2w, k = c2w[extrinsics.latent_frame_indices(trajectory.num_frames)], k[
                extrinsics.latent_frame_indices(trajectory.num_frames)]
            c2w = extrinsics.relative_to_first(c2w)
            c2w[:, :3, 3] *= extrinsics.METRES_PER_ORBIT_UNIT
        return {"c2w": np.asarray(c2w, np.float32), "k": plucker.frame_fractions(np.asarray(k), height, width).astype(np.float32),
                "has": np.ones((), np.float32)}

    def abstract_condition(self, latent_shape, sharding):
        rows, f = latent_shape[:2]

        def shape(*s):
            return jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)

        return {"c2w": shape(rows, f, 4, 4), "k": shape(rows, f, 4), "has": shape(rows)}


KIND = Plucker()
