"""Rotations below the grid step.

Interpolation (no extra templates): each rotation R_j near the best grid rotation R_b is
written ``R_j = exp(v_j) R_b`` (v_j its rotation vector relative to R_b, in degrees); a
quadratic in v (:mod:`cryomatch.kernels.peaks`) is fitted by least squares to the
neighbours' sub-voxel peak scores (the 3x3x3 block of a (max, step) grid, moved inwards
at the grid's boundary, else the 27 nearest rotations), and its maximum, when it lies
within the neighbourhood, gives ``exp(v*) R_b``.

Local refinement: around that rotation, seven rotations (it and +-``step / 2`` about each
axis) are built from the template afresh and scored; a quadratic per axis through them
(the cross terms kept from the interpolation) moves the rotation once more.
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


def stencil_rotation(values, quats, coef, step: float):
    """Move each rotation (S, 4) to the maximum of a quadratic through its stencil scores
    ``values`` (S, 7) (see :func:`local_stencil`): per axis a parabola, cross terms from
    the interpolation's coefficients ``coef`` (S, 10) (0 when there were none)."""
    s = len(quats)
    f0, fm, fp = values[:, 0], values[:, 1::2], values[:, 2::2]  # (S,), (S, 3), (S, 3)
    g = (fp - fm) / (2 * step)
    diag = (fp + fm - 2 * f0[:, None]) / step**2
    h = np.zeros((s, 3, 3))
    h[:, [0, 1, 2], [0, 1, 2]] = diag
    h[:, 0, 1] = h[:, 1, 0] = coef[:, 7]
    h[:, 0, 2] = h[:, 2, 0] = coef[:, 8]
    h[:, 1, 2] = h[:, 2, 1] = coef[:, 9]
    ok = np.all(np.linalg.eigvalsh(h) < 0, axis=1) & np.all(np.isfinite(values), axis=1)
    v = np.zeros((s, 3))
    if ok.any():
        v[ok] = -np.linalg.solve(h[ok], g[ok][..., None])[..., 0]
    ok &= np.linalg.norm(v, axis=1) <= 2 * step
    out = quats.copy()
    if ok.any():
        out[ok] = (
            Rotation.from_rotvec(np.deg2rad(v[ok])) * Rotation.from_quat(quats[ok])
        ).as_quat()
    return out
