"""Rotations and affine resampling of 3D volumes by cubic B-spline interpolation.

Rotations act on (z, y, x) index vectors about a centre c: the rotated volume is
``out(x) = in(R^T (x - c) + c)`` (content at p moves to ``R (p - c) + c``). Outside the
box the volume is taken as the constant ``cval``. scipy.ndimage for numpy arrays,
cupyx.scipy.ndimage for cupy arrays.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module


def ndimage_module(xp):
    """scipy.ndimage for numpy, cupyx.scipy.ndimage for cupy."""
    if xp is np:
        from scipy import ndimage

        return ndimage
    from cupyx.scipy import ndimage

    return ndimage


def affine_resample(
    volume, matrix, offset, cval: float = 0.0, order: int = 3, mode: str = "grid-constant"
):
    """``out(x) = volume(matrix @ x + offset)`` (x index vectors (z, y, x)), float32.
    ``mode`` "grid-constant" interpolates towards ``cval`` across the box's surface;
    "constant" (faster, ~1.5x at order 1) puts ``cval`` at once beyond the last voxel."""
    xp = array_module(volume)
    nd = ndimage_module(xp)
    shifted = volume.astype(xp.float32) - cval  # so that outside is 0 for the spline
    out = nd.affine_transform(
        shifted,
        xp.asarray(matrix),
        offset=xp.asarray(offset),
        order=order,
        mode=mode,
        cval=0.0,
        output=xp.float32,
    )
    return out + cval


def spline_coefficients(volume, cval: float = 0.0, order: int = 3, mode: str = "grid-constant"):
    """Cubic B-spline coefficients of ``volume - cval`` (compute once, rotate many times);
    ``mode`` as in :func:`affine_resample` (the same in :func:`rotate_coefficients`)."""
    xp = array_module(volume)
    return ndimage_module(xp).spline_filter(
        volume.astype(xp.float32) - cval, order=order, mode=mode, output=xp.float32
    )


def rotate_coefficients(
    coefficients, matrices, centre, cval: float = 0.0, order: int = 3, mode: str = "grid-constant"
):
    """The volume of :func:`spline_coefficients` rotated by each of ``matrices`` (R, 3, 3)
    about ``centre``: (R, *shape) float32, ``cval`` outside. ``mode`` "constant" is ~1.5x
    faster at order 3 and the same where the volume is ``cval`` near its faces."""
    xp = array_module(coefficients)
    nd = ndimage_module(xp)
    centre = np.asarray(centre, dtype=np.float64)
    out = xp.empty((len(matrices),) + tuple(coefficients.shape), dtype=xp.float32)
    for i, rot in enumerate(np.asarray(matrices, dtype=np.float64)):
        inv = rot.T
        out[i] = nd.affine_transform(
            coefficients,
            xp.asarray(inv),
            offset=xp.asarray(centre - inv @ centre),
            order=order,
            mode=mode,
            cval=0.0,
            prefilter=False,
            output=xp.float32,
        )
    return out + cval


def rotate_volumes(
    volume, matrices, centre, cval: float = 0.0, order: int = 3, mode: str = "grid-constant"
):
    """The volume rotated by each of ``matrices`` (R, 3, 3) about ``centre``: (R, *shape)
    float32. The spline coefficients are computed once for all rotations."""
    coefficients = spline_coefficients(volume, cval, order, mode)
    return rotate_coefficients(coefficients, matrices, centre, cval, order, mode)
