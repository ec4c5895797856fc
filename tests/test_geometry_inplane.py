"""In-plane composition, inversion, SPARX <-> RELION conversion and the CTF axis in the
reference frame, each checked against point maps written out independently."""

import numpy as np
import pytest

from cryomatch import geometry
from cryomatch.kernels import ctf as ctf_kernel


def _apply(psi, mirror, origin, r):
    """T(r) = M^mirror R_ccw(psi) (r + origin): this module's map, written out by hand."""
    p = np.deg2rad(psi)
    rot = np.array([[np.cos(p), -np.sin(p)], [np.sin(p), np.cos(p)]])
    v = rot @ (np.asarray(r) + np.asarray(origin))
    return np.array([-v[0], v[1]]) if mirror else v


def _random_params(rng):
    return rng.uniform(-180, 180), bool(rng.integers(2)), rng.normal(size=2) * 3


def test_matrix_is_the_documented_map(rng):
    for _ in range(20):
        psi, mirror, origin = _random_params(rng)
        r = rng.normal(size=2)
        matrix = geometry.image_to_reference_matrix(psi, mirror)
        np.testing.assert_allclose(matrix @ (r + origin), _apply(psi, mirror, origin, r))


def test_compose_is_applying_one_map_after_the_other(rng):
    for _ in range(50):
        t1, t2 = _random_params(rng), _random_params(rng)
        psi, mirror, origin = geometry.compose_inplane(*t1, *t2)
        r = rng.normal(size=2) * 5
        expected = _apply(*t2, _apply(*t1, r))  # image = ref1(T1 r), ref1 = ref2(T2 .)
        np.testing.assert_allclose(_apply(psi, mirror, origin, r), expected, atol=1e-12)


def test_invert_undoes_the_map(rng):
    for _ in range(50):
        t = _random_params(rng)
        inv = geometry.invert_inplane(*t)
        r = rng.normal(size=2) * 5
        np.testing.assert_allclose(_apply(*inv, _apply(*t, r)), r, atol=1e-12)
        psi, mirror, origin = geometry.compose_inplane(*t, *inv)
        assert abs(geometry.wrap_degrees(psi)) < 1e-9 and not mirror
        np.testing.assert_allclose(origin, 0, atol=1e-12)


def test_recentre_is_composition_with_a_shift(rng):
    for _ in range(20):
        psi, mirror, origin = _random_params(rng)
        c = rng.normal(size=2)
        # ref_new(s) = ref_old(s + c)  <=>  ref_old = ref_new o (s -> s - c)
        expected = geometry.compose_inplane(psi, mirror, origin, 0.0, False, -c)[2]
        np.testing.assert_allclose(geometry.recentre_origin(psi, origin, mirror, c), expected)


def _sparx_map(alpha, sx, sy, mirror, p):
    """EMAN2 Transform '2D' (libEM/transform.cpp): rotation rows (cos a, sin a),
    (-sin a, cos a), then the translation, then x -> -x when mirrored."""
    a = np.deg2rad(alpha)
    v = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) @ p + [sx, sy]
    return np.array([-v[0], v[1]]) if mirror else v


def test_sparx_parameters_give_the_same_map(rng):
    for _ in range(50):
        alpha, mirror = rng.uniform(0, 360), bool(rng.integers(2))
        sx, sy = rng.normal(size=2) * 3
        psi, origin, m = geometry.sparx_to_relion(alpha, sx, sy, mirror)
        p = rng.normal(size=2) * 5
        np.testing.assert_allclose(
            _apply(psi, m, origin, p), _sparx_map(alpha, sx, sy, mirror, p), atol=1e-12
        )
        back = geometry.relion_to_sparx(psi, origin, m)
        assert abs(geometry.wrap_degrees(back[0] - alpha)) < 1e-9
        np.testing.assert_allclose(back[1:3], [sx, sy], atol=1e-12)
        assert back[3] == mirror


def test_sparx_known_case():
    # alpha = 90: SPARX's matrix sends (1, 0) to (0, -1); RELION's psi is -90 degrees
    psi, origin, mirror = geometry.sparx_to_relion(90.0, 0.0, 0.0, False)
    assert psi == pytest.approx(-90.0)
    np.testing.assert_allclose(_apply(psi, mirror, origin, [1.0, 0.0]), [0.0, -1.0], atol=1e-12)


def test_wrap_degrees():
    np.testing.assert_allclose(
        geometry.wrap_degrees([-180, 180, 190, -190, 540, 0]), [180, 180, -170, 170, 180, 0]
    )


@pytest.mark.parametrize("mirror", [False, True])
def test_defocus_angle_in_reference_frame_matches_turned_frequencies(rng, mirror):
    kx, ky = np.meshgrid(np.linspace(-0.1, 0.1, 9), np.linspace(-0.1, 0.1, 9))
    psi, angle = 37.0, 20.0
    params = dict(
        defocus_u=15000.0, defocus_v=12000.0, voltage=300.0, cs=2.7, amplitude_contrast=0.1
    )
    # CTF(L^-1 k) with L^-1 = A2(psi) M
    linv = np.linalg.inv(geometry.image_to_reference_matrix(psi, mirror))
    kxr = linv[0, 0] * kx + linv[0, 1] * ky
    kyr = linv[1, 0] * kx + linv[1, 1] * ky
    direct = ctf_kernel.ctf(kxr, kyr, defocus_angle=angle, **params)
    new_angle = geometry.defocus_angle_in_reference_frame(angle, psi, mirror)
    np.testing.assert_allclose(
        ctf_kernel.ctf(kx, ky, defocus_angle=new_angle, **params), direct, atol=1e-12
    )
