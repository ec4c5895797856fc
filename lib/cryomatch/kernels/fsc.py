"""Fourier shell correlation of 3D maps (and the resolution where it falls).

FSC(k) = Re sum F1 F2* / sqrt(sum |F1|^2 sum |F2|^2) over the shell |k| in [k - 1/2, k + 1/2)
(in 1/box units); the gold-standard threshold 0.143 (Rosenthal and Henderson 2003, J. Mol.
Biol. 333:721), 0.5 for the comparison of a map with a reference.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, fft_module, to_numpy


def shell_index(shape, xp=np):
    """Rounded |k| * box of each rfftn element of a cubic ``shape`` (box, box, box)."""
    box = shape[-1]
    kz = xp.fft.fftfreq(shape[0]) * box
    ky = xp.fft.fftfreq(shape[1]) * box
    kx = xp.fft.rfftfreq(shape[2]) * box
    k2 = kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2
    return xp.rint(xp.sqrt(k2)).astype(xp.int64)


def fsc(map1, map2, pixel_size: float = 1.0):
    """(frequency in 1/A (box//2 + 1,), FSC (box//2 + 1,)) of two cubic maps of equal shape.

    Shell 0 is the mean; shells where either map has no power give 0.
    """
    xp = array_module(map1)
    fft = fft_module(xp)
    shape = map1.shape
    if map2.shape != shape or len(set(shape)) != 1:
        raise ValueError(f"FSC needs two cubic maps of one shape, got {shape} and {map2.shape}")
    f1, f2 = fft.rfftn(map1), fft.rfftn(map2)
    shells = shell_index(shape, xp).ravel()
    n = shape[-1] // 2 + 1
    keep = shells < n
    s = shells[keep]

    def shell_sum(values):
        return xp.bincount(s, weights=values.ravel()[keep], minlength=n)[:n]

    cross = shell_sum((f1 * xp.conj(f2)).real)
    power = shell_sum(xp.abs(f1) ** 2) * shell_sum(xp.abs(f2) ** 2)
    curve = xp.where(power > 0, cross / xp.sqrt(xp.where(power > 0, power, 1.0)), 0.0)
    freq = np.arange(n) / (shape[-1] * pixel_size)
    return freq, to_numpy(curve).astype(np.float64)


def resolution_at(freq, curve, threshold: float = 0.143) -> float:
    """Resolution in A where the FSC first falls below ``threshold`` (linear interpolation
    between shells), searching from shell 1; Nyquist's if it never does; inf if shell 1
    is already below."""
    freq, curve = np.asarray(freq), np.asarray(curve)
    below = np.flatnonzero(curve[1:] < threshold) + 1
    if len(below) == 0:
        return float(1.0 / freq[-1])
    i = below[0]
    if i == 1:
        return float("inf")
    f0, f1, c0, c1 = freq[i - 1], freq[i], curve[i - 1], curve[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)
    return float(1.0 / f)


def fsc_weight(curve):
    """Per-shell optimal filter sqrt(2 FSC / (1 + FSC)) of a half-map FSC (Rosenthal and
    Henderson 2003), 0 where the FSC is <= 0: the weight of the full map's shells."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 0.0, 1.0)
    return np.sqrt(2 * c / (1 + c))


def shell_filter(volume, per_shell):
    """Multiply each Fourier shell of a cubic ``volume`` by ``per_shell[k]`` (box//2 + 1,)
    (beyond the last shell: 0)."""
    xp = array_module(volume)
    fft = fft_module(xp)
    shells = shell_index(volume.shape, xp)
    weights = xp.asarray(np.append(np.asarray(per_shell, dtype=np.float64), 0.0))
    shells = xp.minimum(shells, len(weights) - 1)
    out = fft.irfftn(fft.rfftn(volume) * weights[shells], s=volume.shape)
    return out.astype(volume.dtype)
