"""Rotational cross-correlation on polar grids: the engine that likelihood (polar Fourier
values) and 2D alignment (real-space rings) share.

Values are sampled on R rings (radii) x W equally spaced angles. In-plane rotation is a
cyclic shift along the angle axis, so correlations for all W rotations come from the FFT
along the angle (see shared notes section 1): with a_hat, b_hat the angular spectra for
q = 0..W/2,

    cc[m, s, k] = sum_r w_r sum_l a_m(r, l) conj(b_s(r, l - k))
                = irfft_q( sum_r w_r a_hat_m(r, q) conj(b_hat_s(r, q)) )[k],

i.e. the correlation of image m with reference s turned by +k angle steps (+360 k / W
degrees). Only q = 0..W/2 are needed: ring values are real (2D rings) or obey
F(r, theta + pi) = conj F(r, theta) (Fourier transforms of real images); either way the
product spectrum is Hermitian and the inverse is a real FFT. The sum over rings is a
matrix product per q, [M x R] @ [R x S].
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, fft_module


def angular_spectra(values):
    """FFT along the last (angle) axis, keeping q = 0..W/2: (..., R, W) -> (..., R, W//2+1)."""
    xp = array_module(values)
    fft = fft_module(xp)
    if xp.iscomplexobj(values):
        n_angles = values.shape[-1]
        return fft.fft(values, axis=-1)[..., : n_angles // 2 + 1]
    return fft.rfft(values, axis=-1)


def rotational_correlation(a_hat, b_hat, weights, n_angles: int):
    """Correlations over all ``n_angles`` rotations (see module docstring).

    a_hat (M, R, Q) and b_hat (S, R, Q) angular spectra (complex64 or complex128),
    weights (R,) ring weights. Returns real (M, S, n_angles). Memory is M * S * n_angles:
    callers batch M and S.
    """
    xp = array_module(a_hat)
    fft = fft_module(xp)
    w = xp.asarray(weights, dtype=a_hat.real.dtype)
    a_q = xp.ascontiguousarray(xp.moveaxis(a_hat, -1, 0))  # (Q, M, R)
    b_q = xp.ascontiguousarray(xp.moveaxis(xp.conj(b_hat) * w[:, None], -1, 0))  # (Q, S, R)
    prod = xp.matmul(a_q, xp.swapaxes(b_q, -1, -2))  # (Q, M, S)
    prod = xp.ascontiguousarray(xp.moveaxis(prod, 0, -1))  # (M, S, Q)
    return fft.irfft(prod, n=n_angles, axis=-1)


def hermitian_angular_spectra(half_values, n_angles: int, axis: int = -1):
    """:func:`angular_spectra` of values with F(r, theta + pi) = conj F(r, theta) (transforms
    of real images), given on the first half of the angles along ``axis`` (the first or the
    last): W/2 values there
    become the spectra for q = 0..W/2 (W/2 + 1 values) on the same axis.

    With y_l the first W/2 values, A(q) = sum_l (y_l + (-1)^q conj y_l) e^{-2 pi i q l / W}:
    even q = 2p are 2 rfft_{W/2}(Re y)(p), odd q = 2p+1 are 2i fft_{W/2}(Im y e^{-2 pi i l/W})(p),
    about half the work of the full FFT (W divisible by 4; otherwise the full FFT is used).
    ``axis=0`` with the other axes contiguous lets the FFTs run across them (vectorized) and
    leaves each q's values contiguous.
    """
    xp = array_module(half_values)
    fft = fft_module(xp)
    if axis not in (0, -1, half_values.ndim - 1):
        raise ValueError("the angle axis must be the first or the last")
    values = half_values
    ax = 0 if axis == 0 else -1
    half = values.shape[ax]
    if n_angles != 2 * half:
        raise ValueError(f"{half} half-circle values do not fit {n_angles} angles")
    if n_angles % 4:
        full = xp.concatenate([values, xp.conj(values)], axis=ax)
        out = fft.fft(full, axis=ax)
        out = out[: half + 1] if ax == 0 else out[..., : half + 1]
    else:
        shape = list(values.shape)
        shape[ax] = half + 1
        out = xp.empty(shape, dtype=xp.result_type(values, xp.complex64))
        twiddle = xp.exp(-2j * np.pi * xp.arange(half) / n_angles).astype(out.dtype)
        if ax == 0:
            out[0::2] = 2 * fft.rfft(values.real, axis=0)
            twiddle = twiddle.reshape((half,) + (1,) * (values.ndim - 1))
            out[1::2] = 2j * fft.fft(values.imag * twiddle, axis=0)[: half // 2]
        else:
            out[..., 0::2] = 2 * fft.rfft(values.real, axis=-1)
            out[..., 1::2] = 2j * fft.fft(values.imag * twiddle, axis=-1)[..., : half // 2]
    return out
