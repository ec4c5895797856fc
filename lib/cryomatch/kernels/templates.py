"""Templates: Fourier transforms of a structure's projections on the polar grid, per viewing
direction (in-plane angle 0; the search turns them).

Viewing directions cover the sphere as in CryoLike: ``viewing_distance`` is the spacing in
radians between neighbouring directions on the unit sphere; Gauss-Legendre nodes in
cos(tilt) (3 + ceil(n_equator / 2) circles, n_equator = 3 + round(2 pi / distance)), on each
circle 3 + round(2 pi sin(tilt) / distance) equally spaced azimuths; the quadrature weights
(Legendre weight x azimuth step) are normalized to sum 1.

For a RELION pose A (:mod:`cryomatch.geometry`) the projection's transform is the central
slice ``F_P(k) = F_V(A^T (kx, ky, 0))`` (frequencies in cycles per pixel, the map's voxel =
the image's pixel). From a map: its DFT at those points (:func:`~.nufft.nufft3d2`, exact to
the tolerance). From Gaussian atoms ``a exp(-|X - x|^2 / 2 s^2)``: the analytic transform
``a (2 pi s^2)^{3/2} exp(-2 pi^2 s^2 |k|^2) exp(-2 pi i k.x)`` (pixel units), summed.
"""

from __future__ import annotations

import numpy as np
from scipy.special import roots_legendre

from .. import geometry
from .nufft import nufft3d2
from .polar_fourier import PolarGrid, finufft_available, full_circle


def viewing_directions(viewing_distance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rot, tilt) in degrees and quadrature weights (sum 1) of directions spaced by
    ``viewing_distance`` radians (see the module docstring)."""
    frequency = 2.0 * np.pi / viewing_distance
    n_equator = 3 + int(round(frequency))
    n_circles = 3 + int(np.ceil(n_equator / 2))
    nodes, weights = roots_legendre(n_circles)
    tilts = np.arccos(nodes)
    rot, tilt, w = [], [], []
    for t, wt in zip(tilts, weights, strict=True):
        n_az = 3 + int(round(frequency * np.sin(t)))
        rot.append(np.arange(n_az) * (360.0 / n_az))
        tilt.append(np.full(n_az, np.rad2deg(t)))
        w.append(np.full(n_az, wt * 2.0 * np.pi / n_az))
    w = np.concatenate(w)
    return np.concatenate(rot), np.concatenate(tilt), w / w.sum()


def slice_points(grid: PolarGrid, matrices) -> np.ndarray:
    """3D frequencies A^T (kx, ky, 0) of the first half of the polar angles, for RELION
    matrices (S, 3, 3): (S, R, W/2, 3) as (x, y, z) in cycles per pixel."""
    kx, ky = grid.points(half=True)
    matrices = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    # (A^T k)_i = sum_j A_ji k_j with k = (kx, ky, 0)
    return (
        kx[None, :, :, None] * matrices[:, None, None, 0, :]
        + ky[None, :, :, None] * matrices[:, None, None, 1, :]
    )


def map_templates(
    volume,
    grid: PolarGrid,
    matrices,
    eps: float = 1e-6,
    method: str = "auto",
    chunk_points: int = 2_000_000,
):
    """Central slices of a (z, y, x) map on the polar grid: complex64 (S, R, W)."""
    points = slice_points(grid, matrices)
    s, r, h, _ = points.shape
    flat = points.reshape(-1, 3)
    out = np.empty(len(flat), dtype=np.complex64)
    for lo in range(0, len(flat), chunk_points):
        p = flat[lo : lo + chunk_points]
        out[lo : lo + chunk_points] = nufft3d2(volume, p[:, 2], p[:, 1], p[:, 0], eps, method)
    return full_circle(out.reshape(s, r, h))


def atom_templates(
    coords_px,
    amplitudes,
    sigmas_px,
    grid: PolarGrid,
    matrices,
    method: str = "auto",
    chunk: int = 4_000_000,
):
    """Exact transforms of Gaussian-atom projections on the polar grid: complex64 (S, R, W).

    coords_px (a, 3) x, y, z in pixels about the centre; amplitudes (a,) peak densities;
    sigmas_px (a,) in pixels. With finufft and few distinct widths, one type-3 NUFFT per
    width (its radial factor shared); otherwise a direct sum in blocks. ``method``: 'auto',
    'finufft' or 'direct'.
    """
    points = slice_points(grid, matrices)
    s, r, h, _ = points.shape
    flat = points.reshape(-1, 3)
    k2 = np.sum(flat * flat, axis=1)
    coords = np.asarray(coords_px, dtype=np.float64)
    sigmas = np.asarray(sigmas_px, dtype=np.float64)
    strength = np.asarray(amplitudes, dtype=np.float64) * (2 * np.pi * sigmas**2) ** 1.5
    widths = np.unique(sigmas)
    total = np.zeros(len(flat), dtype=np.complex128)
    if method == "auto":
        method = "finufft" if finufft_available() and len(widths) <= 32 else "direct"
    if method == "finufft":
        import finufft

        k = [np.ascontiguousarray(2 * np.pi * flat[:, i]) for i in range(3)]
        for sigma in widths:  # one type-3 NUFFT per width, then its radial factor
            g = sigmas == sigma
            x = [np.ascontiguousarray(coords[g, i]) for i in range(3)]
            total += np.exp(-2 * np.pi**2 * sigma**2 * k2) * finufft.nufft3d3(
                *x, strength[g].astype(np.complex128), *k, eps=1e-7, isign=-1
            )
    else:  # direct sum in blocks: exp(-2 pi i k.x - 2 pi^2 s^2 |k|^2) per (point, atom)
        step = max(1, chunk // len(coords))
        for lo in range(0, len(flat), step):
            p = flat[lo : lo + step]
            arg = -2j * np.pi * (p @ coords.T) - 2 * np.pi**2 * np.outer(
                k2[lo : lo + step], sigmas**2
            )
            total[lo : lo + step] = np.exp(arg) @ strength
    return full_circle(total.reshape(s, r, h).astype(np.complex64))


def view_matrices(rot, tilt, psi=None) -> np.ndarray:
    """RELION matrices (S, 3, 3) of the views (psi 0 unless given)."""
    psi = np.zeros_like(np.asarray(rot, dtype=np.float64)) if psi is None else psi
    return geometry.euler_to_matrix(rot, tilt, psi).reshape(-1, 3, 3)
