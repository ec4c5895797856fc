"""Sharp-edged tilt-series phantoms, written for the tests independently of cryomatch's
simulator (no cryomatch import): exact line integrals of uniform boxes, ellipsoids and
spheres (gold beads), projected along the tilted beam and displaced.

Geometry (docs/tomo.md): at tilt theta a point (X, Y, Z) (pixels about the box centre)
lands on the ideal image at (u, v) = (X cos theta - Z sin theta, Y); the beam runs along
(sin theta, 0, cos theta). A raw image pixel q (x, y about the centre n // 2) sees the ideal
image at ``R q + s_i``, R = [[cos phi, sin phi], [-sin phi, cos phi]] for a tilt axis phi
degrees counter-clockwise from +y, s_i the shift of image i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Phantom:
    box: tuple  # (half widths (3,), density) of the slab, or None
    centres: np.ndarray  # ellipsoids (k, 3)
    axes: np.ndarray  # semi-axes (k, 3)
    rotations: np.ndarray  # (k, 3, 3), columns the ellipsoid's axes
    densities: np.ndarray  # (k,)
    beads: np.ndarray  # bead centres (b, 3)
    bead_radius: float
    bead_density: float


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def slab(
    rng: np.random.Generator,
    size: int = 128,
    n_beads: int = 20,
    thickness: float = 0.25,
    width: float = 3.0,
    n_objects: int = 60,
    bead_radius: float = 2.5,
    bead_density: float = 6.0,
) -> Phantom:
    """A slab ``width`` x size wide (far wider than the field of view at every tilt) and
    ``thickness`` x size thick, holding sharp-edged ellipsoids (density 0.3-1) over its whole
    width and ``n_beads`` gold beads (uniform spheres) in the middle 60% of the field."""
    half = np.array([width * size / 2, width * size / 2, thickness * size / 2])
    t = half[2]
    axes = rng.uniform(0.03, 0.09, size=(n_objects, 3)) * size
    reach = 0.75 * size
    centres = np.column_stack(
        [
            rng.uniform(-reach, reach, n_objects),
            rng.uniform(-reach, reach, n_objects),
            rng.uniform(-0.7 * t, 0.7 * t, n_objects),
        ]
    )
    rotations = np.array([_rotation(rng) for _ in range(n_objects)])
    densities = rng.uniform(0.3, 1.0, n_objects)
    beads = _spread(rng, n_beads, 0.3 * size, 6 * bead_radius)
    z = rng.uniform(-(t - bead_radius), t - bead_radius, n_beads)
    return Phantom(
        (half, 0.1),
        centres,
        axes,
        rotations,
        densities,
        np.column_stack([beads, z]),
        bead_radius,
        bead_density,
    )


def without_beads(phantom: Phantom) -> Phantom:
    return Phantom(
        phantom.box,
        phantom.centres,
        phantom.axes,
        phantom.rotations,
        phantom.densities,
        np.zeros((0, 3)),
        phantom.bead_radius,
        phantom.bead_density,
    )


def _spread(rng, n, reach, gap):
    """n points in the square +-reach, at least ``gap`` apart (rejection sampling)."""
    points = []
    while len(points) < n:
        p = rng.uniform(-reach, reach, 2)
        if all(np.hypot(*(p - q)) >= gap for q in points):
            points.append(p)
    return np.array(points)


def _box_chord(origin, direction, half):
    lo, hi = np.full(origin.shape[:-1], -np.inf), np.full(origin.shape[:-1], np.inf)
    for k in range(3):
        d = direction[k]
        if abs(d) < 1e-12:
            inside = np.abs(origin[..., k]) <= half[k]
            lo = np.where(inside, lo, np.inf)
            continue
        a, b = (-half[k] - origin[..., k]) / d, (half[k] - origin[..., k]) / d
        lo, hi = np.maximum(lo, np.minimum(a, b)), np.minimum(hi, np.maximum(a, b))
    return np.clip(hi - lo, 0, None)


def _ellipsoid_chord(origin, direction, centre, metric):
    """Length of the line origin + t direction inside (p - c)^T M (p - c) <= 1."""
    p = origin - centre
    a = direction @ metric @ direction
    b = p @ (metric @ direction)
    c = np.einsum("...i,ij,...j->...", p, metric, p) - 1
    disc = b * b - a * c
    return 2 * np.sqrt(np.clip(disc, 0, None)) / a


def _near(u, centre, theta, reach):
    """Rays (bool) within ``reach`` + 1 px of an object's projected centre."""
    cu = centre[0] * np.cos(theta) - centre[2] * np.sin(theta)
    return (np.abs(u[:, 0] - cu) < reach + 1) & (np.abs(u[:, 1] - centre[1]) < reach + 1)


def project(
    phantom: Phantom,
    angles,
    size: int,
    shifts=None,
    tilt_axis: float = 0.0,
    supersample: int = 2,
) -> np.ndarray:
    """Raw tilt series (n, size, size): exact line integrals averaged over ``supersample``^2
    points per pixel; ``shifts`` (n, 2) pixels, ``tilt_axis`` degrees (module doc)."""
    angles = np.asarray(angles, dtype=float)
    shifts = np.zeros((len(angles), 2)) if shifts is None else np.asarray(shifts, float)
    phi = np.deg2rad(tilt_axis)
    rot = np.array([[np.cos(phi), np.sin(phi)], [-np.sin(phi), np.cos(phi)]])
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    grid = np.arange(size) - size // 2
    y, x = np.meshgrid(
        (grid[:, None] + sub[None]).ravel(), (grid[:, None] + sub[None]).ravel(), indexing="ij"
    )
    q = np.stack([x.ravel(), y.ravel()], 1)
    metrics = [
        r @ np.diag(1 / a**2) @ r.T for r, a in zip(phantom.rotations, phantom.axes, strict=True)
    ]
    out = np.empty((len(angles), size, size))
    for i, theta in enumerate(np.deg2rad(angles)):
        u = q @ rot.T + shifts[i]
        c, s = np.cos(theta), np.sin(theta)
        origin = np.stack([u[:, 0] * c, u[:, 1], -u[:, 0] * s], 1)  # t = 0 on the ray
        direction = np.array([s, 0.0, c])
        total = np.zeros(len(u))
        if phantom.box is not None:
            half, rho = phantom.box
            total += rho * _box_chord(origin, direction, half)
        for centre, metric, rho, axes in zip(
            phantom.centres, metrics, phantom.densities, phantom.axes, strict=True
        ):
            near = _near(u, centre, theta, axes.max())
            total[near] += rho * _ellipsoid_chord(origin[near], direction, centre, metric)
        r2 = phantom.bead_radius**2
        for centre in phantom.beads:
            near = _near(u, centre, theta, phantom.bead_radius)
            d = origin[near] - centre
            along = d @ direction
            perp2 = (d * d).sum(1) - along**2
            total[near] += phantom.bead_density * 2 * np.sqrt(np.clip(r2 - perp2, 0, None))
        block = total.reshape(size, supersample, size, supersample)
        out[i] = block.mean(axis=(1, 3))
    return out.astype(np.float32)


def bead_positions(phantom: Phantom, angles, shifts, tilt_axis: float, size: int) -> np.ndarray:
    """True raw-image positions (n, b, 2) (x, y about the centre) of the beads."""
    angles = np.deg2rad(np.asarray(angles, dtype=float))
    phi = np.deg2rad(tilt_axis)
    rot = np.array([[np.cos(phi), np.sin(phi)], [-np.sin(phi), np.cos(phi)]])
    b = phantom.beads
    u = np.stack(
        [
            b[None, :, 0] * np.cos(angles)[:, None] - b[None, :, 2] * np.sin(angles)[:, None],
            np.broadcast_to(b[None, :, 1], (len(angles), len(b))),
        ],
        -1,
    )
    return np.einsum("ji,nbj->nbi", rot, u - np.asarray(shifts)[:, None, :])


def tilt_series(
    seed: int,
    size: int = 128,
    beads: bool = True,
    noise: float = 0.15,
    max_shift: float = 8.0,
    tilt_axis: float = 3.0,
    angles=None,
):
    """The issue's test case: (stack, angles, shifts, phantom)."""
    rng = np.random.default_rng(seed)
    angles = np.arange(-60, 61, 2.0) if angles is None else np.asarray(angles, float)
    phantom = slab(rng, size, n_beads=20)
    if not beads:
        phantom = without_beads(phantom)
    shifts = rng.uniform(-max_shift, max_shift, size=(len(angles), 2))
    clean = project(phantom, angles, size, shifts, tilt_axis)
    stack = clean + rng.normal(size=clean.shape).astype(np.float32) * noise * clean.std()
    return stack.astype(np.float32), angles, shifts, phantom
