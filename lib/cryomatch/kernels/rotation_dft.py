"""Angular DFTs of the polar search as real matrix products.

Both DFTs of the rotational search (shared notes section 1) act on many short sequences (an
angle axis of W = 128 at 64 px): an FFT library called once per sequence spends most of its
time on per-call work, while one matrix product over all sequences runs near the machine's
peak. So both are written as products with small fixed matrices.

**Inverse, product spectra to correlations over rotations.** For the spectrum X_q, q = 0..W/2,
of a real sequence,

    cc[k] = sum_q c_q Re(X_q e^{2 pi i q k / W}),   c_0 = c_{W/2} = 1/W, else 2/W

(numpy's irfft). Since e^{2 pi i q (k + W/2) / W} = (-1)^q e^{2 pi i q k / W}, the sums E[k] over
even q and O[k] over odd q for k < W/2 give cc[k] = E[k] + O[k] and cc[k + W/2] = E[k] - O[k]
(one radix-2 step): two (W/2 x W/2)-sized real products instead of one (W x W). The even part
takes one more step when 4 divides W (e^{2 pi i q W/4 / W} = +1 for q = 0 mod 4, -1 for q = 2
mod 4): E[k] = A[k] + B[k] and E[k + W/4] = A[k] - B[k] for k < W/4, A over q = 0 mod 4 and B
over q = 2 mod 4, two (W/4 x W/4)-sized products (a quarter fewer multiply-adds in all; the
odd part gains nothing from it: its twiddle, i, mixes Re and Im). Spectra come as real
*planes*: rows 2p and 2p + 1 hold Re and Im of X_q for q = ``order[p]`` (:func:`slot_order`),
one column per sequence, so the products read contiguous rows.

**Forward, half circle to spectra.** Values with F(theta + pi) = conj F(theta) (transforms of
real images) given on the first W/2 angles have the spectrum
A(q) = sum_{l < W/2} (y_l + (-1)^q conj y_l) e^{-2 pi i q l / W}, a real-linear map of
(Re y_l, Im y_l): one real (W x 2 (W/2+1)) matrix, applied to complex64 values viewed as
interleaved float32 and giving the spectra interleaved the same way (or, with the matrix
transposed on the left, q-major: rows Re A_q and Im A_q).
"""

from __future__ import annotations

import numpy as np


def slot_order(n_angles: int) -> np.ndarray:
    """q of each spectrum slot (q <= W/2): the even q, then the odd q = 1, 3, ..; the even q
    as q = 0, 4, .. then q = 2, 6, .. when 4 divides W, else as 0, 2, 4, .."""
    q = np.arange(n_angles // 2 + 1)
    even = np.concatenate([q[0::4], q[2::4]]) if n_angles % 4 == 0 else q[0::2]
    return np.concatenate([even, q[1::2]])


def irfft_weights(qs, n_angles: int) -> np.ndarray:
    """c_q of numpy's irfft for spectra q: 1/W at q = 0 and W/2, else 2/W."""
    qs = np.asarray(qs)
    return np.where((qs == 0) | (qs == n_angles // 2), 1.0, 2.0) / n_angles


def _synthesis(qs, n_angles: int, n_out: int) -> np.ndarray:
    """Real (n_out, 2 len(qs)) float32 matrix: columns (Re, Im) per q of ``qs``, rows k <
    n_out, giving sum_q c_q Re(X_q e^{2 pi i q k / W}) (irfft ignores Im X_0, Im X_{W/2})."""
    qs = np.asarray(qs)
    phi = 2 * np.pi * np.outer(np.arange(n_out), qs) / n_angles  # (k, q)
    c = irfft_weights(qs, n_angles)
    m = np.zeros((n_out, len(qs), 2))
    m[:, :, 0] = c * np.cos(phi)
    m[:, :, 1] = np.where((qs == 0) | (qs == n_angles // 2), 0.0, -c * np.sin(phi))
    return m.reshape(n_out, -1).astype(np.float32)


class InverseRotationDFT:
    """Correlations (W, n) float32 from spectra planes (2 (W/2 + 1), n) (see module
    docstring); ``n_angles`` even."""

    def __init__(self, n_angles: int, xp=np):
        if n_angles % 2:
            raise ValueError(f"the number of angles must be even, got {n_angles}")
        self.w = n_angles
        self.order = slot_order(n_angles)
        half = n_angles // 2
        n_even = (half + 2) // 2  # even q in 0..W/2
        self.even_rows = 2 * n_even
        evens, odds = self.order[:n_even], self.order[n_even:]
        # the whole even part (S_cc's products), and its two halves when 4 divides W
        self.even = xp.asarray(_synthesis(evens, n_angles, half))
        self.odd = xp.asarray(_synthesis(odds, n_angles, half))
        self.quarters = None
        if n_angles % 4 == 0:
            n_zero = int(np.sum(evens % 4 == 0))
            self.quarter_rows = 2 * n_zero  # rows of the q = 0 mod 4 slots
            self.quarters = tuple(
                xp.asarray(_synthesis(qs, n_angles, half // 2))
                for qs in (evens[:n_zero], evens[n_zero:])
            )
        self.xp = xp

    @property
    def rows(self) -> int:
        """Rows of the spectra planes: 2 (W/2 + 1)."""
        return 2 * len(self.order)

    def low_part(self, q_max: int):
        """The part of the correlations from the spectra with q < ``q_max``: the row ranges
        of the planes that hold them (one per run of consecutive slots) and the real
        (W, 2 len(qs)) matrix giving sum_{q < q_max} c_q Re(X_q e^{2 pi i q k / W}) from
        those rows stacked in that order, and those q."""
        slots = np.flatnonzero(self.order < q_max)
        starts = np.flatnonzero(np.diff(slots, prepend=-2) != 1)
        ends = np.append(starts[1:], len(slots))
        runs = tuple(
            slice(2 * int(slots[a]), 2 * int(slots[b - 1]) + 2)
            for a, b in zip(starts, ends, strict=True)
        )
        qs = self.order[slots]
        return runs, self.xp.asarray(_synthesis(qs, self.w, self.w)), qs

    def __call__(self, planes, out=None, scratch=None):
        """planes (2 (W/2+1), n) float32 (rows may be strided) -> correlations (W, n) in ``out``.
        ``scratch``: a (W, n) float32 array for the partial sums (allocated when None)."""
        xp = self.xp
        n = planes.shape[1]
        half = self.w // 2
        if out is None:
            out = xp.empty((self.w, n), dtype=xp.float32)
        if scratch is None:
            scratch = xp.empty((self.w, n), dtype=xp.float32)
        e, o = scratch[:half], scratch[half:]
        if self.quarters is None:
            xp.matmul(self.even, planes[: self.even_rows], out=e)
        else:  # A and B in out's first half, then E = [A + B; A - B]
            quarter, split = half // 2, self.quarter_rows
            a, b = out[:quarter], out[quarter:half]
            xp.matmul(self.quarters[0], planes[:split], out=a)
            xp.matmul(self.quarters[1], planes[split : self.even_rows], out=b)
            xp.add(a, b, out=e[:quarter])
            xp.subtract(a, b, out=e[quarter:])
        xp.matmul(self.odd, planes[self.even_rows :], out=o)
        xp.add(e, o, out=out[:half])
        xp.subtract(e, o, out=out[half:])
        return out


def half_circle_matrix(n_angles: int, dtype=np.float32) -> np.ndarray:
    """Real (W, W + 2) matrix M with spectra = y @ M for values on the first W/2 angles viewed
    as interleaved (Re y_l, Im y_l) and spectra as interleaved (Re A_q, Im A_q), q = 0..W/2
    (see module docstring)."""
    if n_angles % 2:
        raise ValueError(f"the number of angles must be even, got {n_angles}")
    half = n_angles // 2
    phi = 2 * np.pi * np.outer(np.arange(half), np.arange(half + 1)) / n_angles  # (l, q)
    odd = (np.arange(half + 1) % 2).astype(bool)
    m = np.zeros((half, 2, half + 1, 2))  # (l, Re/Im of y, q, Re/Im of A)
    # even q: A = 2 sum Re(y) e^{-i phi}; odd q: A = 2i sum Im(y) e^{-i phi}
    m[:, 0, ~odd, 0] = 2 * np.cos(phi[:, ~odd])
    m[:, 0, ~odd, 1] = -2 * np.sin(phi[:, ~odd])
    m[:, 1, odd, 0] = 2 * np.sin(phi[:, odd])
    m[:, 1, odd, 1] = 2 * np.cos(phi[:, odd])
    return m.reshape(n_angles, n_angles + 2).astype(dtype)
