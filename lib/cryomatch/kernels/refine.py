"""Local refinement of each image's best grid pose below the grid spacing, a batch at once.

The grid search finds the best template view, in-plane turn and displacement on grids.
Here each image's pose moves continuously, A = R(omega) A0 (omega a rotation vector in the
image's frame: x, y tilt the view, z turns in-plane) and the particle's position d, to
maximize the normalized cross-correlation rho of the search (same polar quadrature, CTF
and DC term; a shift is a phase factor on the polar grid) with the structure's central
slice at A (``slicer``, e.g. :class:`~.slicing.FourierSlicer`).

Each of ``rounds`` rounds scores 10 rotations about the current pose (the centre, +- step
along each axis, and the three pairs e_i + e_j), each at 3 x 3 positions (d + t {-1, 0,
1}^2), fits the quadratic in omega through the 10 best-over-positions values, scores its
maximum (within one step; the best stencil point where the quadratic is not concave) and
moves to the best of all 99 scored (pose, position) pairs; the steps then halve. Starting
steps: half the view spacing and half the displacement step, so 6 rounds reach 1/64 of
them (0.22 deg and 0.016 px on a 14.3 deg, 1 px grid) and cover +-14 deg and +-1 px.
Cost per image: 66 slices of R x W/2 points (about 20 CPU-ms at 64 px).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from ..backend import array_module, to_numpy
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


# rotation vectors (units of the step) where each round scores the pose: the centre, +-
# each axis and the three pairs (e_i + e_j): 10 points fix a quadratic in 3 variables
_ROTATION_STENCIL = np.vstack(
    [np.zeros(3), np.eye(3), -np.eye(3), np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]])]
).astype(np.float64)
_SHIFT_STENCIL = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=np.float64)


def _quadratic_terms(x):
    """Columns 1, x_i, x_i x_j (i <= j) of points x (P, 3): (P, 10)."""
    i, j = np.triu_indices(3)
    return np.column_stack([np.ones(len(x)), x, x[:, i] * x[:, j]])


# coefficients of the quadratic through the stencil's 10 values: fit @ values
_ROTATION_FIT = np.linalg.inv(_quadratic_terms(_ROTATION_STENCIL))


def _quadratic_peak(coefficients, fallback):
    """The maximum (B, 3) of quadratics with ``coefficients`` (B, 10) (order of
    :func:`_quadratic_terms`), within the unit ball; where a quadratic is not concave, the
    best of the ``fallback`` points (P, 3)."""
    g = coefficients[:, 1:4]
    h = np.zeros((len(g), 3, 3))
    i, j = np.triu_indices(3)
    h[:, i, j] += coefficients[:, 4:]
    h = h + np.swapaxes(h, 1, 2)  # Hessian: 2 c_ii on the diagonal, c_ij off it
    concave = np.all(np.linalg.eigvalsh(h) < 0, axis=1)
    peak = -np.linalg.solve(np.where(concave[:, None, None], h, -np.eye(3)), g[..., None])[..., 0]
    norm = np.linalg.norm(peak, axis=1, keepdims=True)
    peak = peak / np.maximum(1.0, norm)
    values = _quadratic_terms(fallback) @ coefficients.T  # (P, B)
    best = fallback[np.argmax(values, axis=0)]
    return np.where(concave[:, None], peak, best)


def refine_poses(
    values,
    ctf,
    syy,
    ctf0,
    grid: PolarGrid,
    slicer,
    dc: float,
    matrices,
    shifts_px,
    angle_step_deg: float,
    shift_step_px: float,
    rounds: int = 6,
    chunk: int = 8,
):
    """(matrices (B, 3, 3), shifts_px (B, 2), rho (B,)) after local refinement of a batch of
    images (see the module doc).

    values (B, R, W) the images' polar transforms; ctf (B, R, W); syy (B,) their sums of
    squares; ctf0 (B,) CTFs at 0; matrices (B, 3, 3) RELION A and shifts_px (B, 2) (x, y of
    the particle) the grid poses; ``slicer(kx, ky, matrices (..., 3, 3))`` the structure's
    central slices (..., R, W/2) at the first half of the polar points (kx, ky) (e.g.
    :meth:`~.slicing.FourierSlicer.central_slices`, or :func:`point_slicer`);
    ``angle_step_deg`` and ``shift_step_px`` the grid steps. Memory: the inputs, and per
    ``chunk`` of images scored together 10 poses and 9 shifts of R x W/2 complex64 each.
    """
    xp = array_module(values)
    half = grid.n_inplanes // 2
    kx, ky = (xp.asarray(k, dtype=xp.float32) for k in grid.points(half=True))
    w = xp.asarray(grid.weights[:, None], dtype=xp.float32)
    c_half = xp.asarray(ctf, dtype=xp.float32)[:, :, :half]
    # the image's and CTF's parts of the sums: cc = 2 Re sum wyc phase conj(T), scc from wcc
    wyc = (
        (w * c_half * xp.asarray(values)[:, :, :half]).astype(xp.complex64).reshape(len(c_half), -1)
    )
    wcc = xp.repeat((w * c_half * c_half).reshape(len(c_half), -1), 2, axis=1)[..., None]
    syy = xp.asarray(syy, dtype=xp.float64)
    dc_term = (xp.asarray(ctf0, dtype=xp.float64) * dc) ** 2 / grid.box**2
    a = np.asarray(matrices, dtype=np.float64)
    d = np.asarray(shifts_px, dtype=np.float64).copy()
    n = len(a)
    flat_kx, flat_ky = kx.ravel(), ky.ravel()

    def score(mats, offsets):
        """rho (B, P, D) of poses mats (B, P, 3, 3) at shifts d + offsets (D, 2)."""
        off = xp.asarray(offsets, dtype=xp.float32)
        shifts = xp.exp(2j * np.pi * (flat_kx[:, None] * off[:, 0] + flat_ky[:, None] * off[:, 1]))
        out = xp.empty((n, mats.shape[1], len(off)), dtype=xp.float64)
        for lo in range(0, n, chunk):
            b = slice(lo, min(n, lo + chunk))
            t = slicer(kx, ky, mats[b]).astype(xp.complex64)  # (b, P, R, H)
            t = t.reshape(t.shape[0], t.shape[1], -1)
            parts = t.view(xp.float32)
            scc = 2.0 * ((parts * parts) @ wcc[b])[..., 0] - dc_term[b, None]
            dd = xp.asarray(d[b], dtype=xp.float32)
            phase = xp.exp(2j * np.pi * (flat_kx * dd[:, :1] + flat_ky * dd[:, 1:]))  # (b, K)
            image = (wyc[b] * phase)[:, :, None] * shifts  # (b, K, D)
            cc = 2.0 * (xp.conj(t) @ image.astype(xp.complex64)).real
            out[b] = cc / xp.sqrt(syy[b, None, None] * xp.maximum(scc, 1e-30)[:, :, None])
        return out

    step = np.deg2rad(0.5 * angle_step_deg)
    t = 0.5 * shift_step_px
    rows = np.arange(n)
    for _ in range(rounds):
        turns = Rotation.from_rotvec(step * _ROTATION_STENCIL).as_matrix()  # image frame
        mats = turns[None] @ a[:, None]  # R A: (B, 10, 3, 3)
        rho = to_numpy(score(mats, t * _SHIFT_STENCIL))  # (B, 10, 9)
        move = _quadratic_peak(rho.max(axis=2) @ _ROTATION_FIT.T, _ROTATION_STENCIL[1:])
        candidate = Rotation.from_rotvec(step * move).as_matrix() @ a
        rho_c = to_numpy(score(candidate[:, None], t * _SHIFT_STENCIL))  # (B, 1, 9)
        all_mats = np.concatenate([mats, candidate[:, None]], axis=1)
        all_rho = np.concatenate([rho, rho_c], axis=1).reshape(n, -1)
        best = np.argmax(all_rho, axis=1)
        a = all_mats[rows, best // len(_SHIFT_STENCIL)]
        d = d + t * _SHIFT_STENCIL[best % len(_SHIFT_STENCIL)]
        step, t = 0.5 * step, 0.5 * t
    rho = to_numpy(score(a[:, None], np.zeros((1, 2))))[:, 0, 0]
    return a, d, rho


def point_slicer(values_at):
    """A slicer for :func:`refine_poses` from a function of points (..., 3) (x, y, z)."""

    def slicer(kx, ky, matrices):
        m = np.asarray(matrices, dtype=np.float64)[..., None, None, :, :]
        return values_at(kx[..., None] * m[..., 0, :] + ky[..., None] * m[..., 1, :])

    return slicer


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
