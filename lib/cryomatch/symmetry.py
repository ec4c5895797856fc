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
