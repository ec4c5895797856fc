"""Tilt-series conventions in geometry.py: tilt matrices, projection, tilt axis, gauge."""

import numpy as np

from cryomatch import geometry


def test_tilt_matrices_are_relion_rotations_about_y():
    a = geometry.tilt_matrices([0.0, 30.0, -60.0])
    np.testing.assert_allclose(a, geometry.euler_to_matrix([0, 0, 0], [0, 30, -60], [0, 0, 0]))
    np.testing.assert_allclose(a[:, 1], [[0, 1, 0]] * 3, atol=1e-12)  # y stays y


def test_projection_coordinate_is_first_row_of_relion_matrix(rng):
    points = rng.normal(size=(5, 3))
    angles = np.array([-50.0, 10.0, 70.0])
    a = geometry.tilt_matrices(angles)
    expected = np.einsum("nij,pj->npi", a, points)[..., 0]
    got = geometry.tilt_projection_x(points[None, :, 0], points[None, :, 2], angles[:, None])
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_tilt_axis_rotation_turns_the_axis_onto_y():
    for phi in (0.0, 85.3, -30.0, 92.79):
        p = np.deg2rad(phi)
        axis = np.array([-np.sin(p), np.cos(p)])  # counter-clockwise from +y
        np.testing.assert_allclose(geometry.tilt_axis_rotation(phi) @ axis, [0, 1], atol=1e-12)
    # IMOD's .xf of a SerialEM series with a tilt axis near 84 degrees starts 0.102, 0.995
    np.testing.assert_allclose(geometry.tilt_axis_rotation(84.14)[0], [0.1021, 0.9948], atol=2e-4)


def test_remove_unobservable_removes_object_translations_only(rng):
    angles = np.arange(-60, 61, 3.0)
    t = np.deg2rad(angles)
    tx, ty, tz, offset = 2.5, -1.5, 4.0, 0.7  # object translation and axis offset
    motion = np.stack([offset + tx * np.cos(t) - tz * np.sin(t), np.full_like(t, ty)], 1)
    np.testing.assert_allclose(geometry.remove_unobservable(motion, angles), 0, atol=1e-12)
    jitter = rng.normal(size=motion.shape)
    left = geometry.remove_unobservable(jitter + motion, angles)
    np.testing.assert_allclose(left, geometry.remove_unobservable(jitter, angles), atol=1e-12)
    assert np.abs(left).max() > 0.5  # real jitter survives
