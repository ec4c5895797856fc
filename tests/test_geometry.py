"""Conventions: RELION Euler matrices, origins, in-plane rotation/shift/mirror."""

import numpy as np
import pytest
from scipy import ndimage

from cryomatch import geometry
from cryomatch.kernels.phantom import random_structure
from cryomatch.kernels.projection import project_atoms


def relion_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix written out element by element (euler.cpp)."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


@pytest.mark.parametrize("angles", [(0, 0, 0), (30, 50, -70), (-170, 120, 95), (10, 179, 3)])
def test_matrix_is_relions(angles):
    np.testing.assert_allclose(
        geometry.euler_to_matrix(*angles), relion_matrix(*angles), atol=1e-12
    )


def test_euler_round_trip(rng):
    rot, tilt, psi = rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)
    a = geometry.euler_to_matrix(rot, tilt, psi)
    back = geometry.euler_to_matrix(*geometry.matrix_to_euler(a))
    np.testing.assert_allclose(back, a, atol=1e-10)
    _, tilt2, _ = geometry.matrix_to_euler(a)
    assert np.all((tilt2 >= 0) & (tilt2 <= 180))


def test_viewing_direction_is_third_row(rng):
    rot, tilt, psi = rng.uniform(-180, 180, 10), rng.uniform(0, 180, 10), rng.uniform(-180, 180, 10)
    a = geometry.euler_to_matrix(rot, tilt, psi)
    np.testing.assert_allclose(geometry.viewing_direction(rot, tilt), a[:, 2, :], atol=1e-12)


def test_angle_between_rotations():
    a = geometry.euler_to_matrix(10, 20, 30)
    b = geometry.euler_to_matrix(10, 20, 37)  # psi differs by 7 degrees
    assert geometry.angle_between_rotations(a, b) == pytest.approx(7.0)


def test_origin_puts_particle_at_centre_minus_origin(rng):
    """RELION: image(r) = P(r + origin), so the particle's centroid moves by -origin."""
    atoms = random_structure(rng, 60, 20.0, 3.0)
    a = geometry.euler_to_matrix(20, 40, 60)[None]
    origin = np.array([[6.0, -4.5]])  # Angstrom
    shifted = project_atoms(
        atoms.coords,
        atoms.amplitudes,
        atoms.sigmas,
        a,
        48,
        1.5,
        geometry.displacement_from_origin(origin),
    )[0]
    centred = project_atoms(atoms.coords, atoms.amplitudes, atoms.sigmas, a, 48, 1.5)[0]
    grid = np.arange(48) - 24

    def centroid(im):
        return np.array([im.sum(0) @ grid, im.sum(1) @ grid]) / im.sum()

    np.testing.assert_allclose(centroid(shifted) - centroid(centred), -origin[0] / 1.5, atol=1e-4)


def test_inplane_matrix_is_relions_2d_part():
    np.testing.assert_allclose(
        geometry.inplane_matrix(33.0), geometry.euler_to_matrix(0, 0, 33.0)[:2, :2], atol=1e-12
    )


def _transform(ref, psi, origin, mirror):
    """image(r) = ref(L (r + origin)) by spline interpolation (independent of the module)."""
    n = ref.shape[0]
    g = np.arange(n) - n // 2
    yy, xx = np.meshgrid(g, g, indexing="ij")
    m = np.diag([-1.0, 1.0]) if mirror else np.eye(2)
    p = np.deg2rad(psi)
    a2 = np.array([[np.cos(p), np.sin(p)], [-np.sin(p), np.cos(p)]])
    src = (m @ a2.T) @ np.stack([xx.ravel() + origin[0], yy.ravel() + origin[1]])
    return ndimage.map_coordinates(ref, [src[1] + n // 2, src[0] + n // 2], order=3).reshape(n, n)


@pytest.mark.parametrize("mirror", [False, True])
def test_recentre_origin_keeps_the_image(rng, mirror):
    n = 64
    g = np.arange(n) - n // 2
    yy, xx = np.meshgrid(g, g, indexing="ij")
    ref_old = np.exp(-((xx - 3) ** 2 + (yy + 5) ** 2) / 30.0) + 0.5 * np.exp(
        -((xx + 6) ** 2 + yy**2) / 12.0
    )
    psi, origin, c = 37.0, np.array([2.0, -1.5]), np.array([3.0, -5.0])
    image = _transform(ref_old, psi, origin, mirror)
    ref_new = _transform(ref_old, 0.0, c, False)  # ref_new(s) = ref_old(s + c)
    new_origin = geometry.recentre_origin(psi, origin, mirror, c)
    np.testing.assert_allclose(_transform(ref_new, psi, new_origin, mirror), image, atol=2e-3)
