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
rest go through the inverse FFT. The bound is accumulated while each q's product is in
cache. A seeding pass (every view at one displacement, then all displacements of the best
views) and views taken in a pseudo-random order, in blocks growing from 8, bring each
image's floor near its final value early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import gammaln

from ..backend import array_module, fft_module, to_numpy
from ..errors import CryomatchError
from .polar import hermitian_angular_spectra
from .polar_fourier import PolarGrid


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
            sel = xp.asarray(index)
            return (
                [xp.ascontiguousarray(c[:, sel]) for c in self.cache[0]],
                [xp.ascontiguousarray(c[:, sel]) for c in self.cache[1]],
            )
        order = np.argsort(index)  # read the memory map in file order
        chunk = np.asarray(self.source[np.asarray(index)[order]])
        coefs, power = _project(chunk, self, xp)
        back = xp.asarray(np.argsort(order))
        return [c[:, back] for c in coefs], [c[:, back] for c in power]


def _project(chunk, bank: TemplateBank, xp):
    """Coefficients of templates (c, R, W) in the bank's bases: conj(B V)^T = V^H B^H per q
    (B the sqrt(w)-weighted spectra, so that X = (y sqrt(w) V) @ coefficients); the same for
    the power spectra in the power bases."""
    spectra, power = _spectra(chunk, len(bank.bases))

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
    tolerance: float = 1e-4,
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
    for lo in range(0, s, chunk):
        spectra, power = _spectra(templates[lo : lo + chunk], q_count)
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
    per_view = 8 * (sum(bank.ranks) + sum(v.shape[1] for v in power_bases))
    if per_view * s <= max_bytes:
        parts = [_project(templates[lo : lo + chunk], bank, xp) for lo in range(0, s, chunk)]
        bank.cache = tuple(
            [xp.concatenate([p[i][q] for p in parts], axis=1) for q in range(q_count)]
            for i in range(2)
        )
        bank.source = None
    else:
        bank.chunk_size = max(min_chunk, int(max_bytes // per_view))
    return bank


# --- images ------------------------------------------------------------------------------
@dataclass
class ImageBatch:
    """Images prepared for the search (see :func:`prepare_images`)."""

    projected: list  # per q: (M*D, H_q) complex64
    power: list  # per q: (M, H'_q) complex64, |CTF|^2 spectra in the power bases
    syy: np.ndarray  # (M,) real-space sum of squares about the mean
    ctf0: np.ndarray  # (M,) CTF at k = 0
    n_pixels: int
    n_displacements: int

    @property
    def n_images(self) -> int:
        return len(self.syy)


def shift_phases(grid: PolarGrid, displacements, xp=np, half: bool = False):
    """exp(2 pi i k.d) on the polar grid for displacements (..., 2) in pixels: (..., R, W)
    complex64 (multiplying an image's transform by it moves the particle from d to 0);
    ``half``: the first half of the angles only."""
    kx, ky = grid.points(half=half)
    d = np.asarray(displacements, dtype=np.float64)
    phase = d[..., 0, None, None] * kx + d[..., 1, None, None] * ky
    return xp.asarray(np.exp(2j * np.pi * phase).astype(np.complex64))


def prepare_images(
    values,
    ctf,
    syy,
    ctf0,
    grid: PolarGrid,
    bank: TemplateBank,
    displacements,
    centres=None,
    group: int = 2,
) -> ImageBatch:
    """CTF-multiplied, displaced, compressed images (and their |CTF|^2 for S_cc).

    values (M, R, W) complex: transforms of the mean-removed images; ctf (M, R, W) real;
    syy (M,) sums of squares about the mean; ctf0 (M,) the CTF at k = 0; displacements
    (D, 2) pixels; centres (M, 2) pixels added to every displacement (prior shifts) or None.
    Works on ``group`` images at a time (cache-sized), on half the angles (the values of
    real images are Hermitian, and so are the CTF and the shift phases).
    """
    xp = array_module(values)
    fft = fft_module(xp)
    m, r, w = values.shape
    half = w // 2
    q_count = half + 1
    d = np.asarray(displacements, dtype=np.float64).reshape(-1, 2)
    dcount = len(d)
    ctf = xp.asarray(ctf, dtype=xp.float32)
    # angles first: (W/2, M, R); the FFTs over the angle then run across contiguous rows
    weighted = xp.ascontiguousarray(xp.moveaxis(values[..., :half] * ctf[..., :half], -1, 0))
    shared = None
    if centres is None:
        shared = xp.ascontiguousarray(
            xp.moveaxis(shift_phases(grid, d, xp, half=True), -1, 0)
        )  # (W/2, D, R)
    projected = [xp.empty((m * dcount, b.shape[1]), dtype=xp.complex64) for b in bank.bases]
    for g0 in range(0, m, group):
        g1 = min(m, g0 + group)
        if shared is None:
            phases = shift_phases(grid, d[None] + np.asarray(centres)[g0:g1, None], xp, half=True)
            phases = xp.moveaxis(phases, -1, 0)  # (W/2, g, D, R)
        else:
            phases = shared[:, None]
        shifted = weighted[:, g0:g1, None, :] * phases  # (W/2, g, D, R)
        spectra = hermitian_angular_spectra(shifted, w, axis=0).reshape(
            q_count, -1, r
        )  # (Q, g*D, R)
        for q in range(q_count):
            xp.matmul(spectra[q], bank.bases[q], out=projected[q][g0 * dcount : g1 * dcount])
    # |CTF|^2 spectra in the power bases, for S_cc(m, s, k) (see :func:`_scc`)
    c2 = xp.moveaxis(fft.rfft(ctf * ctf, axis=-1), -1, 0)  # (Q, M, R)
    power = [xp.ascontiguousarray(c2[q]) @ bank.power_bases[q] for q in range(q_count)]
    return ImageBatch(
        projected,
        power,
        np.asarray(syy, dtype=np.float64),
        np.asarray(ctf0, dtype=np.float64),
        grid.box * grid.box,
        dcount,
    )


def _scc(batch: ImageBatch, power_coefficients, dc, w: int):
    """S_cc(k, m, s) = sum_r w_r sum_l C_m^2(l) |T_s|^2(l - k) - (C_m(0) T_s(0))^2 / N for the
    views of ``power_coefficients``: (W, M, S) float32."""
    xp = array_module(batch.power[0])
    prod = xp.stack(
        [p @ c for p, c in zip(batch.power, power_coefficients, strict=True)]
    )  # (Q, M, S)
    scc = fft_module(xp).irfft(prod, n=w, axis=0)
    scc -= xp.asarray(
        ((batch.ctf0[:, None] * dc[None, :]) ** 2 / batch.n_pixels).astype(np.float32)
    )
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
    n_evaluated: int = 0  # (image, view, displacement) triples that went through the inverse FFT
    n_triples: int = 0
    extra: dict = field(default_factory=dict)


class _Accumulator:
    """Running best pose, log-sum-exp and pruning floor per image (host arrays)."""

    def __init__(self, m: int, margin: float):
        self.rho = np.full(m, -np.inf)
        self.template = np.zeros(m, dtype=np.int64)
        self.displacement = np.zeros(m, dtype=np.int64)
        self.rotation = np.zeros(m, dtype=np.int64)
        self.ll_at_best_rho = np.full(m, -np.inf)
        self.ll_ref = np.full(m, -np.inf)  # reference of the log-sum-exp
        self.ll_sum = np.zeros(m)  # sum over evaluated poses of exp(log L + log prior - ref)
        self.floor = np.full(m, -np.inf)  # largest log L + log prior seen (pruning)
        self.margin = margin

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

    def add_floor(self, img, block_max):
        np.maximum.at(self.floor, img, block_max)

    def add_logsumexp(self, img, block_max, block_sum):
        """Per-candidate max and sum of exp(ll - max) folded into each image's total."""
        new = self.ll_ref.copy()
        np.maximum.at(new, img, block_max)
        seen = np.isfinite(self.ll_ref)
        self.ll_sum[seen] *= np.exp(self.ll_ref[seen] - new[seen])
        np.add.at(self.ll_sum, img, block_sum * np.exp(block_max - new[img]))
        self.ll_ref = new

    def alive(self, bound, img, view_ll_max, half_n) -> np.ndarray:
        """Which triples, given bounds on their rho, could beat their image's best rho or
        add more than the tolerance to its integrated likelihood."""
        b = np.clip(bound, 0.0, 1.0 - 1e-7)
        ll_bound = -half_n * np.log1p(-b * b) + view_ll_max
        return (bound >= self.rho[img]) | (ll_bound >= self.floor[img] - self.margin)


@dataclass
class _Context:
    xp: object
    fft: object
    w: int
    half_n: float
    dcount: int
    inv: object  # (W, M, S) 1 / sqrt(S_yy S_cc), S the chunk's views
    lscc: object  # (W, M, S) -1/2 log(N S_cc)
    lprior: np.ndarray  # (S,) log view weight - log(D W)
    cq: np.ndarray  # (Q,) weights of |X_q| in the bound on |cc|
    view_ids: np.ndarray  # (S,) template numbers of the chunk's views
    inv_rows: object  # (M*S, W) inv and lscc, one row per (image, view), for gathers
    lscc_rows: object


@dataclass
class _Block:
    """Product spectra x (Q, M*D, Sb) of every image with Sb views; views (M, Sb) per image
    (the same row for every image, except in the seeding pass)."""

    x: object
    views: np.ndarray

    @property
    def sb(self) -> int:
        return self.views.shape[1]


def search(
    batch: ImageBatch,
    bank: TemplateBank,
    template_block: int = 32,
    ll_tolerance: float = 1e-4,
    prune: bool = True,
    full_output=None,
    seed_views: int = 16,
) -> SearchResult:
    """Best pose and log-likelihoods of every image of ``batch`` against ``bank``.

    ``full_output``: an array-like (M, S, D, W) that receives every normalized
    cross-correlation (no pruning then). ``ll_tolerance``: the share of the integrated
    likelihood that pruning may leave out. ``seed_views``: views per image evaluated
    first in each chunk (those best at the central displacement), to start pruning from a
    good floor.
    """
    xp = array_module(batch.projected[0])
    m, dcount, w = batch.n_images, batch.n_displacements, bank.n_inplanes
    q_count = w // 2 + 1
    n = batch.n_pixels
    cq = np.full(q_count, 2.0 / w, dtype=np.float32)  # irfft's 1/W, q = 1..W/2-1 doubled
    cq[0] = 1.0 / w
    if w % 2 == 0:
        cq[-1] = 1.0 / w
    acc = _Accumulator(m, math.log(bank.n_templates * dcount * w / ll_tolerance))
    prune = prune and full_output is None
    syy = xp.asarray(batch.syy, dtype=xp.float32)[None, :, None]
    lprior = bank.log_weights - math.log(dcount * w)
    n_eval = 0
    for c, views in enumerate(bank.chunks()):
        coefficients, power = bank.coefficients(views)
        scc = _scc(batch, power, bank.dc[views], w)  # (W, M, c)
        inv = (1.0 / xp.sqrt(scc * syy)).astype(xp.float32)
        lscc = (-0.5 * xp.log(n * scc)).astype(xp.float32)
        ctx = _Context(
            xp=xp,
            fft=fft_module(xp),
            w=w,
            half_n=(n - 2) / 2.0,
            dcount=dcount,
            inv=inv,
            lscc=lscc,
            lprior=lprior[views],
            cq=cq,
            view_ids=views,
            inv_rows=xp.ascontiguousarray(inv.reshape(w, -1).T),
            lscc_rows=xp.ascontiguousarray(lscc.reshape(w, -1).T),
        )
        if prune and seed_views > 0:
            _seed(acc, ctx, batch, coefficients, seed_views)
        lo, step = 0, min(template_block, 8 if c == 0 else template_block)
        while lo < len(views):
            local = np.arange(lo, min(len(views), lo + step))
            lo += step
            step = min(template_block, 2 * step)
            n_eval += _search_block(acc, ctx, batch, coefficients, local, prune, full_output)
    c = bioem_constant(n, batch.syy)
    return SearchResult(
        rho=acc.rho,
        template=acc.template,
        displacement=acc.displacement,
        rotation=acc.rotation,
        ll_optimal=c + acc.ll_at_best_rho,
        ll_integrated=c + acc.ll_ref + np.log(acc.ll_sum),
        n_evaluated=n_eval,
        n_triples=m * dcount * bank.n_templates,
    )


def _search_block(acc, ctx, batch, coefficients, local, prune, full_output) -> int:
    """The products of every image x displacement with the views ``local`` (indices into
    the chunk), their bound, and the exact evaluation of the triples that survive it.
    Returns the number of triples evaluated."""
    xp = ctx.xp
    m, dcount, w, sb = batch.n_images, ctx.dcount, ctx.w, len(local)
    q_count = len(coefficients)
    sel = xp.asarray(local)
    x = xp.empty((q_count, m * dcount, sb), dtype=xp.complex64)
    if prune:  # bound sum_q c_q |X_q| accumulated while each X_q is still in cache
        bound = xp.zeros((m * dcount, sb), dtype=xp.float32)
        mag = xp.empty((m * dcount, sb), dtype=xp.float32)
    for q in range(q_count):
        xp.matmul(batch.projected[q], xp.ascontiguousarray(coefficients[q][:, sel]), out=x[q])
        if prune:
            xp.abs(x[q], out=mag)
            mag *= ctx.cq[q]
            bound += mag
    block = _Block(x, np.broadcast_to(local, (m, sb)))
    if not prune:
        everything = np.arange(m * dcount * sb)
        cc = _evaluate(
            acc, ctx, block, everything, chunk=len(everything) if full_output is not None else 1024
        )
        if full_output is not None:
            full_output[:, ctx.view_ids[local]] = to_numpy(
                xp.transpose(cc.reshape(m, dcount, sb, w), (0, 2, 1, 3))
            )
        return len(everything)
    inv_max = ctx.inv[:, :, sel].max(axis=0)  # (M, Sb)
    view_ll_max = to_numpy(ctx.lscc[:, :, sel].max(axis=0)) + ctx.lprior[local][None, :]
    bound = to_numpy(bound.reshape(m, dcount, sb) * inv_max[:, None, :]).reshape(-1)
    rows, cols = np.divmod(np.arange(bound.size), sb)
    img = rows // dcount
    alive = np.flatnonzero(acc.alive(bound, img, view_ll_max[img, cols], ctx.half_n))
    if len(alive):
        _evaluate(acc, ctx, block, alive)
    return len(alive)


def _seed(
    acc: _Accumulator, ctx: _Context, batch: ImageBatch, coefficients, k: int, rounds: int = 2
):
    """Raise each image's best rho and pruning floor before a chunk's main pass. Each round:
    rho of every view at one displacement per image (1/D of the work; the centre first,
    then the image's best so far), then every displacement of the image's ``k`` best views
    there, evaluated exactly. These count for the best pose and the floor only (the main
    pass sums them into the likelihood)."""
    xp = ctx.xp
    m, dcount = batch.n_images, batch.n_displacements
    k = min(k, coefficients[0].shape[1])
    where = np.full(m, dcount // 2)  # the grid's middle point, (0, 0) for odd sizes
    for _ in range(rounds):
        rows = xp.asarray(np.arange(m) * dcount + where)
        x0 = xp.stack(
            [
                xp.take(p, rows, axis=0) @ c
                for p, c in zip(batch.projected, coefficients, strict=True)
            ]
        )
        rho0 = (ctx.fft.irfft(x0, n=ctx.w, axis=0) * ctx.inv).max(axis=0)  # (M, S)
        top = np.argpartition(-to_numpy(rho0), k - 1, axis=1)[:, :k]  # (M, k)
        top_x = xp.asarray(top)
        x = xp.stack(
            [
                xp.matmul(p.reshape(m, dcount, -1), xp.moveaxis(c[:, top_x], 1, 0))  # (M, D, k)
                for p, c in zip(batch.projected, coefficients, strict=True)
            ]
        ).reshape(len(batch.projected), m * dcount, k)
        _evaluate(acc, ctx, _Block(x, top), np.arange(m * dcount * k), accumulate=False)
        if np.array_equal(acc.displacement, where):
            break
        where = acc.displacement.copy()


def _evaluate(
    acc: _Accumulator,
    ctx: _Context,
    block: _Block,
    flat: np.ndarray,
    accumulate: bool = True,
    chunk: int = 1024,
):
    """Exact rho and log L over all rotations for the triples ``flat`` (indices into
    (M*D, Sb)), in cache-sized chunks; folds them into ``acc``. Returns rho (len(flat), W)
    when ``chunk`` covers them all (the dense path), else None."""
    out = None
    for lo in range(0, len(flat), chunk):
        out = _evaluate_chunk(acc, ctx, block, flat[lo : lo + chunk], accumulate)
    return out if len(flat) <= chunk else None


def _evaluate_chunk(acc, ctx, block, flat, accumulate):
    """One chunk of :func:`_evaluate`, laid out (triple, rotation): every gather contiguous."""
    xp = ctx.xp
    rows, cols = np.divmod(flat, block.sb)
    img = rows // ctx.dcount
    views = block.views[img, cols]
    q_count = block.x.shape[0]
    spectra = xp.ascontiguousarray(
        xp.take(block.x.reshape(q_count, -1), xp.asarray(flat), axis=1).T
    )
    rho = ctx.fft.irfft(spectra, n=ctx.w, axis=-1)  # (n, W)
    pair = xp.asarray(img * ctx.inv.shape[2] + views)  # (image, view) row of inv_rows, lscc_rows
    rho *= xp.take(ctx.inv_rows, pair, axis=0)
    rot = xp.argmax(rho, axis=1)
    best = xp.take_along_axis(rho, rot[:, None], axis=1)[:, 0]
    pose = xp.maximum(rho, 0.0)
    pose *= pose
    xp.negative(pose, out=pose)
    xp.log1p(pose, out=pose)
    pose *= -ctx.half_n
    pose += xp.take(ctx.lscc_rows, pair, axis=0)
    at_best = xp.take_along_axis(pose, rot[:, None], axis=1)[:, 0]
    pose += xp.asarray(ctx.lprior[views].astype(np.float32))[:, None]
    top = pose.max(axis=1)
    acc.add_best(
        img,
        to_numpy(best),
        ctx.view_ids[views],
        rows % ctx.dcount,
        to_numpy(rot),
        to_numpy(at_best),
    )
    top_host = to_numpy(top).astype(np.float64)
    acc.add_floor(img, top_host)
    if accumulate:
        pose -= top[:, None]
        xp.exp(pose, out=pose)
        acc.add_logsumexp(img, top_host, to_numpy(pose.sum(axis=1)).astype(np.float64))
    return rho
