"""Seeded pseudo-atomic phantoms: Gaussian blobs whose density and projections are exact."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation


@dataclass
class PseudoAtoms:
    """Gaussian pseudo-atoms: coords (a, 3) x, y, z in Angstrom about the centre, peak
    amplitudes (a,), widths sigmas (a,) in Angstrom, domain labels (a,)."""

    coords: np.ndarray
    amplitudes: np.ndarray
    sigmas: np.ndarray
    domains: np.ndarray | None = None  # domain label per atom


def random_structure(
    rng: np.random.Generator, n_atoms: int, radius: float, sigma: float
) -> PseudoAtoms:
    """An asymmetric three-domain blob cloud inside a sphere of ``radius`` Angstrom.

    Domains of 45%, 33% and 22% of the atoms, each a folded chain (a random walk with steps
    of 0.9 sigma, like a protein backbone), the two smaller ones set off from the core in
    directions more than 60 degrees apart; the smallest domain is denser (a lobe).
    """
    fractions = (0.45, 0.33, 0.22)
    counts = np.maximum(1, np.round(np.array(fractions) * n_atoms).astype(int))
    counts[0] += n_atoms - counts.sum()
    d1 = _unit(rng.normal(size=3))
    while True:
        d2 = _unit(rng.normal(size=3))
        if np.dot(d1, d2) < 0.5:
            break
    centres = [np.zeros(3), 0.55 * radius * d1, 0.5 * radius * d2]
    parts, amps = [], []
    for count, centre, fraction, density in zip(
        counts, centres, fractions, (1.0, 1.0, 1.6), strict=True
    ):
        parts.append(centre + _chain(rng, count, 0.9 * sigma, 0.75 * radius * fraction ** (1 / 3)))
        amps.append(density * rng.uniform(0.8, 1.2, count))
    coords = np.concatenate(parts)
    coords -= coords.mean(axis=0)
    sigmas = sigma * rng.uniform(0.9, 1.3, n_atoms)
    domains = np.repeat(np.arange(3), counts)
    return PseudoAtoms(coords, np.concatenate(amps), sigmas, domains)


def _chain(rng, n: int, step: float, radius: float) -> np.ndarray:
    """A random walk of n points with the given step, kept inside a ball of ``radius``."""
    coords = np.zeros((n, 3))
    for i in range(1, n):
        for _ in range(100):
            trial = coords[i - 1] + step * _unit(rng.normal(size=3))
            if np.linalg.norm(trial) < radius:
                break
        coords[i] = trial
    return coords - coords.mean(axis=0)


def conformational_variant(
    base: PseudoAtoms, rng: np.random.Generator, angle_deg: float = 70.0
) -> PseudoAtoms:
    """Another conformation: the middle domain swings by ``angle_deg`` about a random axis
    through its hinge (the point between it and the core, at the core's edge)."""
    moving = base.domains == 1
    core = base.coords[base.domains == 0].mean(axis=0)
    centre = base.coords[moving].mean(axis=0)
    hinge = core + 0.45 * (centre - core)
    axis = _unit(np.cross(centre - core, rng.normal(size=3)))
    turn = Rotation.from_rotvec(np.deg2rad(angle_deg) * axis)
    coords = base.coords.copy()
    coords[moving] = turn.apply(coords[moving] - hinge) + hinge
    coords -= coords.mean(axis=0)
    return PseudoAtoms(coords, base.amplitudes.copy(), base.sigmas.copy(), base.domains.copy())


def _unit(v):
    return v / np.linalg.norm(v)
