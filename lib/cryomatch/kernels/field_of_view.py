"""Does the specimen stay inside the field of view? Centre-of-mass laws (etspy's COM and
COM-CL, and the COM start of cryomatch's reprojection) hold only for an object whose every
projection lies inside the image across the tilt axis; a slab wider than the field of view
(most cryo-ET) breaks them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .tiltalign import background_level


def edge_signal(stack, band: float = 0.05, sigma: float = 2.0) -> np.ndarray:
    """Per image (n,): the signal in the frame's left and right bands (across a tilt axis
    along y), relative to the image's signal. Images (n, ny, nx), background removed as
    :func:`~cryomatch.kernels.tiltalign.background_level` does, are smoothed by a Gaussian
    of ``sigma`` px (noise); the value is the larger of the two bands' mean |signal| over
    ``band`` x nx columns, divided by the 99th percentile of |signal| in the image. An
    object inside the field of view gives about the smoothed noise (a few percent); a
    specimen crossing the edges gives tenths."""
    data = np.asarray(stack, dtype=np.float32)
    data = data - background_level(data)[:, None, None]
    smooth = np.abs(ndimage.gaussian_filter(data, (0, sigma, sigma)))
    n, ny, nx = data.shape
    w = max(2, int(round(band * nx)))
    rows = slice(ny // 10, ny - ny // 10)  # corners turned in from the raw frame are left out
    left = smooth[:, rows, :w].mean(axis=(1, 2))
    right = smooth[:, rows, -w:].mean(axis=(1, 2))
    scale = np.percentile(smooth.reshape(n, -1), 99, axis=1)
    return np.maximum(left, right) / np.maximum(scale, 1e-30)
