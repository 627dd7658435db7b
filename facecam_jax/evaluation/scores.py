"""PSNR and SSIM of uint8 RGB videos against their true targets (data range 255, averaged over frames).

SSIM is Wang et al.'s Gaussian-window SSIM, implemented here so scikit-image stays a test extra.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# PSNR of identical frames is infinite; a cap keeps averages and JSON finite. One grey level of
# error on a single pixel of a 704x480 frame already reads ~108 dB, so nothing real is clipped
# below 100 dB.
PSNR_CAP = 100.0
# Wang et al. 2004: Gaussian window sigma 1.5 truncated to 11 taps (radius int(3.5 * 1.5 + 0.5)).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 RGB videos [T, H, W, 3] (or images [H, W, 3]) of one shape, as [T, H, W, 3]."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}; compare equal frame counts and sizes")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (data range 255), got {a.dtype} and {b.dtype}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, C] with T >= 1 or one image [H, W, C], got {a.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 videos (data range 255): per frame, capped at PSNR_CAP, averaged over frames."""
    a, b = _pair(a, b)
    values = []
    for x, y in zip(a, b):
        mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
        values.append(PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * math.log10(DATA_RANGE ** 2 / mse)))
    return float(np.mean(values))


def ssim_frame(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two images [H, W, C] (or [H, W]) in 0..255, channels averaged.

    Gaussian window (sigma 1.5, 11 taps), population covariances, K1 0.01, K2 0.03; the mean
    is taken where the whole window lies inside the image (a 5-pixel border is left out),
    i.e. Wang et al. 2004 and `skimage.metrics.structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=255)`.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    pad = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if min(x.shape[:2]) < 2 * pad + 1:
        raise ValueError(f"SSIM needs frames of at least {2 * pad + 1}x{2 * pad + 1} pixels, got {x.shape[:2]}")

    def blur(image):  # [H, W, C], each channel on its own
        return ndimage.gaussian_filter(image, sigma=(SSIM_SIGMA, SSIM_SIGMA, 0.0), truncate=SSIM_TRUNCATE,
                                       mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 videos [T, H, W, 3] (or images): `ssim_frame` per frame, averaged over frames."""
    a, b = _pair(a, b)
    return float(np.mean([ssim_frame(x, y) for x, y in zip(a, b)]))
