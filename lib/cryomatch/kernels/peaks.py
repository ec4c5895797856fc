"""Sub-sample maxima of sampled 3D functions: parabolas per axis and quadratic fits.

A quadratic in three variables ``f(v) = a + g.v + v.H v / 2`` has 10 coefficients, in the
order of :func:`monomials`; fitted by least squares to samples, its maximum is
``v* = -H^-1 g`` with value ``a + g.v* / 2`` when H is negative definite.
"""

from __future__ import annotations

import numpy as np

N_COEFFICIENTS = 10


def monomials(v: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 10): 1, x, y, z, x^2, y^2, z^2, xy, xz, yz."""
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], axis=-1)


def hessian(coef: np.ndarray) -> np.ndarray:
    """H (..., 3, 3) of quadratic coefficients (..., 10)."""
    h = np.empty(coef.shape[:-1] + (3, 3))
    h[..., 0, 0], h[..., 1, 1], h[..., 2, 2] = 2 * coef[..., 4], 2 * coef[..., 5], 2 * coef[..., 6]
    h[..., 0, 1] = h[..., 1, 0] = coef[..., 7]
    h[..., 0, 2] = h[..., 2, 0] = coef[..., 8]
    h[..., 1, 2] = h[..., 2, 1] = coef[..., 9]
    return h


def quadratic_maximum(coef: np.ndarray):
    """(v* (N, 3), f(v*) (N,), ok (N,)) of quadratics (N, 10); ok where H is negative
    definite (elsewhere v* = 0 and the value is a)."""
    coef = np.asarray(coef, dtype=np.float64)
    h = hessian(coef)
    g = coef[:, 1:4]
    ok = np.all(np.linalg.eigvalsh(h) < 0, axis=1)
    v = np.zeros((len(coef), 3))
    if ok.any():
        v[ok] = -np.linalg.solve(h[ok], g[ok][..., None])[..., 0]
    return v, coef[:, 0] + 0.5 * np.sum(g * v, axis=1), ok


# least-squares operator of a 3x3x3 stencil at unit spacing, samples in C order
_STENCIL = np.stack(np.meshgrid(*[[-1.0, 0.0, 1.0]] * 3, indexing="ij"), -1).reshape(-1, 3)
STENCIL_FIT = np.linalg.pinv(monomials(_STENCIL))  # (10, 27)


def stencil_maximum(samples: np.ndarray, spacing: float, log: bool = False):
    """Maximum of a quadratic fitted to 3x3x3 samples (N, 3, 3, 3) at ``spacing``: (offset
    from the stencil centre (N, 3), value (N,)). With ``log``, where all samples are
    positive, the fit is to their logarithms (a Gaussian peak: exact for the Gaussian-like
    peaks of correlations of smooth maps). Where the fit has no maximum within the
    stencil, the best sample."""
    flat = samples.reshape(len(samples), 27).astype(np.float64)
    positive = np.all(flat > 0, axis=1) & log
    fitted = np.where(positive[:, None], np.log(np.where(positive[:, None], flat, 1.0)), flat)
    v, value, ok = quadratic_maximum(fitted @ STENCIL_FIT.T)
    value = np.where(positive, np.exp(np.minimum(value, 700)), value)
    best = np.argmax(flat, axis=1)
    inside = ok & np.all(np.abs(v) <= 1.0, axis=1)
    v = np.where(inside[:, None], v, _STENCIL[best])
    value = np.where(inside, np.maximum(value, flat.max(axis=1)), flat.max(axis=1))
    return v * spacing, value


def parabolic_peaks(scores: np.ndarray):
    """Maxima over the last three axes of (..., wz, wy, wx) refined by a 3-point parabola
    per axis: (positions (..., 3) in samples, values (...))."""
    lead, w = scores.shape[:-3], scores.shape[-3:]
    flat = scores.reshape(-1, *w)
    idx = np.array(np.unravel_index(np.argmax(flat.reshape(len(flat), -1), axis=1), w)).T
    rows = np.arange(len(flat))
    best = flat[rows, idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float64)
    pos = idx.astype(np.float64)
    value = best.copy()
    for a in range(3):
        lo, hi = idx.copy(), idx.copy()
        lo[:, a] -= 1
        hi[:, a] += 1
        inside = (lo[:, a] >= 0) & (hi[:, a] < w[a])
        lo, hi = np.clip(lo, 0, np.array(w) - 1), np.clip(hi, 0, np.array(w) - 1)
        ym = flat[rows, lo[:, 0], lo[:, 1], lo[:, 2]]
        yp = flat[rows, hi[:, 0], hi[:, 1], hi[:, 2]]
        finite = np.isfinite(ym) & np.isfinite(yp)
        ym, yp = np.where(finite, ym, best), np.where(finite, yp, best)
        denom = ym - 2 * best + yp
        ok = inside & finite & (denom < 0)
        delta = np.clip(np.where(ok, 0.5 * (ym - yp) / np.where(ok, denom, -1.0), 0.0), -0.5, 0.5)
        pos[:, a] += delta
        value -= np.where(ok, (ym - yp) * delta / 4, 0.0)
    return pos.reshape(*lead, 3), value.reshape(lead)


def grid_peaks(scores: np.ndarray, log: bool = False):
    """Maxima over the last three axes of (..., wz, wy, wx) refined by a quadratic fitted
    to the 3x3x3 samples around the best one (see :func:`stencil_maximum`; parabolas per
    axis where an axis has fewer than 3 samples): (positions (..., 3) in samples, values)."""
    lead, w = scores.shape[:-3], np.array(scores.shape[-3:])
    if np.any(w < 3):
        return parabolic_peaks(scores)
    flat = scores.reshape(-1, *w)
    idx = np.array(np.unravel_index(np.argmax(flat.reshape(len(flat), -1), axis=1), tuple(w))).T
    centre = np.clip(idx, 1, w - 2)
    off = _STENCIL.astype(np.int64)  # (27, 3)
    pts = centre[:, None, :] + off[None]
    samples = flat[np.arange(len(flat))[:, None], pts[..., 0], pts[..., 1], pts[..., 2]]
    offset, value = stencil_maximum(samples.reshape(-1, 3, 3, 3), 1.0, log)
    return (centre + offset).reshape(*lead, 3), value.reshape(lead)
