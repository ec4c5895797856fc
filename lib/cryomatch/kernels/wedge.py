"""Fourier-space weights of 3D volumes on the rfftn grid: low-pass, missing wedge, Nyquist.

Arrays are (z, y, x); the rfftn grid of a (nz, ny, nx) box is (nz, ny, nx // 2 + 1) with
integer frequency indices kz, ky from ``fftfreq * n`` and kx from ``rfftfreq * n``; a
frequency in cycles per voxel is ``index / n`` along each axis.

Missing wedge (single-axis tilt series; acryo's geometry, kept for portability): a tilt
range (min, max) in degrees about y with the beam along z samples the central planes whose
normals lie between two unit vectors ``n_j = (-cos a_j, 0, sin a_j)`` in (z, y, x) with
a = min, max; a frequency k is kept when ``(k . n_0)(k . n_1) <= 0``. For (-60, 60) this
keeps ``|kz| <= tan(60 deg) |kx|`` plus the ky axis and the origin. A subvolume seen at
orientation q (a rotation acting on (z, y, x)) has its wedge normals turned by q^-1.
"""

from __future__ import annotations

import math

import numpy as np


def rfft_indices(shape, xp=np):
    """Integer frequency indices (kz, ky, kx) of an rfftn grid, broadcastable float32."""
    nz, ny, nx = shape
    kz = xp.asarray(np.fft.fftfreq(nz) * nz, dtype=xp.float32)[:, None, None]
    ky = xp.asarray(np.fft.fftfreq(ny) * ny, dtype=xp.float32)[None, :, None]
    kx = xp.asarray(np.fft.rfftfreq(nx) * nx, dtype=xp.float32)[None, None, :]
    return kz, ky, kx


def butterworth(shape, cutoff: float | None, order: int = 2, xp=np):
    """Low-pass weights ``1 / (1 + (|f| / cutoff)^(2 order))`` on the rfftn grid; |f| in
    cycles per voxel (Nyquist 0.5 per axis, 0.5 sqrt(3) at the corner). ``cutoff`` None,
    <= 0 or >= 0.5 sqrt(3) means no filter (all ones), as in acryo."""
    kz, ky, kx = rfft_indices(shape, xp)
    full = xp.ones((shape[0], shape[1], shape[2] // 2 + 1), dtype=xp.float32)
    if cutoff is None or cutoff <= 0 or cutoff >= 0.5 * math.sqrt(3):
        return full
    f2 = (kz / shape[0]) ** 2 + (ky / shape[1]) ** 2 + (kx / shape[2]) ** 2
    return full / (1 + (f2 / cutoff**2) ** order)


def without_nyquist(shape, xp=np):
    """0/1 weights that drop the Nyquist planes of even axes (their sign is ambiguous,
    which breaks sub-voxel interpolation of correlations)."""
    kz, ky, kx = rfft_indices(shape, xp)
    keep = xp.ones((shape[0], shape[1], shape[2] // 2 + 1), dtype=xp.float32)
    for k, n in ((kz, shape[0]), (ky, shape[1]), (kx, shape[2])):
        if n % 2 == 0:
            keep = keep * (xp.abs(k) != n // 2)
    return keep


def wedge_normals(tilt_range, axis: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """The two unit normals (z, y, x) that bound a tilt range (min, max) in degrees about
    the y or x axis (see the module docstring)."""
    lo, hi = (math.pi - math.radians(a) for a in tilt_range)
    if axis == "y":
        return np.array([math.cos(lo), 0.0, math.sin(lo)]), np.array(
            [math.cos(hi), 0.0, math.sin(hi)]
        )
    if axis == "x":
        return np.array([math.cos(lo), math.sin(lo), 0.0]), np.array(
            [math.cos(hi), math.sin(hi), 0.0]
        )
    raise ValueError(f"tilt axis must be 'y' or 'x', got {axis!r}")


def wedge_mask(shape, normal_pairs, xp=np):
    """0/1 float32 rfftn-grid mask of the sampled region: the union over ``normal_pairs``
    [(n0, n1), ...] (already turned to the subvolume's frame, (z, y, x)) of
    ``(k . n0)(k . n1) <= 0`` with k in cycles per voxel. No pairs: all ones."""
    kz, ky, kx = rfft_indices(shape, xp)
    keep = xp.zeros((shape[0], shape[1], shape[2] // 2 + 1), dtype=bool)
    if not normal_pairs:
        return keep.astype(xp.float32) + 1
    for n0, n1 in normal_pairs:
        n0 = np.asarray(n0, dtype=np.float64) / shape
        n1 = np.asarray(n1, dtype=np.float64) / shape
        d0 = kz * float(n0[0]) + ky * float(n0[1]) + kx * float(n0[2])
        d1 = kz * float(n1[0]) + ky * float(n1[1]) + kx * float(n1[2])
        keep = keep | (d0 * d1 <= 0)
    return keep.astype(xp.float32)
