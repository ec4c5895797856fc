"""Direct Fourier reconstruction from 2D images (central-slice insertion) and its inverse.

By the projection-slice theorem the 2D transform of an image ``P(x, y) = integral
V(R^T (x, y, z)) dz`` is the central slice ``F_P(k) = F_V(R^T (kx, ky, 0))`` of the map's
transform; ``R`` (3x3, orthogonal; RELION's A for plain single-particle poses, see
:mod:`cryomatch.geometry`) takes map coordinates into the image's frame.

Grids: images (n, box, box) and maps (box, box, box) have their centre at ``box // 2``
(RELION's). Transforms are taken after zero-padding to ``size = pad * box`` and are
*centred* (frequency 0 at ``size // 2``, full complex grid); frequency coordinates are in
units of 1 / (size pixels). Inserting with trilinear weights convolves the map's transform
with a triangle, which multiplies the map by ``sinc^2`` per axis: :func:`gridding_correction`
divides it out (nearest-neighbour gridding: ``sinc``).

Weights: the caller gives per-slice data values (e.g. ``w * CTF * image`` for plain images,
``w * image`` for CTF-premultiplied ones) and per-slice weights (``(w * CTF)^2``);
:func:`normalise` divides the summed values by the summed weights plus a Wiener constant.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, fft_module

GRIDDINGS = ("trilinear", "nearest")


def padded_size(box: int, pad: int) -> int:
    return int(box) * int(pad)


def centred_fft2(images, size: int):
    """Centred full 2D transforms (n, size, size) complex of images (n, box, box) zero-padded
    to ``size`` (pixel ``box // 2`` goes to ``size // 2``)."""
    xp = array_module(images)
    fft = fft_module(xp)
    n, box = images.shape[0], images.shape[-1]
    out = xp.zeros((n, size, size), dtype=xp.float64)
    o = size // 2 - box // 2
    out[:, o : o + box, o : o + box] = images
    return fft.fftshift(fft.fft2(fft.ifftshift(out, axes=(-2, -1))), axes=(-2, -1))


def centred_fftn(volume, size: int):
    """Centred full 3D transform (size,) * 3 of a volume (box,) * 3 zero-padded to ``size``."""
    xp = array_module(volume)
    fft = fft_module(xp)
    box = volume.shape[-1]
    out = xp.zeros((size,) * 3, dtype=xp.float64)
    o = size // 2 - box // 2
    out[o : o + box, o : o + box, o : o + box] = volume
    return fft.fftshift(fft.fftn(fft.ifftshift(out)))


def inverse_centred_fftn(spectrum, box: int):
    """Real volume (box,) * 3 from a centred 3D transform of a padded grid (the centre crop)."""
    xp = array_module(spectrum)
    fft = fft_module(xp)
    size = spectrum.shape[-1]
    vol = fft.fftshift(fft.ifftn(fft.ifftshift(spectrum))).real
    o = size // 2 - box // 2
    return vol[o : o + box, o : o + box, o : o + box]


def slice_grid(size: int, radius: float, xp=np):
    """(ky, kx) integer frequency coordinates (m,) of the centred 2D grid within ``radius``
    (in 1 / size units), and their flat indices (m,) into a (size, size) array."""
    k = xp.arange(size) - size // 2
    ky, kx = xp.meshgrid(k, k, indexing="ij")
    keep = (kx * kx + ky * ky) <= radius * radius
    flat = xp.flatnonzero(keep.ravel())
    return ky.ravel()[flat].astype(xp.float64), kx.ravel()[flat].astype(xp.float64), flat


def slice_coordinates(matrices, ky, kx):
    """Map-frame frequency coordinates (n, m, 3) as (x, y, z) = R^T (kx, ky, 0) of the slice
    points (ky, kx) (m,) for rotations R (n, 3, 3)."""
    xp = array_module(ky)
    r = xp.asarray(matrices, dtype=xp.float64)
    # R^T (kx, ky, 0): columns 0 and 1 of R^T are rows 0 and 1 of R
    return r[:, 0, None, :] * kx[None, :, None] + r[:, 1, None, :] * ky[None, :, None]


def _spread(coords, size: int, gridding: str):
    """Yield (flat index, weight) per grid point that coordinates (..., 3) (x, y, z, grid
    centre at size // 2) spread onto: 8 trilinear corners, or 1 nearest point."""
    xp = array_module(coords)
    c = coords + size // 2
    if gridding == "nearest":
        i = xp.clip(xp.rint(c).astype(xp.int64), 0, size - 1)
        yield (i[..., 2] * size + i[..., 1]) * size + i[..., 0], 1.0
        return
    if gridding != "trilinear":
        raise ValueError(f"unknown gridding {gridding!r} (use one of {GRIDDINGS})")
    i0 = xp.clip(xp.floor(c).astype(xp.int64), 0, size - 2)
    f = c - i0
    base = (i0[..., 2] * size + i0[..., 1]) * size + i0[..., 0]
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    for dz, wz in ((0, 1.0 - fz), (1, fz)):
        for dy, wy in ((0, 1.0 - fy), (1, fy)):
            wzy = wz * wy
            for dx, wx in ((0, 1.0 - fx), (1, fx)):
                yield base + ((dz * size + dy) * size + dx), wzy * wx


def insert_slices(data, weight, values, slice_weights, matrices, ky, kx, gridding="trilinear"):
    """Add slices into ``data`` (size^3 complex, flat or cubic) and ``weight`` (size^3 real).

    values (n, m) complex and slice_weights (n, m) real at the slice points (ky, kx) (m,) of
    :func:`slice_grid`; matrices (n, 3, 3) the rotations R of the images. Points must lie
    inside the grid (radius below size / 2 - 1). Returns (data, weight), updated in place.
    """
    xp = array_module(values)
    size = round(data.size ** (1 / 3))
    coords = slice_coordinates(matrices, ky, kx).reshape(-1, 3)
    v = values.reshape(-1)
    sw = slice_weights.reshape(-1)
    d_flat, w_flat = data.reshape(-1), weight.reshape(-1)
    n = d_flat.size
    for idx, wc in _spread(coords, size, gridding):
        wc = wc * xp.ones(len(v)) if np.isscalar(wc) else wc
        d_flat += xp.bincount(idx, weights=wc * v.real, minlength=n)
        d_flat += 1j * xp.bincount(idx, weights=wc * v.imag, minlength=n)
        w_flat += xp.bincount(idx, weights=wc * sw, minlength=n)
    return data, weight


def extract_slices(spectrum, matrices, ky, kx, gridding="trilinear"):
    """Central slices (n, m) complex of a centred 3D transform (size^3) at rotations R
    (n, 3, 3), sampled at the slice points (ky, kx) (m,) by trilinear interpolation."""
    size = spectrum.shape[-1]
    flat = spectrum.reshape(-1)
    out = 0.0
    for idx, w in _spread(slice_coordinates(matrices, ky, kx), size, gridding):
        out = out + flat[idx] * w
    return out


def gridding_correction(box: int, size: int, gridding="trilinear", xp=np):
    """Per-voxel factor (box,) * 3 that the real-space map is divided by after gridding on a
    ``size`` grid: sinc^2 (trilinear) or sinc (nearest) of (distance / size) per axis."""
    r = (xp.arange(box, dtype=xp.float64) - box // 2) / size
    s = xp.sinc(r) ** (2 if gridding == "trilinear" else 1)
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def normalise(data, weight, wiener: float, radius: float | None = None):
    """data / (weight + wiener * mean weight) on a centred grid, 0 where no slice reached or
    beyond ``radius`` (1 / size units). The Wiener constant is relative to the mean summed
    weight over the sampled points (within ``radius``)."""
    xp = array_module(weight)
    size = weight.shape[-1]
    filled = weight > 0
    if radius is not None:
        k = xp.arange(size) - size // 2
        k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
        filled &= k2 <= radius * radius
    mean = float(weight[filled].mean()) if bool(filled.any()) else 1.0
    return xp.where(filled, data / xp.where(filled, weight + wiener * mean, 1.0), 0.0)


def reconstruct(data, weight, box: int, wiener: float, radius=None, gridding="trilinear"):
    """The real map (box,) * 3 float32 from summed slices and weights on a centred grid."""
    xp = array_module(weight)
    size = round(weight.size ** (1 / 3))
    spectrum = normalise(data.reshape((size,) * 3), weight.reshape((size,) * 3), wiener, radius)
    vol = inverse_centred_fftn(spectrum, box)
    return (vol / gridding_correction(box, size, gridding, xp)).astype(xp.float32)


def reference_spectrum(volume, pad: int, gridding="trilinear"):
    """Centred padded transform of a map, pre-divided by the gridding kernel so that
    :func:`extract_slices` gives the slices of the map itself."""
    xp = array_module(volume)
    box = volume.shape[-1]
    size = padded_size(box, pad)
    return centred_fftn(volume / gridding_correction(box, size, gridding, xp), size)


def dose_weights(k, exposure):
    """Radiation-damage weights exp(-N / (2 Ne(k))) (Grant and Grigorieff 2015, eLife
    4:e06980; Ne = 0.245 k^-1.665 + 2.81 e/A^2) for frequencies k (m,) in 1/A and
    exposures N (n,) in e/A^2 before each image: (n, m)."""
    xp = array_module(k)
    k = xp.maximum(xp.asarray(k, dtype=xp.float64), 1e-6)
    critical = 0.245 * k**-1.665 + 2.81
    return xp.exp(-xp.asarray(exposure, dtype=xp.float64)[:, None] / (2 * critical[None, :]))


def bfactor_weights(k, bfactors):
    """Envelopes exp(-B k^2 / 4) (n, m) for B-factors (n,) in A^2 (positive dampens) at
    frequencies k (m,) in 1/A."""
    xp = array_module(k)
    b = xp.asarray(bfactors, dtype=xp.float64)
    return xp.exp(-b[:, None] * (k[None, :] ** 2) / 4.0)
