"""FactorPortrait (paper in shared/papers/factorportrait.txt, section 4; issue 33): one portrait
image animated by a driving video's expressions and head pose, seen along a camera path.

Condition fusion (paper 4.2): the DiT input is the reference latent frame followed by the F
target latent frames, and on channels ``[video 16 | reference 16 | normals 16 | rays 6]``
(``in_dim`` 54, the new channels of the widened patch embedding zero-initialised):

  frame 0 (reference)   video = reference latent, reference = reference latent, normals = 0,
                        rays = the identity camera's (the reference camera itself)
  frames 1..F           video = noisy target, reference = 0, normals = normal-map latents,
                        rays = each target camera relative to the reference camera

The paper prepends the reference latent to the noisy latent along time; we also give it its
own channels (zero elsewhere), so the model can tell the clean reference from noise. Rays are
Plücker maps on the latent grid (``camera.plucker.ray_map``, as the ``plucker`` kind computes
them). The velocity is the output's target frames. Expression (paper 4.2): per-frame codes
(``camera.expression``, the substitute for the paper's encoder) through the DiT's expression
controller (``wan_dit.add_expression_layers``): no offset on the reference frame.

Training is self-reenactment on multi-view data: the reference is the source camera's first
frame (the source video's first latent frame is it exactly: the Wan VAE encodes the first frame
alone), the target another camera over the clip, driving landmarks, normals and expressions the
target clip's own (``data.transforms.NormalMaps``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from facecam_jax.camera import animation, expression, extrinsics, landmarks, normals, plucker, trajectories
from facecam_jax.conditioning.base import CameraKind
from facecam_jax.conditioning.plucker import KIND as PLUCKER
from facecam_jax.models import wan_dit

LATENT_CHANNELS = 16
IN_DIM = 3 * LATENT_CHANNELS + plucker.RAY_CHANNELS  # video, reference, normals, rays


def fuse(noisy, reference, normals, rays):
    """The DiT input ``[B, 1 + F, h, w, 3C + 6]`` from noisy target latents ``[B, F, h, w, C]``, the
    reference latent ``[B, 1, h, w, C]``, normal-map latents ``[B, F, h, w, C]`` and ray maps of
    the reference and target frames ``[B, 1 + F, h, w, 6]`` (the module docstring's layout)."""
    ref = reference.astype(noisy.dtype)
    zeros_target, zeros_ref = jnp.zeros_like(noisy), jnp.zeros_like(ref)
    video = jnp.concatenate([ref, noisy], axis=1)
    ref_slot = jnp.concatenate([ref, zeros_target], axis=1)
    normal_slot = jnp.concatenate([zeros_ref, normals.astype(noisy.dtype)], axis=1)
    return jnp.concatenate([video, ref_slot, normal_slot, rays.astype(noisy.dtype)], axis=-1)


class FactorPortrait(CameraKind):
    name = "factorportrait"
    batch_videos = ("normals",)
    batch_arrays = ("target_landmarks", "source_world_2_cam", "source_intrinsics", "target_world_2_cam",
                    "target_intrinsics")
    trainable = ("expression", "patch_embedding")  # its controller; its widened input (zero-initialised channels)

    def configured(self, camera):
        """``camera.normal_maps=False``: the paper's C2 ablation (``WITHOUT_NORMALS``)."""
        return self if camera is None or camera.get("normal_maps", True) else WITHOUT_NORMALS

    def prepare(self, model, config):
        wan_dit.widen_patch_embedding(model, config.model.in_dim)
        return wan_dit.add_expression_layers(model, expression.CODES_DIM)

    def input_frames(self, frames: int) -> int:
        return 1 + frames  # the reference frame, then the target

    def side_flops(self, config, video_frames):
        """The expression controller (``wan_dit.ExpressionController``) on one video's codes: its
        projection, two temporal layers (q, k, v, o, attention over the frames, a 4x MLP) and the
        grouped output to the model width."""
        t, w = video_frames, wan_dit.EXPRESSION_WIDTH
        layer = 2 * t * w * w * 4 + 2 * 2 * t * t * w + 2 * 2 * t * w * 4 * w
        latent = 1 + (t - 1) // wan_dit.VAE_TIME_STRIDE
        return float(2 * t * expression.CODES_DIM * w + 2 * layer + 2 * latent * wan_dit.VAE_TIME_STRIDE * w * config.dim)

    def rays(self, noisy, condition):
        """Ray maps ``[B, 1 + F, h, w, 6]`` on the latent grid: the reference camera (identity pose,
        its intrinsics), then each target frame's camera relative to it; zero for samples without
        cameras."""
        b, _, h, w = noisy.shape[:4]
        scale = jnp.asarray([w, h, w, h], jnp.float32)
        target = plucker.ray_map(condition["k"] * scale, condition["c2w"], h, w, xp=jnp)  # [B, F, h, w, 6]
        ref = plucker.ray_map(condition["ref_k"][:, None] * scale, jnp.eye(4), h, w, xp=jnp)  # [B, 1, h, w, 6]
        maps = jnp.concatenate([ref, target], axis=1)
        return maps * condition["has"].astype(maps.dtype)[:, None, None, None, None]

    def dit_input(self, model, noisy, source, condition):
        normals = condition["normals"] if self.batch_videos else jnp.zeros_like(noisy)  # C2: no normal maps
        x = fuse(noisy, source[:, :1], normals, self.rays(noisy, condition))
        pad = model.config.in_dim - x.shape[-1]
        if pad < 0:
            raise ValueError(f"model in_dim {model.config.in_dim} is narrower than FactorPortrait's {x.shape[-1]} "
                             f"channels; set model.in_dim={IN_DIM}")
        return jnp.pad(x, ((0, 0),) * 4 + ((0, pad),))

    def velocity(self, model, noisy, source, condition, t, context):
        x = self.dit_input(model, noisy, source, condition)
        return model(x, t, context, expression=condition["expression"])[:, 1:]  # the target frames

    def velocity_cached(self, model, noisy, source, condition, t, context, *, skip, residual):
        x = self.dit_input(model, noisy, source, condition)
        out, residual = wan_dit.cached_forward(model, x, t, context, out_frames=None, skip=skip, residual=residual,
                                               expression=condition["expression"])
        return out[:, 1:], residual

    # ------------------------------------------------------------------ training

    def batch_spec(self, data):
        spec = {**super().batch_spec(data), **PLUCKER.batch_spec(data)}  # the camera pairs as CameraCtrl II's
        spec["target_landmarks"] = ((data.frames, expression.NUM_LANDMARKS, 3), np.float32)
        spec["source_intrinsics"] = ((3, 3), np.float32)
        return spec

    def condition(self, latents, batch, *, rng=None, dropout=0.0):
        height, width = batch["target"].shape[2:4]
        c2w, k, has = plucker.training_cameras(batch["source_world_2_cam"], batch["target_world_2_cam"],
                                               batch["target_intrinsics"], xp=jnp)
        ref_k = jnp.where(has[:, None, None], batch["source_intrinsics"].astype(jnp.float32), jnp.eye(3))
        codes = expression.expression_codes(batch["target_landmarks"].astype(jnp.float32), height, width, xp=jnp)
        face = jnp.all(jnp.isfinite(codes), axis=(-2, -1))  # [B]: a sample without landmarks gets zero codes
        codes = jnp.where(face[:, None, None], codes, 0.0)
        return {**{k: latents[k] for k in self.batch_videos}, **jax.lax.stop_gradient({
            "expression": codes,
            "c2w": c2w.astype(jnp.float32),
            "k": plucker.frame_fractions(k, height, width, xp=jnp).astype(jnp.float32),
            "ref_k": plucker.frame_fractions(ref_k, height, width, xp=jnp).astype(jnp.float32),
            "has": has.astype(jnp.float32)})}

    # ------------------------------------------------------------------ sampling

    def make_condition(self, trajectory, *, height, width, framing, source_frames):
        """The condition of a reference image (``source_frames[0]``; its face's landmarks) animated
        by ``trajectory``, a ``camera.animation.Animation`` (a camera path and a driving video):
        the retargeted face's normal maps along the path, its expression codes per video frame,
        the cameras of the latent frames relative to the reference's."""
        if not isinstance(trajectory, animation.Animation):
            raise ValueError("camera kind 'factorportrait' animates a portrait image by a driving video: sample with "
                             "python -m facecam_jax.sample --config ...:factorportrait-mini --image ref.png "
                             "--driving drive.mp4 (batch mode and the page re-render videos: other camera kinds)")
        try:
            reference = landmarks.detect_one(source_frames[0])
        except landmarks.NoFaceError:
            raise landmarks.NoFaceError("the reference image has no face MediaPipe can detect: FactorPortrait "
                                        "animates the face it shows") from None
        frames = trajectory.num_frames
        pixels, shape = animation.retarget(reference, height, width, trajectory.driving)
        w2c, k = trajectories.source_cameras(trajectory.trajectory, reference, height=height, width=width)
        k_cv = animation.pixel_centre_intrinsics(k)
        idx = extrinsics.latent_frame_indices(frames)
        raw = {"expression": expression.codes_of(shape),
               "c2w": animation.relative_c2w(w2c)[idx].astype(np.float32),
               "k": plucker.frame_fractions(k_cv[idx], height, width).astype(np.float32),
               "ref_k": plucker.frame_fractions(k_cv[0], height, width).astype(np.float32),
               "has": np.ones((), np.float32)}
        if self.batch_videos:  # the head pose: the retargeted face seen from each camera of the path
            seen = animation.seen_along(pixels, w2c, k, height, width)
            raw["normals"] = normals.landmark_normal_maps(seen, height, width)
        return raw

    def encode_condition(self, raw, encode, windows):
        if windows is not None:
            raise ValueError("FactorPortrait animates one window (data.frames frames, its reference frame first): "
                             "sample --frames up to data.frames")
        return super().encode_condition(raw, encode, windows)

    def abstract_condition(self, latent_shape, sharding):
        rows, f = latent_shape[:2]

        def shape(*s):
            return jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)

        videos = {k: shape(*latent_shape) for k in self.batch_videos}
        return {**videos, "expression": shape(rows, 1 + 4 * (f - 1), expression.CODES_DIM),
                "c2w": shape(rows, f, 4, 4), "k": shape(rows, f, 4), "ref_k": shape(rows, 4), "has": shape(rows)}


class WithoutNormals(FactorPortrait):
    """The paper's C2 ablation: no head-pose normal maps. The data pipeline does not render them,
    the VAE does not encode them, and their channels of the DiT input stay zero (the same
    model shape, so the same budget and the same patch embedding)."""

    batch_videos = ()


KIND = FactorPortrait()
WITHOUT_NORMALS = WithoutNormals()
