"""Point groups in RELION's conventions (cryomatch.symmetry)."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryomatch import geometry, symmetry
from cryomatch.errors import CryomatchError


def _contains(group, matrix):
    return any(np.abs(g - matrix).max() < 1e-6 for g in group)


def _turn(axis, degrees):
    axis = np.asarray(axis, dtype=np.float64)
    return Rotation.from_rotvec(np.deg2rad(degrees) * axis / np.linalg.norm(axis)).as_matrix()


@pytest.mark.parametrize(
    "symbol, order",
    [("C1", 1), ("c4", 4), ("C12", 12), ("D2", 4), ("D7", 14), ("T", 12), ("O", 24)]
    + [("I", 60), ("I1", 60), ("I2", 60), ("I3", 60), ("I4", 60)],
)
def test_groups_are_closed_rotation_groups_of_the_right_order(symbol, order):
    group = symmetry.point_group(symbol)
    assert group.shape == (order, 3, 3)
    assert symmetry.expected_order(symbol) == order
    np.testing.assert_allclose(group[0], np.eye(3))
    np.testing.assert_allclose(np.linalg.det(group), 1.0, atol=1e-9)
    for a in group[:: max(1, order // 7)]:
        for b in group[:: max(1, order // 5)]:
            assert _contains(group, a @ b)


def test_axes_follow_relion():
    # Cn about z, Dn's 2-fold about x, O's 4-folds about x, y and z
    assert _contains(symmetry.point_group("C4"), _turn((0, 0, 1), 90))
    assert _contains(symmetry.point_group("D3"), _turn((1, 0, 0), 180))
    assert not _contains(symmetry.point_group("D3"), _turn((0, 1, 0), 180))
    octahedral = symmetry.point_group("O")
    for axis in np.eye(3):
        assert _contains(octahedral, _turn(axis, 90))
    # T: a 3-fold about z; I (= I2): 2-folds about x, y, z and a 5-fold in the xz plane
    assert _contains(symmetry.point_group("T"), _turn((0, 0, 1), 120))
    ico = symmetry.point_group("I")
    for axis in np.eye(3):
        assert _contains(ico, _turn(axis, 180))
    assert _contains(ico, _turn((0.525731114, 0, 0.850650807), 72))
    # I3: a 5-fold about z
    assert _contains(symmetry.point_group("I3"), _turn((0, 0, 1), 72))


def test_equivalent_poses_give_the_same_viewing_set():
    rot, tilt, psi = 30.0, 50.0, -20.0
    a = geometry.euler_to_matrix(rot, tilt, psi)
    poses = symmetry.equivalent_poses(a, "C4")
    assert poses.shape == (4, 3, 3)
    # the C4 partners differ by 90 deg steps of rot, same tilt and psi
    rots, tilts, psis = geometry.matrix_to_euler(poses)
    np.testing.assert_allclose(np.sort(np.round(rots - rot, 6) % 360), [0, 90, 180, 270], atol=1e-6)
    np.testing.assert_allclose(tilts, tilt, atol=1e-6)
    np.testing.assert_allclose(psis, psi, atol=1e-6)


@pytest.mark.parametrize("bad", ["C0", "X3", "D", "I5", "", "C-2"])
def test_unknown_groups_are_refused(bad):
    with pytest.raises(CryomatchError, match="point group"):
        symmetry.point_group(bad)
