"""Fourier transforms of images sampled on a polar grid (shells x in-plane angles).

The grid: ``n_shells`` radii from Gauss-Jacobi quadrature with weight r (the disc's
r dr) on [0, k_max], ``k_max = resolution_factor * 0.5`` cycles per pixel (Nyquist times
the factor), and ``n_inplanes`` equally spaced angles theta_l = 2 pi l / n_inplanes. With
the point weights ``w_j = W_j * 2 pi / n_inplanes`` (W_j the radial Gauss-Jacobi weights)

    sum_j w_j sum_l F(r_j, theta_l) conj G(r_j, theta_l)  ~  integral over the disc of F conj G,

and with frequencies in cycles per pixel Parseval gives ``sum_pixels a b = integral of
F_a conj F_b`` over the band, so polar inner products approximate real-space ones.

The transform of an image is exact (no interpolation of a Cartesian FFT): a direct DFT on
the polar points as one real matrix product per batch, or finufft's type-2 NUFFT when it is
installed (optional, same result to single precision). A pixel (iy, ix) sits at
(x, y) = (ix - n//2, iy - n//2), as in :mod:`cryomatch.kernels.projection`, and
``F(k) = sum_pixels img(x, y) exp(-2 pi i (kx x + ky y))``. Transforms of real images obey
``F(r, theta + pi) = conj F(r, theta)``: only the first half of the angles is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import roots_jacobi

from ..backend import array_module
from ..errors import CryomatchError


@dataclass(frozen=True)
class PolarGrid:
    """Polar quadrature grid in Fourier space; radii in cycles per pixel."""

    box: int
    radii: np.ndarray  # (n_shells,) cycles per pixel
    shell_weights: np.ndarray  # (n_shells,) Gauss-Jacobi weights of r dr
    n_inplanes: int

    @property
    def n_shells(self) -> int:
        return len(self.radii)

    @property
    def angles(self) -> np.ndarray:
        """In-plane angles theta_l in radians, (n_inplanes,)."""
        return 2.0 * np.pi * np.arange(self.n_inplanes) / self.n_inplanes

    @property
    def weights(self) -> np.ndarray:
        """Weight w_j of every point on shell j (sum of w_j x n_inplanes = the disc's area)."""
        return self.shell_weights * (2.0 * np.pi / self.n_inplanes)

    def points(self, half: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(kx, ky) in cycles per pixel, (n_shells, n_angles); ``half``: first half of angles."""
        theta = self.angles[: self.n_inplanes // 2] if half else self.angles
        return self.radii[:, None] * np.cos(theta), self.radii[:, None] * np.sin(theta)

    def as_dict(self) -> dict:
        return {
            "box": self.box,
            "radii": self.radii,
            "shell_weights": self.shell_weights,
            "n_inplanes": self.n_inplanes,
        }

    @classmethod
    def from_dict(cls, d) -> PolarGrid:
        return cls(
            int(d["box"]),
            np.asarray(d["radii"]),
            np.asarray(d["shell_weights"]),
            int(d["n_inplanes"]),
        )

    def same_as(self, other: PolarGrid) -> bool:
        return (
            self.box == other.box
            and self.n_inplanes == other.n_inplanes
            and self.n_shells == other.n_shells
            and np.allclose(self.radii, other.radii, rtol=1e-6, atol=0)
        )


def polar_grid(
    box: int,
    resolution_factor: float = 1.0,
    n_inplanes: int | None = None,
    n_shells: int | None = None,
) -> PolarGrid:
    """The polar grid of a ``box``-pixel image: ``n_shells`` (default ``1 + ceil(factor * box)``,
    65 at 64 px) Gauss-Jacobi radii up to ``factor`` x Nyquist, ``n_inplanes`` (default
    2 x box, even) angles."""
    if not resolution_factor > 0:
        raise CryomatchError(f"resolution_factor must be positive, got {resolution_factor}")
    n_inplanes = 2 * box if n_inplanes is None else int(n_inplanes)
    if n_inplanes < 4 or n_inplanes % 2:
        raise CryomatchError(f"n_inplanes must be even and at least 4, got {n_inplanes}")
    n_shells = 1 + int(np.ceil(resolution_factor * box)) if n_shells is None else int(n_shells)
    if n_shells < 1:
        raise CryomatchError(f"n_shells must be at least 1, got {n_shells}")
    k_max = 0.5 * resolution_factor
    # Gauss-Jacobi with weight (1 + x) on [-1, 1]; r = k_max (1 + x) / 2, r dr = k_max^2/4 (1+x) dx
    x, w = roots_jacobi(n_shells, 0.0, 1.0)
    return PolarGrid(box, k_max * (1.0 + x) / 2.0, w * k_max**2 / 4.0, n_inplanes)


def full_circle(half_values):
    """Values on all angles from the first half, using F(r, theta + pi) = conj F(r, theta):
    (..., R, W/2) -> (..., R, W)."""
    xp = array_module(half_values)
    return xp.concatenate([half_values, xp.conj(half_values)], axis=-1)


# --- images: exact DFT on the polar points, or finufft -------------------------------------
def finufft_available() -> bool:
    try:
        import finufft  # noqa: F401
    except ImportError:
        return False
    return True


def dft_matrices(grid: PolarGrid, max_bytes: float = 256e6, dtype=np.float32) -> list:
    """Real DFT matrices for blocks of shells: [(shells, (box*box, 2 p) = [cos | -sin] of
    2 pi k.x)] over the first half of the angles, each at most ``max_bytes``. Images
    (n, box*box) @ a block give the real and imaginary parts of those points."""
    half = grid.n_inplanes // 2
    per_shell = grid.box**2 * 2 * half * np.dtype(dtype).itemsize
    step = max(1, int(max_bytes // per_shell))
    kx, ky = grid.points(half=True)
    c = np.arange(grid.box, dtype=np.float64) - grid.box // 2
    blocks = []
    for lo in range(0, grid.n_shells, step):
        shells = slice(lo, min(grid.n_shells, lo + step))
        # exp(-2 pi i (kx x + ky y)) as the product of 1D factors; row = iy * box + ix
        ex = np.exp(-2j * np.pi * np.outer(c, kx[shells].ravel()))
        ey = np.exp(-2j * np.pi * np.outer(c, ky[shells].ravel()))
        e = (ey[:, None, :] * ex[None, :, :]).reshape(grid.box**2, -1)
        blocks.append((shells, np.concatenate([e.real, e.imag], axis=1).astype(dtype)))
    return blocks


def polar_transform(images, grid: PolarGrid, method: str = "auto", matrices=None):
    """Fourier transforms of real images (n, box, box) on the polar grid: complex64 (n, R, W).

    ``method``: 'dft' (exact, real matrix products; pass ``matrices`` from
    :func:`dft_matrices` to reuse them across batches), 'finufft' (type-2 NUFFT, tolerance
    1e-7) or 'auto' (finufft when installed and the images are numpy, otherwise dft).
    """
    xp = array_module(images)
    n, box = images.shape[0], images.shape[-1]
    if box != grid.box:
        raise CryomatchError(f"images are {box} pixels but the polar grid is for {grid.box}")
    half = grid.n_inplanes // 2
    if method == "auto":
        method = "finufft" if (xp is np and finufft_available()) else "dft"
    if method == "finufft":
        import finufft

        kx, ky = grid.points(half=True)
        # modes -n/2..(n-1)/2 are pixel offsets ix - n//2 (y first: the array is (y, x))
        data = np.ascontiguousarray(np.asarray(images, dtype=np.complex128))
        out = finufft.nufft2d2(
            2 * np.pi * ky.ravel(), 2 * np.pi * kx.ravel(), data, eps=1e-7, isign=-1
        )
        values = out.reshape(n, grid.n_shells, half).astype(np.complex64)
    elif method == "dft":
        values = xp.empty((n, grid.n_shells, half), dtype=xp.complex64)
        flat = xp.asarray(images, dtype=xp.float32).reshape(n, box * box)
        for shells, matrix in matrices if matrices is not None else dft_matrices(grid):
            prod = flat @ xp.asarray(matrix)
            p = prod.shape[1] // 2
            values[:, shells] = (prod[:, :p] + 1j * prod[:, p:]).reshape(n, -1, half)
    else:
        raise CryomatchError(f"unknown polar transform method {method!r} (auto, dft, finufft)")
    return full_circle(values)
