"""Rotations below the grid step.

Interpolation (no extra templates): each rotation R_j near the best grid rotation R_b is
written ``R_j = exp(v_j) R_b`` (v_j its rotation vector relative to R_b, in degrees); a
quadratic in v (:mod:`cryomatch.kernels.peaks`) is fitted by least squares to the
neighbours' sub-voxel peak scores (the 3x3x3 block of a (max, step) grid, moved inwards
at the grid's boundary, else the 27 nearest rotations), and its maximum, when it lies
within the neighbourhood, gives ``exp(v*) R_b``.

Local refinement: around that rotation, seven rotations (it and +-``step / 2`` about each
axis) are built from the template afresh and scored; a quadratic fitted to them and to the
grid neighbours together, weighted towards the interpolated rotation, moves the rotation
once more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from ..kernels.peaks import N_COEFFICIENTS, monomials, quadratic_maximum
from .rotations import rotation_grid


@dataclass
class NeighbourTable:
    """Per rotation r: the rotation the fit is centred on (R,) (r itself, or on a grid's
    boundary the nearest rotation with a full 3x3x3 block), its neighbours' indices (R, K)
    (-1: none), least-squares operators (R, 10, K) from their scores to quadratic
    coefficients, the neighbourhood radius in degrees (R,; 0 where no fit is possible)
    and the grid step in degrees."""

    centre: np.ndarray
    index: np.ndarray
    operator: np.ndarray
    radius: np.ndarray
    step: float


def neighbour_table(quaternions: np.ndarray, rotations_arg=None) -> NeighbourTable:
    """Neighbours of every rotation (see the module docstring)."""
    rot = Rotation.from_quat(quaternions)
    n = len(quaternions)
    grid = rotation_grid(rotations_arg)
    if grid is not None:
        axes = [np.unique(grid[:, a]) for a in range(3)]
        ijk = np.stack([np.searchsorted(axes[a], grid[:, a]) for a in range(3)], axis=-1)
        dims = np.array([len(a) for a in axes])
        ijk = np.where(dims >= 3, np.clip(ijk, 1, np.maximum(dims - 2, 1)), ijk)
        centre = np.ravel_multi_index(tuple(ijk.T), dims)
        offsets = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)
        cand = ijk[:, None, :] + offsets[None]
        ok = np.all((cand >= 0) & (cand < dims), axis=-1)
        flat = np.ravel_multi_index(tuple(np.clip(cand, 0, dims - 1).transpose(2, 0, 1)), dims)
        index = np.where(ok, flat, -1)
    else:
        k = min(27, n)
        angles = np.stack([(rot * rot[i].inv()).magnitude() for i in range(n)])
        index = np.argsort(angles, axis=1)[:, :k]
        centre = np.arange(n)
    operator = np.zeros((n, N_COEFFICIENTS, index.shape[1]))
    radius = np.zeros(n)
    spacing = []
    for r in range(n):
        valid = index[r] >= 0
        v = np.rad2deg((rot[index[r][valid]] * rot[centre[r]].inv()).as_rotvec())
        design = monomials(v)
        norms = np.linalg.norm(v, axis=1)
        if norms.size > 1:
            spacing.append(np.min(norms[norms > 1e-9]))
        if valid.sum() >= N_COEFFICIENTS and np.linalg.matrix_rank(design) == N_COEFFICIENTS:
            operator[r][:, valid] = np.linalg.pinv(design)
            radius[r] = norms.max()
    step = float(np.median(spacing)) if spacing else 0.0
    return NeighbourTable(centre, index, operator, radius, step)


def interpolate_rotation(values, rot_index, quaternions, table: NeighbourTable, fallback=None):
    """Quaternions (S, 4): the maximum of a quadratic fitted to the scores ``values``
    (S, K) of the neighbourhood of each subvolume's best grid rotation ``rot_index`` (S,)
    (in the order of ``table.index[rot_index]``), or ``fallback`` (S, 4) (default: the
    best grid rotation) where the fit has no maximum within the neighbourhood; also the
    fitted quadratics' coefficients (S, 10) (degrees about the fit's centre; 0 where
    unused)."""
    values = np.where(np.isfinite(values), values, 0.0)  # missing neighbours weigh 0
    coef = np.einsum("sck,sk->sc", table.operator[rot_index], values)
    v, _, ok = quadratic_maximum(coef)
    ok &= (table.radius[rot_index] > 0) & (
        np.linalg.norm(v, axis=1) <= 0.75 * table.radius[rot_index]
    )
    out = (quaternions[rot_index] if fallback is None else np.asarray(fallback)).copy()
    if ok.any():
        turn = Rotation.from_rotvec(np.deg2rad(v[ok]))
        out[ok] = (turn * Rotation.from_quat(quaternions[table.centre[rot_index[ok]]])).as_quat()
    return out, np.where(ok[:, None], coef, 0.0)


def local_stencil(quats, step: float) -> np.ndarray:
    """Seven rotations per subvolume (S, 7, 4): each quaternion and its turns by
    +-``step`` degrees about x, y, z (left-multiplied, as the rotation vectors above)."""
    offsets = np.zeros((7, 3))
    for a in range(3):
        offsets[1 + 2 * a, a] = -step
        offsets[2 + 2 * a, a] = step
    turn = Rotation.from_rotvec(np.deg2rad(offsets))
    base = Rotation.from_quat(quats)
    return np.stack([(turn[j] * base).as_quat() for j in range(7)], axis=1)


def fit_rotation(points, values, centre, estimate, width: float, radius):
    """Rotations (S, 4) at the maximum of quadratics fitted by weighted least squares to
    scores ``values`` (S, P) (-inf: missing) at rotations ``points`` (S, P, 4), in rotation
    vectors (degrees) about ``centre`` (S, 4); weights fall off as a Gaussian of ``width``
    degrees from ``estimate`` (S, 4), which is kept where the fit has no maximum within
    ``radius`` (S,) degrees of the centre."""
    s, p = values.shape
    base = Rotation.from_quat(np.repeat(centre, p, axis=0))
    v = np.rad2deg((Rotation.from_quat(points.reshape(-1, 4)) * base.inv()).as_rotvec()).reshape(
        s, p, 3
    )
    v0 = np.rad2deg((Rotation.from_quat(estimate) * Rotation.from_quat(centre).inv()).as_rotvec())
    valid = np.isfinite(values)
    w = np.where(valid, np.exp(-np.sum((v - v0[:, None]) ** 2, axis=-1) / (2 * width**2)), 0.0)
    sw = np.sqrt(w)[..., None]
    coef = np.einsum(
        "sck,sk->sc", np.linalg.pinv(sw * monomials(v)), sw[..., 0] * np.where(valid, values, 0.0)
    )
    vmax, _, ok = quadratic_maximum(coef)
    ok &= (valid.sum(axis=1) >= N_COEFFICIENTS) & (np.linalg.norm(vmax, axis=1) <= radius)
    out = np.asarray(estimate, dtype=np.float64).copy()
    if ok.any():
        turn = Rotation.from_rotvec(np.deg2rad(vmax[ok]))
        out[ok] = (turn * Rotation.from_quat(centre[ok])).as_quat()
    return out
