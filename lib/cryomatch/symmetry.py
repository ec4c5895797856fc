"""Point-group symmetry in RELION's conventions (the one place for them).

Groups and their axes follow RELION's (and Xmipp's) definitions (RELION src/symmetries.cpp):
``Cn`` an n-fold about z; ``Dn`` adds a 2-fold about x; ``T`` a 3-fold about z and a 2-fold
about (0, 0.816496, 0.577350); ``O`` a 3-fold about (1, 1, 1)/sqrt(3) and a 4-fold about z;
``I`` (= ``I2``) 2-fold about z, 5-fold about (0.525731, 0, 0.850651), 3-fold about
(0, 0.356822, 0.934172); ``I1``, ``I3``, ``I4`` RELION's other icosahedral settings.
Only proper rotations (no mirrors, no inversion): cryo-EM maps are chiral.

The group's matrices S act on map coordinates (x, y, z); a map with the symmetry satisfies
``V(S x) = V(x)``. A RELION pose A (map -> image, see :mod:`cryomatch.geometry`) is then
equivalent to every ``A S`` (the projection ``V(A^T x)`` equals ``V((A S)^T x)``).
"""

from __future__ import annotations

import re

import numpy as np
from scipy.spatial.transform import Rotation

from .errors import CryomatchError

# generators (fold, axis) of RELION's point groups (facts from RELION's symmetries.cpp)
_ICOSAHEDRAL = {
    "I2": [
        (2, (0, 0, 1)),
        (5, (0.525731114, 0, 0.850650807)),
        (3, (0, 0.356822076, 0.934172364)),
    ],
    "I1": [
        (2, (1, 0, 0)),
        (5, (0.8506508070, 0, -0.5257311143)),
        (3, (0.9341723640, 0.3568220765, 0)),
    ],
    "I3": [
        (2, (-0.5257311143, 0, 0.8506508070)),
        (5, (0, 0, 1)),
        (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
    "I4": [
        (2, (0.5257311143, 0, 0.8506508070)),
        (5, (0.8944271932547096, 0, 0.4472135909903704)),
        (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
}
_GROUP_ORDER = {"T": 12, "O": 24, "I": 60}


def _generators(symbol: str):
    s = symbol.strip().upper()
    if m := re.fullmatch(r"C(\d+)", s):
        return [(int(m.group(1)), (0, 0, 1))]
    if m := re.fullmatch(r"D(\d+)", s):
        return [(int(m.group(1)), (0, 0, 1)), (2, (1, 0, 0))]
    if s == "T":
        return [(3, (0, 0, 1)), (2, (0, 0.816496, 0.577350))]
    if s == "O":
        return [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0, 0, 1))]
    if s == "I":
        s = "I2"
    if s in _ICOSAHEDRAL:
        return _ICOSAHEDRAL[s]
    return None


def expected_order(symbol: str) -> int:
    """Number of rotations in the point group ``symbol`` (C1 -> 1, C4 -> 4, D7 -> 14, ...)."""
    s = check_symbol(symbol)
    if s[0] == "C":
        return int(s[1:])
    if s[0] == "D":
        return 2 * int(s[1:])
    return _GROUP_ORDER[s[0]]


def check_symbol(symbol: str) -> str:
    """The canonical (upper-case) symbol, or a CryomatchError naming the accepted forms."""
    s = str(symbol).strip().upper()
    gens = _generators(s)
    if gens is None or any(fold < 1 for fold, _ in gens):
        raise CryomatchError(
            f"unknown point group {symbol!r}: use Cn, Dn (n >= 1), T, O, I (= I2), I1, I3 or I4"
        )
    return s


def point_group(symbol: str) -> np.ndarray:
    """The rotation matrices (order, 3, 3) of point group ``symbol``, identity first.

    Acts on (x, y, z) map coordinates. The group is closed by products of the generators'
    rotations; matrices equal to 1e-6 are merged.
    """
    gens = _generators(check_symbol(symbol))
    elements = [np.eye(3)]
    for fold, axis in gens:
        axis = np.asarray(axis, dtype=np.float64)
        axis = axis / np.linalg.norm(axis)
        for k in range(1, fold):
            elements.append(Rotation.from_rotvec(axis * 2 * np.pi * k / fold).as_matrix())
    group = _close(elements)
    if len(group) != expected_order(symbol):  # a wrong generator table would show here
        raise AssertionError(f"point group {symbol}: {len(group)} elements")
    return np.stack(group)


def _close(elements, tol: float = 1e-6):
    group = []

    def add(m):
        if not any(np.abs(m - g).max() < tol for g in group):
            group.append(m)
            return True
        return False

    for m in elements:
        add(m)
    grew = True
    while grew:
        grew = False
        for a in list(group):
            for b in list(group):
                grew |= add(a @ b)
        if len(group) > 60:
            raise AssertionError("point group did not close")
    return group


def equivalent_poses(matrices, symbol: str) -> np.ndarray:
    """All symmetry-equivalent RELION poses ``A S`` (..., order, 3, 3) of poses A (..., 3, 3)."""
    group = point_group(symbol)
    return np.einsum("...ij,gjk->...gik", np.asarray(matrices, dtype=np.float64), group)


# --- asymmetric units of viewing directions ------------------------------------------------
# RELION's geometric asymmetric units (facts from RELION's healpix_sampling.cpp,
# removeSymmetryEquivalentPointsGeometric): ranges of rot and tilt (degrees), and for the
# polyhedral groups half-spaces d . normal >= 0 of the viewing direction d.
_ASU_NORMALS = {
    "T": [(-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.471404, 0.816497, 0.0)],
    "O": [(0.0, -1.0, 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0)],
    "I2": [
        (0.0, 1.0, 0.0),
        (-0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
        (0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
    ],
    "I4": [  # RELION writes these with <= 0: negated here
        (0.0, 0.0, -1.0),
        (-0.187592467856686, 0.303530987314591, 0.491123477863004),
        (-0.187592467856686, -0.303530987314591, 0.491123477863004),
    ],
}
_ASU_TILT_OF_I2_NORMALS = {"I1": 90.0, "I3": 31.7174745559, "I4": -31.7174745559}
_EPS = 1e-6  # degrees (and dot products) of slack on the boundaries


def _asu_normals(s: str) -> np.ndarray:
    from .geometry import euler_to_matrix

    if s in ("I1", "I3"):
        a = euler_to_matrix(0.0, _ASU_TILT_OF_I2_NORMALS[s], 0.0)
        normals = np.asarray(_ASU_NORMALS["I2"]) @ a.T
    elif s == "I4":
        a = euler_to_matrix(0.0, _ASU_TILT_OF_I2_NORMALS[s], 0.0)
        normals = np.asarray(_ASU_NORMALS["I4"]) @ a.T
    else:
        normals = np.asarray(_ASU_NORMALS["I2" if s == "I" else s])
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def in_asymmetric_unit(rot, tilt, symbol: str) -> np.ndarray:
    """Whether viewing directions (rot, tilt in degrees, RELION) lie in RELION's asymmetric
    unit of ``symbol``: Cn |rot| <= 180/n; Dn 90 - 180/n <= rot <= 90 + 180/n and tilt <= 90
    (D1: tilt <= 90); T, O, I half-spaces about the polyhedron's axes (with rot ranges for T
    and O). Boundaries are included."""
    s = check_symbol(symbol)
    rot = (np.asarray(rot, dtype=np.float64) + 180.0) % 360.0 - 180.0  # [-180, 180)
    rot = np.where(rot <= -180.0 + _EPS, rot + 360.0, rot)  # (-180, 180]
    tilt = np.asarray(tilt, dtype=np.float64)
    rot, tilt = np.broadcast_arrays(rot, tilt)
    upper = tilt <= 90.0 + _EPS
    if s[0] == "C":
        return np.abs(rot) <= 180.0 / int(s[1:]) + _EPS
    if s[0] == "D":
        n = int(s[1:])
        if n == 1:
            return upper
        return (np.abs(rot - 90.0) <= 180.0 / n + _EPS) & upper
    from .geometry import viewing_direction

    inside = np.all(viewing_direction(rot, tilt) @ _asu_normals(s).T >= -_EPS, axis=-1)
    if s == "T":
        ranged = ((rot >= 90.0 - _EPS) & (rot <= 150.0 + _EPS)) | (np.abs(rot) <= _EPS)
        return inside & ranged
    if s == "O":
        ranged = ((rot >= 45.0 - _EPS) & (rot <= 135.0 + _EPS) & upper) | (np.abs(rot) <= _EPS)
        return inside & ranged
    return inside


def to_asymmetric_unit(matrices, symbol: str) -> np.ndarray:
    """The symmetry-equivalent pose (A S, see :func:`equivalent_poses`) of each RELION pose
    A (..., 3, 3) whose viewing direction lies in the asymmetric unit (the first such in the
    group's order; the pose itself when it is inside already)."""
    from .geometry import matrix_to_euler

    matrices = np.asarray(matrices, dtype=np.float64)
    candidates = equivalent_poses(matrices, symbol)  # (..., order, 3, 3)
    rot, tilt, _ = matrix_to_euler(candidates)
    inside = in_asymmetric_unit(rot, tilt, symbol)
    if not np.all(inside.any(axis=-1)):
        raise AssertionError(f"{symbol}: a pose has no equivalent in the asymmetric unit")
    pick = np.argmax(inside, axis=-1)
    return np.take_along_axis(candidates, pick[..., None, None, None], axis=-3)[..., 0, :, :]


def generators(symbol: str) -> np.ndarray:
    """One rotation (by 360/fold degrees) per generating axis of ``symbol`` (k, 3, 3), on
    (x, y, z); empty for C1. Together they generate the group."""
    gens = _generators(check_symbol(symbol))
    out = [
        Rotation.from_rotvec(np.asarray(axis) / np.linalg.norm(axis) * 2 * np.pi / fold).as_matrix()
        for fold, axis in gens
        if fold > 1
    ]
    return np.stack(out) if out else np.zeros((0, 3, 3))
