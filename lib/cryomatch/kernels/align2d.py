"""Multi-reference 2D alignment on polar rings (SPARX mref_ali2d; Penczek, Radermacher and
Frank 1992, Ultramicroscopy 40:33; ring FFT of Joyeux and Penczek 2002, Ultramicroscopy 92:33).

Images are sampled on rings of radii ``ir..ou`` step ``rs`` (pixels) about their current
centre, each ring at SPARX's length for its radius (the next power of two at or above
2 pi r, at least W / fold; W that of the outer ring), bilinear interpolation as one sparse
matrix for a whole batch; the spectra are laid out as if every ring had W points, each
ring holding the frequencies below half its length (:func:`ring_layout`). Rings are
weighted by their radius (the area element), their weighted mean is removed and they are
scaled to unit weighted norm, so every correlation below is a normalized cross-correlation
(NCC) over the disc of radius ``ou``.

Rotation: in-plane rotation is a cyclic shift along the ring, so the correlations over all
angles come from one FFT along the rings (:mod:`cryomatch.kernels.polar`):
``cc(k) = irfft_q(sum_r w_r A(r, q) conj(B(r, q)))``, the reference turned counter-clockwise
by ``k`` steps. Mirror: the reference mirrored x -> -x about its ring centre has the angular
spectrum ``(-1)^q conj(B)``, so ``sum_r A conj(B_mirror) = (-1)^q sum_r A B``.

Translation: the ``+-xr, +-yr`` grid (step ``ts``) is laid out on the reference side: the
image's rings about its current centre are compared with the reference's rings about each
grid point ``e``; then ``image(p + u) = ref(e + L u)`` with ``L`` the in-plane rotation (and
mirror) found. Shifting S references D times (S x D ring sets) costs far less than shifting
M images D times.

Search as matrix products (shared notes, section 1). For each angular frequency the sum over
rings is a product [images x rings] @ [rings x (references x shifts)]. Two exact tricks cut
the work that follows the products:

* Folding: the correlation is evaluated at every ``fold``-th angle only (exactly, not
  low-passed): ``cc(fold k) = irfft_j(G_j) / fold`` with ``G_j = sum_t C_{j + t W / fold}``
  (aliasing), and with ``C_{W - q} = conj(C_q)`` this is again a sum over rings, now of
  ``fold * R`` terms. The products get ``fold`` times deeper and the inverse FFTs ``fold``
  times shorter. The coarse pass leaves out the terms above each ring's band ``pi r``
  (a pixel image holds at most 1/2 cycle per pixel), 54 of 112 columns at 64 px.
* Mirror for free: with ``A = X + iY`` and ``B = U + iV`` the four real products
  ``[X; Y] @ [U; V]^T`` give both ``sum A conj(B) = (XU + YV) + i(YU - XV)`` and
  ``sum A B = (XU - YV) + i(YU + XV)``: half the flops of two complex products.

Each image keeps its ``top`` best (reference, shift, mirror) candidates by the folded
correlation; these are re-scored exactly (the full W-angle correlation, then Newton steps on
its trigonometric polynomial for a sub-step angle), the best wins, and its shift is refined
to sub-pixel by parabolas through the neighbouring grid shifts at the refined angle.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy import ndimage

from .. import geometry
from ..backend import array_module, fft_module, to_numpy
from .fourier import rfft_frequencies
from .polar import angular_spectra


# --- rings ---------------------------------------------------------------------------------
def ring_radii(ir: float, ou: float, rs: float) -> np.ndarray:
    """Ring radii ``ir, ir + rs, ..., <= ou`` in pixels."""
    return np.arange(ir, ou + 1e-6 * rs, rs, dtype=np.float64)


def ring_points(ou: float) -> int:
    """Points per ring: the next power of two at or above 2 pi ou (at least 16)."""
    return max(16, 1 << math.ceil(math.log2(2.0 * math.pi * ou)))


def max_ring_radius(box: int) -> int:
    """Largest ring radius whose bilinear samples stay inside a box (centre at box // 2)."""
    return box - 1 - box // 2


def _bspline3(f):
    """Cubic B-spline weights (4, ...) of the taps -1, 0, 1, 2 at fractional positions f."""
    g = 1.0 - f
    return np.stack([g**3 / 6, 2 / 3 - f * f + f**3 / 2, 2 / 3 - g * g + g**3 / 2, f**3 / 6])


def ring_sampler(box: int, radii, n_angles: int, order: int = 1) -> scipy.sparse.csr_matrix:
    """Sparse (R * W, box * box) matrix of interpolation weights: rings about the box centre.

    Ring point ``(r, l)`` sits at ``(x, y) = r (cos 2 pi l / W, sin 2 pi l / W)`` pixels from
    the centre; rows are ordered (ring, angle), columns are pixels in (y, x) order.
    ``order=1``: bilinear on the pixels (4 taps). ``order=3``: cubic B-spline (16 taps,
    indices periodic) on spline coefficients, which :func:`fourier_shift` makes with
    ``prefilter=True``: exact interpolation of the cubic spline through the pixels (Unser
    1999, IEEE Signal Process. Mag. 16:22), flat to far higher frequencies than bilinear.
    """
    radii = np.asarray(radii, dtype=np.float64)
    theta = 2.0 * np.pi * np.arange(n_angles) / n_angles
    c = box // 2
    x = (c + radii[:, None] * np.cos(theta)).ravel()
    y = (c + radii[:, None] * np.sin(theta)).ravel()
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    if order == 3:
        wx, wy = _bspline3(fx), _bspline3(fy)  # (4, P)
        taps = np.arange(-1, 3)
        cols = ((y0 + taps[:, None, None]) % box)[:, None] * box + ((x0 + taps[:, None]) % box)
        weights = wy[:, None] * wx[None]  # (4 y, 4 x, P)
        cols = cols.reshape(16, -1).T.ravel()
        weights = weights.reshape(16, -1).T.ravel()
        rows = np.repeat(np.arange(x.size), 16)
    elif order == 1:
        rows = np.repeat(np.arange(x.size), 4)
        cols, weights = [], []
        for dy, dx, w in (
            (0, 0, (1 - fy) * (1 - fx)),
            (0, 1, (1 - fy) * fx),
            (1, 0, fy * (1 - fx)),
            (1, 1, fy * fx),
        ):
            cols.append(np.clip(y0 + dy, 0, box - 1) * box + np.clip(x0 + dx, 0, box - 1))
            weights.append(np.where((y0 + dy < box) & (x0 + dx < box), w, 0.0))
        cols = np.stack(cols, axis=1).ravel()
        weights = np.stack(weights, axis=1).ravel()
    else:
        raise ValueError(f"order must be 1 or 3, got {order}")
    return scipy.sparse.csr_matrix(
        (weights.astype(np.float32), (rows, cols)), shape=(x.size, box * box)
    )


def sample_rings(images, sampler, n_rings: int):
    """Ring values (n, R, W) of images (n, box, box) about their centres; ``sampler`` from
    :func:`ring_sampler`. One sparse product ``sampler @ pixels`` with the images as columns
    (pixel-major: each ring point is then 4 vector updates over the whole batch)."""
    xp = array_module(images)
    n = len(images)
    pixels = xp.ascontiguousarray(images.reshape(n, -1).astype(xp.float32, copy=False).T)
    if xp is not np:  # pragma: no cover - GPU path: sparse @ dense on the device
        import cupyx.scipy.sparse

        sampler = cupyx.scipy.sparse.csr_matrix(sampler)
    rings = sampler @ pixels  # (R * W, n)
    return xp.ascontiguousarray(rings.T).reshape(n, n_rings, -1)


def ring_weights(radii) -> np.ndarray:
    """Ring weights proportional to the radius (the area element r dr dtheta), summing to 1."""
    radii = np.asarray(radii, dtype=np.float64)
    return radii / radii.sum()


def normalized_spectra(rings, weights):
    """Angular spectra (n, R, W//2+1) of rings (n, R, W) after removing their weighted mean
    and scaling to unit weighted norm: ``sum_r w_r sum_l a(r, l)^2 = 1`` (complex64)."""
    xp = array_module(rings)
    n, n_rings, n_angles = rings.shape
    w = xp.asarray(weights, dtype=xp.float32)
    spectra = angular_spectra(rings.astype(xp.float32, copy=False))
    n_freq = spectra.shape[-1]
    mean = (spectra[..., 0].real @ w) / n_angles  # weighted mean ring value
    spectra[..., 0] -= n_angles * mean[:, None]
    # Parseval: sum_l a(l)^2 = (1/W) sum_q g_q |A_q|^2, g_q = 2 where q pairs with W - q
    g = np.ones(n_freq, dtype=np.float32)
    g[1 : (n_angles + 1) // 2] = 2.0
    parts = spectra.view(xp.float32).reshape(n, n_rings, 2 * n_freq)  # re, im interleaved
    power = (parts * parts) @ xp.asarray(np.repeat(g, 2))  # (n, R)
    norm = xp.sqrt((power @ w) / n_angles)
    spectra *= (1.0 / xp.where(norm > 0, norm, 1.0))[:, None, None]
    return spectra


def _circulants(kernels, out=None):
    """Circulant matrices (n, N, N) ``C[a, b] = c[(b - a) % N]`` of kernels c (n, N): row a
    is the window ``N - a`` of c repeated twice (one strided copy, into ``out`` if given)."""
    xp = array_module(kernels)
    n = kernels.shape[-1]
    if xp is np:
        twice = np.concatenate([kernels, kernels], axis=-1)
        windows = np.lib.stride_tricks.sliding_window_view(twice, n, axis=-1)[:, n:0:-1]
    else:  # pragma: no cover - GPU path: one gather
        windows = kernels[:, (xp.arange(n)[None, :] - xp.arange(n)[:, None]) % n]
    if out is None:
        return xp.ascontiguousarray(windows)
    out[...] = windows
    return out


def fourier_shift(images, shifts, prefilter: bool = False):
    """Images (n, box, box) moved by ``shifts`` (n, 2) = (x, y) pixels: ``out(r) = in(r - s)``;
    with ``prefilter`` the moved images' periodic cubic B-spline coefficients (each axis's
    transfer function divided by ``2/3 + cos(2 pi k)/3``; ``ring_sampler(order=3)``).

    The same periodic Fourier shift as :func:`cryomatch.kernels.fourier.shift_images`
    (rfft2, phase ramps, irfft2), as matrix products: the shift along an axis is the circular
    convolution with ``c = irfft(ramp)``, so ``out = C_y (in C_x)`` with C the circulant
    matrices of the kernels (two batched box^3 products, about half the FFTs' time for
    64 px). One detail of the rfft2 grid: its y Nyquist frequency (-1/2) turns by the complex
    ``e^(i pi s_y)``; its imaginary part adds the rank-one term ``u v`` with
    ``u = (sin(pi s_y) / box) (-1)^y`` and ``v = irfft_x(i rfft_x(sum_y' (-1)^y' in) ramp_x)``
    (even boxes), taken into the second product as one more column of C_y and row of in C_x.
    """
    xp = array_module(images)
    fft = fft_module(xp)
    n, box, _ = images.shape
    images = images.astype(xp.float32, copy=False)
    shifts = xp.asarray(shifts, dtype=xp.float64).reshape(-1, 2)
    freq = xp.fft.rfftfreq(box)
    ramps = xp.exp(-2j * np.pi * freq[None, None, :] * shifts[:, :, None])
    spline = 1.0  # the B-spline prefilter's gain at the y Nyquist frequency
    if prefilter:
        ramps = ramps / (2.0 / 3.0 + xp.cos(2.0 * np.pi * freq) / 3.0)
        spline = 3.0
    kernels = fft.irfft(ramps, n=box, axis=-1).astype(xp.float32)  # (n, 2, box): x, y
    extra = 1 - box % 2  # the Nyquist column and row
    left = xp.empty((n, box, box + extra), dtype=xp.float32)
    right = xp.empty((n, box + extra, box), dtype=xp.float32)
    # C_y as a circulant of the reversed kernel c(-d), written into the left operand
    _circulants(xp.roll(kernels[:, 1, ::-1], 1, axis=-1), out=left[:, :, :box])
    xp.matmul(images, _circulants(kernels[:, 0]), out=right[:, :box])
    if extra:
        alt = xp.asarray(np.where(np.arange(box) % 2 == 0, 1.0, -1.0), dtype=xp.float32)
        nyquist = fft.irfft(1j * fft.rfft(alt @ images, axis=-1) * ramps[:, 0], n=box, axis=-1)
        left[:, :, box] = (spline * xp.sin(np.pi * shifts[:, 1]) / box)[:, None] * alt
        right[:, box] = nyquist
    return xp.matmul(left, right)


# --- translation grid ----------------------------------------------------------------------
def shift_grid(xr: float, yr: float, ts: float) -> tuple[np.ndarray, int, int]:
    """Grid of trial shifts (D, 2) as (x, y) pixels, ``-xr..xr`` by ``ts`` (and y); returns
    the grid and its size (nx, ny); index ``d = iy * nx + ix``."""
    nx, ny = 2 * int(math.floor(xr / ts + 1e-9)) + 1, 2 * int(math.floor(yr / ts + 1e-9)) + 1
    xs = ts * (np.arange(nx) - nx // 2)
    ys = ts * (np.arange(ny) - ny // 2)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1), nx, ny


# --- folded ring spectra -------------------------------------------------------------------
def coarse_fold(n_angles: int, coarse_angles: int = 64) -> int:
    """Fold factor that leaves ``coarse_angles`` angles (at least 1) for the coarse pass."""
    return max(1, n_angles // coarse_angles)


def _fold_rows(n_out: int) -> np.ndarray:
    """Folded frequencies j = 0..n_out/2 in parity order, the even j first, then the odd
    (:func:`_coarse_scores` splits the inverse DFT there)."""
    j = np.arange(n_out // 2 + 1)
    return np.concatenate([j[0::2], j[1::2]])


def _fold_index(n_angles: int, fold: int):
    """For each folded row j (parity order) and term t: the rfft index of the raw frequency
    ``q = j + t W / fold`` and whether it is conjugated (q > W/2 is conj of W - q); returns
    (index (Q', fold), conj (Q', fold), j (Q',))."""
    n_out = n_angles // fold
    j = _fold_rows(n_out)
    q = j[:, None] + np.arange(fold)[None, :] * n_out  # (Q', fold)
    conj = q > n_angles // 2
    return np.where(conj, n_angles - q, q), conj, j


def fold_spectra(spectra, fold: int, weights=None):
    """Angular spectra (n, R, Q) in the folded layout, float32 (Q', 2, K, n), K = fold * R:
    for each folded row j (parity order) the real and imaginary parts of ``A_q`` at the raw
    frequencies ``q = j + t W / fold`` (t = 0..fold-1, each followed by the R rings; q > W/2
    is ``conj A_(W-q)``), the images last; optionally times ring weights.
    :func:`image_spectra` makes this layout directly from images; this is for spectra at
    hand (tests, :meth:`FoldedSpectra.from_spectra`)."""
    xp = array_module(spectra)
    n, n_rings, n_freq = spectra.shape
    index, conj, _ = _fold_index(2 * (n_freq - 1), fold)
    terms = spectra[:, :, xp.asarray(index)]  # (n, R, Q', fold)
    terms = xp.where(xp.asarray(conj), xp.conj(terms), terms)
    if weights is not None:
        terms = terms * xp.asarray(weights, dtype=xp.float32)[:, None, None]
    out = xp.empty((index.shape[0], 2, fold, n_rings, n), dtype=xp.float32)
    out[:, 0] = terms.real.transpose(2, 3, 1, 0)
    out[:, 1] = terms.imag.transpose(2, 3, 1, 0)
    return out.reshape(index.shape[0], 2, fold * n_rings, n)


def _complex_values(folded, scale=None, out=None):
    """Folded values (Q', 2, K, n) as complex (n, Q', K), times ``scale`` (n,) if given,
    written into ``out`` if given (one pass)."""
    xp = array_module(folded)
    n_rows, _, k, n = folded.shape
    out = xp.empty((n, n_rows, k), dtype=xp.complex64) if out is None else out
    parts = out.view(xp.float32).reshape(n, n_rows, k, 2)
    for p in range(2):
        if scale is None:
            parts[..., p] = folded[:, p].transpose(2, 0, 1)
        else:
            xp.multiply(folded[:, p].transpose(2, 0, 1), scale[:, None, None], out=parts[..., p])
    return out


def _runs(mask) -> tuple:
    """The (start, stop) ranges of the True runs of a boolean vector."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(mask, np.int8), [0]])))
    return tuple((int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2], strict=True))


def ring_lengths(radii, n_angles: int, fold: int) -> np.ndarray:
    """Points each ring is sampled at: SPARX's ring length ``L_r`` (:func:`ring_points` of
    its radius, the next power of two at or above ``2 pi r``), at least ``W / fold`` and at
    most W. A ring of L points holds the angular frequencies below L/2, and a pixel image
    at most ``pi r`` turns round a ring of radius r (1/2 cycle per pixel)."""
    n_out = n_angles // fold
    return np.array([min(max(ring_points(r), n_out), n_angles) for r in radii], dtype=np.int64)


def ring_layout(radii, n_angles: int, fold: int):
    """The folded columns that rings sampled at their own lengths (:func:`ring_lengths`)
    give: ``(term, ring, coarse)``, each (K'',), the term t and ring r of each column and
    whether the coarse pass uses it. A ring of ``L = f n_out`` points gives its f terms
    ``t_g`` (:func:`ring_transform`), the frequencies ``j + t_g n_out`` up to L/2 and their
    conjugates: the terms ``t = t_g`` of the W-point layout for ``t_g < f/2``, else
    ``t_g + fold - f``. Columns go ring length by ring length, then term, then ring. The
    coarse pass skips the terms whose lowest frequency is above ``pi r`` (only
    interpolation residue and the images' corner frequencies). At 64 px (W 256, fold 4,
    28 rings) 62 of the 112 columns, 54 in the coarse pass."""
    radii = np.asarray(radii, dtype=np.float64)
    lengths = ring_lengths(radii, n_angles, fold)
    n_out = n_angles // fold
    term, ring = [], []
    for length in np.unique(lengths):
        rings = np.flatnonzero(lengths == length)
        f = int(length) // n_out
        for t_g in range(f):
            term += [t_g if t_g < f / 2 else t_g + fold - f] * len(rings)
            ring += list(rings)
    term, ring = np.array(term, dtype=np.int64), np.array(ring, dtype=np.int64)
    index, _, _ = _fold_index(n_angles, fold)  # (Q', fold): rfft index of (j, t)
    lowest = index.min(axis=0)
    return term, ring, lowest[term] <= np.pi * radii[ring]


def full_layout(n_rings: int, fold: int):
    """:func:`ring_layout` of every column (t, r), t-major, all in the coarse pass: rings
    sampled at the full W (spectra at hand)."""
    k = np.arange(fold * n_rings)
    return k // n_rings, k % n_rings, np.ones(k.size, dtype=bool)


@dataclass
class FoldedSpectra:
    """Ring spectra of images in the folded layout (:func:`image_spectra`): ``values``
    (M, Q', K'') complex64, normalized, the K'' columns of :func:`ring_layout`; the coarse
    pass takes its operands from them (:func:`_coarse_operand`), the exact scores use them
    as they are. Sliced along the images: ``spectra[lo:hi]``."""

    values: object

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, index):
        return FoldedSpectra(self.values[index])

    @classmethod
    def from_spectra(cls, spectra, fold: int) -> FoldedSpectra:
        """From normalized angular spectra (n, R, Q) (:func:`normalized_spectra`)."""
        return cls(_complex_values(fold_spectra(spectra, fold)))


@dataclass
class _RingGroup:
    """Rings of one length ``f n_out`` in :class:`_RingTransform`."""

    rows: slice  # their rows of the sampler, ordered (l', u, r): ring point l' f + u
    fold: int  # f, the sub-rings of n_out points
    n_rings: int
    stage2: np.ndarray  # (Q', 2 f, 2 f): twiddles and DFT across the sub-rings, times W / L
    columns: slice  # their columns of the layout (:func:`ring_layout`), ordered (t_g, r)


@dataclass
class _RingTransform:
    """Pixels -> folded ring spectra as matrix products (:func:`ring_transform`)."""

    sampler: scipy.sparse.csr_matrix  # (sum of L R over the groups, P): ring points
    pixels: np.ndarray  # (P,) the pixels (flat (y, x) index) the rings use, in order
    stage1: np.ndarray  # (2 Q', n_out): real DFT of the sub-rings, rows (j, part)
    groups: tuple  # _RingGroup per ring length
    parseval: np.ndarray  # (Q' * 2 * K'',): g_j w_r / W per folded value, 0 on the DC
    dc: np.ndarray  # (R,): the layout's column of each ring's DC (j = 0, t = 0)
    weights: np.ndarray  # (R,) ring weights
    n_angles: int
    fold: int


def ring_transform(sampler, radii, n_angles: int, fold: int) -> _RingTransform:
    """The folded ring spectra of images as matrix products, no FFT and no transposes.

    Each ring is sampled at its own length ``L = f n_out`` (:func:`ring_lengths`, ``n_out =
    W / fold``), as SPARX samples rings, and the rings of one length go together. Sub-rings:
    ring point ``l = l' f + u`` belongs to sub-ring u (n_out points). The L-point DFT at the
    raw frequency ``q = j + t n_out`` is (Cooley-Tukey) ``A(q) = sum_u exp(-2 pi i q u / L)
    S_u(j)`` with ``S_u`` the n_out-point DFT of sub-ring u. So per ring length: the sampler,
    its rows ordered (l', u, r), gives rings (n_out, f R m) for a batch of m images as
    columns; stage 1, one real product, gives ``S_u(j)`` for j = 0..n_out/2; stage 2, one
    (2 f x 2 f) real product per j, the folded values ``A(j + t n_out)`` times W / L (the
    W-point DFT of a ring within its band), laid out (j, part, t, r, m) and placed in the
    columns of :func:`ring_layout`. Flops per image and ring: about
    ``2 (n_out + 2) L + 8 f L``, a quarter of a dense L-point DFT; at 64 px 3968 ring
    points instead of 28 x 256. ``sampler``: :func:`ring_sampler` at W points per ring.
    """
    radii = np.asarray(radii, dtype=np.float64)
    n_rings = len(radii)
    n_out = n_angles // fold
    j = _fold_rows(n_out)
    angle = 2.0 * np.pi * np.outer(j, np.arange(n_out)) / n_out
    stage1 = np.stack([np.cos(angle), -np.sin(angle)], axis=1).reshape(2 * len(j), n_out)
    lengths = ring_lengths(radii, n_angles, fold)
    rows, groups, at_row, at_column = [], [], 0, 0
    for length in np.unique(lengths):
        rings = np.flatnonzero(lengths == length)
        f = int(length) // n_out
        tu = np.outer(np.arange(f), np.arange(f))  # t u
        phi = -2.0 * np.pi * (j[:, None, None] * np.arange(f) + n_out * tu) / length  # j, t, u
        cos, sin = np.cos(phi), np.sin(phi)
        stage2 = np.zeros((len(j), 2, f, 2, f))  # j, part out, t, part in, u
        stage2[:, 0, :, 0], stage2[:, 0, :, 1] = cos, -sin  # Re A = sum_u X cos - Y sin
        stage2[:, 1, :, 0], stage2[:, 1, :, 1] = sin, cos  # Im A = sum_u X sin + Y cos
        stage2 *= n_angles / length
        l_, u_, r_ = np.meshgrid(np.arange(n_out), np.arange(f), rings, indexing="ij")
        rows.append((r_ * n_angles + (l_ * f + u_) * (n_angles // length)).ravel())
        groups.append(
            _RingGroup(
                slice(at_row, at_row + rows[-1].size),
                f,
                len(rings),
                stage2.reshape(len(j), 2 * f, 2 * f).astype(np.float32),
                slice(at_column, at_column + f * len(rings)),
            )
        )
        at_row, at_column = at_row + rows[-1].size, at_column + f * len(rings)
    term, ring, _ = ring_layout(radii, n_angles, fold)
    weights = ring_weights(radii)
    # Parseval: sum_l a(l)^2 = (1/W) sum over the folded values of g_j |A|^2, g_j = 2 but 1
    # at j = 0 and n_out/2 (there the conjugate partner W - q is a folded value too)
    g = np.where((j == 0) | (j == n_out // 2), 1.0, 2.0)
    parseval = np.broadcast_to(
        g[:, None, None] * weights[ring] / n_angles, (len(j), 2, len(ring))
    ).copy()
    dc = np.array([np.flatnonzero((term == 0) & (ring == r))[0] for r in range(n_rings)])
    parseval[0, :, dc] = 0.0  # the DC (j = 0, t = 0): added centred by image_spectra
    sampler = scipy.sparse.csr_matrix(sampler, copy=True)
    sampler.eliminate_zeros()  # taps of weight 0 (a ring point on a pixel) use no pixel
    sampler = sampler[np.concatenate(rows)]
    pixels = np.unique(sampler.indices)
    return _RingTransform(
        sampler[:, pixels],
        pixels,
        stage1.astype(np.float32),
        tuple(groups),
        parseval.ravel().astype(np.float32),
        dc,
        weights,
        n_angles,
        fold,
    )


@functools.lru_cache(maxsize=8)
def _cached_transform(
    box: int, radii: tuple, n_angles: int, fold: int, order: int = 1
) -> _RingTransform:
    return ring_transform(ring_sampler(box, radii, n_angles, order), radii, n_angles, fold)


def image_spectra(
    images, origins, radii, n_angles, sampler=None, fold=None, chunk=None, order: int = 1
):
    """Ring spectra of images (M, box, box) about their current centres ``-origin``
    (origins (M, 2) in pixels: images are first moved by the exact Fourier shift
    ``+origin``; whole-pixel origins by indexing, the same where the rings' pixels do not
    wrap), as :class:`FoldedSpectra`; the exact values with the weighted mean removed
    and unit weighted norm (``sum_r w_r sum_l a^2 = 1``). ``chunk`` images at a time
    (default 32 on the CPU, where a chunk stays in cache; all at once on the GPU).
    ``order``: the rings' interpolation (:func:`ring_sampler`), 1 bilinear or 3 cubic
    B-spline (the spline prefilter rides on the Fourier shift)."""
    xp = array_module(images)
    box = images.shape[-1]
    fold = coarse_fold(n_angles) if fold is None else fold
    if sampler is None:
        radii = tuple(np.asarray(radii, dtype=float))
        tr = _cached_transform(box, radii, n_angles, fold, order)
    else:
        tr = ring_transform(sampler, radii, n_angles, fold)
    sampler = tr.sampler
    if xp is not np:  # pragma: no cover - GPU path: sparse @ dense on the device
        import cupyx.scipy.sparse

        sampler = cupyx.scipy.sparse.csr_matrix(sampler)
    stage1 = xp.asarray(tr.stage1)
    stage2 = [xp.asarray(g.stage2) for g in tr.groups]
    parseval, w = xp.asarray(tr.parseval), xp.asarray(tr.weights, dtype=xp.float32)
    dc_columns = xp.asarray(tr.dc)
    n, n_rows = len(images), len(tr.stage1) // 2
    n_out = tr.stage1.shape[1]
    k = tr.groups[-1].columns.stop
    chunk = (32 if xp is np else max(n, 1)) if chunk is None else chunk
    origins = xp.asarray(origins, dtype=xp.float64).reshape(-1, 2)
    values = xp.empty((n, n_rows, k), dtype=xp.complex64)
    used = xp.asarray(tr.pixels)
    whole = order == 1 and _whole_pixels(origins, tr.pixels, box)
    block = 8 * chunk  # images moved at a time (matrix products gain from large batches)
    for lo in range(0, n, chunk):
        if whole:  # moved by indexing, straight into the pixel-major layout
            pixels = _moved_pixels(images[lo : lo + chunk], origins[lo : lo + chunk], used)
        else:
            if lo % block == 0:
                moved = images[lo : lo + block].astype(xp.float32, copy=False)
                moved = fourier_shift(moved, origins[lo : lo + block], prefilter=order == 3)
            centred = moved[lo % block : lo % block + chunk]
            pixels = centred.reshape(len(centred), -1).T[used]  # (P, m)
        m = pixels.shape[1]
        rings = sampler @ pixels  # (sum L R, m): per ring length, rows (l', u, r)
        folded = xp.empty((n_rows, 2, k, m), dtype=xp.float32)
        for group, twiddles in zip(tr.groups, stage2, strict=True):
            sub = stage1 @ rings[group.rows].reshape(n_out, -1)  # (2 Q', f R m)
            out = xp.matmul(twiddles, sub.reshape(n_rows, 2 * group.fold, -1))
            folded[:, :, group.columns] = out.reshape(n_rows, 2, -1, m)
        dc = folded[0, 0, dc_columns]  # A_0 = ring sums (j = 0, real part, t = 0)
        mean = (w @ dc) / n_angles  # weighted mean ring value
        dc -= n_angles * mean
        folded[0, 0, dc_columns] = dc
        flat = folded.reshape(-1, m)
        power = parseval @ (flat * flat) + (w @ (dc * dc)) / n_angles
        scale = 1.0 / xp.sqrt(xp.where(power > 0, power, 1.0))
        _complex_values(folded, scale, values[lo : lo + m])
    return FoldedSpectra(values)


def whole_pixel_centres(origins, room: float) -> np.ndarray:
    """The search's ring centres ``-c``: origins (n, 2) rounded to whole pixels, within
    ``+-room`` per axis; :func:`image_spectra` moves images by whole pixels by indexing (no
    Fourier shift), and :func:`refine_poses` takes each match to its exact position."""
    origins = np.asarray(origins, dtype=np.float64)
    c = np.rint(origins)
    return np.where(np.abs(c) > room + 1e-6, np.trunc(origins), c)


def _whole_pixels(origins, pixels, box: int) -> bool:
    """Whether all origins (n, 2) are whole pixels and move the ring pixels ``pixels`` (flat
    (y, x) indices) without wrapping them round the box (then indexing is the exact shift)."""
    xp = array_module(origins)
    if not len(origins) or not bool(xp.all(origins == xp.rint(origins))):
        return False
    y, x = pixels // box, pixels % box
    lo = xp.min(origins, axis=0)  # (x, y): out(r) = in(r - s)
    hi = xp.max(origins, axis=0)
    return bool(
        x.min() - hi[0] >= 0
        and x.max() - lo[0] < box
        and y.min() - hi[1] >= 0
        and y.max() - lo[1] < box
    )


def _moved_pixels(images, origins, used):
    """Pixels ``used`` (P,) of images (m, box, box) moved by whole-pixel origins (m, 2),
    ``out(r) = in(r - origin)``, pixel-major (P, m) float32 (one gather)."""
    xp = array_module(images)
    m, box, _ = images.shape
    shift = origins.astype(xp.intp)
    base = xp.arange(m, dtype=xp.intp) * (box * box) - (shift[:, 1] * box + shift[:, 0])
    flat = images.astype(xp.float32, copy=False).reshape(-1)
    return xp.take(flat, used.astype(xp.intp)[:, None] + base[None, :])


@dataclass
class References:
    """Reference ring spectra prepared for :func:`search` (built by :func:`prepare_references`)."""

    exact: object  # (2, N, Q', K'') complex64: w conj(B), mirrored (-1)^j w B; N = S * D
    blocks: list  # per block of b sets: (U, V), each (Q', K', b) float32, of folded w B
    dft: tuple  # (even, odd) float32: the half-circle inverse DFTs P, Q (:func:`_dft_matrices`)
    n_even: int  # folded rows of even j (the first rows of the folded layout)
    spectrum: tuple  # (entry (Q,), conj (Q,)): the folded value holding each rfft index q
    block: int  # sets per block
    coarse: tuple  # ((start, stop), ...): the K' of the K'' columns the coarse pass uses
    groups: object  # (K'', fold) complex64: 1 where a kept column belongs to term t
    weights: np.ndarray  # (R,)
    n_angles: int
    n_refs: int
    n_shifts: int
    grid: np.ndarray  # (D, 2) shifts (x, y) in pixels
    grid_shape: tuple[int, int]  # (nx, ny)
    step: float  # grid step ts in pixels
    fold: int

    @property
    def n_sets(self) -> int:
        return self.n_refs * self.n_shifts


def prepare_references(
    references, radii, n_angles, xr, yr, ts, fold=None, sampler=None, block: int = 64, order=1
):
    """Ring spectra of references (S, box, box) about every grid shift, ready to search;
    ``block`` reference-shift sets go into one matrix product (a cache-sized tile);
    ``order`` the rings' interpolation (:func:`image_spectra`).

    The rings of reference s about grid point ``e`` are those of the reference moved by
    ``-e`` (exact Fourier shift) about its centre; sets are reference-major, ``n = s D + d``.
    """
    xp = array_module(references)
    grid, nx, ny = shift_grid(xr, yr, ts)
    s, d = len(references), len(grid)
    fold = coarse_fold(n_angles) if fold is None else fold
    spectra = image_spectra(
        xp.repeat(references.astype(xp.float32), d, axis=0),
        -xp.tile(xp.asarray(grid, dtype=xp.float64), (s, 1)),
        radii,
        n_angles,
        sampler,
        fold,
        order=order,
    )
    layout = ring_layout(radii, n_angles, fold)
    return _references(
        spectra.values, ring_weights(radii), s, grid, (nx, ny), ts, n_angles, fold, block, layout
    )


def references_from_spectra(
    spectra, weights, n_refs, grid, grid_shape, ts, fold=None, block: int = 64
) -> References:
    """:class:`References` from normalized ring spectra (S * D, R, Q), reference-major."""
    n_angles = 2 * (spectra.shape[-1] - 1)
    fold = coarse_fold(n_angles) if fold is None else fold
    values = FoldedSpectra.from_spectra(spectra, fold).values
    layout = full_layout(len(weights), fold)  # spectra at hand: every column, exact
    return _references(values, weights, n_refs, grid, grid_shape, ts, n_angles, fold, block, layout)


def _references(
    values, weights, n_refs, grid, grid_shape, ts, n_angles, fold, block, layout
) -> References:
    """:class:`References` from normalized folded values (S * D, Q', K'') complex in the
    columns ``layout`` = (term, ring, coarse) (:func:`ring_layout`)."""
    xp = array_module(values)
    n_sets, n_rows, _ = values.shape
    term, ring, coarse = layout
    column_weights = xp.asarray(np.asarray(weights)[ring], dtype=xp.float32)
    weighted = values * column_weights  # w_r per column (t, r)
    runs = _runs(coarse)  # the columns of the coarse pass
    chosen = xp.concatenate([weighted[:, :, lo:hi] for lo, hi in runs], axis=2)
    u = chosen.real.transpose(1, 2, 0)  # (Q', K', N)
    v = chosen.imag.transpose(1, 2, 0)
    blocks = [
        (
            xp.ascontiguousarray(u[..., lo : lo + block]),
            xp.ascontiguousarray(v[..., lo : lo + block]),
        )
        for lo in range(0, n_sets, block)
    ]
    n_out = n_angles // fold
    rows = _fold_rows(n_out)
    sign = xp.asarray(np.where(rows % 2 == 0, 1.0, -1.0), dtype=xp.float32)[:, None]
    exact = xp.stack([xp.conj(weighted), weighted * sign])  # (-1)^q = (-1)^j, n_out even
    even, odd = _dft_matrices(n_rows, fold)
    # each rfft index q: the folded value of raw frequency q, or of W - q conjugated
    q = np.arange(n_angles // 2 + 1)
    conj = q % n_out > n_out // 2
    raw = np.where(conj, n_angles - q, q)
    entry = np.argsort(rows)[raw % n_out] * fold + raw // n_out
    groups = (term[:, None] == np.arange(fold)).astype(np.complex64)  # (K'', fold)
    return References(
        exact,
        blocks,
        (xp.asarray(even), xp.asarray(odd)),
        even.shape[2] // 2,
        (xp.asarray(entry), xp.asarray(conj)),
        block,
        runs,
        xp.asarray(groups),
        np.asarray(weights),
        n_angles,
        n_refs,
        len(grid),
        np.asarray(grid),
        grid_shape,
        ts,
        fold,
    )


# --- the search ----------------------------------------------------------------------------
def _dft_matrices(n_freq: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse real DFT of the products, split by the parity of the folded frequency j into
    two half-circle transforms (even, odd), each (2, n_out / 2, 2 len(j)) float32.

    ``cc(k) = (1/W) sum_j g_j (Re G_j cos(2 pi j k / n_out) - Im G_j sin(...))``, with
    ``G = (XU + YV) + i (YU - XV)`` and, mirrored, ``(-1)^j ((XU - YV) + i (YU + XV))``.
    With ``C = g cos / W`` and ``S = -g sin / W`` both are sums of two transforms,
    ``P = C XU + S YU`` (of the U products) and ``Q = C YV - S XV`` (of the V products):
    ``cc = P + Q`` and, mirrored, ``(-1)^j (P - Q)``, half the flops of transforming each
    mirror apart. Turning by half a circle multiplies term j by ``(-1)^j``, so with E and O
    the sums over even and odd j at the ``n_out / 2`` angles k of the first half circle,
    ``cc(k) = E(k) + O(k)`` and ``cc(k + n_out / 2) = E(k) - O(k)``: the maximum over the
    full circle is ``max_k E(k) + |O(k)|``, at half the DFT's flops again (one radix-2 step).
    Per parity: [P rows; Q rows] of the half-circle angles, columns ``(j, r)`` for j of that
    parity and r in (X, Y), as the products of U (for P) and of V (for Q) are laid out.
    """
    n_out = 2 * (n_freq - 1)
    half = n_out // 2
    mats = []
    for j in (np.arange(0, n_freq, 2), np.arange(1, n_freq, 2)):
        g = np.where((j == 0) | (j == n_freq - 1), 1.0, 2.0) / (n_out * fold)
        angle = 2.0 * np.pi * np.outer(np.arange(half), j) / n_out
        tc, ts = g * np.cos(angle), -g * np.sin(angle)  # (half, len(j))
        out = np.zeros((2, half, len(j), 2))  # P or Q, angle, j, r (X, Y)
        out[0, :, :, 0], out[0, :, :, 1] = tc, ts  # P = C XU + S YU
        out[1, :, :, 0], out[1, :, :, 1] = -ts, tc  # Q = C YV - S XV
        mats.append(out.reshape(2, half, 2 * len(j)).astype(np.float32))
    return mats[0], mats[1]


def _coarse_scores(image_folded, refs: References):
    """:func:`_coarse_from_operand` for folded image values (Q', 2, K, M) (:func:`fold_spectra`)."""
    xp = array_module(image_folded)
    n_rows, _, k, m = image_folded.shape
    kept = xp.concatenate([image_folded[:, :, lo:hi] for lo, hi in refs.coarse], axis=2)
    left = xp.ascontiguousarray(kept.transpose(0, 1, 3, 2)).reshape(n_rows, 2 * m, -1)
    return _coarse_from_operand(left, refs)


def _coarse_operand(values, columns):
    """The left operand of the coarse products, (Q', 2 M, K') float32: per folded row the
    real parts X of the images' folded values (M, Q', K'') above their imaginary parts Y, in
    the K' columns of the ranges ``columns`` (:attr:`References.coarse`; one cache-sized
    copy per batch)."""
    xp = array_module(values)
    m, n_rows, k = values.shape
    parts = values.view(xp.float32).reshape(m, n_rows, k, 2)
    out = xp.empty((n_rows, 2, m, sum(hi - lo for lo, hi in columns)), dtype=xp.float32)
    at = 0
    for lo, hi in columns:
        out[..., at : at + hi - lo] = parts[:, :, lo:hi].transpose(1, 3, 0, 2)
        at += hi - lo
    return out.reshape(n_rows, 2 * m, -1)


def _coarse_from_operand(left, refs: References):
    """Correlation maxima over the ``n_out`` folded angles, (2, M, N) for every (mirror,
    image, reference-shift), from the images' ``[X; Y]`` operand (Q', 2 M, K')
    (:func:`_coarse_operand`): per block and parity of j one product per folded frequency
    and part, ``[X; Y] @ U`` and ``[X; Y] @ V``, laid out so that the half-circle inverse
    DFTs P and Q are one more matrix product; then, with E and O the even and odd parts,
    ``max_k E(k) + |O(k)|`` for ``cc = P + Q`` and the mirrored ``+-(P - Q)``
    (:func:`_dft_matrices`)."""
    xp = array_module(left)
    n_rows, m2, _ = left.shape
    m = m2 // 2
    parities = (slice(0, refs.n_even), slice(refs.n_even, n_rows))
    half = refs.dft[0].shape[1]
    out = xp.empty((2, m, refs.n_sets), dtype=xp.float32)
    products = pq = None
    for i, (u, v) in enumerate(refs.blocks):
        b = u.shape[-1]
        if products is None or products[0].shape[-1] != b:
            products = [xp.empty((2, p.stop - p.start, 2 * m, b), xp.float32) for p in parities]
            pq = [xp.empty((2, half, m * b), xp.float32) for _ in parities]
        for p, rows in enumerate(parities):  # c, j, (r, m), n
            xp.matmul(left[rows], u[rows], out=products[p][0])
            xp.matmul(left[rows], v[rows], out=products[p][1])
            xp.matmul(refs.dft[p], products[p].reshape(2, -1, m * b), out=pq[p])
        (p_even, q_even), (p_odd, q_odd) = pq
        cc = pq[1]  # odd parts as |O| = |P_o + Q_o| and, mirrored, |P_o - Q_o|
        xp.add(p_odd, q_odd, out=cc[0])
        xp.multiply(q_odd, -2.0, out=cc[1])  # cc[0] - 2 Q_o = P_o - Q_o
        cc[1] += cc[0]
        xp.abs(cc, out=cc)
        cc += p_even
        cc[0] += q_even
        cc[1] -= q_even
        lo = i * refs.block
        out[:, :, lo : lo + b] = cc.reshape(2, half, m, b).max(axis=1)
    return out


def _exact_products(values, refs: References, n_index, mirror, chunk=None):
    """Weighted product spectra ``sum_r w_r A conj(B)``, or for a mirror
    ``(-1)^q sum_r w_r A B``, of each image (folded values (M, Q', K'')) with its T
    reference-shift sets ``n_index`` (M, T): returns (M, T, Q) over the rfft indices q.
    ``mirror`` (M, T) or (M, 1). Per ``chunk`` images (default about 32 sets on the CPU,
    so that the buffers stay in cache; all at once on the GPU) one gather of the sets
    (:attr:`References.exact` holds both forms), one product in place, the sums over the
    rings of each term as a matrix product written into the result, all on the folded
    values; then each q picked from its folded value (conjugated by a sign on the
    imaginary parts)."""
    xp = array_module(values)
    m, t = n_index.shape
    _, n_rows, k = values.shape
    flat = refs.exact.reshape(-1, n_rows * k)  # (2 N, Q' K''): sets, then mirrored sets
    index = xp.asarray(mirror, dtype=xp.intp) * refs.n_sets + n_index
    index = xp.broadcast_to(index, (m, t))
    if chunk is None:  # about 32 gathered sets at a time on the CPU
        chunk = max(1, 32 // t) if xp is np else max(m, 1)
    groups = refs.groups  # (K'', fold): the sums over the rings of each term
    fold = groups.shape[1]
    d = xp.empty((m, t, n_rows * fold), dtype=xp.complex64)
    for lo in range(0, m, chunk):
        b = flat[index[lo : lo + chunk].ravel()]  # fancy indexing: faster than take here
        b.reshape(-1, t, n_rows * k)[...] *= values[lo : lo + chunk].reshape(-1, 1, n_rows * k)
        xp.matmul(b.reshape(-1, k), groups, out=d[lo : lo + chunk].reshape(-1, fold))
    entry, conj = refs.spectrum
    c = xp.take(d, entry, axis=-1)
    c.view(xp.float32)[..., 1::2] *= xp.where(conj, -1.0, 1.0).astype(xp.float32)
    return c


def _rotations(theta, n_freq: int):
    """``e^(i q theta)`` (P, Q) for q = 0..Q-1, complex64: the outer product of
    ``e^(i a B theta)`` and ``e^(i b theta)`` (q = a B + b, B about sqrt(Q)), so 2 sqrt(Q)
    exponentials per row instead of Q (angles reduced in double precision)."""
    xp = array_module(theta)
    base = math.isqrt(max(n_freq - 1, 0)) + 1
    theta = xp.asarray(theta, dtype=xp.float64)[:, None]

    def turns(step, count):
        angle = ((theta * (step * xp.arange(count))) % (2.0 * np.pi)).astype(xp.float32)
        out = xp.empty(angle.shape, dtype=xp.complex64)
        parts = out.view(xp.float32).reshape(*angle.shape, 2)
        parts[..., 0], parts[..., 1] = xp.cos(angle), xp.sin(angle)
        return out

    high, low = turns(base, -(-n_freq // base)), turns(1, base)
    out = xp.multiply(high[:, :, None], low[:, None, :])
    return out.reshape(len(theta), -1)[:, :n_freq]


def _polynomial(c, theta, n_angles: int):
    """The correlation ``cc(theta)`` and its first two derivatives from product spectra c
    (P, Q), or (P, T, Q) all at the angle theta (P,) of their row:
    ``cc = (1/W) sum_q g_q Re(C_q e^(i q theta))``, g = 1, 2, ..., 2, 1; the three sums as
    one real product of the turned spectra (re, im interleaved) with the columns g (on Re),
    -g q (on Im) and -g q^2 (on Re)."""
    xp = array_module(c)
    n_freq = c.shape[-1]
    q = np.arange(n_freq, dtype=np.float64)
    g = np.full(n_freq, 2.0 / n_angles)
    g[0] = g[-1] = 1.0 / n_angles
    columns = np.zeros((n_freq, 2, 3))  # q, part (re, im), sum
    columns[:, 0, 0], columns[:, 1, 1], columns[:, 0, 2] = g, -g * q, -g * q * q
    turn = _rotations(xp.asarray(theta), n_freq).reshape(len(c), *(1,) * (c.ndim - 2), n_freq)
    turned = xp.multiply(c, turn, out=xp.empty(c.shape, dtype=xp.complex64))
    sums = turned.view(xp.float32).reshape(*c.shape[:-1], 2 * n_freq) @ xp.asarray(
        columns.reshape(2 * n_freq, 3).astype(np.float32)
    )
    return sums[..., 0], sums[..., 1], sums[..., 2]


def _refine_angle(c, n_angles: int):
    """Maximum over the full circle of the correlations with product spectra c (P, Q): the
    best of the W exact samples, a parabola through it and its neighbours, one Newton step
    on the trigonometric polynomial (kept within half a sample step). Returns (theta, value)."""
    xp = array_module(c)
    fft = fft_module(xp)
    samples = fft.irfft(c, n=n_angles, axis=-1)
    k = xp.argmax(samples, axis=-1)
    rows = xp.arange(len(k))
    f0, fm, fp = samples[rows, k], samples[rows, k - 1], samples[rows, (k + 1) % n_angles]
    curvature = fm - 2.0 * f0 + fp
    offset = xp.where(curvature < 0, 0.5 * (fm - fp) / xp.where(curvature < 0, curvature, -1), 0)
    step = 2.0 * np.pi / n_angles
    theta = (k + xp.clip(offset, -0.5, 0.5)) * step
    return _newton(c, theta, n_angles, k * step, 0.5 * step)


def _newton(c, theta, n_angles: int, centre, reach):
    """One Newton step for the maximum of the trigonometric polynomial of c, kept within
    ``centre +- reach``; returns (theta, value)."""
    xp = array_module(c)
    _, d1, d2 = _polynomial(c, theta, n_angles)
    newton = xp.where(d2 < 0, -d1 / xp.where(d2 < 0, d2, -1.0), 0.0)
    theta = xp.clip(theta + newton, centre - reach, centre + reach)
    return theta, _polynomial(c, theta, n_angles)[0]


@dataclass
class Alignment:
    """Best match of each image: ``image(p + u) = ref(e + L u)`` near the image's centre p,
    with ``L = M^mirror A2(-angle)^T`` (the reference turned counter-clockwise by ``angle``,
    mirrored first when ``mirror``) and ``e = shift``, the ring centre in the reference."""

    reference: np.ndarray  # (M,) int, 0-based
    mirror: np.ndarray  # (M,) bool
    angle: np.ndarray  # (M,) degrees, counter-clockwise turn of the reference
    shift: np.ndarray  # (M, 2) x, y pixels in the reference frame
    score: np.ndarray  # (M,) normalized cross-correlation at the peak

    def to_params(self, origin):
        """(psi, origin, mirror) in RELION's convention (:mod:`cryomatch.geometry`) for images
        whose rings were taken about ``-origin`` (pixels): ``psi = -angle`` and
        ``origin' = origin + L^-1 shift``."""
        psi = geometry.wrap_degrees(-self.angle)
        new_origin = geometry.recentre_origin(psi, origin, self.mirror, -self.shift)
        return psi, new_origin, self.mirror


def search(image_spec, refs: References, top: int = 2, batch: int = 256, exclude=None) -> Alignment:
    """Align images (:class:`FoldedSpectra` from :func:`image_spectra`) to every reference,
    shift and mirror (module docstring), ``batch`` images at a time (the coarse pass in
    cache-sized parts of those, :func:`coarse_scores`); ``exclude`` (M,) names a reference
    each image must not match (e.g. itself), or -1."""
    xp = array_module(image_spec.values)
    _check_layout(image_spec, refs)
    if exclude is None:
        exclude = xp.full(len(image_spec), -1)
    parts = [
        _search_batch(image_spec[lo : lo + batch], refs, top, exclude[lo : lo + batch])
        for lo in range(0, len(image_spec), batch)
    ]
    return Alignment(
        *(
            np.concatenate([to_numpy(getattr(p, f)) for p in parts])
            for f in ("reference", "mirror", "angle", "shift", "score")
        )
    )


def refine(image_spec, refs: References, reference, mirror, batch: int = 256) -> Alignment:
    """Local refinement of known matches: each image (:class:`FoldedSpectra` about its
    matched centre, e.g. with ``order=3`` rings) against its own reference ``reference``
    (M,) and mirror (M,) only, starting at the centre of ``refs``' shift grid (a small one,
    e.g. +-1 px): the exact correlation over the full circle, then the climb on the grid and
    the parabolas of :func:`search`. One reference-shift set and its grid neighbours per
    image instead of all of them."""
    xp = array_module(image_spec.values)
    _check_layout(image_spec, refs)
    reference = xp.asarray(reference, dtype=xp.int64)
    mirror = xp.asarray(mirror, dtype=bool)
    parts = []
    for lo in range(0, len(image_spec), batch):
        values = image_spec.values[lo : lo + batch]
        n_best = reference[lo : lo + batch] * refs.n_shifts + refs.n_shifts // 2
        mir = mirror[lo : lo + batch]
        c = _exact_products(values, refs, n_best[:, None], mir[:, None])[:, 0]
        theta, value = _refine_angle(c, refs.n_angles)
        shift, theta, value, n_best = _refine_shift(values, refs, n_best, mir, theta, value, c)
        parts.append(
            Alignment(
                to_numpy(n_best // refs.n_shifts),
                to_numpy(mir),
                np.rad2deg(to_numpy(theta).astype(np.float64)),
                to_numpy(shift),
                to_numpy(value),
            )
        )
    return Alignment(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("reference", "mirror", "angle", "shift", "score")
        )
    )


SECOND_PASS = 0.25  # refine_poses: images moved by more than this many fine grid steps


def refine_poses(images, origin, reference, mirror, fine: References, radii, room, passes=2):
    """The final refinement of :func:`search`'s matches (``to_params`` form: origins (M, 2)
    in pixels, ``reference`` and ``mirror`` (M,)) on the exact images (M, box, box): rings
    of each image moved by the exact Fourier shift to its match, sampled by cubic B-spline,
    against its own reference only (:func:`refine`; ``fine``: references from
    :func:`prepare_references` with ``order=3`` and a small grid); up to ``passes`` times for
    the images a pass moved by more than a quarter of ``fine``'s step. Images whose rings
    would leave them (|origin| > ``room`` per axis) are left as they are. Returns
    (psi (M,), origin (M, 2), score (M,), refined (M,) bool); psi and score NaN where not
    refined."""
    xp = array_module(images)
    n = len(images)
    origin = np.array(origin, dtype=np.float64)
    psi, score = np.full(n, np.nan), np.full(n, np.nan)
    inside = np.abs(origin).max(axis=1) <= room + 1e-6
    todo = np.flatnonzero(inside)
    for _ in range(passes):
        if not len(todo):
            break
        subset = images if len(todo) == n else images[xp.asarray(todo)]  # no copy of all
        spectra = image_spectra(subset, origin[todo], radii, fine.n_angles, order=3)
        best = refine(spectra, fine, reference[todo], mirror[todo])
        before = origin[todo]
        psi[todo], origin[todo], _ = best.to_params(before)
        score[todo] = best.score
        moved = np.linalg.norm(origin[todo] - before, axis=1) > SECOND_PASS * fine.step
        todo = todo[moved & (np.abs(origin[todo]).max(axis=1) <= room + 1e-6)]
    return psi, origin, score, inside


def _check_layout(image_spec, refs: References) -> None:
    layout = tuple(refs.exact.shape[2:])  # (Q', K'')
    if tuple(image_spec.values.shape[1:]) != layout:
        raise ValueError(
            f"image spectra {tuple(image_spec.values.shape[1:])} do not match the references' "
            f"folded layout {layout} (rings, W and fold differ)"
        )


def coarse_scores(image_spec, refs: References, batch=None):
    """The coarse pass of :func:`search`: folded maxima (2, M, N) of :class:`FoldedSpectra`,
    ``batch`` images at a time (default 64 on the CPU, where the products stay in cache;
    all at once on the GPU)."""
    xp = array_module(image_spec.values)
    batch = (64 if xp is np else max(len(image_spec), 1)) if batch is None else batch
    values = image_spec.values
    return xp.concatenate(
        [
            _coarse_from_operand(_coarse_operand(values[lo : lo + batch], refs.coarse), refs)
            for lo in range(0, len(image_spec), batch)
        ],
        1,
    )


def _search_batch(image_spec, refs: References, top: int, exclude) -> Alignment:
    xp = array_module(image_spec.values)
    m = len(image_spec)
    s, d = refs.n_refs, refs.n_shifts
    coarse = coarse_scores(image_spec, refs)  # (2, M, S * D)
    coarse = xp.moveaxis(coarse.reshape(2, m, s, d), 0, 1).reshape(m, 2 * s, d)
    best_d = xp.argmax(coarse, axis=-1)  # per (image, mirror * S + reference)
    best = xp.take_along_axis(coarse, best_d[..., None], axis=-1)[..., 0]
    skip = xp.flatnonzero(exclude >= 0)
    best[skip, exclude[skip]] = best[skip, s + exclude[skip]] = -xp.inf
    top = min(top, 2 * s - (1 if len(skip) else 0))
    cand = xp.argsort(-best, axis=1)[:, :top]  # (M, T) of mirror * S + reference
    d_cand = xp.take_along_axis(best_d, cand, axis=1)
    n_cand, mir_cand = (cand % s) * d + d_cand, cand >= s
    values = image_spec.values
    c = _exact_products(values, refs, n_cand, mir_cand).reshape(m * top, -1)
    theta, value = _refine_angle(c, refs.n_angles)
    pick = xp.argmax(value.reshape(m, top), axis=1)
    rows = xp.arange(m) * top + pick
    n_best = xp.take_along_axis(n_cand, pick[:, None], axis=1)[:, 0]
    mir_best = xp.take_along_axis(mir_cand, pick[:, None], axis=1)[:, 0]
    shift, theta, value, n_best = _refine_shift(
        values, refs, n_best, mir_best, theta[rows], value[rows], c[rows]
    )
    return Alignment(
        reference=n_best // d,
        mirror=mir_best,
        angle=np.rad2deg(to_numpy(theta).astype(np.float64)),
        shift=shift,
        score=value,
    )


def _neighbours(values, refs: References, n_best, mirror, theta):
    """Product spectra (M, 4, Q) and correlations at ``theta`` (M, 4) of the grid neighbours
    x-, y-, x+, y+ of each winner (a winner on the grid's edge stands in for the missing
    neighbour), and which axes have both neighbours (M, 2)."""
    xp = array_module(values)
    nx, ny = refs.grid_shape
    d = n_best % refs.n_shifts
    pos = xp.stack([d % nx, d // nx], axis=1)
    inside = (pos > 0) & (pos < xp.asarray([nx - 1, ny - 1]))
    stride = xp.asarray([1, nx])
    lo = xp.where(pos > 0, n_best[:, None] - stride, n_best[:, None])
    hi = xp.where(pos < xp.asarray([nx - 1, ny - 1]), n_best[:, None] + stride, n_best[:, None])
    index = xp.concatenate([lo, hi], axis=1)
    c = _exact_products(values, refs, index, mirror[:, None])
    return index, c, _polynomial(c, theta, refs.n_angles)[0], inside


def _refine_shift(values, refs: References, n_best, mirror, theta, peak, c_best):
    """Sub-step shift and angle of each winner. First a climb on the grid at the refined
    angle while a neighbouring shift correlates better (the coarse pass may have picked a
    neighbour of the best shift); then parabolas along x and y through the neighbours give
    the shift, and the product spectra, interpolated to that shift by the same parabolas,
    the angle there (a 0.5 px error at radius r would turn the angle by 0.5/r radians).
    Returns (shift (M, 2), theta, value, reference-shift index)."""
    xp = array_module(values)
    m = len(values)
    n_angles = refs.n_angles
    step = 2.0 * np.pi / n_angles
    nx, ny = refs.grid_shape
    if nx < 3 and ny < 3:
        return xp.asarray(refs.grid)[n_best % refs.n_shifts].astype(xp.float64), theta, peak, n_best
    index, c, scores, inside = _neighbours(values, refs, n_best, mirror, theta)
    todo = xp.arange(m)  # images whose neighbours were just (re)computed
    for _ in range(4):
        j = xp.argmax(scores[todo], axis=1)
        better = scores[todo, j] > peak[todo]
        if not better.any():
            break
        todo, j = todo[better], j[better]
        n_best[todo] = index[todo, j]
        c_best[todo] = c[todo, j]
        theta[todo], peak[todo] = _newton(c_best[todo], theta[todo], n_angles, theta[todo], step)
        index[todo], c[todo], scores[todo], inside[todo] = _neighbours(
            values[todo], refs, n_best[todo], mirror[todo], theta[todo]
        )
    f_lo, f_hi = scores[:, :2], scores[:, 2:]
    curvature = f_lo - 2.0 * peak[:, None] + f_hi
    ok = inside & (curvature < 0)
    t = xp.clip(xp.where(ok, 0.5 * (f_lo - f_hi) / xp.where(ok, curvature, -1.0), 0.0), -0.5, 0.5)
    # quadratic interpolation of the spectra along each axis, C(t) = C0 + t (C+ - C-)/2 +
    # t^2 (C+ - 2 C0 + C-)/2 = C0 (1 - t^2) + C- (t^2 - t)/2 + C+ (t^2 + t)/2: one small
    # product per image with the neighbours' weights
    tt = xp.where(ok, t, 0.0)
    coef = xp.concatenate([0.5 * (tt * tt - tt), 0.5 * (tt * tt + tt)], axis=1)  # (M, 4)
    c_at = xp.matmul(coef.astype(xp.complex64)[:, None, :], c)[:, 0]
    c_at += c_best * (1.0 - (tt * tt).sum(axis=1)).astype(xp.float32)[:, None]
    theta, value = _newton(c_at, theta, n_angles, theta, step)
    shift = xp.asarray(refs.grid)[n_best % refs.n_shifts] + refs.step * t
    return shift, theta, value, n_best


# --- images in the reference frame, averages, FRC, centring --------------------------------
def resample_images(images, matrices, offsets, order: int = 1, margin: int = 4):
    """``out(s) = in(A s + b)`` for images (n, box, box), matrices A (n, 2, 2) and offsets
    b (n, 2), coordinates (x, y) in pixels about the box centre; zero outside the image.

    ``order=1``: bilinear, as four gathers from the flattened, zero-padded stack.
    ``order=3``: cubic spline for the whole batch in one call, the stack interpolated as a
    3D array at integer image indices, where a spline prefiltered along all three axes
    reproduces each image's own 2D spline exactly (mirror boundary beyond the padding).
    """
    images = np.asarray(images, dtype=np.float32)
    n, box, _ = images.shape
    c = box // 2
    grid = np.arange(box, dtype=np.float64) - c
    sy, sx = np.meshgrid(grid, grid, indexing="ij")
    pts = np.stack([sx.ravel(), sy.ravel()])  # (2, P)
    src = np.einsum("nij,jp->nip", np.asarray(matrices, np.float64), pts)
    src += np.asarray(offsets, dtype=np.float64)[:, :, None] + (c + margin)
    padded = np.pad(images, ((0, 0), (margin, margin), (margin, margin)))
    if order == 1:
        size = box + 2 * margin
        x = np.clip(src[:, 0], 0, size - 1.001)
        y = np.clip(src[:, 1], 0, size - 1.001)
        x0, y0 = np.floor(x), np.floor(y)
        fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
        index = (np.arange(n)[:, None] * size + y0.astype(np.int64)) * size + x0.astype(np.int64)
        flat = padded.ravel()
        top = flat[index] * (1 - fx) + flat[index + 1] * fx
        bottom = flat[index + size] * (1 - fx) + flat[index + size + 1] * fx
        return (top * (1 - fy) + bottom * fy).reshape(n, box, box)
    padded = ndimage.spline_filter(padded, order=order, mode="mirror", output=np.float32)
    index = np.broadcast_to(np.arange(n, dtype=np.float64)[:, None], (n, box * box))
    out = ndimage.map_coordinates(
        padded, [index, src[:, 1], src[:, 0]], order=order, mode="mirror", prefilter=False
    )
    return out.reshape(n, box, box).astype(np.float32, copy=False)


def to_reference_frame(images, psi, mirror, origin, order: int = 1):
    """Images mapped onto their reference's frame: ``aligned(s) = image(L^-1 s - origin)``
    for ``image(r) = ref(L (r + origin))`` (origin (n, 2) in pixels)."""
    linv = np.linalg.inv(geometry.image_to_reference_matrix(psi, mirror))
    return resample_images(images, linv, -np.asarray(origin, dtype=np.float64), order)


def from_reference_frame(references, psi, mirror, origin, order: int = 3):
    """Images made from references (n, box, box): ``image(r) = ref(L (r + origin))``."""
    matrix = geometry.image_to_reference_matrix(psi, mirror)
    offset = np.einsum("nij,nj->ni", matrix, np.asarray(origin, dtype=np.float64))
    return resample_images(references, matrix, offset, order)


def shell_index(box: int):
    """Fourier shell (ring) index of each rfft2 element, rounded |k| in 1/box units."""
    ky, kx = rfft_frequencies(box)
    return np.rint(np.sqrt(kx * kx + ky * ky) * box).astype(np.int64)


def fourier_ring_correlation(a, b):
    """FRC between images a and b (n, box, box) per shell 0..box//2: (n, box//2 + 1)."""
    box = a.shape[-1]
    fa, fb = np.fft.rfft2(a), np.fft.rfft2(b)
    shells = shell_index(box).ravel()
    n_shells = box // 2 + 1
    keep = shells < n_shells

    def ring_sum(values):
        v = values.reshape(len(values), -1)[:, keep]
        index = (np.arange(len(v))[:, None] * n_shells + shells[keep][None, :]).ravel()
        sums = np.bincount(index, weights=v.ravel(), minlength=len(v) * n_shells)
        return sums.reshape(len(v), n_shells)

    cross = ring_sum((fa * np.conj(fb)).real)
    pa, pb = ring_sum(np.abs(fa) ** 2), ring_sum(np.abs(fb) ** 2)
    denom = np.sqrt(pa * pb)
    return np.where(denom > 0, cross / np.where(denom > 0, denom, 1.0), 0.0)


def lowpass(images, cutoff, width: float = 0.05):
    """Raised-cosine low-pass of images (n, box, box): 1 below ``cutoff - width/2``, 0 above
    ``cutoff + width/2`` (cycles per pixel, per image (n,) or one value)."""
    box = images.shape[-1]
    ky, kx = rfft_frequencies(box)
    k = np.sqrt(kx * kx + ky * ky)[None]
    cutoff = np.asarray(cutoff, dtype=np.float64).reshape(-1, 1, 1)
    t = np.clip((k - cutoff + width / 2) / width, 0.0, 1.0)
    spectrum = np.fft.rfft2(images) * (0.5 + 0.5 * np.cos(np.pi * t))
    return np.fft.irfft2(spectrum, s=(box, box)).astype(np.float32)


def centre_of_mass(images, radius: float):
    """Centre (n, 2) as (x, y) pixels from the box centre of each image's squared contrast
    inside a disc of ``radius``: ``sum x (f - b)^2 / sum (f - b)^2`` with ``b`` the mean
    outside the disc. Squaring makes it blind to the contrast sign (SPARX's first-harmonic
    phase flips with it), and low-pass ringing, symmetric about the particle, cancels."""
    images = np.asarray(images, dtype=np.float64)
    n, box, _ = images.shape
    grid = np.arange(box, dtype=np.float64) - box // 2
    y, x = np.meshgrid(grid, grid, indexing="ij")
    inside = (x * x + y * y) <= radius * radius
    background = images[:, ~inside].mean(axis=1) if (~inside).any() else np.zeros(n)
    weight = (images - background[:, None, None]) ** 2 * inside
    total = weight.sum(axis=(1, 2))
    total = np.where(total > 0, total, 1.0)
    centre = np.stack([(weight * x).sum(axis=(1, 2)), (weight * y).sum(axis=(1, 2))], -1)
    return centre / total[:, None]


def phase_centre_of_gravity(images):
    """Centre (n, 2) as (x, y) pixels from the box centre by the phase of each image's first
    Fourier harmonic along x and along y (SPARX's phase_cog, its ``center=1``):
    ``x_c = box / (2 pi) arg sum f(x, y) exp(2 pi i (x - box // 2) / box)``, in
    (-box/2, box/2]. A weighted circular mean of the density: it moves by half the box when
    the contrast is inverted."""
    images = np.asarray(images, dtype=np.float64)
    n, box, _ = images.shape
    turn = np.exp(2j * np.pi * (np.arange(box) - box // 2) / box)
    x = images.sum(axis=1) @ turn  # profiles along x, first harmonic
    y = images.sum(axis=2) @ turn
    return np.stack([np.angle(x), np.angle(y)], axis=-1) * box / (2.0 * np.pi)


def disc_mask(box: int, radius: float, edge: float = 2.0) -> np.ndarray:
    """Soft disc (box, box): 1 inside ``radius``, cosine fall to 0 over ``edge`` pixels."""
    grid = np.arange(box, dtype=np.float64) - box // 2
    r = np.sqrt(grid[:, None] ** 2 + grid[None, :] ** 2)
    t = np.clip((r - radius) / edge, 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)
