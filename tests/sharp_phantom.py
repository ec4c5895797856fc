"""Hard-edged test objects for tilt-series tests, made without cryomatch's simulator: uniform
ellipsoids (and dense spheres as beads) whose projections are exact line integrals (chord
lengths times density) sampled at pixel centres, so the images have sharp edges.

Geometry as :mod:`cryomatch.geometry` defines it: the map point p (x, y, z in pixels about
the box centre) is seen at tilt theta through RELION's A = Ry(theta); the ray through image
point (u, v) is {A^T (u, v, t)}; a raw image is ``raw_i(q) = ideal_i(q + s_i)`` with
s_i = shifts[i] = (x, y) pixels (the alignment that maps it back).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def random_hard_phantom(rng, size: int, n_ellipsoids: int = 16, n_beads: int = 8):
    """(centres (m, 3), shape matrices M (m, 3, 3) with (p - c)^T M (p - c) <= 1 inside,
    densities (m,)): ellipsoids with semi-axes 4-14% of the box and density 0.3-1, and beads
    of radius 1.5-2.5 px and density 4, all within a ball of 0.3 x size."""
    reach = 0.3 * size
    semi = rng.uniform(0.04, 0.14, size=(n_ellipsoids, 3)) * size
    rot = Rotation.random(n_ellipsoids, random_state=rng).as_matrix()
    shape = np.einsum("mij,mj,mkj->mik", rot, 1.0 / semi**2, rot)
    radius = rng.uniform(1.5, 2.5, n_beads)
    bead_shape = np.eye(3)[None] / radius[:, None, None] ** 2
    bound = np.r_[reach - semi.max(axis=1), reach - radius]
    direction = rng.normal(size=(len(bound), 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    centres = direction * (rng.uniform(0, 1, (len(bound), 1)) ** (1 / 3)) * bound[:, None]
    densities = np.r_[rng.uniform(0.3, 1.0, n_ellipsoids), np.full(n_beads, 4.0)]
    return centres, np.concatenate([shape, bead_shape]), densities


def hard_projections(phantom, angles, shape, shifts=None, tilt_axis: float = 0.0) -> np.ndarray:
    """Exact line integrals (n, ny, nx) float64 of a :func:`random_hard_phantom`; with
    ``tilt_axis`` (degrees counter-clockwise from +y) ``raw_i(q) = ideal_i(R q + s_i)``, R the
    turn by -tilt_axis that puts the axis on +y."""
    centres, shapes, densities = phantom
    angles = np.asarray(angles, dtype=np.float64)
    ny, nx = shape
    shifts = np.zeros((len(angles), 2)) if shifts is None else np.asarray(shifts, float)
    y, x = np.mgrid[0:ny, 0:nx]
    phi = np.deg2rad(tilt_axis)
    qx, qy = x - nx // 2, y - ny // 2
    rx, ry = np.cos(phi) * qx + np.sin(phi) * qy, -np.sin(phi) * qx + np.cos(phi) * qy
    out = np.zeros((len(angles), ny, nx))
    for i, theta in enumerate(np.deg2rad(angles)):
        c, s = np.cos(theta), np.sin(theta)
        a = np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])  # RELION's Ry(theta)
        u = rx + shifts[i, 0]
        v = ry + shifts[i, 1]
        for centre, m, rho in zip(centres, shapes, densities, strict=True):
            mt = a @ m @ a.T  # the ellipsoid in the image frame (u, v, t)
            w = a @ centre
            du, dv = u - w[0], v - w[1]
            qa = mt[2, 2]
            qb = mt[2, 0] * du + mt[2, 1] * dv
            qc = mt[0, 0] * du**2 + 2 * mt[0, 1] * du * dv + mt[1, 1] * dv**2 - 1.0
            disc = qb**2 - qa * qc
            out[i] += rho * 2.0 * np.sqrt(np.maximum(disc, 0.0)) / qa
    return out
