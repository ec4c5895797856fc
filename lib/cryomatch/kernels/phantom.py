"""Seeded pseudo-atomic phantoms: Gaussian blobs whose density and projections are exact."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation


@dataclass
class PseudoAtoms:
    """Gaussian pseudo-atoms: coords (a, 3) x, y, z in Angstrom about the centre, peak
    amplitudes (a,), widths sigmas (a,) in Angstrom."""

    coords: np.ndarray
    amplitudes: np.ndarray
    sigmas: np.ndarray


def random_structure(
    rng: np.random.Generator, n_atoms: int, radius: float, sigma: float
) -> PseudoAtoms:
    """An asymmetric blob cloud: atoms on a random walk (a chain, like a protein backbone)
    folded inside a sphere of ``radius`` Angstrom, plus one off-centre dense lobe."""
    step = 0.9 * sigma
    coords = np.zeros((n_atoms, 3))
    for i in range(1, n_atoms):
        for _ in range(100):
            trial = coords[i - 1] + step * _unit(rng.normal(size=3))
            if np.linalg.norm(trial) < radius:
                break
        coords[i] = trial
    coords -= coords.mean(axis=0)
    lobe = coords[:, 0] + 0.5 * coords[:, 1] > np.quantile(coords[:, 0] + 0.5 * coords[:, 1], 0.8)
    amplitudes = np.where(lobe, 1.6, 1.0) * rng.uniform(0.8, 1.2, n_atoms)
    sigmas = sigma * rng.uniform(0.9, 1.3, n_atoms)
    return PseudoAtoms(coords, amplitudes, sigmas)


def conformational_variant(
    base: PseudoAtoms, rng: np.random.Generator, fraction: float = 0.35, angle_deg: float = 50.0
) -> PseudoAtoms:
    """A second structure: the atoms on one side of a random plane (a domain holding about
    ``fraction`` of them) swing by ``angle_deg`` about an axis through the hinge."""
    normal = _unit(rng.normal(size=3))
    side = base.coords @ normal
    moving = side > np.quantile(side, 1.0 - fraction)
    hinge = base.coords[moving].mean(axis=0) - normal * (side[moving].mean() - side[moving].min())
    axis = _unit(np.cross(normal, _unit(rng.normal(size=3))))
    turn = Rotation.from_rotvec(np.deg2rad(angle_deg) * axis)
    coords = base.coords.copy()
    coords[moving] = turn.apply(coords[moving] - hinge) + hinge
    coords -= coords.mean(axis=0)
    return PseudoAtoms(coords, base.amplitudes.copy(), base.sigmas.copy())


def _unit(v):
    return v / np.linalg.norm(v)
