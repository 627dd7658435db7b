"""FactorPortrait (issue 33): normal maps, expression codes and controller, condition fusion, training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facecam_jax import conditioning
from facecam_jax import sharding as sh
from facecam_jax.camera import expression as ex
from facecam_jax.camera import normals as nm
from facecam_jax.models import wan_dit as W
from facecam_jax.runtime.config_file import load_config

KIND = conditioning.get("factorportrait")
H, W_ = 192, 128
K = np.array([[400.0, 0.0, (W_ - 1) / 2], [0.0, 400.0, (H - 1) / 2], [0.0, 0.0, 1.0]])


def _yaw(degrees):
    a = np.radians(degrees)
    return np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])


def _mean_normal(image):
    n = nm.decode_normals(image[image.any(-1)]).mean(0)
    return n / np.linalg.norm(n)


def test_a_frontal_face_mesh_has_normals_facing_the_camera_and_turning_the_head_turns_them():
    head = nm.proxy_head_camera()
    frontal = nm.render_normal_map(head + [0.0, 0.0, 3.0], np.eye(4), K, H, W_)
    covered = frontal.any(-1)
    assert covered.sum() > 2000 and not covered[0].any()  # a face in the middle, black around it
    n = nm.decode_normals(frontal[covered])
    assert (n[:, 2] < 0).mean() > 0.99  # towards the camera (-z)
    np.testing.assert_allclose(_mean_normal(frontal), [0.0, 0.0, -1.0], atol=0.05)
    np.testing.assert_array_equal(nm.encode_normals(np.array([0.0, 0.0, -1.0])), [128, 128, 255])  # the code
    assert frontal[covered][:, 2].mean() > 220 and np.all(np.abs(frontal[covered][:, :2].mean(0) - 128) < 10)
    def normal_at(image, point):  # the rendered normal at a surface point's pixel
        u, v = np.round(point[:2] / point[2] * K[0, 0] + K[:2, 2]).astype(int)
        return nm.decode_normals(image[v, u])

    for degrees in (-30.0, 30.0):
        rotation = _yaw(degrees)
        turned = nm.render_normal_map(head @ rotation.T + [0.0, 0.0, 3.0], np.eye(4), K, H, W_)
        for landmark in (4, 151, 168, 200):  # nose tip, forehead, between the eyes, above the chin
            before = normal_at(frontal, head[landmark] + [0.0, 0.0, 3.0])
            after = normal_at(turned, head[landmark] @ rotation.T + [0.0, 0.0, 3.0])
            angle = np.degrees(np.arccos(np.clip(after @ (rotation @ before), -1.0, 1.0)))
            assert angle < 8.0, (degrees, landmark, angle)  # the surface's normal turned with the head
        facing = rotation @ [0.0, 0.0, -1.0]  # where the face looks after the turn
        assert np.sign(_mean_normal(turned)[0]) == np.sign(facing[0])  # the visible normals lean that way
    # Exactly: vertex normals rotate with the mesh.
    rotation = _yaw(25.0) @ np.array([[1.0, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    np.testing.assert_allclose(nm.vertex_normals(head @ rotation.T), nm.vertex_normals(head) @ rotation.T, atol=1e-9)


def test_landmark_normal_maps_lie_on_the_face_in_the_frame():
    head = ex.canonical_head() * 18.0 @ _yaw(20.0).T + [64.0, 90.0, 0.0]  # pixels of a turned face
    landmarks = head / [W_, H, W_]
    maps = nm.landmark_normal_maps(np.stack([landmarks, landmarks]), H, W_)
    assert maps.shape == (2, H, W_, 3) and maps.dtype == np.uint8
    ys, xs = np.nonzero(maps[0].any(-1))
    assert abs(xs.mean() - head[:, 0].mean()) < 4 and abs(ys.mean() - head[:, 1].mean()) < 6
    vertices = nm.landmark_vertices(landmarks, H, W_)
    nose = vertices[4]  # the nose tip: its pixel shows its normal, which points where the face turned
    u, v = np.round(nose[:2]).astype(int)
    want = nm.vertex_normals(vertices)[4]
    assert np.degrees(np.arccos(np.clip(nm.decode_normals(maps[0, v, u]) @ want, -1, 1))) < 8.0
    assert np.sign(want[0]) == np.sign((_yaw(20.0) @ [0.0, 0.0, -1.0])[0]) and abs(want[0]) > 0.2


def test_expression_codes_remove_head_pose_scale_and_position():
    face = ex.canonical_head().copy()
    face[13, 1] += 0.2  # an open mouth: the inner upper lip moved
    codes = []
    for degrees, scale, shift in ((0.0, 20.0, (64, 90)), (35.0, 14.0, (40, 120)), (-20.0, 25.0, (70, 80))):
        pixels = scale * face @ _yaw(degrees).T + [*shift, 0.0]
        codes.append(ex.expression_codes(pixels / [W_, H, W_], H, W_))
    np.testing.assert_allclose(codes[1], codes[0], atol=1e-5)
    np.testing.assert_allclose(codes[2], codes[0], atol=1e-5)
    assert codes[0].shape == (ex.CODES_DIM,) and np.abs(codes[0]).max() > 0.05  # the mouth remains
    on_device = ex.expression_codes(jnp.asarray((20.0 * face / [W_, H, W_] + [0.5, 0.5, 0.0])[None]), H, W_, xp=jnp)
    np.testing.assert_allclose(np.asarray(on_device)[0], codes[0], atol=1e-4)


def test_expression_codes_group_like_the_vae_first_frame_alone():
    x = jnp.arange(81, dtype=jnp.float32)[None, :, None]  # [1, 81, 1]: the frame index
    grouped = W.group_frames(x)
    assert grouped.shape == (1, 21, 4)
    np.testing.assert_array_equal(grouped[0, 0], [0, 0, 0, 0])
    np.testing.assert_array_equal(grouped[0, 1], [1, 2, 3, 4])
    np.testing.assert_array_equal(grouped[0, 20], [77, 78, 79, 80])


def test_expression_layers_leave_the_base_model_unchanged_bit_exactly_until_trained():
    model = W.WanDiT("tiny", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 4, 16))
    ctx = jax.random.normal(jax.random.key(2), (2, 5, 32))
    t = jnp.array([300.0, 700.0])
    base = np.asarray(model(x, t, ctx))
    base_jit = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, x, t, ctx))
    W.add_expression_layers(model, 12)
    codes = jax.random.normal(jax.random.key(3), (2, 9, 12))  # 9 frames: 3 latent frames after one lead frame
    np.testing.assert_array_equal(np.asarray(model(x, t, ctx, expression=codes)), base)
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, *a: m(*a, expression=codes))(model, x, t, ctx)),
                                  base_jit)
    # Trained (a non-zero output layer), each latent frame gets its own modulation: the lead frame none.
    out = model.expression.out
    out.kernel.set_value(jax.random.normal(jax.random.key(4), out.kernel.get_value().shape))
    offset = model.expression(codes, 4)
    assert offset.shape == (2, 4, 64)
    np.testing.assert_array_equal(offset[:, 0], 0.0)
    assert not np.allclose(offset[:, 1], offset[:, 2]) and float(jnp.abs(offset[:, 1:]).max()) > 0
    assert not np.allclose(np.asarray(model(x, t, ctx, expression=codes)), base)


def test_fusion_puts_the_reference_first_and_each_condition_on_its_frames():
    b, f, h, w, c = 2, 3, 4, 6, 16
    noisy = jnp.full((b, f, h, w, c), 1.0)
    source = jnp.concatenate([jnp.full((b, 1, h, w, c), 2.0), jnp.full((b, f - 1, h, w, c), 9.0)], axis=1)
    k = jnp.tile(jnp.asarray([0.9, 1.3, 0.5, 0.5]), (b, 1))
    turned = jnp.eye(4).at[:3, :3].set(jnp.asarray(_yaw(30.0))).at[:3, 3].set(jnp.asarray([0.5, 0.0, 0.2]))
    condition = {"normals": jnp.full((b, f, h, w, c), 3.0), "c2w": jnp.tile(turned, (b, f, 1, 1)),
                 "k": jnp.tile(k[:, None], (1, f, 1)), "ref_k": k, "has": jnp.ones((b,))}
    model = nnx.eval_shape(lambda: KIND.prepare(W.WanDiT("tiny", rngs=nnx.Rngs(0)), load_config("factorportrait-mini")))
    x = np.asarray(KIND.dit_input(model, noisy, source, condition))
    assert x.shape == (b, 1 + f, h, w, 54)
    video, ref, normal, rays = x[..., :16], x[..., 16:32], x[..., 32:48], x[..., 48:]
    np.testing.assert_array_equal(video[:, 0], 2.0)  # the reference (the source's first latent frame)
    np.testing.assert_array_equal(video[:, 1:], 1.0)  # the noisy target
    np.testing.assert_array_equal(ref[:, 0], 2.0)
    np.testing.assert_array_equal(ref[:, 1:], 0.0)  # generated frames: no reference features
    np.testing.assert_array_equal(normal[:, 0], 0.0)  # the reference frame: no normals
    np.testing.assert_array_equal(normal[:, 1:], 3.0)
    np.testing.assert_array_equal(rays[:, 0, ..., :3], 0.0)  # identity camera: at the origin, no moment
    np.testing.assert_allclose(rays[:, 0, h // 2, w // 2, 3:], [[0.0, 0.0, 1.0]] * b, atol=0.2)  # along +z
    assert np.abs(rays[:, 1:, ..., :3]).max() > 0.1  # the moved target camera
    no_camera = np.asarray(KIND.dit_input(model, noisy, source, {**condition, "has": jnp.zeros((b,))}))
    np.testing.assert_array_equal(no_camera[..., 48:], 0.0)


def test_factorportrait_trains_alike_on_one_and_eight_devices_and_exports_its_layers(tmp_path):
    from facecam_jax.checkpoints.io import open_checkpoint
    from facecam_jax.training import trainer

    config = load_config("factorportrait-mini,frames=9,batch_size=2,steps=2,checkpoint_every=2,optimizer.lr=1e-2")
    losses = []
    for name, shape in (("one", (1, 1, 1, 1)), ("eight", (2, 2, 1, 2))):
        result = trainer.train(config, str(tmp_path / name),
                               mesh=sh.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))]))
        with open(tmp_path / name / "metrics.jsonl") as f:
            losses.append([m["loss"] for m in map(json.loads, f)])
    print(f"\nfactorportrait losses, 1 device {losses[0]}, 8 devices {losses[1]}")
    assert len(losses[0]) == 2 and np.all(np.isfinite(losses[0]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert float(jnp.abs(result.model.expression.out.kernel.get_value()).max()) > 0  # trained from zero
    assert float(jnp.abs(result.model.patch_embedding.kernel.get_value()[..., 16:, :]).max()) > 0
    exported = set(open_checkpoint(result.exported))
    assert {"expression.out.weight", "expression.proj.weight", "expression.layer1.ffn.fc2.bias",
            "expression.layer0.norm1.weight", "patch_embedding.weight"} <= exported
