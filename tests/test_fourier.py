"""Fourier cropping and sub-pixel shifts against analytic Gaussians."""

import numpy as np
import pytest

from cryomatch.kernels.fourier import fourier_crop, shift_images


def gaussian(box, centre=(0.0, 0.0), sigma=4.0, scale=1.0):
    g = (np.arange(box) - box // 2) * scale
    yy, xx = np.meshgrid(g, g, indexing="ij")
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("new_box", [32, 48, 96])
def test_fourier_crop_resamples_band_limited_image(new_box):
    img = gaussian(64, (2.0, -3.0), sigma=4.0)[None].astype(np.float32)
    out = fourier_crop(img, new_box)[0]
    expected = gaussian(new_box, (2.0, -3.0), sigma=4.0, scale=64 / new_box)
    np.testing.assert_allclose(out, expected, atol=2e-3)
    assert out.mean() == pytest.approx(img.mean(), rel=1e-4)  # same field of view


def test_shift_images_moves_by_subpixel_amount():
    img = gaussian(64, sigma=3.0)[None].astype(np.float32)
    out = shift_images(img, np.array([[1.5, -2.25]]))[0]
    np.testing.assert_allclose(out, gaussian(64, (1.5, -2.25), sigma=3.0), atol=1e-4)
