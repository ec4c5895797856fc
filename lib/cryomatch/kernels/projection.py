"""Projections of 3D structures along z at RELION poses (see :mod:`cryomatch.geometry`).

Images are line integrals in units of (density x voxels): the sum along z of a voxelized
map, so that :func:`project_atoms` of a phantom equals the z-sum of :func:`voxelize_atoms`.
Pixel (iy, ix) of a box-n image sits at (x, y) = (ix - n//2, iy - n//2) pixels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..backend import array_module


def _gaussian_profiles(centres, sigmas, box, xp):
    """exp(-(i - c)^2 / 2 s^2) for pixel centres i: (..., atoms, box); centres in pixels
    about the box centre."""
    grid = xp.arange(box, dtype=xp.float64) - box // 2
    d = grid - centres[..., None]
    return xp.exp(-0.5 * d * d / (sigmas[..., None] ** 2))


def project_atoms(coords, amplitudes, sigmas, matrices, box, pixel_size, displacements=None):
    """Exact projections of Gaussian pseudo-atoms.

    coords (a, 3) x, y, z in Angstrom about the centre; amplitudes (a,) peak densities;
    sigmas (a,) in Angstrom; matrices (n, 3, 3) RELION A; displacements (n, 2) x, y in
    Angstrom of the particle from the image centre (``-origin``). Returns (n, box, box).
    """
    xp = array_module(coords)
    matrices = xp.asarray(matrices, dtype=xp.float64)
    rotated = xp.einsum("nij,aj->nai", matrices, xp.asarray(coords, dtype=xp.float64))
    centres = rotated[..., :2] / pixel_size
    if displacements is not None:
        centres = centres + xp.asarray(displacements, dtype=xp.float64)[:, None, :] / pixel_size
    s = xp.asarray(sigmas, dtype=xp.float64) / pixel_size
    weight = xp.asarray(amplitudes, dtype=xp.float64) * np.sqrt(2 * np.pi) * s  # z-integral
    gx = _gaussian_profiles(centres[..., 0], s, box, xp)
    gy = _gaussian_profiles(centres[..., 1], s, box, xp) * weight[:, None]
    return xp.matmul(xp.swapaxes(gy, -1, -2), gx).astype(xp.float32)


def voxelize_atoms(coords, amplitudes, sigmas, box, pixel_size):
    """Gaussian pseudo-atoms sampled on a box^3 grid (z, y, x), voxel centres as in images."""
    xp = array_module(coords)
    c = xp.asarray(coords, dtype=xp.float64) / pixel_size
    s = xp.asarray(sigmas, dtype=xp.float64) / pixel_size
    gx = _gaussian_profiles(c[:, 0], s, box, xp)
    gy = _gaussian_profiles(c[:, 1], s, box, xp)
    gz = _gaussian_profiles(c[:, 2], s, box, xp) * xp.asarray(amplitudes, dtype=xp.float64)[:, None]
    plane = (gy[:, :, None] * gx[:, None, :]).reshape(len(c), box * box)
    return (gz.T @ plane).reshape(box, box, box).astype(xp.float32)


def spline_coefficients(volume, order: int = 3):
    """Prefiltered B-spline coefficients for :func:`project_volume` (compute once per map)."""
    return ndimage.spline_filter(
        np.asarray(volume, dtype=np.float64), order=order, mode="grid-constant"
    )


def project_volume(coefficients, matrices, displacements_px=None, order: int = 3):
    """Real-space projections of a map by spline interpolation (numpy only).

    coefficients: from :func:`spline_coefficients` (z, y, x) of a cubic box; matrices
    (n, 3, 3) RELION A; displacements_px (n, 2) x, y of the particle from the centre in
    pixels. Returns float32 (n, box, box): image(x, y) = sum_z V(A^T (x - dx, y - dy, z)).
    """
    box = coefficients.shape[-1]
    grid = np.arange(box, dtype=np.float64) - box // 2
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    out = np.empty((len(matrices), box, box), dtype=np.float32)
    for i, a in enumerate(np.asarray(matrices, dtype=np.float64)):
        dx, dy = (0.0, 0.0) if displacements_px is None else displacements_px[i]
        pts = np.stack([(x - dx).ravel(), (y - dy).ravel(), z.ravel()])  # image frame (x,y,z)
        mx, my, mz = a.T @ pts  # map frame
        samples = ndimage.map_coordinates(
            coefficients,
            [mz + box // 2, my + box // 2, mx + box // 2],
            order=order,
            mode="grid-constant",
            prefilter=False,
        )
        out[i] = samples.reshape(box, box, box).sum(axis=0)
    return out
