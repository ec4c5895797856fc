"""Local refinement of each image's best grid pose below the grid spacing.

The grid search finds the best template view, in-plane turn and displacement on grids.
Here each image's pose moves continuously: A = A0 R(omega) (omega a rotation vector in the
map's frame, any direction: view and in-plane together) and the displacement d, to maximize
the normalized cross-correlation (the same rho as the search) with the exact central slice
of the structure at A (``slicer``), by Nelder-Mead from the grid pose (initial simplex half
a grid step along each parameter). Parameters are scaled by the grid steps so that one unit
is one step.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.spatial.transform import Rotation

from .polar_fourier import PolarGrid, full_circle
from .templates import slice_points


def rho_at_pose(values, ctf, syy, ctf0, grid: PolarGrid, template_half, dc, shift_px):
    """rho of one image (R, W) against a template of the full pose, given on the first half
    of the angles (R, W/2), moved by ``shift_px`` (x, y pixels of the particle)."""
    kx, ky = grid.points(half=True)
    half = grid.n_inplanes // 2
    model = (
        ctf[:, :half] * template_half * np.exp(-2j * np.pi * (kx * shift_px[0] + ky * shift_px[1]))
    )
    w = grid.weights[:, None]
    # sums over the full circle are twice the real part over the half (Hermitian values)
    cc = 2.0 * np.sum(w * values[:, :half] * np.conj(model)).real
    scc = 2.0 * np.sum(w * np.abs(model) ** 2) - (ctf0 * dc) ** 2 / grid.box**2
    return cc / np.sqrt(syy * max(scc, 1e-30))


def refine_pose(
    values,
    ctf,
    syy,
    ctf0,
    grid: PolarGrid,
    slicer,
    dc,
    matrix,
    shift_px,
    angle_step_deg: float,
    shift_step_px: float,
    max_evaluations: int = 200,
):
    """(matrix, shift_px, rho) after local refinement of one image's pose (see module doc).
    ``slicer(points (..., 3) cycles/pixel as (x, y, z))`` returns the structure's transform."""
    matrix = np.asarray(matrix, dtype=np.float64)
    angle_scale = np.deg2rad(angle_step_deg)
    shift_px = np.asarray(shift_px, dtype=np.float64)

    def pose(p):
        rotation = Rotation.from_rotvec(p[:3] * angle_scale).as_matrix()
        return matrix @ rotation, shift_px + p[3:] * shift_step_px

    def cost(p):
        a, d = pose(p)
        return -rho_at_pose(
            values, ctf, syy, ctf0, grid, slicer(slice_points(grid, a[None])[0]), dc, d
        )

    # Nelder-Mead, restarted once from its result with a smaller simplex: the score is flat
    # near the optimum and a single run can stop early in a shallow valley.
    best, best_cost = np.zeros(5), cost(np.zeros(5))
    for size in (0.5, 0.15):
        result = minimize(
            cost,
            best,
            method="Nelder-Mead",
            options={
                "initial_simplex": best + np.vstack([np.zeros(5), size * np.eye(5)]),
                "xatol": 0.01,
                "fatol": 1e-7,
                "maxfev": max_evaluations // 2,
            },
        )
        if result.fun <= best_cost:
            best, best_cost = result.x, result.fun
    a, d = pose(best)
    return a, d, -cost(best)


def map_slicer(interpolator):
    """slicer for a map: its DFT at (x, y, z) points through a :class:`~.nufft.MapInterpolator`."""

    def slicer(points):
        return interpolator.at(points[..., 2], points[..., 1], points[..., 0]).reshape(
            points.shape[:-1]
        )

    return slicer


def atom_slicer(coords_px, amplitudes, sigmas_px):
    """slicer for Gaussian atoms (pixel units): the analytic transform at (x, y, z) points."""
    coords = np.asarray(coords_px, dtype=np.float64)
    sig2 = np.asarray(sigmas_px, dtype=np.float64) ** 2
    strength = np.asarray(amplitudes, dtype=np.float64) * (2 * np.pi * sig2) ** 1.5

    def slicer(points):
        flat = points.reshape(-1, 3)
        arg = -2j * np.pi * (flat @ coords.T) - 2 * np.pi**2 * np.outer(
            np.sum(flat * flat, axis=1), sig2
        )
        return (np.exp(arg) @ strength).reshape(points.shape[:-1])

    return slicer


def full_template(slicer, grid: PolarGrid, matrix):
    """The structure's polar transform (R, W) at a full pose (for checks)."""
    return full_circle(slicer(slice_points(grid, np.asarray(matrix)[None])[0]))
