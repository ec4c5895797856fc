"""Geometry helpers of the polar search: in-plane turns and twist errors."""

import numpy as np
import pytest

from cryomatch import geometry


def test_twist_of_a_pure_inplane_rotation_is_its_angle():
    a = geometry.euler_to_matrix(30.0, 50.0, 10.0)
    b = geometry.euler_to_matrix(30.0, 50.0, 10.0 + 7.5)
    assert geometry.inplane_angle_between(b, a) == pytest.approx(7.5)
    assert geometry.inplane_angle_between(a, b) == pytest.approx(-7.5)


def test_twist_ignores_a_small_change_of_viewing_direction():
    a = geometry.euler_to_matrix(0.0, 50.0, 20.0)
    b = geometry.euler_to_matrix(0.0, 53.0, 20.0)  # tilt about the image's y axis: a swing
    assert abs(geometry.inplane_angle_between(b, a)) < 1e-9


def test_psi_turn_round_trip():
    turns = np.arange(128)
    psi = geometry.psi_from_polar_turn(turns, 128)
    assert psi[0] == 0.0 and psi[1] == pytest.approx(360 - 360 / 128)
    np.testing.assert_allclose(geometry.polar_turn_from_psi(psi, 128), turns, atol=1e-9)
