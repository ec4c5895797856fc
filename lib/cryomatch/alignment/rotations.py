"""Rotation sets for the search, as acryo defines them.

``rotations`` is a (max, step) pair in degrees (the same for all axes), three such pairs
for the z, y and x axes, a scipy ``Rotation`` (or a list of them), or None (identity only).
A (max, step) pair gives the angles ``-n step .. n step`` with ``n = int(max / step)``
(only 0 when step is 0); the set is their Cartesian product in (z, y, x) order, each
triple the external rotation ``Rz(az) Ry(ay) Rx(ax)`` acting on (z, y, x) vectors (x first),
which is scipy's ``Rotation.from_euler('zyx', [ax, ay, az])`` on (z, y, x) vectors.
Quaternions are scipy's (x, y, z, w) of those rotations.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from scipy.spatial.transform import Rotation

from ..errors import CryomatchError, CryomatchWarning


def euler_zyx_to_rotation(angles) -> Rotation:
    """Rotations of (z, y, x) vectors from angles (..., 3) about the z, y, x axes (degrees,
    external, x applied first)."""
    angles = np.asarray(angles, dtype=np.float64)
    return Rotation.from_euler("zyx", angles[..., ::-1], degrees=True)


def _axis_angles(pair) -> np.ndarray:
    try:
        max_angle, step = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise CryomatchError(
            f"a rotation range must be (max, step) degrees, got {pair!r}"
        ) from None
    if step < 0 or max_angle < 0:
        raise CryomatchError(f"rotation range {pair!r}: max and step must not be negative")
    if step == 0:
        return np.zeros(1)
    n = int(max_angle / step)
    return np.linspace(-n * step, n * step, 2 * n + 1)


def rotation_grid(rotations) -> np.ndarray | None:
    """The (n, 3) z, y, x angle triples of a (max, step) range set, else None."""
    if rotations is None or isinstance(rotations, Rotation):
        return None
    items = list(rotations)
    if items and isinstance(items[0], Rotation):
        return None
    if np.ndim(items) == 1:
        items = [items] * 3
    if len(items) != 3:
        raise CryomatchError(f"rotations must be one (max, step) pair or three, got {rotations!r}")
    axes = [_axis_angles(p) for p in items]
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


def normalize_rotations(rotations) -> np.ndarray:
    """Quaternions (n, 4) (x, y, z, w) of a rotation set (see the module docstring).

    A set without the identity draws a warning: alignment then cannot keep a subvolume as
    it is, and results are biased away from the starting pose.
    """
    grid = rotation_grid(rotations)
    if grid is not None:
        quats = euler_zyx_to_rotation(grid).as_quat(canonical=False)
    elif rotations is None:
        quats = np.array([[0.0, 0.0, 0.0, 1.0]])
    elif isinstance(rotations, Rotation):
        quats = np.atleast_2d(rotations.as_quat(canonical=False))
    else:
        quats = np.stack([np.asarray(r.as_quat(canonical=False)).reshape(4) for r in rotations])
    if not np.any(np.abs(quats[:, 3]) > 1 - 1e-9):
        warnings.warn(
            "the rotation set does not contain the identity: no subvolume can keep its pose",
            CryomatchWarning,
            stacklevel=3,
        )
    return quats
