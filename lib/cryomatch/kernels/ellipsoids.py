"""Gaussian-ellipsoid phantoms whose tilt-series projections are exact (closed form).

An ellipsoid of density ``rho exp(-(p - c)^T S^-1 (p - c) / 2)`` (covariance S, centre c,
(x, y, z) in pixels about the box centre) projects along RELION's A (:mod:`cryomatch.geometry`)
to the 2D Gaussian of covariance ``(A S A^T)[:2, :2]``, centre ``(A c)[:2]`` and integral
``rho (2 pi)^(3/2) sqrt(det S)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from .. import geometry


@dataclass
class Ellipsoids:
    """centres (m, 3) x, y, z in pixels about the box centre; covariances (m, 3, 3) in
    pixels^2; densities (m,)."""

    centres: np.ndarray
    covariances: np.ndarray
    densities: np.ndarray


def random_phantom(
    rng: np.random.Generator,
    size: int,
    n_ellipsoids: int = 24,
    n_beads: int = 12,
    radius: float = 0.3,
) -> Ellipsoids:
    """Ellipsoids (semi-axes 3-12% of the box, random orientations, densities 0.3-1) and
    dense beads (sigma 1.2 px, density 3) inside a sphere of ``radius`` x size: every
    projection of it, moved by up to ~0.15 x size, stays inside the image."""
    r = radius * size
    sig = rng.uniform(0.03, 0.12, size=(n_ellipsoids, 3)) * size / 2
    rot = Rotation.random(n_ellipsoids, random_state=rng).as_matrix()
    cov = np.einsum("mij,mj,mkj->mik", rot, sig**2, rot)
    reach = r - 2.5 * sig.max(axis=1)
    centres = _in_ball(rng, n_ellipsoids) * np.maximum(reach, 0)[:, None]
    bead_sigma = 1.2
    bead_centres = _in_ball(rng, n_beads) * (r - 3 * bead_sigma)
    return Ellipsoids(
        np.concatenate([centres, bead_centres]),
        np.concatenate([cov, np.broadcast_to(np.eye(3) * bead_sigma**2, (n_beads, 3, 3))]),
        np.concatenate([rng.uniform(0.3, 1.0, n_ellipsoids), np.full(n_beads, 3.0)]),
    )


def slab_phantom(
    rng: np.random.Generator,
    size: int,
    n_ellipsoids: int = 24,
    n_beads: int = 12,
    thickness: float = 0.25,
    bead_density: float = 6.0,
) -> Ellipsoids:
    """An extended specimen: a slab ``thickness`` x size thick and three times the box
    wide (a flat Gaussian of density 0.05) holding ellipsoids (semi-axes 3-8% of the box,
    densities 0.3-1) spread over twice the box, and gold beads (sigma 1.2 px, density
    ``bead_density``) in the middle 60% of the field: at every tilt the specimen crosses
    the frame edges, the beads stay inside."""
    t = thickness * size / 2
    m = 4 * n_ellipsoids  # the same density of ellipsoids as over the field of view
    sig = rng.uniform(0.03, 0.08, size=(m, 3)) * size / 2
    sig[:, 2] = np.minimum(sig[:, 2], t / 2.5)
    rot = Rotation.random(m, random_state=rng).as_matrix()
    cov = np.einsum("mij,mj,mkj->mik", rot, sig**2, rot)
    centres = np.column_stack([rng.uniform(-size, size, (m, 2)), rng.uniform(-0.5 * t, 0.5 * t, m)])
    bead_sigma = 1.2
    beads = np.column_stack(
        [
            rng.uniform(-0.3 * size, 0.3 * size, (n_beads, 2)),
            rng.uniform(-(t - 3 * bead_sigma), t - 3 * bead_sigma, n_beads),
        ]
    )
    slab_cov = np.diag([(1.5 * size) ** 2, (1.5 * size) ** 2, (t / 2) ** 2])
    return Ellipsoids(
        np.concatenate([np.zeros((1, 3)), centres, beads]),
        np.concatenate(
            [
                slab_cov[None],
                cov,
                np.broadcast_to(np.eye(3) * bead_sigma**2, (n_beads, 3, 3)),
            ]
        ),
        np.concatenate([[0.05], rng.uniform(0.3, 1.0, m), np.full(n_beads, bead_density)]),
    )


def _in_ball(rng, n):
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v * rng.uniform(0, 1, size=(n, 1)) ** (1 / 3)


def project(
    phantom: Ellipsoids, angles, shape: tuple[int, int], shifts=None, tilt_axis: float = 0.0
) -> np.ndarray:
    """Raw tilt series (n, ny, nx) float32: ``raw_i(q) = ideal_i(R q + s_i)`` with R the
    tilt-axis rotation for ``tilt_axis`` degrees and s_i = ``shifts`` (n, 2) = (x, y) pixels,
    i.e. the alignment that :mod:`cryomatch.geometry` defines maps the raw image back onto
    the ideal projection."""
    angles = np.asarray(angles, dtype=np.float64)
    n = len(angles)
    ny, nx = shape
    shifts = np.zeros((n, 2)) if shifts is None else np.asarray(shifts, dtype=np.float64)
    rot = geometry.tilt_axis_rotation(tilt_axis)
    y, x = np.mgrid[0:ny, 0:nx]
    q = np.stack([x - nx // 2, y - ny // 2], axis=-1).reshape(-1, 2) @ rot.T  # (p, 2)
    q = q[None] + shifts[:, None, :]  # (n, p, 2)
    a = geometry.tilt_matrices(angles)[:, :2, :]  # (n, 2, 3)
    out = np.zeros((n, ny * nx))
    for c, s, rho in zip(phantom.centres, phantom.covariances, phantom.densities, strict=True):
        mean = a @ c  # (n, 2)
        cov2 = a @ s @ a.transpose(0, 2, 1)  # (n, 2, 2)
        inv = np.linalg.inv(cov2)
        peak = rho * np.sqrt(2 * np.pi) * np.sqrt(np.linalg.det(s) / np.linalg.det(cov2))
        d = q - mean[:, None, :]
        quad = np.einsum("npi,nij,npj->np", d, inv, d)
        out += peak[:, None] * np.exp(-0.5 * quad)
    return out.reshape(n, ny, nx).astype(np.float32)


def voxelize(phantom: Ellipsoids, shape: tuple[int, int, int]) -> np.ndarray:
    """The phantom's density sampled on a (nz, ny, nx) grid (centre at n // 2)."""
    nz, ny, nx = shape
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    p = np.stack([x - nx // 2, y - ny // 2, z - nz // 2], axis=-1).reshape(-1, 3)
    out = np.zeros(len(p))
    for c, s, rho in zip(phantom.centres, phantom.covariances, phantom.densities, strict=True):
        d = p - c
        out += rho * np.exp(-0.5 * np.einsum("pi,ij,pj->p", d, np.linalg.inv(s), d))
    return out.reshape(shape).astype(np.float32)
