"""Real-space helpers for 3D volumes: soft spherical masks, Fourier-space filtering."""

from __future__ import annotations

import numpy as np

from ..backend import array_module, fft_module


def soft_sphere(shape, radius: float, edge: float = 3.0, centre=None, xp=np):
    """Mask (z, y, x) float32: 1 within ``radius`` voxels of ``centre`` (default the box
    centre ``shape // 2``), a raised-cosine fall-off to 0 over ``edge`` voxels."""
    centre = np.asarray(shape) // 2 if centre is None else np.asarray(centre, dtype=np.float64)
    axes = [xp.arange(n, dtype=xp.float32) - float(c) for n, c in zip(shape, centre, strict=True)]
    r = xp.sqrt(
        axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    )
    t = xp.clip((r - radius) / max(edge, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(np.pi * t)).astype(xp.float32)


def fourier_filter(volumes, weights):
    """Volumes (..., nz, ny, nx) multiplied by rfftn-grid ``weights`` in Fourier space."""
    xp = array_module(volumes)
    fft = fft_module(xp)
    shape = volumes.shape[-3:]
    spectrum = fft.rfftn(volumes, axes=(-3, -2, -1)) * weights
    return fft.irfftn(spectrum, s=shape, axes=(-3, -2, -1)).astype(xp.float32, copy=False)


def fourier_resize(volume, box: int):
    """A cubic volume (n, n, n) resampled to (box, box, box) by cropping (or zero-padding)
    its Fourier transform; the voxel size becomes ``voxel * n / box``. Mean preserved."""
    xp = array_module(volume)
    fft = fft_module(xp)
    n = volume.shape[-1]
    if box == n:
        return volume
    spectrum = fft.fftshift(fft.fftn(volume))
    c, h, m = n // 2, box // 2, min(n, box)
    out = xp.zeros((box,) * 3, dtype=spectrum.dtype)
    src = tuple(slice(c - m // 2, c - m // 2 + m) for _ in range(3))
    dst = tuple(slice(h - m // 2, h - m // 2 + m) for _ in range(3))
    out[dst] = spectrum[src]
    resized = fft.ifftn(fft.ifftshift(out)).real * (box / n) ** 3
    return resized.astype(xp.float32)
