"""The camera-conditioning seam: kinds are found by name, FaceCam's landmarks kind is exactly
``wan_dit.facecam_velocity``, and nothing outside the kind calls FaceCam's input by name."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facecam_jax import conditioning, options
from facecam_jax.models import wan_dit as W
from facecam_jax.runtime.config_file import load_config

CFG = W.get_config("tiny").replace(in_dim=36)


def test_kinds_are_the_modules_of_the_package_and_the_config_names_one():
    assert options.camera_kinds() == ("factorportrait", "landmarks", "none", "plucker", "recammaster")
    kind = conditioning.of(load_config("mini,frames=9"))
    assert kind is conditioning.get("landmarks") and kind.name == "landmarks"
    with pytest.raises(ValueError, match="camera.kind must be one of 'factorportrait', 'landmarks', .*got 'rays'"):
        conditioning.get("rays")
    assert kind.batch_keys() == ("source", "target", "camera")
    spec = kind.batch_spec(load_config("mini,frames=9").data)
    assert spec["camera"] == ((9, 64, 48, 3), np.uint8)


def test_the_landmarks_kind_is_facecams_velocity():
    model = W.WanDiT(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    noisy, camera, source = (jnp.asarray(rng.standard_normal((2, 2, 4, 4, 16)), jnp.float32) for _ in range(3))
    t = jnp.array([700.0, 300.0])
    ctx = jnp.asarray(rng.standard_normal((2, 3, CFG.text_dim)), jnp.float32)
    kind = conditioning.get("landmarks")
    want = W.facecam_velocity(model, noisy, camera, source, t, ctx)
    np.testing.assert_array_equal(kind.velocity(model, noisy, source, {"camera": camera}, t, ctx), want)
    shape = kind.token_shape(CFG, noisy.shape)
    assert shape == W.facecam_token_shape(CFG, noisy.shape) == (2, 2 * 2 * 2 * 2, CFG.dim)
    v, residual = kind.velocity_cached(model, noisy, source, {"camera": camera}, t, ctx, skip=False,
                                       residual=jnp.zeros(shape))
    np.testing.assert_allclose(v, want, atol=1e-6)
    reused, same = jax.jit(lambda r: kind.velocity_cached(model, noisy, source, {"camera": camera}, t, ctx,
                                                          skip=jnp.array(True), residual=r))(residual)
    np.testing.assert_allclose(reused, want, atol=1e-5)  # the blocks' cached residual stands in for them
    np.testing.assert_array_equal(same, residual)
    assert kind.token_counts(CFG, noisy.shape) == (shape[1], shape[1] // 2)


def test_nothing_outside_the_landmarks_kind_calls_facecams_input_by_name():
    root = pathlib.Path(__file__).resolve().parents[1]
    allowed = {"facecam_jax/conditioning/landmarks.py", "facecam_jax/models/wan_dit.py"}
    call = re.compile(r"\b(facecam_velocity|facecam_velocity_cached|facecam_input|facecam_token_shape)\(")
    found = []
    for folder in ("facecam_jax", "bench", "tools", "configs"):
        for path in (root / folder).rglob("*.py"):
            rel = str(path.relative_to(root))
            if rel not in allowed and call.search(path.read_text()):
                found.append(rel)
    assert found == []


def test_the_none_kind_trains_and_samples_without_a_camera(tmp_path):
    """The comparison's floor: no camera input and no camera layers; it trains and samples."""
    from facecam_jax import sampling
    from facecam_jax.training import trainer

    config = load_config("mini,frames=9,batch_size=2,steps=2,checkpoint_every=2,camera.kind=none,model.in_dim=16,"
                         "sample.num_steps=1")
    kind = conditioning.of(config)
    assert kind.batch_keys() == ("source", "target") and kind.input_frames(3) == 6
    result = trainer.train(config, str(tmp_path / "run"))
    assert result.model.camera_patch is None and not result.model.has_camera_layers
    frames = np.random.default_rng(0).integers(0, 255, (9, 64, 48, 3), dtype=np.uint8)
    video = sampling.generate(config, frames, kind.load_trajectory("arc_left", 9), workdir=str(tmp_path / "run")).video
    assert video.shape == frames.shape
