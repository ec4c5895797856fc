"""Missing-wedge-weighted averaging of subvolumes in Fourier space, and point-group symmetry.

Each subvolume, turned into the reference's frame by its pose (cubic spline), contributes
its spectrum times its wedge in that frame, ``sum_i W_i V_i``, and the wedge itself,
``sum_i W_i``; the average is ``sum W V / (sum W + c)`` (a Wiener-like constant c, in units
of particles, keeps frequencies that few particles sampled from being amplified; zero
where none did). The sums of different particles add, so chunks of particles are summed
separately and merged. Spectra are rfftn grids (nz, ny, nx // 2 + 1), arrays (z, y, x).
"""

from __future__ import annotations

from ..backend import array_module, fft_module
from .rotate import rotate_volumes


def wedge_weighted_sums(volumes, wedges):
    """(sum_i W_i rfftn(v_i) complex128, sum_i W_i float64) of subvolumes (n, *shape)
    already in the reference's frame and their wedges (n, nz, ny, nx // 2 + 1) there."""
    xp = array_module(volumes)
    fft = fft_module(xp)
    spectra = fft.rfftn(volumes, axes=(-3, -2, -1))
    num = (spectra * wedges).sum(axis=0).astype(xp.complex128)
    return num, wedges.sum(axis=0).astype(xp.float64)


def wiener_average(num, den, shape, constant: float = 1.0):
    """The average map (float32, ``shape``) from the sums of :func:`wedge_weighted_sums`."""
    xp = array_module(num)
    fft = fft_module(xp)
    spectrum = xp.where(den > 0, num / (den + constant), 0)
    return fft.irfftn(spectrum, s=tuple(shape)).astype(xp.float32)


def symmetrize(volume, matrices_zyx, centre):
    """The mean of the volume rotated by each matrix (order, 3, 3) acting on (z, y, x)
    about ``centre``: the map made symmetric under a point group (identity included)."""
    if len(matrices_zyx) <= 1:
        return volume
    xp = array_module(volume)
    edge = float(xp.mean(volume[0]))
    return rotate_volumes(volume, matrices_zyx, centre, cval=edge).mean(axis=0)
