"""Type-2 non-uniform FFT of a 3D map: its DFT at arbitrary frequencies, to a tolerance.

``F(k) = sum_X V(X) exp(-2 pi i k.X)`` for voxel offsets X = index - n//2 (per axis) and
frequencies k in cycles per voxel. finufft computes it when installed; otherwise a numpy
implementation of the same algorithm (Barnett, Magland, af Klinteberg 2019, SIAM J. Sci.
Comput. 41:C479): divide the map by the kernel's Fourier transform, zero-pad by 2, FFT, and
interpolate each point from its w^3 neighbours with the "exponential of semicircle" kernel
phi(z) = exp(beta (sqrt(1 - z^2) - 1)), w = ceil(log10(1/eps)) + 1, beta = 2.30 w. The
error is about eps relative to sum |V|.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial.legendre import leggauss

from .polar_fourier import finufft_available

_UPSAMPLING = 2


def nufft3d2(volume, kz, ky, kx, eps: float = 1e-6, method: str = "auto"):
    """DFT of a real or complex (z, y, x) map at points (kz, ky, kx) (1D arrays, cycles per
    voxel): complex128 (P,). ``method``: 'finufft', 'numpy' or 'auto'."""
    if method == "auto":
        method = "finufft" if finufft_available() else "numpy"
    kz, ky, kx = (np.ascontiguousarray(np.ravel(k), dtype=np.float64) for k in (kz, ky, kx))
    data = np.ascontiguousarray(volume, dtype=np.complex128)
    if method == "finufft":
        import finufft

        return finufft.nufft3d2(
            2 * np.pi * kz, 2 * np.pi * ky, 2 * np.pi * kx, data, eps=eps, isign=-1
        )
    return _nufft3d2_numpy(data, (kz, ky, kx), eps)


def _kernel(eps: float):
    width = int(np.ceil(np.log10(1.0 / eps))) + 1
    beta = 2.30 * width

    def phi(t):  # t in fine-grid units, support |t| < width / 2
        z = np.clip(2.0 * t / width, -1.0, 1.0)
        return np.where(
            np.abs(2.0 * t / width) < 1.0, np.exp(beta * (np.sqrt(1.0 - z * z) - 1.0)), 0.0
        )

    def phi_hat(xi):  # integral of phi(t) exp(-2 pi i xi t) dt (real, even), by quadrature
        z, wz = leggauss(4 * width + 40)
        t = z * width / 2.0
        return (width / 2.0) * np.cos(2 * np.pi * np.outer(xi, t)) @ (wz * phi(t))

    return width, phi, phi_hat


class MapInterpolator:
    """The numpy type-2 NUFFT of one map, set up once (deconvolved, padded, FFT'd): ``at(kz,
    ky, kx)`` then costs w^3 operations per point (for many small calls, e.g. refinement)."""

    def __init__(self, volume, eps: float = 1e-6):
        self.width, self.phi, phi_hat = _kernel(eps)
        shape = volume.shape
        self.fine = tuple(_UPSAMPLING * n for n in shape)
        # V'(X) = V(X) / phi_hat(X / N') per axis, placed at X mod N' in the fine grid
        offsets = [np.arange(n) - n // 2 for n in shape]
        corr = [1.0 / phi_hat(o / nf) for o, nf in zip(offsets, self.fine, strict=True)]
        scaled = (
            np.asarray(volume, dtype=np.complex128)
            * corr[0][:, None, None]
            * corr[1][None, :, None]
            * corr[2][None, None, :]
        )
        padded = np.zeros(self.fine, dtype=np.complex128)
        padded[np.ix_(*[o % nf for o, nf in zip(offsets, self.fine, strict=True)])] = scaled
        self.grid = np.fft.fftn(padded).astype(
            np.complex64
        )  # G[m] = sum V'(X) e^{-2 pi i m X / N'}

    def at(self, kz, ky, kx, chunk: int = 8192) -> np.ndarray:
        points = [np.ravel(k).astype(np.float64) for k in (kz, ky, kx)]
        out = np.empty(len(points[0]), dtype=np.complex128)
        steps = np.arange(self.width)
        for lo in range(0, len(out), chunk):
            idx, wts = [], []
            for k, nf in zip(points, self.fine, strict=True):
                u = k[lo : lo + chunk] * nf  # position on the fine grid
                m = np.ceil(u - self.width / 2.0)[:, None] + steps  # (p, w) neighbours
                wts.append(self.phi(u[:, None] - m).astype(np.float32))
                idx.append(m.astype(np.int64) % nf)
            values = self.grid[
                idx[0][:, :, None, None], idx[1][:, None, :, None], idx[2][:, None, None, :]
            ]
            out[lo : lo + chunk] = np.einsum("pa,pb,pc,pabc->p", *wts, values, optimize=True)
        return out


def _nufft3d2_numpy(volume, points, eps):
    return MapInterpolator(volume, eps).at(*points)
