"""Reconstruction training of the mini VAE: a short run learns, statistics normalise, saving round-trips."""

import itertools

import numpy as np
import pytest
from flax import nnx

from facecam_jax import build
from facecam_jax import video_io as video
from facecam_jax.checkpoints.vae import load_vae, save_vae
from facecam_jax.data import augment, mini_dataset
from facecam_jax.models.wan_vae import VAEConfig, WanVAE, to_unit_range
from facecam_jax.training import vae_training as vt

# Measured: 8 random-init frames reconstruct at ~10 dB; after the short run below at ~21.6 dB
# (fixed frames, 40 steps at lr 1e-3; 17.8 dB after 20, 23.9 after 80; ~15 s on 2 CPU cores).
MIN_PSNR = 18.0


@pytest.fixture(scope="module")
def frames():
    """8 real frames of 4 mini-dataset cameras at 32x32 (uint8 [8, 1, 32, 32, 3])."""
    built = mini_dataset.build()
    out = []
    for serial in mini_dataset.serials(8)[:4]:
        raw = video.read_frames(built.video_path(serial), [10, 70])
        crop = augment.cover_crop_params(raw.shape[1], raw.shape[2], 32, 32)
        out.append(augment.apply_cover_crop(raw, crop, 32, 32))
    return np.concatenate(out)[:, None]


def test_short_run_reconstructs_beyond_the_stated_psnr(frames):
    vae = vt.zero_residual_branches(WanVAE(build.vae_config("mini"), rngs=nnx.Rngs(0)))
    before = vt.reconstruction_psnr(vae, frames)
    settings = vt.VAETraining(steps=40, clips=len(frames), frames=1, lr=1e-3, log_every=20)
    run = vt.train(vae, itertools.repeat(frames), settings)
    after = vt.reconstruction_psnr(vae, frames)
    print(f"\n[mini VAE] reconstruction PSNR {before:.2f} -> {after:.2f} dB in {settings.steps} steps "
          f"({run.history[-1]['seconds']:.1f} s); training-batch PSNR {[round(r['psnr'], 1) for r in run.history]}")
    assert after > MIN_PSNR and after > before + 8.0


def test_latent_statistics_normalise_and_survive_a_save(tmp_path):
    vae = WanVAE(VAEConfig(dim=8, z_dim=4, latents_mean=None, latents_std=None), rngs=nnx.Rngs(1))
    videos = np.random.default_rng(0).integers(0, 256, (4, 5, 16, 16, 3), dtype=np.uint8)
    mean, std = vt.latent_stats(vae, videos, batch=2)
    vt.set_latent_stats(vae, mean, std)

    def encode(model):  # two videos at a time, as the statistics were gathered: one program
        return np.concatenate([np.asarray(model.encode(to_unit_range(videos[i:i + 2]))) for i in (0, 2)])

    z = encode(vae)
    np.testing.assert_allclose(z.reshape(-1, 4).mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.reshape(-1, 4).std(0), 1.0, atol=1e-4)
    loaded = load_vae(save_vae(vae, str(tmp_path / "vae")))
    assert loaded.config == vae.config
    np.testing.assert_array_equal(encode(loaded), z)


def test_clip_stream_cuts_clips_from_every_video_of_a_batch():
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 256, (2, 9, 8, 8, 3), dtype=np.uint8) for k in vt.CLIP_KEYS}
    clips = vt.clip_stream(itertools.repeat(batch), clips=3, frames=5, seed=0)
    seen = np.concatenate([next(clips) for _ in range(4)])  # 12 clips: two batches' 6 videos each
    assert seen.shape == (12, 5, 8, 8, 3)
    videos = np.concatenate([batch[k] for k in vt.CLIP_KEYS])
    for clip in seen:  # each clip is 5 consecutive frames of one of the batch's videos
        assert any(np.array_equal(clip, v[s:s + 5]) for v in videos for s in range(5))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vt.VAETraining(frames=4)
