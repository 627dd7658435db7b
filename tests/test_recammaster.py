"""ReCamMaster in the codebase: the block change against a torch reference written over
diffusers' Wan blocks, initialisation, the camera files, training and sampling through the seam."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import conditioning
from facecam_jax.camera import extrinsics, trajectories
from facecam_jax.checkpoints import dit as ckpt
from facecam_jax.checkpoints import load_dit
from facecam_jax.checkpoints.io import write_safetensors
from facecam_jax.models import wan_dit as W

TINY = W.PRESETS["tiny"]  # in_dim 16: ReCamMaster adds no input channels
REL_TOL = 1e-5


def _inputs(seed=0, batch=2, frames=2, hw=(4, 6)):
    rng = np.random.default_rng(seed)
    noisy, source = (rng.standard_normal((batch, frames, *hw, 16)).astype(np.float32) for _ in range(2))
    cams = rng.standard_normal((batch, frames, 12)).astype(np.float32)
    t = np.array([999.0, 437.5][:batch], np.float32)
    ctx = rng.standard_normal((batch, 5, TINY.text_dim)).astype(np.float32)
    return noisy, source, cams, t, ctx


def _recammaster_block_forward(torch, block, cams_per_token):
    """ReCamMaster's block over a diffusers WanTransformerBlock (SPEC 12): the camera offset
    added to the modulated norm1 input, the projector on the self-attention output."""

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
        x_in = (self.norm1(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        x_in = x_in + self.cam_encoder(cams_per_token[0])
        attn = self.projector(self.attn1(x_in, None, None, rotary_emb))
        hidden_states = (hidden_states.float() + attn * gate).type_as(hidden_states)
        h = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(h, encoder_hidden_states, None, None)
        h = (self.norm3(hidden_states.float()) * (1 + c_scale) + c_shift).type_as(hidden_states)
        return (hidden_states.float() + self.ffn(h).float() * c_gate).type_as(hidden_states)

    block.forward = types.MethodType(forward, block)


@pytest.fixture(scope="module")
def reference(torch, tmp_path_factory):
    """A tiny diffusers Wan DiT with random camera layers per block; its base weights on disk."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_config(ckpt.diffusers_config(TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and "weight" in name else 0.0) + 0.15 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("rcm") / "base.safetensors")
    write_safetensors(path, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    cams_per_token = [None]
    for block in model.blocks:
        block.cam_encoder = torch.nn.Linear(12, TINY.dim)
        block.projector = torch.nn.Linear(TINY.dim, TINY.dim)
        with torch.no_grad():
            for layer in (block.cam_encoder, block.projector):
                layer.weight.copy_(0.2 * torch.randn_like(layer.weight))
                layer.bias.copy_(0.1 * torch.randn_like(layer.bias))
        _recammaster_block_forward(torch, block, cams_per_token)
    return model, path, cams_per_token


def _torch_velocity(torch, model, cams_per_token, noisy, source, cams, t, ctx):
    f, h, w = noisy.shape[1], noisy.shape[2] // 2, noisy.shape[3] // 2
    tiled = np.concatenate([cams, cams], axis=1)  # both halves see the target's cameras
    cams_per_token[0] = torch.from_numpy(np.repeat(tiled, h * w, axis=1))  # [B, 2F * h * w, 12]
    x = np.concatenate([noisy, source], axis=1).transpose(0, 4, 1, 2, 3)
    pad = np.zeros((ctx.shape[0], TINY.text_len, TINY.text_dim), np.float32)
    pad[:, :ctx.shape[1]] = ctx
    with torch.no_grad():
        out = model(torch.from_numpy(x.copy()), torch.from_numpy(t), torch.from_numpy(pad), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)[:, :f]


def _with_torch_camera_layers(jmodel, torch_model):
    W.add_camera_layers(jmodel)
    stack = lambda get: jnp.asarray(np.stack([get(b).detach().numpy() for b in torch_model.blocks]))  # noqa: E731
    jmodel.blocks.cam_encoder.kernel.set_value(stack(lambda b: b.cam_encoder.weight.T))
    jmodel.blocks.cam_encoder.bias.set_value(stack(lambda b: b.cam_encoder.bias))
    jmodel.blocks.projector.kernel.set_value(stack(lambda b: b.projector.weight.T))
    jmodel.blocks.projector.bias.set_value(stack(lambda b: b.projector.bias))
    return jmodel


@pytest.mark.parametrize("hw", [(4, 6), (6, 4)])  # any grid: the broadcast follows the real token grid
def test_recammaster_velocity_parity(reference, torch, hw):
    model, path, cams_per_token = reference
    jmodel = _with_torch_camera_layers(load_dit(path, config=TINY), model)
    noisy, source, cams, t, ctx = _inputs(hw=hw)
    want = _torch_velocity(torch, model, cams_per_token, noisy, source, cams, t, ctx)
    got = np.asarray(nnx.jit(W.recammaster_velocity)(jmodel, noisy, source, cams, t, ctx))
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"\n[recammaster_velocity {hw}] max rel err {rel:.2e}")
    assert got.shape == noisy.shape and rel <= REL_TOL
    kind = conditioning.get("recammaster")
    via_kind = np.asarray(kind.velocity(jmodel, noisy, source, {"cameras": cams}, t, ctx))
    np.testing.assert_allclose(via_kind, got, rtol=1e-6, atol=1e-6)
    other = np.asarray(W.recammaster_velocity(jmodel, noisy, source, cams + 1.0, t, ctx))
    assert np.abs(other - got).max() > 1e-3  # the cameras reach the output


def test_camera_layers_start_as_the_base_model(reference):
    _, path, _ = reference
    base = load_dit(path, config=TINY)
    noisy, source, cams, t, ctx = _inputs(seed=1)
    want = np.asarray(base(jnp.concatenate([noisy, source], axis=1), t, ctx, out_frames=noisy.shape[1]))
    wrapped = W.add_camera_layers(load_dit(path, config=TINY))
    assert wrapped.has_camera_layers and wrapped.blocks.cam_encoder.kernel.get_value().shape == (2, 12, TINY.dim)
    got = np.asarray(W.recammaster_velocity(wrapped, noisy, source, cams, t, ctx))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no camera layers"):
        base(jnp.concatenate([noisy, source], axis=1), t, ctx, camera=jnp.zeros((2, 4, 12)))
    with pytest.raises(ValueError, match="give camera"):
        wrapped(jnp.concatenate([noisy, source], axis=1), t, ctx)


def test_recammaster_camera_file_and_presets(tmp_path):
    # A hand-made file: camera 1 still, camera 2 dollies 50 cm forward (Unreal +x) over 9 frames.
    def unreal(x_cm):
        m = np.eye(4)
        m[0, 3] = x_cm
        return " ".join("[" + " ".join(f"{v:g}" for v in row) + "]" for row in m.T)  # stored transposed

    data = {f"frame{i}": {"cam01": unreal(0.0), "cam02": unreal(50.0 * i / 8)} for i in range(9)}
    path = tmp_path / "camera_extrinsics.json"
    path.write_text(__import__("json").dumps(data))
    still = extrinsics.recammaster_poses(path, 1, frames=9)
    assert still.shape == (3, 12) and still.dtype == np.float32
    np.testing.assert_allclose(still, np.tile(np.eye(4)[:3].reshape(12), (3, 1)), atol=1e-7)
    dolly = extrinsics.recammaster_poses(path, 2, frames=9).reshape(3, 3, 4)
    np.testing.assert_allclose(dolly[:, :, :3], np.tile(np.eye(3), (3, 1, 1)), atol=1e-7)
    np.testing.assert_allclose(dolly[:, :, 3], [[0, 0, 0], [0, 0, 0.25], [0, 0, 0.5]], atol=1e-6)  # OpenCV +z, m
    with pytest.raises(ValueError, match="no cam03"):
        extrinsics.recammaster_poses(path, 3, frames=9)
    # The presets round-trip through the format, and name the motion they make.
    written = tmp_path / "presets.json"
    extrinsics.write_recammaster_json(written, {n + 1: extrinsics.preset_c2w(p, 9)
                                                for n, p in enumerate(extrinsics.PRESETS)})
    for n, name in enumerate(extrinsics.PRESETS, start=1):
        np.testing.assert_allclose(extrinsics.recammaster_poses(written, n, frames=9),
                                   extrinsics.preset_poses(f"cam{n:02d}", 9), atol=1e-5)
    pan = extrinsics.preset_poses("pan_right", 9).reshape(3, 3, 4)
    assert pan[-1, 0, 2] > 0.4 and np.abs(pan[-1, :, 3]).max() < 1e-6  # turned right, did not move
    arc = extrinsics.preset_poses("arc_left", 9).reshape(3, 3, 4)
    assert arc[-1, 0, 3] < -1.0  # moved left around the subject
    # A project trajectory: the arc around the head in metres, relative to the first frame.
    traj = extrinsics.trajectory_poses(trajectories.canonical("arc_left", 9)).reshape(3, 3, 4)
    np.testing.assert_allclose(traj[0], np.eye(4)[:3], atol=1e-6)
    radius = trajectories.RADIUS * extrinsics.METRES_PER_ORBIT_UNIT
    assert 0.1 * radius < np.linalg.norm(traj[-1, :, 3]) < 2 * radius


def test_training_pairs_take_poses_relative_to_the_source_camera():
    rng = np.random.default_rng(0)

    def pose():
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = q, rng.standard_normal(3)
        return m

    source = np.stack([pose() for _ in range(2)])
    target = np.stack([np.stack([pose() for _ in range(9)]) for _ in range(2)])
    target[1] = np.nan  # an in-the-wild sample: no cameras
    got = np.asarray(extrinsics.relative_poses(jnp.asarray(source, jnp.float32), jnp.asarray(target, jnp.float32),
                                               xp=jnp))
    want0 = np.stack([(source[0] @ np.linalg.inv(target[0, i]))[:3].reshape(12) for i in (0, 4, 8)])
    np.testing.assert_allclose(got[0], want0, atol=1e-4)
    np.testing.assert_array_equal(got[1], np.tile(np.eye(4)[:3].reshape(12), (3, 1)))


def test_recammaster_trains_alike_on_one_and_eight_devices(tmp_path):
    """The mini dataset's camera pairs through the same pipeline; one device and data 2 x fsdp 2 x
    tensor 2 give the same losses, and the camera layers move."""
    import json

    from facecam_jax import sharding as sh
    from facecam_jax.runtime.config_file import load_config
    from facecam_jax.training import trainer

    config = load_config("recammaster-mini,frames=9,batch_size=2,steps=2,checkpoint_every=2,optimizer.lr=1e-2")
    losses = []
    for name, shape in (("one", (1, 1, 1, 1)), ("eight", (2, 2, 1, 2))):
        mesh = sh.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        result = trainer.train(config, str(tmp_path / name), mesh=mesh)
        with open(tmp_path / name / "metrics.jsonl") as f:
            losses.append([m["loss"] for m in map(json.loads, f)])
    print(f"\nrecammaster losses, 1 device {losses[0]}, 8 devices {losses[1]}")
    assert len(losses[0]) == 2 and np.all(np.isfinite(losses[0]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert float(jnp.abs(result.model.blocks.cam_encoder.kernel.get_value()).max()) > 0  # trained from zero


@pytest.mark.parametrize("remat", ["none", "full"])
def test_flops_count_the_camera_layers_as_traced(remat):
    """The analytic FLOPs with ReCamMaster's layers (trained with the self-attention) equal the
    dots JAX traces for its velocity and its loss gradient."""
    from facecam_jax import build
    from facecam_jax.perf import flops as flops_lib

    kind = conditioning.get("recammaster")
    model = nnx.eval_shape(lambda: W.add_camera_layers(W.WanDiT(TINY, rngs=nnx.Rngs(0), remat=remat)))
    trainable = kind.trainable_names(("self_attn",))
    graphdef, params, frozen = nnx.split(model, nnx.All(nnx.Param, build.trainable_filter(trainable)), ...)
    lat = jax.ShapeDtypeStruct((1, 2, 4, 4, 16), jnp.float32)  # 2 x 8 tokens, 2 x 2 frames
    args = (lat, lat, jax.ShapeDtypeStruct((1, 2, 12), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, 16, 32), jnp.float32))

    def velocity(p, f, *a):
        return W.recammaster_velocity(nnx.merge(graphdef, p, f), *a)

    loss = lambda p, f, *a: (velocity(p, f, *a) ** 2).sum()  # noqa: E731
    traced_forward = flops_lib.jaxpr_flops(jax.make_jaxpr(velocity)(params, frozen, *args))
    traced_step = flops_lib.jaxpr_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params, frozen, *args))
    flops = flops_lib.dit_flops(TINY, 1, 16, 8, trainable, remat, camera_linears=kind.block_linears(TINY), frames=4)
    plain = flops_lib.dit_flops(TINY, 1, 16, 8)
    assert flops["forward"] == traced_forward > plain["forward"]
    assert flops["forward"] + flops["backward"] + flops["remat"] == traced_step


def test_recammaster_samples_alike_on_one_and_eight_devices_and_from_the_cli(tmp_path):
    """The sampling program with the camera layers on fsdp 8 renders what one device renders
    (within one grey level); the sample command line takes ReCamMaster's camera files."""
    import forked_runs
    from camera_kind_checks import grey_levels_one_vs_eight_devices

    from facecam_jax.runtime.config_file import load_config
    from facecam_jax.video_io import read_video

    diff = grey_levels_one_vs_eight_devices(load_config("recammaster-mini,frames=9,sample.num_steps=2"), "cam09")
    print(f"\nrecammaster render, fsdp 8 vs 1 device: max {diff} grey levels")
    assert diff <= 1
    cameras = tmp_path / "camera_extrinsics.json"
    extrinsics.write_recammaster_json(cameras, {2: extrinsics.preset_c2w("zoom_in", 9)})
    out = tmp_path / "out.mp4"
    run = forked_runs.run("-m", "facecam_jax.sample", "--config", "configs/facecam.py:recammaster-mini,frames=9",
                          "--config.sample.num_steps=1", "--frames", "9", "--trajectory", f"{cameras}:2",
                          "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert read_video(str(out))[0].shape == (9, 64, 48, 3)
    bad = forked_runs.run("-m", "facecam_jax.sample", "--config", "configs/facecam.py:recammaster-mini,frames=9",
                          "--frames", "9", "--trajectory", f"{cameras}:7", "--out", str(tmp_path / "bad.mp4"))
    assert bad.returncode == 1 and "no cam07" in bad.stderr and not (tmp_path / "bad.mp4").exists()


def test_recammaster_checkpoints_load(reference, torch, tmp_path):
    """ReCamMaster's step20000.ckpt layout (torch.save of a state dict in DiffSynth naming: the
    whole DiT plus the camera layers) loads with camera='recammaster', as do the same tensors in
    safetensors and a camera-layers-only overlay over a Wan base; anything else is one clear error."""
    import re

    from facecam_jax.checkpoints import CheckpointError
    from facecam_jax.checkpoints.dit_naming import diffusers_to_original

    model, base_path, cams_per_token = reference
    base = {diffusers_to_original(k): v for k, v in model.state_dict().items()
            if not re.search(r"\.(cam_encoder|projector)\.", k)}
    cameras = {f"blocks.{i}.{layer}.{p}": getattr(getattr(b, layer), p).detach().clone()
               for i, b in enumerate(model.blocks) for layer in ("cam_encoder", "projector") for p in ("weight", "bias")}
    ckpt_path = str(tmp_path / "step20000.ckpt")
    torch.save({**base, **cameras}, ckpt_path)
    noisy, source, cams, t, ctx = _inputs(seed=2)
    want = _torch_velocity(torch, model, cams_per_token, noisy, source, cams, t, ctx)
    jmodel = load_dit(ckpt_path, config=TINY, camera="recammaster")
    got = np.asarray(W.recammaster_velocity(jmodel, noisy, source, cams, t, ctx))
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= REL_TOL
    overlay = str(tmp_path / "cameras.safetensors")
    write_safetensors(overlay, {k: v.numpy() for k, v in cameras.items()})
    layered = load_dit(base_path, config=TINY, camera="recammaster", overlay=overlay)
    np.testing.assert_allclose(np.asarray(W.recammaster_velocity(layered, noisy, source, cams, t, ctx)), got,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(CheckpointError, match="camera layers: load it with camera='recammaster'"):
        load_dit(ckpt_path, config=TINY)
    with pytest.raises(CheckpointError, match="hold no camera layers"):
        load_dit(base_path, config=TINY, camera="recammaster")
    # A hostile pickle under the .ckpt name is refused as for every .pth (nothing runs).
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (__import__("os").system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError):
        load_dit(str(evil), config=TINY, camera="recammaster")
    assert not (tmp_path / "pwned").exists()


def test_multicamvideo_scenes_train_recammaster(tmp_path):
    """A MultiCamVideo-layout scene (videos/camNN.mp4, cameras/camera_extrinsics.json, moving
    cameras, no faces) feeds ReCamMaster's training: each batch's poses are its target cameras
    relative to its source camera at the clip start, read from the file, and a step trains."""
    from facecam_jax.data import pipeline
    from facecam_jax.runtime.config_file import load_config
    from facecam_jax.training import trainer
    from facecam_jax.video_io import write_video

    scene = tmp_path / "train" / "f18_aperture10" / "scene1"
    (scene / "videos").mkdir(parents=True)
    (scene / "cameras").mkdir()
    rng = np.random.default_rng(0)
    c2w = {n: extrinsics.preset_c2w(name, 9) for n, name in ((1, "pan_right"), (2, "arc_left"), (3, "zoom_in"))}
    c2w[2][:, :3, 3] += [1.0, 0.0, 0.5]  # the cameras start at different places
    for n in c2w:
        write_video(str(scene / "videos" / f"cam{n:02d}.mp4"), rng.integers(0, 255, (9, 48, 64, 3), np.uint8), 15.0)
    extrinsics.write_recammaster_json(scene / "cameras" / "camera_extrinsics.json", c2w)
    config = load_config(f"recammaster-mini,data.dataset=files,data.multiview_layout=multicamvideo,"
                         f"data.multiview_root={tmp_path / 'train'},data.composite=False,frames=9,stride=1,"
                         "batch_size=2,data.max_shots=1,steps=1,checkpoint_every=1")
    kind = conditioning.of(config)
    batch = next(pipeline.make_train_iterator(config, needs=kind.batch_keys()))
    assert not batch["camera"].any()  # no landmark maps drawn (ReCamMaster reads none), no face needed
    poses = np.asarray(kind.condition({}, {k: jnp.asarray(batch[k]) for k in kind.batch_arrays})["cameras"])
    for b in range(2):
        source, target = (int(c) + 1 for c in batch["cameras"][b][:2])
        want = extrinsics.flatten(np.linalg.inv(c2w[source][0]) @ c2w[target][[0, 4, 8]])
        np.testing.assert_allclose(poses[b], want, atol=2e-4)
    assert trainer.train(config, str(tmp_path / "run")).step == 1
