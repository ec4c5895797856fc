"""Search of images against template views over displacements and in-plane rotations, with
the best normalized cross-correlation and the BioEM integrated log-likelihood per image.

Notation (see shared notes section 1): images Y_m and templates T_s on the polar grid
(:mod:`.polar_fourier`), quadrature weights w_r per ring, image CTFs C_m, displacements d.
The image is multiplied by its own CTF (``<C T, Y> = <T, C Y>``) and shifted back by d
(``Y_d(k) = Y(k) exp(2 pi i k.d)``: the particle sits at d from the box centre). In-plane
rotation is a cyclic shift along the angle, so for all W rotations at once

    cc[m, s, d, k] = sum_r w_r sum_l (C_m Y_m,d)(r, l) conj T_s(r, l - k)
                   = irfft_q( sum_r w_r A_m,d(r, q) conj B_s(r, q) )[k]

(A, B the angular spectra). The sum over r is a matrix product per q, compressed without
loss at the working precision: per q the singular directions of the templates [S x R]
(eigenvectors of their R x R Gram matrix, accumulated over chunks of views) keep the
H_q <= R that carry all but ``tolerance^2`` of the templates' energy (a radial SVD in the
spirit of Rangan 2023, Inverse Problems 39:024003), so the images are projected once onto
H_q directions and the product is [M*D x H_q] @ [H_q x S].

Normalized cross-correlation (CryoLike's): rho = cc / sqrt(S_yy S_cc), with
S_yy = sum (y - mean y)^2 over the N pixels (real space) and
S_cc(m, s, k) = sum w |C_m|^2 |T_s(l - k)|^2 - (C_m(0) T_s(0))^2 / N the template's power
under the CTF without its mean (a rotational correlation too: astigmatic CTFs make it
depend on k).

BioEM log-likelihood (Cossio and Hummer 2013, J. Struct. Biol. 184:427): for the model
y = a c + b + noise (white Gaussian, sigma) with flat priors on a >= 0 and b and Jeffreys'
1/sigma, the integrals over a, b and sigma give, per pose,

    log L = lgamma((N-2)/2) - log 2 - (N-2)/2 log(pi S_yy (1 - rho_+^2)) - 1/2 log(N S_cc),

rho_+ = max(rho, 0) (the half-line a >= 0 in the limit rho sqrt(N) >> 1). The integrated
log-likelihood is log sum over poses of prior * L, with prior = view weight / (D W).

Pruning (exact to a stated tolerance): |cc[k]| <= (|X_0| + 2 sum_q |X_q| + |X_W/2|) / W for
the product spectrum X, so a (image, view, displacement) whose bound is below the image's
best rho cannot hold its optimum, and one whose bound on log L is below the running maximum
minus ``log(n_poses / ll_tolerance)`` adds at most ``ll_tolerance`` of the total; only the
rest, gathered over displacements into tiles, go through the inverse FFT. A seeding pass
(1 in 4 views at the central displacement, then every other displacement of the best
views; then every view at each image's best displacement and the 9 displacements around
it for the best views) and views taken in a pseudo-random order bring each image's floor
near its final value early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import gammaln

from ..backend import array_module, fft_module, to_numpy
from ..errors import CryomatchError
from .polar_fourier import PolarGrid
from .rotation_dft import InverseRotationDFT, half_circle_matrix, irfft_weights


# --- displacements and the likelihood formula --------------------------------------------
def displacement_grid(max_displacement: float, n_x: int, n_y: int) -> np.ndarray:
    """CryoLike's grid: (D, 2) x, y, linspace(-max, max, n) per axis, x fastest; (0, 0)
    alone when n_x * n_y <= 1."""
    if n_x * n_y <= 1:
        return np.zeros((1, 2))
    if n_x < 1 or n_y < 1:
        raise CryomatchError(f"n_displacements_x and _y must be at least 1, got {n_x}, {n_y}")
    x, y = np.meshgrid(
        np.linspace(-max_displacement, max_displacement, n_x),
        np.linspace(-max_displacement, max_displacement, n_y),
    )
    return np.stack([x.ravel(), y.ravel()], axis=1)


def bioem_constant(n_pixels: int, syy) -> np.ndarray:
    """The pose-independent part of log L per image: lgamma((N-2)/2) - log 2 -
    (N-2)/2 log(pi S_yy)."""
    syy = np.asarray(syy, dtype=np.float64)
    return (
        gammaln((n_pixels - 2) / 2.0) - math.log(2.0) - (n_pixels - 2) / 2.0 * np.log(np.pi * syy)
    )


def bioem_log_likelihood(rho, scc, syy, n_pixels: int):
    """log L per pose (see module docstring) from rho, S_cc and S_yy (broadcasting)."""
    xp = array_module(rho)
    rho_p = xp.maximum(rho, 0.0)
    return (
        bioem_constant(n_pixels, syy)
        - (n_pixels - 2) / 2.0 * xp.log1p(-rho_p * rho_p)
        - 0.5 * xp.log(n_pixels * scc)
    )


# --- templates ---------------------------------------------------------------------------
def _spectra(chunk, q_count):
    """Angular spectra (c, R, Q) of templates and of their power |T|^2."""
    t = np.asarray(to_numpy(chunk), dtype=np.complex128)
    return np.fft.fft(t, axis=-1)[..., :q_count], np.fft.rfft(np.abs(t) ** 2, axis=-1)


def _bases(grams, tolerance: float):
    """Per q the eigenvectors (R, H_q) of the Gram matrices B^H B that keep all but
    tolerance^2 of the total energy (smallest eigenvalues over all q dropped first)."""
    eig = [np.linalg.eigh(g) for g in grams]
    values = [np.clip(e[0][::-1], 0.0, None) for e in eig]  # descending
    energy = np.concatenate(values)
    total = energy.sum()
    threshold = -1.0
    if tolerance > 0 and total > 0:
        ordered = np.sort(energy)
        dropped = np.cumsum(ordered) <= tolerance**2 * total
        threshold = ordered[dropped][-1] if dropped.any() else -1.0
    bases, left = [], 0.0
    for (_, vectors), lam in zip(eig, values, strict=True):
        keep = int(np.sum(lam > max(threshold, 0.0)))
        left += float(lam[keep:].sum())
        bases.append(vectors[:, ::-1][:, :keep])
    return bases, (math.sqrt(left / total) if total > 0 else 0.0)


@dataclass
class TemplateBank:
    """Templates prepared for the search (see :func:`prepare_templates`): per q the
    directions (bases) both sides project onto; the templates' coefficients in them, kept in
    memory or recomputed per chunk of views from ``source``."""

    bases: list  # per q: (R, H_q) complex64, sqrt(w) V: spectra project onto these
    power_bases: list  # per q: (R, H'_q) complex64, the same for |CTF|^2 and |T|^2
    dc: np.ndarray  # (S,) T_s(0), the projections' sums
    log_weights: np.ndarray  # (S,) log view weights (normalized)
    n_inplanes: int
    ring_weights: np.ndarray  # (R,)
    error: float  # sqrt of the relative energy the compression leaves out
    chunk_size: int  # views per chunk of the search
    source: object = None  # (S, R, W) templates (a memory map is fine) when not cached
    cache: tuple | None = None  # (coefficients per q (H_q, S), power coefficients per q)
    cache_views: np.ndarray | None = None  # the view of each of the cache's columns
    stacked: tuple | None = None  # the cache's coefficients as :func:`_stacked_coefficients`

    @property
    def n_templates(self) -> int:
        return len(self.dc)

    @property
    def ranks(self) -> list[int]:
        return [b.shape[1] for b in self.bases]

    def chunks(self) -> list[np.ndarray]:
        """View indices of each chunk, in a fixed pseudo-random order (every chunk and
        block samples the whole sphere)."""
        order = np.random.default_rng(0).permutation(self.n_templates)
        return [
            order[lo : lo + self.chunk_size] for lo in range(0, self.n_templates, self.chunk_size)
        ]

    def coefficients(self, index):
        """(per q (H_q, len(index)), per q (H'_q, len(index))) complex64 for these views."""
        xp = array_module(self.bases[0])
        if self.cache is not None:
            if np.array_equal(index, self.cache_views):  # the whole set, in the search's order
                return self.cache
            sel = xp.asarray(np.argsort(self.cache_views)[np.asarray(index)])
            return (
                [xp.ascontiguousarray(c[:, sel]) for c in self.cache[0]],
                [xp.ascontiguousarray(c[:, sel]) for c in self.cache[1]],
            )
        order = np.argsort(index)  # read the memory map in file order
        chunk = np.asarray(self.source[np.asarray(index)[order]])
        coefs, power = _project(chunk, self, xp)
        back = xp.asarray(np.argsort(order))
        return [c[:, back] for c in coefs], [c[:, back] for c in power]


def _project(chunk, bank: TemplateBank, xp, spectra=None):
    """Coefficients of templates (c, R, W) in the bank's bases: conj(B V)^T = V^H B^H per q
    (B the sqrt(w)-weighted spectra, so that X = (y sqrt(w) V) @ coefficients); the same for
    the power spectra in the power bases. ``spectra``: :func:`_spectra` of ``chunk`` when
    already computed."""
    spectra, power = _spectra(chunk, len(bank.bases)) if spectra is None else spectra

    def coefficients(values, bases):
        return [
            xp.asarray(
                np.ascontiguousarray(
                    (values[:, :, q] @ to_numpy(b).astype(np.complex128))
                    .conj()
                    .T.astype(np.complex64)
                )
            )
            for q, b in enumerate(bases)
        ]

    return coefficients(spectra, bank.bases), coefficients(power, bank.power_bases)


def prepare_templates(
    templates,
    grid: PolarGrid,
    view_weights,
    dc,
    tolerance: float = 3e-5,
    xp=np,
    max_bytes: float = 512e6,
    chunk: int = 256,
    min_chunk: int = 64,
) -> TemplateBank:
    """Per-q compression of templates (S, R, W) complex (a memory map is fine: read in
    chunks of ``chunk`` views, so memory does not grow with S beyond the coefficients).

    ``tolerance``: the compression keeps, over all q, the largest singular directions of
    the sqrt(w)-weighted template spectra until the energy left out is at most tolerance^2
    of the total (0: exact). The bases come from the Gram matrices B^H B (R x R per q),
    accumulated over chunks. The coefficients (about (sum H_q + sum H'_q) x 8 bytes per
    view) are kept in memory when they fit ``max_bytes``, else recomputed for each chunk
    of views (at least ``min_chunk``) that the search takes.
    """
    s, r, w = templates.shape
    if w != grid.n_inplanes or r != grid.n_shells:
        raise CryomatchError(
            f"templates are {r} x {w} but the polar grid is {grid.n_shells} x {grid.n_inplanes}"
        )
    q_count = w // 2 + 1
    sw = np.sqrt(grid.weights)
    grams = np.zeros((q_count, r, r), dtype=np.complex128)
    pgrams = np.zeros((q_count, r, r), dtype=np.complex128)
    # the spectra are kept for the coefficients when they fit the budget (else recomputed)
    keep = 32 * s * r * q_count <= max_bytes / 2
    kept = []
    for lo in range(0, s, chunk):
        spectra, power = _spectra(templates[lo : lo + chunk], q_count)
        if keep:
            kept.append((spectra, power))
        b = np.moveaxis(spectra * sw[:, None], -1, 0)  # (Q, c, R)
        grams += np.conj(b).transpose(0, 2, 1) @ b
        p = np.moveaxis(power * sw[:, None], -1, 0)
        pgrams += np.conj(p).transpose(0, 2, 1) @ p
    bases, error = _bases(grams, tolerance)
    # S_cc sets each rho's scale: its bases are kept whole (exact; cheap, one product per image)
    power_bases, _ = _bases(pgrams, 0.0)
    weights = np.asarray(view_weights, dtype=np.float64)
    bank = TemplateBank(
        bases=[
            xp.asarray(np.ascontiguousarray((sw[:, None] * v).astype(np.complex64))) for v in bases
        ],
        power_bases=[
            xp.asarray(np.ascontiguousarray((sw[:, None] * v).astype(np.complex64)))
            for v in power_bases
        ],
        dc=np.asarray(dc, dtype=np.float64).reshape(-1) * np.ones(s),
        log_weights=np.log(weights / weights.sum()),
        n_inplanes=w,
        ring_weights=grid.weights,
        error=error,
        chunk_size=s,
        source=templates,
    )
    # complex coefficients, then their real forms (:func:`_stacked_coefficients`: 2 copies)
    per_view = 8 * (sum(bank.ranks) + sum(v.shape[1] for v in power_bases)) + 32 * sum(bank.ranks)
    if per_view * s <= max_bytes:
        parts = [
            _project(templates[lo : lo + chunk], bank, xp, kept[i] if keep else None)
            for i, lo in enumerate(range(0, s, chunk))
        ]
        # kept in the order the search takes the views (one chunk: no gather per batch)
        bank.cache_views = bank.chunks()[0]
        at = xp.asarray(bank.cache_views)
        bank.cache = tuple(
            [
                xp.ascontiguousarray(xp.concatenate([p[i][q] for p in parts], axis=1)[:, at])
                for q in range(q_count)
            ]
            for i in range(2)
        )
        bank.stacked = _stacked_coefficients(bank.cache[0], xp)
        bank.source = None
    else:
        bank.chunk_size = max(min_chunk, int(max_bytes // per_view))
    return bank


# --- images ------------------------------------------------------------------------------
# --- images ------------------------------------------------------------------------------
@dataclass
class ImageBatch:
    """Images prepared for the search (see :func:`prepare_images`)."""

    stacked: list  # per q (D, M, 2 H_q) float32: the compressed images, rows [Re a, -Im a]
    power: list  # per q: (M, H'_q) complex64, |CTF|^2 spectra in the power bases
    syy: np.ndarray  # (M,) real-space sum of squares about the mean
    ctf0: np.ndarray  # (M,) CTF at k = 0
    n_pixels: int
    n_displacements: int
    displacements: np.ndarray | None = None  # (D, 2) pixels

    @property
    def n_images(self) -> int:
        return len(self.syy)

    def neighbours(self, count: int = 9) -> np.ndarray:
        """(D, count) indices of each displacement's ``count`` nearest (itself first); all D
        of them when the displacements are not known."""
        count = min(count, self.n_displacements)
        if self.displacements is None:
            return np.tile(np.arange(self.n_displacements), (self.n_displacements, 1))
        d = np.asarray(self.displacements, dtype=np.float64)
        dist = np.hypot(*(d[:, None] - d[None]).transpose(2, 0, 1))
        return np.argsort(dist, axis=1, kind="stable")[:, :count]

    def coarse(self) -> np.ndarray:
        """Indices of every other displacement along x and y (those an even number of grid
        steps from the middle one), or all when there are no more than 9."""
        if self.displacements is None or self.n_displacements <= 9:
            return np.arange(self.n_displacements)
        d = np.asarray(self.displacements, dtype=np.float64)
        keep = np.ones(len(d), dtype=bool)
        for axis in range(2):
            values = np.unique(d[:, axis])
            rank = np.searchsorted(values, d[:, axis])
            keep &= (rank - len(values) // 2) % 2 == 0
        return np.flatnonzero(keep)


def shift_angles(grid: PolarGrid, displacements, half: bool = False) -> np.ndarray:
    """2 pi k.d on the polar grid for displacements (..., 2) in pixels: (..., R, W) float64
    (the phase of :func:`shift_phases`); ``half``: the first half of the angles only."""
    kx, ky = grid.points(half=half)
    d = np.asarray(displacements, dtype=np.float64)
    return 2 * np.pi * (d[..., 0, None, None] * kx + d[..., 1, None, None] * ky)


def shift_phases(grid: PolarGrid, displacements, xp=np, half: bool = False):
    """exp(2 pi i k.d) on the polar grid for displacements (..., 2) in pixels: (..., R, W)
    complex64 (multiplying an image's transform by it moves the particle from d to 0);
    ``half``: the first half of the angles only."""
    return xp.asarray(np.exp(1j * shift_angles(grid, displacements, half)).astype(np.complex64))


def prepare_images(
    values,
    ctf,
    syy,
    ctf0,
    grid: PolarGrid,
    bank: TemplateBank,
    displacements,
    centres=None,
    group: int | None = None,
) -> ImageBatch:
    """CTF-multiplied, displaced, compressed images (and their |CTF|^2 for S_cc).

    values (M, R, W) complex: transforms of the mean-removed images; ctf (M, R, W) real;
    syy (M,) sums of squares about the mean; ctf0 (M,) the CTF at k = 0; displacements
    (D, 2) pixels; centres (M, 2) pixels added to every displacement (prior shifts) or None.
    Works on ``group`` displacements of every image at a time (default: about 4 MB of
    shifted values), on half the angles (the values of real images are Hermitian, and so
    are the CTF and the shift phases); the angular spectra are two real matrix products
    over all rings (:func:`.rotation_dft.half_circle_matrix`: even q come from the real
    parts of the values alone, odd q from the imaginary parts).

    The compressed images a = y V (complex, H_q per q) are kept as real rows
    [Re a, -Im a] (blocks of H_q; rows: displacement, image), so that real products with
    the coefficients c stacked as [Re c; Im c] and [Im c; -Re c] give the planes Re(a c)
    and Im(a c) (see :func:`search`). The angular spectra come out
    q-major (the half-circle matrix on the left: per q, Re y_q and Im y_q are (rows, R)
    blocks), projected by two real products, with [Re V, -Im V] and [-Im V, -Re V]
    (together [Re a | -Im a]).
    """
    xp = array_module(values)
    fft = fft_module(xp)
    m, r, w = values.shape
    half = w // 2
    q_count = half + 1
    d = np.asarray(displacements, dtype=np.float64).reshape(-1, 2)
    dcount = len(d)
    ctf = xp.asarray(ctf, dtype=xp.float32)
    weighted = (values[..., :half] * ctf[..., :half]).astype(xp.complex64)  # (M, R, W/2)
    w_re, w_im = xp.ascontiguousarray(weighted.real), xp.ascontiguousarray(weighted.imag)
    # the half-circle DFT: even q from Re y only, odd q from Im y only (two products)
    odd = np.arange(q_count) % 2 == 1
    dft = half_circle_matrix(w).reshape(half, 2, q_count, 2)  # (l, Re/Im y, q, Re/Im A)
    from_re = xp.asarray(np.ascontiguousarray(dft[:, 0, ~odd].reshape(half, -1).T))
    from_im = xp.asarray(np.ascontiguousarray(dft[:, 1, odd].reshape(half, -1).T))
    # per q, [Re y_q | Im y_q] @ [[Re V, -Im V], [-Im V, -Re V]] = [Re a | -Im a]
    by_re = [xp.concatenate([b.real, -b.imag], axis=1) for b in bank.bases]  # (R, 2 H_q)
    by_im = [xp.concatenate([-b.imag, -b.real], axis=1) for b in bank.bases]
    if group is None:
        group = max(1, int(4e6 // (8 * m * r * half)))
    stacked = [xp.empty((dcount, m, 2 * b.shape[1]), dtype=xp.float32) for b in bank.bases]
    size = min(group, dcount) * m * r
    buffers = [xp.empty(size * half, dtype=xp.float32) for _ in range(3)] + [
        xp.empty(size * rows_, dtype=xp.float32) for rows_ in (from_re.shape[0], from_im.shape[0])
    ]
    scratch = xp.empty((size // r, 2 * max(b.shape[1] for b in bank.bases)), xp.float32)
    for d0 in range(0, dcount, group):
        d1 = min(dcount, d0 + group)
        rows = (d1 - d0) * m
        at = d[d0:d1, None] if centres is None else d[None, d0:d1] + np.asarray(centres)[:, None]
        if centres is not None:
            at = np.moveaxis(at, 1, 0)  # (g, M, 2)
        phase = xp.asarray(shift_angles(grid, at, half=True).astype(np.float32))  # (g, 1|M, R, W/2)
        cos, sin = xp.cos(phase), xp.sin(phase)
        shape = (d1 - d0, m, r, half)
        shifted_re, shifted_im, tmp = (b[: rows * r * half].reshape(shape) for b in buffers[:3])
        xp.multiply(w_re, cos, out=shifted_re)
        xp.multiply(w_im, sin, out=tmp)
        xp.subtract(shifted_re, tmp, out=shifted_re)
        xp.multiply(w_re, sin, out=shifted_im)
        xp.multiply(w_im, cos, out=tmp)
        xp.add(shifted_im, tmp, out=shifted_im)
        even = buffers[3][: from_re.shape[0] * rows * r].reshape(-1, rows * r)
        odd_ = buffers[4][: from_im.shape[0] * rows * r].reshape(-1, rows * r)
        xp.matmul(from_re, shifted_re.reshape(rows * r, half).T, out=even)
        xp.matmul(from_im, shifted_im.reshape(rows * r, half).T, out=odd_)
        spectra = (
            even.reshape(-1, 2, rows, r),  # even q: (q/2, Re/Im, rows, R)
            odd_.reshape(-1, 2, rows, r),  # odd q
        )
        for q in range(q_count):
            h = bank.bases[q].shape[1]
            y = spectra[q % 2][q // 2]
            out = stacked[q][d0:d1].reshape(rows, 2 * h)
            xp.matmul(y[0], by_re[q], out=out)
            xp.matmul(y[1], by_im[q], out=scratch[:rows, : 2 * h])
            out += scratch[:rows, : 2 * h]
    # |CTF|^2 spectra in the power bases, for S_cc(m, s, k) (see :func:`_scc`)
    c2 = xp.moveaxis(fft.rfft(ctf * ctf, axis=-1), -1, 0)  # (Q, M, R)
    power = [xp.ascontiguousarray(c2[q]) @ bank.power_bases[q] for q in range(q_count)]
    return ImageBatch(
        stacked,
        power,
        np.asarray(syy, dtype=np.float64),
        np.asarray(ctf0, dtype=np.float64),
        grid.box * grid.box,
        dcount,
        d,
    )


def _scc(batch: ImageBatch, power_coefficients, dc, dft: InverseRotationDFT):
    """S_cc(k, m, s) = sum_r w_r sum_l C_m^2(l) |T_s|^2(l - k) - (C_m(0) T_s(0))^2 / N for the
    views of ``power_coefficients``: (M, S, W) float32 (the spectra products per q, then the
    inverse DFT over q as one real product). |CTF|^2 and |T|^2 are centrosymmetric, so the
    power bases of odd q are empty and S_cc is pi-periodic: the even q's half suffices."""
    xp = array_module(batch.power[0])
    m, s = batch.n_images, power_coefficients[0].shape[1]
    odd_empty = all(power_coefficients[q].shape[0] == 0 for q in dft.order[dft.even_rows // 2 :])
    planes = xp.empty((dft.even_rows if odd_empty else dft.rows, m * s), dtype=xp.float32)
    for p in range(len(planes) // 2):
        q = dft.order[p]
        prod = (batch.power[q] @ power_coefficients[q]).reshape(-1)  # (M S,) complex64
        planes[2 * p], planes[2 * p + 1] = prod.real, prod.imag
    if odd_empty:
        half = planes.T @ dft.even.T
        scc = xp.concatenate([half, half], axis=1).reshape(m, s, dft.w)
    else:
        scc = dft(planes).T.reshape(m, s, dft.w)
    scc -= xp.asarray(
        ((batch.ctf0[:, None] * dc[None, :]) ** 2 / batch.n_pixels).astype(np.float32)
    )[:, :, None]
    return xp.maximum(scc, 1e-30)


# --- search ------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Per image: best normalized cross-correlation and where (template, displacement index,
    rotation step k of the engine), log L there, and the integrated log L."""

    rho: np.ndarray
    template: np.ndarray
    displacement: np.ndarray
    rotation: np.ndarray
    ll_optimal: np.ndarray
    ll_integrated: np.ndarray
    n_evaluated: int = 0  # (image, view, displacement) triples that went through the inverse DFT
    n_triples: int = 0
    extra: dict = field(default_factory=dict)


LOG2E = 1.0 / math.log(2.0)
TILE_COLUMNS = 2048  # columns (triples) per tile of the inverse DFT: (W, 2048) float32 = 1 MB
POOL_COLUMNS = 512  # surviving triples gathered over displacement groups before evaluation
SEED_STRIDE = 4  # views of a chunk that the seeding pass's first step evaluates: 1 in this
LOW_Q = 16  # spectra whose exact part of cc the second bound takes (the rest: triangle)
SEED_EXACT = 32  # views per image the seeding evaluates exactly (those of largest bound)
BOUND_SLOTS = 8  # spectra planes whose magnitudes are added to the bound at once (in cache)
SKIP_GROUPS = 8  # displacement groups evaluated without the bound after one where it pruned nothing
OVERFLOW = 100.0  # largest log2 of one term of a tile's likelihood sums (float32: < 128)


class _Accumulator:
    """Per image (host arrays): best rho, its pose and log L there; the likelihood summed
    over evaluated poses in units of 2^ref2 (log2 units throughout: ll2 = log2 of a pose's
    likelihood x prior, without the image's constant); floor2, the largest log2 of one
    evaluated (view, displacement)'s sum seen (a lower bound on the image's total: pruning)."""

    def __init__(self, m: int, margin2: float):
        self.rho = np.full(m, -np.inf)
        self.template = np.zeros(m, dtype=np.int64)
        self.displacement = np.zeros(m, dtype=np.int64)
        self.rotation = np.zeros(m, dtype=np.int64)
        self.ll_at_best_rho = np.full(m, -np.inf)
        self.ref2 = np.full(m, -np.inf)
        self.total = np.zeros(m)
        self.floor2 = np.full(m, -np.inf)
        self.margin2 = margin2

    def add_best(self, img, rho, template, disp, rot, ll_pose):
        """Candidates (arrays over some poses): keep each image's largest rho."""
        order = np.lexsort((-rho, img))
        first = np.ones(len(order), dtype=bool)
        first[1:] = img[order][1:] != img[order][:-1]
        pick = order[first]
        i = img[pick]
        better = rho[pick] > self.rho[i]
        i, pick = i[better], pick[better]
        self.rho[i] = rho[pick]
        self.template[i] = template[pick]
        self.displacement[i] = disp[pick]
        self.rotation[i] = rot[pick]
        self.ll_at_best_rho[i] = ll_pose[pick]

    def raise_ref(self, ref2):
        """Move the sums' reference up to ``ref2`` (M,) where it is higher."""
        new = np.maximum(self.ref2, ref2)
        seen = np.isfinite(self.ref2)
        self.total[seen] *= np.exp2(self.ref2[seen] - new[seen])
        self.ref2 = new


@dataclass
class _Chunk:
    """One chunk of views: their numbers, S_cc, 1 / sqrt(S_yy S_cc), the pose-independent
    log2 terms, and the coefficients as real matrices."""

    views: np.ndarray  # (c,) template numbers
    scc: object  # (M, c, W) float32
    inv: object  # (M, c, W) float32
    lscc2: object  # (M, c, W) float32: (-1/2 ln(N S_cc) + ln prior) log2(e)
    coef: list  # per q (2, 2 H_q, c) float32: rows [Re c; Im c] and [Im c; -Re c]
    lmin: np.ndarray | None = None  # (M, c) float64 (host): lscc2's smallest over rotations
    lmax: np.ndarray | None = None  # (M, c) float64 (host): its largest
    inv_max: np.ndarray | None = None  # (M, c) float64 (host): inv's largest over rotations
    lmin_views: np.ndarray | None = None  # (M,) lmax's smallest over the views
    coef_rows: list | None = None  # per q (c, 2, 2 H_q): coef's copy, one row per view


@dataclass
class _Context:
    xp: object
    dft: InverseRotationDFT
    w: int
    half_n: float
    n_pixels: int
    m: int
    dcount: int
    stacked: list  # per q (D, M, 2 H_q): the images (see :func:`prepare_images`)
    prune: bool
    full_output: object
    buffers: dict  # reused arrays
    neighbours: np.ndarray  # (D, nb) each displacement's nearest (see ImageBatch.neighbours)
    coarse: np.ndarray  # displacements of the seeding's first round
    low_part: tuple  # (row ranges, (W, 2 LOW_Q) matrix, weights) of the second bound
    skip_bound: int = 0  # groups to evaluate without the bound (it pruned nothing lately)
    weights: dict = field(default_factory=dict)  # (first slot, count): the bound's c'_q
    group_rows: dict = field(default_factory=dict)  # (d0, d1): see :func:`_group_rows`

    def slot_weights(self, p0: int, count: int):
        """c'_q (1, 1/2 at q = 0 and W/2) of the spectra slots p0..p0 + count, float32."""
        key = (p0, count)
        if key not in self.weights:
            qs = self.dft.order[p0 : p0 + count]
            self.weights[key] = self.xp.asarray(_bound_weights(qs, self.w))
        return self.weights[key]

    group: int = 1  # displacements per product (see :func:`_search_block`)


def search(
    batch: ImageBatch,
    bank: TemplateBank,
    template_block: int = 64,
    ll_tolerance: float = 1e-4,
    prune: bool = True,
    full_output=None,
    seed_views: int = 16,
    block_bytes: float = 8e6,
) -> SearchResult:
    """Best pose and log-likelihoods of every image of ``batch`` against ``bank``.

    Views go in blocks of ``template_block`` at most, and displacements in groups whose
    spectra planes (4 x 2 (W/2+1) x M bytes per view and displacement) fit ``block_bytes``
    (so that they stay in the caches). For a block and a group, the products of every image
    and displacement with every view are two real matrix products per q (one call; see
    :func:`prepare_images`), giving spectra planes (Re X_q, Im X_q) x
    (displacement, image, view); each q's |X_q| goes into the triangle bound on |cc|
    (``prune``) right after its product. The columns that survive the bound go through the
    inverse DFT over q (:class:`.rotation_dft.InverseRotationDFT`, in tiles of
    :data:`TILE_COLUMNS`), which gives at once each column's largest rho and its likelihood
    summed over the W rotations.

    The likelihood of a pose relative to the image's reference ``ref2`` (log2 units) is
    (beta (1 - rho_+^2))^(-(N-2)/2) with beta = 2^(-(lscc2 + lprior2 - ref2) / ((N-2)/2)):
    with r = cc sqrt(beta) / sqrt(S_yy S_cc), it is exp2(-(N-2)/2 log2(beta - r_+^2)), a
    few passes over the tile; rho itself is only computed for the columns whose largest r
    could beat the image's best rho. The reference follows the best poses seen, and is
    raised before a tile whose terms could leave float32's range.

    ``full_output``: an array-like (M, S, D, W) that receives every normalized
    cross-correlation (no pruning then). ``ll_tolerance``: the share of the integrated
    likelihood that pruning may leave out. ``seed_views``: views per image evaluated
    first in each chunk (those best at the central displacement), to start pruning from a
    good floor.
    """
    xp = array_module(batch.stacked[0])
    m, dcount, w = batch.n_images, batch.n_displacements, bank.n_inplanes
    n = batch.n_pixels
    dft = InverseRotationDFT(w, xp)
    prune = prune and full_output is None
    acc = _Accumulator(m, math.log2(bank.n_templates * dcount * w / ll_tolerance))
    sb = max(1, min(int(template_block), int(block_bytes // (4 * dft.rows * m))))
    ctx = _Context(
        xp=xp,
        dft=dft,
        w=w,
        half_n=(n - 2) / 2.0,
        n_pixels=n,
        m=m,
        dcount=dcount,
        stacked=batch.stacked,
        prune=prune,
        full_output=full_output,
        buffers={},
        neighbours=batch.neighbours(9),
        low_part=_scaled_low_part(dft),
        coarse=batch.coarse(),
        group=max(1, int(block_bytes // (4 * dft.rows * m * sb))),
    )
    syy = xp.asarray(batch.syy, dtype=xp.float32)[:, None, None]
    lprior = bank.log_weights - math.log(dcount * w)
    n_eval = 0
    for views in bank.chunks():
        coefficients, power = bank.coefficients(views)
        cached = bank.stacked is not None and coefficients is bank.cache[0]
        coef, coef_rows = bank.stacked if cached else _stacked_coefficients(coefficients, xp)
        scc = _scc(batch, power, bank.dc[views], dft)  # (M, c, W)
        chunk = _Chunk(
            views=views,
            scc=scc,
            inv=(1.0 / xp.sqrt(scc * syy)).astype(xp.float32),
            lscc2=(
                (-0.5 * xp.log(n * scc) + xp.asarray(lprior[views].astype(np.float32))[:, None])
                * LOG2E
            ).astype(xp.float32),
            coef=coef,
            coef_rows=coef_rows,
        )
        del coefficients
        chunk.lmin = to_numpy(chunk.lscc2.min(axis=2)).astype(np.float64)
        chunk.lmax = to_numpy(chunk.lscc2.max(axis=2)).astype(np.float64)
        chunk.inv_max = to_numpy(chunk.inv.max(axis=2)).astype(np.float64)
        chunk.lmin_views = chunk.lmax.min(axis=1)
        if seed_views > 0:
            _seed(acc, ctx, chunk, seed_views)
        for lo in range(0, len(views), sb):
            n_eval += _search_block(acc, ctx, chunk, lo, min(len(views), lo + sb))
    c = bioem_constant(n, batch.syy)
    return SearchResult(
        rho=acc.rho,
        template=acc.template,
        displacement=acc.displacement,
        rotation=acc.rotation,
        ll_optimal=c + acc.ll_at_best_rho,
        ll_integrated=c + (acc.ref2 + np.log2(acc.total)) / LOG2E,
        n_evaluated=n_eval,
        n_triples=m * dcount * bank.n_templates,
    )


def _bound_weights(qs, w: int) -> np.ndarray:
    """c'_q = W/2 c_q (1, 1/2 at q = 0 and W/2): the triangle bound's weights, float32."""
    return (irfft_weights(qs, w) * (w / 2)).astype(np.float32)


def _scaled_low_part(dft: InverseRotationDFT):
    """:meth:`.InverseRotationDFT.low_part` for q < LOW_Q in the triangle bound's units (W/2
    times the correlations'): (row ranges, matrix, the low q's weights c'_q)."""
    runs, matrix, qs = dft.low_part(LOW_Q)
    return runs, matrix * np.float32(dft.w / 2), dft.xp.asarray(_bound_weights(qs, dft.w))


def _stacked_coefficients(coefficients, xp) -> tuple:
    """Per q, the views' coefficients c (H_q, c) as real rows [Re c; Im c] and [Im c; -Re c]
    (2, 2 H_q, c), views into one array (2, sum 2 H_q, c) (the columns of all q are filled
    at once); and per q their copy (c, 2, 2 H_q), one row per view: the seeding gathers
    those."""
    sizes = [2 * c.shape[0] for c in coefficients]
    both = xp.empty((2, sum(sizes), coefficients[0].shape[1]), dtype=xp.float32)
    views, lo = [], 0
    for c, size in zip(coefficients, sizes, strict=True):
        h = size // 2
        view = both[:, lo : lo + size]
        view[0, :h], view[0, h:] = c.real, c.imag
        view[1, :h], view[1, h:] = c.imag, -c.real
        views.append(view)
        lo += size
    return views, [xp.ascontiguousarray(v.transpose(2, 0, 1)) for v in views]


def _buffer(ctx: _Context, name: str, shape, dtype=None):
    """A reused array of at least ``shape``'s size, viewed as ``shape``."""
    xp = ctx.xp
    dtype = xp.float32 if dtype is None else dtype
    size = math.prod(shape)
    buf = ctx.buffers.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = xp.empty(size, dtype=dtype)
        ctx.buffers[name] = buf
    return buf[:size].reshape(shape)


@dataclass
class _Block:
    """Views lo..hi of a chunk; arrays over its columns (image, view) = image * sb + view."""

    lo: int
    hi: int
    ref: object  # (M, 1) float32: the images' references ref2 the block's beta is taken at
    bmin: np.ndarray  # (M*sb,) smallest beta over rotations (host, float64)
    bmax: np.ndarray  # (M*sb,) largest
    img: np.ndarray  # (M*sb,) image of each column
    local: np.ndarray  # (M*sb,) view of each column (index into the chunk)
    threshold: object = None  # (M*sb,) raw bound below which a triple is pruned
    can_prune: bool = False  # some threshold above 0
    dense: tuple | None = None  # (invp, beta) (W, M*sb) of every column, once needed

    @property
    def sb(self) -> int:
        return self.hi - self.lo


def _block(acc: _Accumulator, ctx: _Context, chunk: _Chunk, lo: int, hi: int) -> _Block:
    """Per-column arrays of views lo..hi at the images' current references. beta =
    2^((ref2 - lscc2) / ((N-2)/2)) and invp = inv sqrt(beta) (W values per column) are
    computed for the columns that are evaluated (:func:`_columns`); their extremes over the
    rotations come from lscc2's (float32, as beta itself: exp2 is monotonic)."""
    xp, m = ctx.xp, ctx.m
    sb = hi - lo
    unset = ~np.isfinite(acc.ref2)
    if unset.any():  # first sums: the rho = 0 level
        acc.raise_ref(np.where(unset, chunk.lmax[:, lo:hi].max(axis=1), -np.inf))
    ref = acc.ref2.astype(np.float32)[:, None]

    def beta_at(l2):
        return _beta(ctx, ref, l2.astype(np.float32), np).reshape(-1).astype(np.float64)

    blk = _Block(
        lo=lo,
        hi=hi,
        ref=xp.asarray(ref),
        bmin=beta_at(chunk.lmax[:, lo:hi]),
        bmax=beta_at(chunk.lmin[:, lo:hi]),
        img=np.repeat(np.arange(m), sb),
        local=np.tile(np.arange(lo, hi), m),
    )
    if ctx.prune:
        _set_threshold(acc, ctx, chunk, blk)
    return blk


def _set_threshold(acc: _Accumulator, ctx: _Context, chunk: _Chunk, blk: _Block) -> None:
    """The block's pruning threshold from the images' current best rho and floor: a triple
    is kept when bound * max_k inv >= min(best rho, the rho whose log L reaches the floor
    minus the margin)."""
    inv_max, lmax = chunk.inv_max[:, blk.lo : blk.hi], chunk.lmax[:, blk.lo : blk.hi]  # (M, sb)
    gap = (acc.floor2[:, None] - acc.margin2 - lmax) / ctx.half_n
    with np.errstate(invalid="ignore", over="ignore"):
        need = np.sqrt(np.clip(1.0 - np.exp2(-gap), 0.0, 1.0))
    need = np.where(np.isfinite(gap), need, 0.0)
    rho_min = np.minimum(np.maximum(acc.rho, 0.0)[:, None], need)
    blk.threshold = ctx.xp.asarray((rho_min / inv_max).reshape(-1).astype(np.float32))
    blk.can_prune = bool((rho_min > 0).any())


def _search_block(acc: _Accumulator, ctx: _Context, chunk: _Chunk, lo: int, hi: int) -> int:
    """Every image x displacement against views lo..hi of the chunk; returns the number of
    (image, view, displacement) triples evaluated.

    Displacements go in groups of ``ctx.group`` (their spectra planes stay in the caches):
    per q one product over the group's displacements and the images ([2 g M x 2 H_q] @
    [2 H_q x sb]) fills the planes (Re X_q, Im X_q) of every triple, and |X_q| is added to
    the triangle bound at once; then the triples the bound keeps are gathered into tiles for
    :func:`_evaluate` (kept until :data:`POOL_COLUMNS` have gathered: fewer, larger calls)."""
    xp, m, dcount = ctx.xp, ctx.m, ctx.dcount
    sb = hi - lo
    acc.raise_ref(acc.floor2)
    blk = _block(acc, ctx, chunk, lo, hi)
    rows, n = ctx.dft.rows, m * sb
    evaluated = 0
    pool = []  # (tile of spectra planes, columns, displacements) not evaluated yet
    coefs = [chunk.coef[q][:, :, lo:hi] for q in ctx.dft.order]  # per slot (2, 2 H_q, sb)
    stale = False  # the floors rose since the threshold was set
    for d0 in range(0, dcount, ctx.group):
        d1 = min(dcount, d0 + ctx.group)
        g = d1 - d0
        if ctx.prune and stale:
            _set_threshold(acc, ctx, chunk, blk)
            stale = False
        planes = _buffer(ctx, "planes", (rows // 2, 2, g * n))  # columns (d, image, view)
        bound = None
        if ctx.prune and ctx.skip_bound <= 0 and blk.can_prune:
            bound = _buffer(ctx, "bound", (g * n,))
            bound[:] = 0.0
        images = _group_rows(ctx, d0, d1)
        outs = planes.reshape(rows // 2, 2, g * m, sb)
        for p0 in range(0, rows // 2, BOUND_SLOTS):
            p1 = min(rows // 2, p0 + BOUND_SLOTS)
            for p in range(p0, p1):
                xp.matmul(images[p], coefs[p], out=outs[p])
            if bound is not None:
                _add_magnitudes(ctx, planes[p0:p1], p0, bound)
        ctx.skip_bound -= 1
        if bound is not None:
            # the bound is sum_q c_q |X_q| with c_q = 2/W (1/W at q = 0 and W/2)
            threshold = blk.threshold * np.float32(ctx.w / 2)
            alive = to_numpy(xp.flatnonzero(bound.reshape(g, n) >= threshold))
            if 2 * len(alive) < g * n:  # few: gather them into tiles
                flat = planes.reshape(rows, g * n)
                alive = _second_bound(ctx, flat, bound, alive, threshold)
                if len(alive):
                    tile = xp.take(flat, xp.asarray(alive), axis=1)
                    pool.append((tile, alive % n, d0 + alive // n))
                if sum(len(c) for _, c, _ in pool) >= POOL_COLUMNS:
                    blk = _evaluate_pool(acc, ctx, chunk, blk, pool)
                    stale = True
                evaluated += len(alive)
                continue
            if 10 * len(alive) > 9 * g * n:  # the bound prunes nothing (noise): skip it a while
                ctx.skip_bound = SKIP_GROUPS
        per_tile = max(1, TILE_COLUMNS // sb) * sb  # whole images per tile
        for j in range(g):
            at_d = planes[:, :, j * n : (j + 1) * n].reshape(rows, n)  # a view, rows strided
            for c0 in range(0, n, per_tile):
                c1 = min(n, c0 + per_tile)
                cols = np.arange(c0, c1)
                blk = _evaluate(acc, ctx, chunk, blk, at_d[:, c0:c1], cols, d0 + j, True)
        evaluated += g * n
        stale = True
    _evaluate_pool(acc, ctx, chunk, blk, pool)
    return evaluated


def _group_rows(ctx: _Context, d0: int, d1: int) -> list:
    """Per slot, the images' rows at displacements d0..d1 as (1, g M, 2 H_q) (made once per
    search: every block of views takes the same groups)."""
    if (d0, d1) not in ctx.group_rows:
        rows = [ctx.stacked[q][d0:d1].reshape(1, (d1 - d0) * ctx.m, -1) for q in ctx.dft.order]
        ctx.group_rows[d0, d1] = rows
    return ctx.group_rows[d0, d1]


def _evaluate_pool(acc, ctx, chunk, blk, pool: list) -> _Block:
    """:func:`_evaluate` the pooled tiles (emptied) in tiles of :data:`TILE_COLUMNS`."""
    if not pool:
        return blk
    xp = ctx.xp
    tiles = xp.concatenate([t for t, _, _ in pool], axis=1) if len(pool) > 1 else pool[0][0]
    cols, disp = (np.concatenate([p[i] for p in pool]) for i in (1, 2))
    pool.clear()
    for c0 in range(0, len(cols), TILE_COLUMNS):
        at = slice(c0, c0 + TILE_COLUMNS)
        blk = _evaluate(acc, ctx, chunk, blk, tiles[:, at], cols[at], disp[at], False)
    return blk


def _second_bound(ctx: _Context, flat, bound, alive: np.ndarray, threshold) -> np.ndarray:
    """The columns of ``alive`` (indices into the planes ``flat`` (rows, g n)) that a tighter
    bound keeps: the exact largest over rotations of the part of cc from q < LOW_Q, plus
    the triangle bound of the rest (``bound`` minus the low q's magnitudes), at least
    ``threshold`` (n,) (both in the triangle bound's units). On realistic particles about
    1 in 6 of the triangle bound's survivors remain."""
    xp = ctx.xp
    runs, matrix, weights = ctx.low_part
    n = threshold.shape[0]
    keep = []
    for c0 in range(0, len(alive), 4 * TILE_COLUMNS):
        cols = alive[c0 : c0 + 4 * TILE_COLUMNS]
        ix = xp.asarray(cols)
        low = xp.concatenate([xp.take(flat[run], ix, axis=1) for run in runs])  # (2 Q, c)
        top = (matrix @ low).max(axis=0)
        xp.square(low, out=low)
        magnitudes = xp.sqrt(low[0::2] + low[1::2])  # (Q, c)
        top += xp.take(bound, ix) - weights @ magnitudes
        # float32 sums: a relative margin keeps the bound on the safe side
        need = xp.take(threshold, xp.asarray(cols % n)) * np.float32(1 - 1e-4)
        keep.append(cols[to_numpy(top >= need)])
    return np.concatenate(keep) if keep else alive


def _triangle_bound(ctx: _Context, planes):
    """sum_q c'_q |X_q| (c'_q = 1, 1/2 at q = 0 and W/2) of spectra planes (slots, 2, n) in
    the order of the inverse DFT's slots: (n,)."""
    xp = ctx.xp
    bound = xp.zeros(planes.shape[-1], dtype=xp.float32)
    order = ctx.dft.order
    for p0 in range(0, len(order), BOUND_SLOTS):
        p1 = min(len(order), p0 + BOUND_SLOTS)
        _add_magnitudes(ctx, planes[p0:p1], p0, bound)
    return bound


def _add_magnitudes(ctx: _Context, planes, p0: int, bound) -> None:
    """bound += sum_q c'_q |X_q| for planes (slots, 2, n): (Re X_q, Im X_q) of the slots
    from p0 (c'_q = 1, 1/2 at q = 0 and W/2: :meth:`_Context.slot_weights`)."""
    xp = ctx.xp
    sq = _buffer(ctx, "square", planes.shape)
    xp.square(planes, out=sq)
    mag = sq[:, 0]
    xp.add(sq[:, 0], sq[:, 1], out=mag)
    xp.sqrt(mag, out=mag)
    bound += ctx.slot_weights(p0, len(planes)) @ mag


def _evaluate(acc, ctx, chunk, blk, planes, cols, d, dense) -> _Block:
    """Exact likelihood sums over the W rotations of the triples (columns ``cols`` of the
    block, displacement ``d``: one, or one per column) whose spectra planes are ``planes``;
    best poses among them.
    ``dense``: ``cols`` is a run of whole images. Returns the block (rebuilt when a
    reference had to be raised)."""
    xp, w = ctx.xp, ctx.w
    n = planes.shape[1]
    img = blk.img[cols]
    for _ in range(8):
        cc = ctx.dft(planes, out=_buffer(ctx, "cc", (w, n)), scratch=_buffer(ctx, "dft", (w, n)))
        if ctx.full_output is not None:
            _write_full(ctx, chunk, blk, cc, cols, d)
        invp, beta = _columns(ctx, chunk, blk, cols, dense)
        r = cc
        r *= invp  # rho sqrt(beta)
        rmax = to_numpy(r.max(axis=0)).astype(np.float64)
        # largest log2 term of each column: -(N-2)/2 log2(beta_min - rmax_+^2)
        room = blk.bmin[cols] - np.maximum(rmax, 0.0) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            top = np.where(room > 0, -ctx.half_n * np.log2(np.maximum(room, 1e-300)), np.inf)
        high = top > OVERFLOW
        if not high.any():
            break
        if not np.isfinite(top[high]).all():  # rho ~ 1: float32 could not hold it
            cap = np.sqrt(blk.bmin[cols] * (1 - 1e-6)).astype(np.float32)
            r = xp.minimum(r, xp.asarray(cap))
            break
        raise_to = np.full(ctx.m, -np.inf)
        np.maximum.at(raise_to, img[high], acc.ref2[img[high]] + top[high] - OVERFLOW / 2)
        acc.raise_ref(raise_to)
        blk = _block(acc, ctx, chunk, blk.lo, blk.hi)
    # rho <= r / sqrt(beta): columns whose largest rho could beat the image's best
    upper = rmax / np.sqrt(np.where(rmax >= 0, blk.bmin[cols], blk.bmax[cols]))
    cand = np.flatnonzero(upper > acc.rho[img])
    if len(cand):
        cx = xp.asarray(cand)
        rho = xp.take(r, cx, axis=1) / xp.sqrt(xp.take(beta, cx, axis=1))  # exact rho
        disp = np.broadcast_to(np.asarray(d), cols.shape)[cand]
        _update_best(acc, ctx, chunk, rho, img[cand], blk.local[cols[cand]], disp)
    # terms below 2^-OVERFLOW of the reference are negligible; exp2 is slow below 2^-126
    clamp = bool((ctx.half_n * np.log2(blk.bmax[cols]) > OVERFLOW).any())
    sums = _likelihood_sums(ctx, r, beta, clamp)
    with np.errstate(divide="ignore"):
        col2 = np.log2(sums) + acc.ref2[img]
    if dense:
        i0, i1 = img[0], img[-1] + 1
        acc.total[i0:i1] += sums.reshape(i1 - i0, -1).sum(axis=1)
        acc.floor2[i0:i1] = np.maximum(acc.floor2[i0:i1], col2.reshape(i1 - i0, -1).max(axis=1))
    else:
        acc.total += np.bincount(img, weights=sums, minlength=ctx.m)
        np.maximum.at(acc.floor2, img, col2)
    return blk


def _beta(ctx: _Context, ref, l2, xp, out=None):
    """beta = 2^((ref2 - lscc2) / ((N-2)/2)) in float32 (``out``: in place, e.g. on l2)."""
    beta = xp.subtract(ref, l2, out=out)
    beta *= np.float32(1.0 / ctx.half_n)
    return xp.exp2(beta, out=beta)


def _columns(ctx: _Context, chunk: _Chunk, blk: _Block, cols, dense: bool):
    """(invp, beta) (W, len(cols)) of the block's columns ``cols`` (``dense``: a run of
    whole images: slices of the block's arrays, computed once for all its columns; else
    gathered from the chunk's rows and returned as transposed views)."""
    xp, w = ctx.xp, ctx.w
    if dense:
        if blk.dense is None:
            beta = _beta(ctx, blk.ref[:, :, None], chunk.lscc2[:, blk.lo : blk.hi], xp)
            invp = chunk.inv[:, blk.lo : blk.hi] * xp.sqrt(beta)
            blk.dense = tuple(xp.ascontiguousarray(a.reshape(-1, w).T) for a in (invp, beta))
        return tuple(a[:, cols[0] : cols[-1] + 1] for a in blk.dense)
    img = blk.img[cols]
    ix = xp.asarray(img * len(chunk.views) + blk.local[cols])  # rows of (M c, W)
    l2 = xp.take(chunk.lscc2.reshape(-1, w), ix, axis=0)
    beta = _beta(ctx, xp.take(blk.ref, xp.asarray(img), axis=0), l2, xp, out=l2)
    invp = xp.take(chunk.inv.reshape(-1, w), ix, axis=0)
    invp *= xp.sqrt(beta)
    return invp.T, beta.T


def _likelihood_sums(ctx: _Context, r, beta, clamp: bool) -> np.ndarray:
    """sum over rotations of (beta - r_+^2)^(-(N-2)/2) per column, in place on r (W, n);
    ``clamp``: terms below 2^-OVERFLOW set to that."""
    xp = ctx.xp
    n = r.shape[1]
    bounds = ctx.buffers.get("bounds")
    if bounds is None or bounds.shape[1] < n:
        bounds = xp.empty((2, max(n, TILE_COLUMNS)), dtype=xp.float32)
        bounds[0], bounds[1] = 0.0, -OVERFLOW
        ctx.buffers["bounds"] = bounds
    xp.maximum(r, bounds[0:1, :n], out=r)  # (a row broadcast runs faster than a scalar)
    xp.square(r, out=r)
    xp.subtract(beta, r, out=r)
    xp.log2(r, out=r)
    r *= np.float32(-ctx.half_n)
    if clamp:
        xp.maximum(r, bounds[1:2, :n], out=r)
    xp.exp2(r, out=r)
    ones = ctx.buffers.get("ones")
    if ones is None:
        ones = ctx.buffers["ones"] = xp.ones(r.shape[0], dtype=xp.float32)
    return to_numpy(ones @ r).astype(np.float64)  # the sum over rotations as a product


def _update_best(acc, ctx, chunk, rho, img, local, disp) -> np.ndarray:
    """Each image's best column of exact rho (W, n) (triples img, local view, disp): its
    best rotation and log L there, into ``acc`` where it beats the image's best. Returns
    every column's largest rho (n,); the argmax over rotations is taken for at most one
    column per image."""
    xp = ctx.xp
    cmax = to_numpy(rho.max(axis=0)).astype(np.float64)
    better = np.flatnonzero(cmax > acc.rho[img])  # few once the seeding has run
    order = better[np.lexsort((-cmax[better], img[better]))]  # per image, largest first
    first = np.ones(len(order), dtype=bool)
    first[1:] = img[order][1:] != img[order][:-1]
    pick = order[first]  # ties: the first column (lexsort is stable)
    if len(pick):
        rot = to_numpy(xp.argmax(rho[:, xp.asarray(pick)], axis=0))
        scc = to_numpy(chunk.scc[xp.asarray(img[pick]), xp.asarray(local[pick]), xp.asarray(rot)])
        rp = np.clip(cmax[pick], 0.0, 1.0 - 1e-12)
        ll = -ctx.half_n * np.log1p(-rp * rp) - 0.5 * np.log(ctx.n_pixels * scc.astype(np.float64))
        acc.add_best(img[pick], cmax[pick], chunk.views[local[pick]], disp[pick], rot, ll)
    return cmax


def _write_full(ctx, chunk, blk, cc, cols, d):
    """Normalized cross-correlations of a dense tile (W, n) into the full output (M, S, D,
    W)."""
    w, sb = ctx.w, blk.sb
    i0, i1 = blk.img[cols[0]], blk.img[cols[-1]] + 1
    inv = chunk.inv[i0:i1, blk.lo : blk.hi].reshape(-1, w)
    rho = to_numpy(cc.T * inv).reshape(i1 - i0, sb, w)
    ctx.full_output[i0:i1, chunk.views[blk.lo : blk.hi], d] = rho


def _seed(acc: _Accumulator, ctx: _Context, chunk: _Chunk, k: int, rounds: int = 2):
    """Raise each image's best rho and pruning floor before a chunk's main pass. Each round:
    rho of every view at one displacement per image (the centre first, then the image's
    best so far; the products for all, the inverse DFT for the :data:`SEED_EXACT` views of
    largest triangle bound), then of the image's ``k`` best views there at some
    displacements: every other one along x and y in the first round
    (:meth:`ImageBatch.coarse`), the 9 nearest the image's best in the next
    (:meth:`ImageBatch.neighbours`); all evaluated exactly. These count for the best pose
    and the floor only (the main pass sums them into the likelihood). The second round is
    skipped when no pose could be pruned (pure noise)."""
    xp, m, dcount, w = ctx.xp, ctx.m, ctx.dcount, ctx.w
    n_views = len(chunk.views)
    k = min(k, n_views)
    order, rows = ctx.dft.order, ctx.dft.rows
    where = np.full(m, dcount // 2)  # the grid's middle point, (0, 0) for odd sizes
    at, images = xp.asarray(where), xp.arange(m)
    for step in range(rounds):
        # first round: the first views of the chunk only (a pseudo-random sample of the
        # sphere, 1 in SEED_STRIDE), enough to find each image's displacement
        c = n_views if step else min(n_views, max(k, -(-n_views // SEED_STRIDE)))
        planes = _buffer(ctx, "seed", (rows // 2, 2 * m, c))
        for p, q in enumerate(order):
            a = ctx.stacked[q][at, images]  # (M, 2H)
            xp.matmul(a[None], chunk.coef[q][:, :, :c], out=planes[p].reshape(2, m, c))
        # exactly only the views whose triangle bound on rho is among the image's largest
        e = min(c, SEED_EXACT)
        bound = _triangle_bound(ctx, planes.reshape(rows // 2, 2, -1))  # (M c,)
        upper = to_numpy(bound).reshape(m, c) * chunk.inv_max[:, :c]
        pick = np.argpartition(-upper, e - 1, axis=1)[:, :e]  # (M, e)
        cols = xp.asarray((pick + c * np.arange(m)[:, None]).reshape(-1))
        rho = ctx.dft(xp.take(planes.reshape(rows, -1), cols, axis=1)).reshape(w, m, e)
        rho *= chunk.inv[images[:, None], xp.asarray(pick)].transpose(2, 0, 1)
        img = np.repeat(np.arange(m), e)
        cmax = _exact_update(acc, ctx, chunk, rho.reshape(w, -1), img, pick.reshape(-1), where[img])
        best = np.argpartition(-cmax.reshape(m, e), k - 1, axis=1)[:, :k]
        top = np.take_along_axis(pick, best, axis=1)  # (M, k)
        top_x = xp.asarray(top)
        # displacements: every other one first, then those around each image's best
        dsel = np.tile(ctx.coarse, (m, 1)) if step == 0 else ctx.neighbours[where]
        nd = dsel.shape[1]
        rows_x = xp.asarray((dsel * m + np.arange(m)[:, None]).reshape(-1))  # (image, nd)
        views_x = xp.asarray(top.reshape(-1))
        planes = _buffer(ctx, "seed2", (rows // 2, 2, m, nd, k))
        for p, q in enumerate(order):
            a = xp.take(ctx.stacked[q].reshape(dcount * m, -1), rows_x, axis=0)
            coef = xp.take(chunk.coef_rows[q], views_x, axis=0).reshape(m, k, 2, -1)
            xp.matmul(a.reshape(1, m, nd, -1), coef.transpose(2, 0, 3, 1), out=planes[p])
        cc = ctx.dft(planes.reshape(rows, -1)).reshape(w, m, nd, k)
        inv = chunk.inv[images[:, None], top_x].transpose(2, 0, 1)  # (W, M, k)
        rho = (cc * inv[:, :, None, :]).reshape(w, -1)
        img = np.repeat(np.arange(m), nd * k)
        local = np.repeat(top[:, None, :], nd, axis=1).reshape(-1)
        disp = np.repeat(dsel, k, axis=1).reshape(-1)
        _exact_update(acc, ctx, chunk, rho, img, local, disp)
        if step and np.array_equal(acc.displacement, where):
            break
        if not (acc.floor2 - acc.margin2 - chunk.lmin_views > 0).any():
            break  # no pose is far enough below the best for pruning (noise): more is waste
        where = acc.displacement.copy()
        at = xp.asarray(where)


def _exact_update(acc, ctx, chunk, rho, img, local, disp) -> np.ndarray:
    """Best poses and pruning floor from exact rho (W, n) of triples (img, local view,
    disp); returns each column's largest rho. The floor takes, per column, the log2
    likelihood x prior of its largest rho with the column's smallest S_cc term (a lower
    bound on the pose's own: every value it takes is that of an evaluated pose or less)."""
    cmax = _update_best(acc, ctx, chunk, rho, img, local, disp)
    rp = np.clip(cmax, 0.0, 1.0 - 1e-6)
    top = -ctx.half_n * np.log2(1.0 - rp * rp) + chunk.lmin[img, local]
    np.maximum.at(acc.floor2, img, top)
    return cmax
