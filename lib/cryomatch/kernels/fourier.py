"""Fourier-space helpers for images: frequency grids, cropping, sub-pixel shifts."""

from __future__ import annotations

import numpy as np

from ..backend import array_module, fft_module


def rfft_frequencies(box: int, pixel_size: float = 1.0, xp=np):
    """(ky, kx) grids of an rfft2 of a box x box image, in 1/Angstrom (1/pixel if size 1)."""
    ky = xp.fft.fftfreq(box, d=pixel_size)[:, None]
    kx = xp.fft.rfftfreq(box, d=pixel_size)[None, :]
    return xp.broadcast_to(ky, (box, box // 2 + 1)), xp.broadcast_to(kx, (box, box // 2 + 1))


def fourier_crop(images, box: int):
    """Resample images (..., n, n) to (..., box, box) by cropping (or zero-padding) their
    Fourier transforms; the pixel size becomes ``pixel * n / box``. Mean is preserved."""
    xp = array_module(images)
    fft = fft_module(xp)
    n = images.shape[-1]
    if box == n:
        return images
    spectrum = fft.fftshift(fft.fft2(images, axes=(-2, -1)), axes=(-2, -1))
    c, h = n // 2, box // 2
    if box < n:
        # taking the real part below splits the new Nyquist row/column evenly between +/-
        spectrum = spectrum[..., c - h : c - h + box, c - h : c - h + box]
    else:
        padded = xp.zeros(images.shape[:-2] + (box, box), dtype=spectrum.dtype)
        padded[..., h - c : h - c + n, h - c : h - c + n] = spectrum
        spectrum = padded
    out = fft.ifft2(fft.ifftshift(spectrum, axes=(-2, -1)), axes=(-2, -1)).real
    return (out * (box * box) / (n * n)).astype(images.dtype, copy=False)


def phase_shift_2d(shape, shifts, xp=np):
    """rfft2 phase factors (n, ny, nx//2+1) of images of ``shape`` (ny, nx) that move them by
    ``shifts`` (n, 2) as (x, y) pixels: ``irfft2(rfft2(img) * factor)`` is ``img`` translated
    by +shift."""
    ny, nx = shape
    ky = xp.fft.fftfreq(ny)[None, :, None]
    kx = xp.fft.rfftfreq(nx)[None, None, :]
    shifts = xp.asarray(shifts, dtype=xp.float64).reshape(-1, 2)
    return xp.exp(-2j * np.pi * (kx * shifts[:, 0, None, None] + ky * shifts[:, 1, None, None]))


def shift_images(images, shifts):
    """Translate images (n, ny, nx) by ``shifts`` (n, 2) = (x, y) pixels (periodic, exact
    for band-limited images), in the images' precision."""
    xp = array_module(images)
    fft = fft_module(xp)
    shape = images.shape[-2:]
    spectrum = fft.rfft2(images, axes=(-2, -1))
    spectrum = spectrum * phase_shift_2d(shape, shifts, xp).astype(spectrum.dtype, copy=False)
    return fft.irfft2(spectrum, s=shape, axes=(-2, -1)).astype(images.dtype, copy=False)


def apply_ctf(images, ctf_values):
    """Multiply images (n, box, box) by real CTFs sampled on the rfft2 grid (n, box, box//2+1)."""
    xp = array_module(images)
    fft = fft_module(xp)
    box = images.shape[-1]
    spectrum = fft.rfft2(images, axes=(-2, -1)) * ctf_values
    return fft.irfft2(spectrum, s=(box, box), axes=(-2, -1)).astype(images.dtype, copy=False)
