"""Projection model of a single-axis tilt series, fitted robustly to tracked points
(gold beads or patch centres), as IMOD's tiltalign does (Mastronarde & Held 2017, J. Struct.
Biol. 197:102).

A point X = (x, y, z) in pixels (about the tilt axis at the image centre) is seen in image i
at the raw-image position (x, y about the centre n // 2)

    q_i = R(phi_i)^T (m_i P(theta_i + dtheta_i) X - s_i)

with P(theta) X = (x cos theta - z sin theta, y) (:func:`cryomatch.geometry.tilt_projection_x`),
R(phi) the tilt-axis rotation of :func:`cryomatch.geometry.tilt_axis_rotation` (phi degrees
counter-clockwise from +y), s_i the shift and m_i the magnification of image i. For m_i = 1
this is exactly the alignment convention of :mod:`cryomatch.geometry`: ``aligned(R q + s) =
raw(q)``. Variables: the points, the shifts, one tilt-axis angle, and optionally per image a
rotation (added to the axis angle), a tilt-angle offset and a magnification; image
``reference`` keeps shift 0 and its optional variables at 0 / 1, and the points' mean z is 0
(the object translation the data cannot see).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

RAYLEIGH_MEDIAN = 1.1774  # median of |e| for a 2D normal e of unit sigma per axis


@dataclass
class ModelFit:
    """A fitted projection model. Per image (n,): ``shifts`` (n, 2) px, ``rotations`` (tilt
    axis angle of each image, degrees), ``angles`` (tilt angles used, degrees),
    ``magnifications``; per point (m,): ``positions`` (m, 3) px, NaN for points left out.
    ``residuals`` (n, m, 2) observed minus predicted (NaN where unobserved), ``used`` and
    ``rejected`` (n, m) masks (rejected: outliers left out of the final fit)."""

    positions: np.ndarray
    shifts: np.ndarray
    tilt_axis: float
    rotations: np.ndarray
    angles: np.ndarray
    magnifications: np.ndarray
    residuals: np.ndarray
    used: np.ndarray
    rejected: np.ndarray
    reference: int

    @property
    def errors(self) -> np.ndarray:
        """Residual lengths (n, m) in pixels, NaN where not used."""
        e = np.hypot(self.residuals[..., 0], self.residuals[..., 1])
        return np.where(self.used, e, np.nan)

    @property
    def mean_residual(self) -> float:
        """Mean residual length over the observations used (IMOD's 'residual error mean')."""
        e = self.errors
        return float(np.nanmean(e)) if np.isfinite(e).any() else float("nan")

    @property
    def point_residuals(self) -> np.ndarray:
        """Mean residual (m,) of each point over the images it was used in (NaN: unused)."""
        with np.errstate(invalid="ignore"):
            return _nanmean(self.errors, axis=0)

    @property
    def view_residuals(self) -> np.ndarray:
        """Mean residual (n,) of each image over the points used in it."""
        with np.errstate(invalid="ignore"):
            return _nanmean(self.errors, axis=1)

    def predict(self) -> np.ndarray:
        """Predicted positions (n, m, 2) of every point in every image."""
        return project_points(
            self.positions, self.angles, self.shifts, self.rotations, self.magnifications
        )


def _nanmean(a, axis):
    count = np.isfinite(a).sum(axis=axis)
    total = np.nansum(a, axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _project(x, y, z, theta, sx, sy, phi, mag):
    """Elementwise model (module doc): positions, tilt and axis angles in radians."""
    u = mag * (x * np.cos(theta) - z * np.sin(theta)) - sx
    v = mag * y - sy
    c, s = np.cos(phi), np.sin(phi)
    return np.stack([c * u - s * v, s * u + c * v], axis=-1)  # R(phi)^T (u, v)


def project_points(positions, angles, shifts, rotations, magnifications=None) -> np.ndarray:
    """Raw-image positions (n, m, 2) of points (m, 3) in images with tilt ``angles`` (n,),
    ``shifts`` (n, 2), tilt-axis angles ``rotations`` (n,) in degrees and magnifications
    (module doc)."""
    p = np.asarray(positions, dtype=np.float64)[None]
    t = np.deg2rad(np.asarray(angles, dtype=np.float64))[:, None]
    sh = np.asarray(shifts, dtype=np.float64)[:, None, :]
    phi = np.deg2rad(np.broadcast_to(np.asarray(rotations, dtype=np.float64), t.shape[:1]))
    mag = np.ones(len(t)) if magnifications is None else np.asarray(magnifications, float)
    return _project(
        p[..., 0], p[..., 1], p[..., 2], t, sh[..., 0], sh[..., 1], phi[:, None], mag[:, None]
    )


def initial_guess(observed, angles, reference: int) -> tuple[np.ndarray, np.ndarray]:
    """Points (m, 3) and shifts (n, 2) to start a fit from, with the tilt axis along y:
    x from the reference image (or the nearest image that sees the point), z = 0, shifts
    the mean offset of each image's points from their predictions."""
    observed = np.asarray(observed, dtype=np.float64)
    n, m, _ = observed.shape
    seen = np.isfinite(observed[..., 0])
    order = np.argsort(np.abs(np.arange(n) - reference), kind="stable")
    positions = np.zeros((m, 3))
    t = np.deg2rad(np.asarray(angles, dtype=np.float64))
    for j in range(m):
        views = order[seen[order, j]]
        if len(views):
            i = views[0]
            positions[j, :2] = observed[i, j] / [np.cos(t[i]), 1.0]
    predicted = project_points(positions, angles, np.zeros((n, 2)), np.zeros(n))
    with np.errstate(invalid="ignore"):
        shifts = np.nan_to_num(_nanmean(predicted - observed, axis=1))
    return positions, shifts - shifts[reference]


def fit_projection_model(
    observed,
    angles,
    reference: int | None = None,
    rotation: str = "global",
    tilt_angles: bool = False,
    magnification: bool = False,
    tilt_axis: float = 0.0,
    initial: ModelFit | None = None,
    loss: str = "huber",
    f_scale: float = 1.0,
    reject: float = 4.0,
    min_reject: float = 1.0,
    rounds: int = 4,
    min_views: int = 3,
) -> ModelFit:
    """Fit the projection model to ``observed`` positions (n, m, 2) (x, y pixels about the
    image centre; NaN where a point was not found) by robust least squares (scipy's
    ``least_squares``, ``loss`` with scale ``f_scale`` px).

    ``rotation``: 'fixed' (the axis at ``tilt_axis`` degrees), 'global' (one fitted angle)
    or 'per_view'; ``tilt_angles`` and ``magnification`` add per-image offsets / scales.
    After each fit, observations whose residual exceeds ``reject`` times the median residual
    / 1.18 (a robust sigma), and at least ``min_reject`` px, are rejected as outliers and the
    model is fitted again, at most ``rounds`` times. Points seen (and not rejected) in
    fewer than ``min_views`` images are left out (NaN positions); an image with no point
    keeps its starting shift (``ModelFit.used`` shows which). ``reference`` (default: the
    image nearest 0 degrees) keeps its shift (and optional variables) fixed.
    """
    observed = np.asarray(observed, dtype=np.float64)
    angles = np.asarray(angles, dtype=np.float64)
    n, m, _ = observed.shape
    if rotation not in ("fixed", "global", "per_view"):
        raise ValueError(f"rotation must be 'fixed', 'global' or 'per_view', got {rotation!r}")
    if reference is None:
        reference = int(np.argmin(np.abs(angles)))
    seen = np.isfinite(observed).all(axis=-1)
    others = np.flatnonzero(np.arange(n) != reference)
    blocks = {"shift": 2}
    if rotation == "per_view":
        blocks["psi"] = 1
    if tilt_angles:
        blocks["dtheta"] = 1
    if magnification:
        blocks["logm"] = 1
    n_global = 0 if rotation == "fixed" else 1

    if initial is not None:
        positions = np.where(np.isfinite(initial.positions), initial.positions, 0.0)
        shifts = initial.shifts - initial.shifts[reference]
        axis0 = initial.tilt_axis if rotation != "fixed" else tilt_axis
        psi0 = initial.rotations - initial.tilt_axis
        dtheta0 = initial.angles - angles
        logm0 = np.log(initial.magnifications)
    else:
        positions, shifts = initial_guess(observed, angles, reference)
        axis0, psi0, dtheta0, logm0 = tilt_axis, np.zeros(n), np.zeros(n), np.zeros(n)

    def pack(pos, sh, axis, psi, dth, logm):
        parts = [pos.ravel(), [axis] if n_global else []]
        per = {"shift": sh[others], "psi": psi[others, None], "dtheta": dth[others, None]}
        per["logm"] = logm[others, None]
        parts.append(np.concatenate([per[k] for k in blocks], axis=1).ravel())
        return np.concatenate(parts)

    width = sum(blocks.values())

    def unpack(v):
        pos = v[: 3 * m].reshape(m, 3)
        axis = v[3 * m] if n_global else tilt_axis
        per = v[3 * m + n_global :].reshape(n - 1, width)
        full = {k: np.zeros((n, w)) for k, w in blocks.items()}
        col = 0
        for k, w in blocks.items():
            full[k][others] = per[:, col : col + w]
            col += w
        psi = full["psi"][:, 0] if "psi" in full else np.zeros(n)
        dth = full["dtheta"][:, 0] if "dtheta" in full else np.zeros(n)
        logm = full["logm"][:, 0] if "logm" in full else np.zeros(n)
        return pos, full["shift"], axis, psi, dth, logm

    v0 = pack(positions, shifts, axis0, psi0, dtheta0, logm0)
    rejected = np.zeros((n, m), dtype=bool)
    first = initial is None
    for _ in range(max(1, rounds)):
        keep = (seen & ~rejected).sum(axis=0) >= min_views  # points still determined
        used = seen & keep[None, :] & ~rejected
        vi, pj = np.nonzero(used)
        target = observed[vi, pj]
        weight = np.sqrt(max(len(vi), 1))

        def residual(v, vi=vi, pj=pj, target=target, weight=weight, keep=keep):
            pos, sh, axis, psi, dth, logm = unpack(v)
            p = pos[pj]
            q = _project(
                p[:, 0],
                p[:, 1],
                p[:, 2],
                np.deg2rad(angles + dth)[vi],
                sh[vi, 0],
                sh[vi, 1],
                np.deg2rad(axis + psi)[vi],
                np.exp(logm)[vi],
            )
            gauge = weight * pos[keep, 2].mean() if keep.any() else 0.0
            return np.concatenate([(q - target).ravel(), [gauge]])

        def jacobian(v, vi=vi, pj=pj, weight=weight, keep=keep):
            return _jacobian(unpack(v), vi, pj, angles, keep, weight, reference, n_global, blocks)

        if first and loss != "linear":  # plain least squares first: near the minimum fast
            v0 = least_squares(residual, v0, jac=jacobian).x
        first = False
        v0 = least_squares(residual, v0, jac=jacobian, loss=loss, f_scale=f_scale).x
        pos, sh, axis, psi, dth, logm = unpack(v0)
        predicted = project_points(pos, angles + dth, sh, axis + psi, np.exp(logm))
        err = np.where(used, np.hypot(*(observed - predicted).transpose(2, 0, 1)), 0.0)
        sigma = np.median(err[used]) / RAYLEIGH_MEDIAN if used.any() else 0.0
        bad = used & (err > max(reject * sigma, min_reject))
        if not bad.any():
            break
        rejected |= bad
    pos, sh, axis, psi, dth, logm = unpack(v0)
    predicted = project_points(pos, angles + dth, sh, axis + psi, np.exp(logm))
    keep = (seen & ~rejected).sum(axis=0) >= min_views
    used = seen & keep[None, :] & ~rejected
    pos = np.where(keep[:, None], pos, np.nan)
    return ModelFit(
        pos,
        sh,
        float(axis),
        axis + psi,
        angles + dth,
        np.exp(logm),
        np.where(seen[..., None], observed - predicted, np.nan),
        used,
        rejected & seen,
        reference,
    )


def _jacobian(variables, vi, pj, angles, keep, weight, reference, n_global, blocks):
    """Dense Jacobian (2k + 1, n_var) of the residuals of :func:`fit_projection_model`."""
    pos, sh, axis, psi, dth, logm = variables
    m, n, k = len(pos), len(angles), len(vi)
    deg = np.pi / 180
    theta = np.deg2rad(angles + dth)[vi]
    phi = np.deg2rad(axis + psi)[vi]
    mag = np.exp(logm)[vi]
    x, y, z = pos[pj].T
    c, s = np.cos(phi), np.sin(phi)
    ct, st = np.cos(theta), np.sin(theta)
    u, v = mag * (x * ct - z * st), mag * y  # before the shift
    wu, wv = u - sh[vi, 0], v - sh[vi, 1]

    def turn(a, b):  # R(phi)^T (a, b) for each observation, (k, 2)
        return np.stack([c * a - s * b, s * a + c * b], axis=-1)

    width = sum(blocks.values())
    jac = np.zeros((k, 2, 3 * m + n_global + (n - 1) * width))
    rows = np.arange(k)
    jac[rows, :, 3 * pj] = turn(mag * ct, 0 * ct)
    jac[rows, :, 3 * pj + 1] = turn(0 * ct, mag)
    jac[rows, :, 3 * pj + 2] = turn(-mag * st, 0 * ct)
    d_phi = deg * np.stack([-s * wu - c * wv, c * wu - s * wv], axis=-1)
    if n_global:
        jac[:, :, 3 * m] = d_phi
    slot = np.full(n, -1)
    slot[np.arange(n) != reference] = np.arange(n - 1)
    free = slot[vi] >= 0
    base = 3 * m + n_global + slot[vi] * width
    derivs = {
        "shift": [turn(-1 + 0 * c, 0 * c), turn(0 * c, -1 + 0 * c)],
        "psi": [d_phi],
        "dtheta": [turn(deg * mag * (-x * st - z * ct), 0 * c)],
        "logm": [turn(u, v)],
    }
    col = 0
    for name in blocks:
        for d in derivs[name]:
            jac[rows[free], :, base[free] + col] = d[free]
            col += 1
    out = np.zeros((2 * k + 1, jac.shape[2]))
    out[: 2 * k] = jac.reshape(2 * k, -1)
    out[2 * k, 3 * np.flatnonzero(keep) + 2] = weight / max(keep.sum(), 1)
    return out
