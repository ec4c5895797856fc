"""The simulator's forward model against independent computations."""

import numpy as np

from cryomatch import geometry
from cryomatch.kernels.phantom import conformational_variant, random_structure
from cryomatch.kernels.projection import (
    project_atoms,
    project_volume,
    spline_coefficients,
    voxelize_atoms,
)

BOX, APIX = 48, 2.0


def phantom(rng):
    return random_structure(rng, 120, 0.28 * BOX * APIX, 1.6 * APIX)


def test_projection_equals_sum_of_voxelized_phantom_along_beam(rng):
    a = phantom(rng)
    volume = voxelize_atoms(a.coords, a.amplitudes, a.sigmas, BOX, APIX)
    image = project_atoms(a.coords, a.amplitudes, a.sigmas, np.eye(3)[None], BOX, APIX)[0]
    np.testing.assert_allclose(image, volume.sum(axis=0), rtol=0, atol=1e-5 * image.max())


def test_rotated_projection_equals_z_sum_of_rotated_voxelization(rng):
    """P(x, y) = sum_z V(A^T (x, y, z)): voxelize the atoms at A r and sum along z."""
    a = phantom(rng)
    mat = geometry.euler_to_matrix(30.0, 50.0, -70.0)
    image = project_atoms(a.coords, a.amplitudes, a.sigmas, mat[None], BOX, APIX)[0]
    rotated = voxelize_atoms(a.coords @ mat.T, a.amplitudes, a.sigmas, BOX, APIX)
    np.testing.assert_allclose(image, rotated.sum(axis=0), atol=1e-5 * image.max())


def test_map_projection_matches_atom_projection(rng):
    a = phantom(rng)
    volume = voxelize_atoms(a.coords, a.amplitudes, a.sigmas, BOX, APIX)
    mats = geometry.euler_to_matrix([30.0, -100.0], [50.0, 140.0], [-70.0, 10.0])
    disp = np.array([[2.0, -1.5], [-0.5, 3.25]])  # pixels
    exact = project_atoms(a.coords, a.amplitudes, a.sigmas, mats, BOX, APIX, disp * APIX)
    interp = project_volume(spline_coefficients(volume), mats, disp)
    assert np.abs(exact - interp).max() < 2e-3 * exact.max()


def test_variant_moves_one_domain_and_differs_in_projection(rng):
    base = phantom(rng)
    variant = conformational_variant(base, rng)
    fixed, moving = base.domains != 1, base.domains == 1

    def pair_distances(c):
        return np.linalg.norm(c[:, None] - c[None], axis=-1)

    np.testing.assert_allclose(
        pair_distances(variant.coords[fixed]), pair_distances(base.coords[fixed]), atol=1e-9
    )
    core_to_domain = [
        c[moving].mean(0) - c[base.domains == 0].mean(0) for c in (base.coords, variant.coords)
    ]
    assert np.linalg.norm(core_to_domain[1] - core_to_domain[0]) > 5.0  # Angstrom
    mats = geometry.random_rotations(20, rng).as_matrix()
    pa = project_atoms(base.coords, base.amplitudes, base.sigmas, mats, BOX, APIX)
    pb = project_atoms(variant.coords, variant.amplitudes, variant.sigmas, mats, BOX, APIX)
    assert (
        np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(pa, pb, strict=True)])
        < 0.95
    )
