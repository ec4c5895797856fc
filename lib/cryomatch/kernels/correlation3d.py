"""Cross-correlations of 3D volumes over a small window of shifts, as matrix products.

For a subvolume v and a template t (real, (z, y, x), box n),

    c(d) = sum_x t(x) v(x + d) = 1/N sum_k V(k) conj(T(k)) exp(2 pi i k.d / n)

(N voxels; circular in the box). Only shifts |d| <= max_shifts are wanted, so instead of
one inverse FFT per (subvolume, rotation) pair the inverse DFT is evaluated on the window
alone, separably: a contraction over kz with an (w, nz) phase matrix, then ky, then kx.
The kz contraction is batched over the (ky, kx) pairs as one matrix product of
[subvolumes x window] by [kz] by [rotations] per pair, so the rotated templates' spectra
are read once per batch of subvolumes; the pairs are kx-major, so that a block of kx
columns holds whole ky lines for the next two contractions. Complex products run as one
real product of twice the size (OpenBLAS multi-threads many small complex products
badly; real ones take its small-matrix path, and one larger product uses it better than
four). With a few templates (a mask's local statistics) the products of the spectra come
first and each contraction is one matrix product over all pairs. Shifts need not be
integers: the same sum is the band-limited interpolation of the correlation (Nyquist
planes must be zero), which the sub-voxel peak search uses (cf. the matrix-multiply DFT
of Guizar-Sicairos, Thurman and Fienup, Opt. Lett. 33, 156, 2008).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, fft_module

# working set per subvolume of one block of (ky, kx) pairs: on CPUs (one or a few
# subvolumes at a time) small enough for the caches (measured 1.3-1.6x faster than 8 MiB
# with 125 templates). Per subvolume, so that the blocks, and the sums' rounding, do not
# depend on how many subvolumes are batched together
CHUNK_BYTES = 2**20
FEW_TEMPLATES = 8  # up to this many templates, products first (see _few_templates)
PRODUCT_BYTES = 64 * 2**20  # _few_templates' products of one block of subvolumes


def rfft_spectra(volumes):
    """rfftn over the last three axes as complex64: (..., nz, ny, nx) -> (..., nz, ny, nx//2+1)."""
    xp = array_module(volumes)
    fft = fft_module(xp)
    return fft.rfftn(volumes, axes=(-3, -2, -1)).astype(xp.complex64, copy=False)


def template_layout(spectra):
    """Templates' spectra (R, nz, ny, kx) in the layout the correlations read: per
    frequency pair, the real parts of their conjugates over kz stacked on the imaginary
    parts, float32 (P, 2 nz, R), contiguous, the P = kx * ny pairs in :func:`pair_order`
    (kx-major)."""
    xp = array_module(spectra)
    conj = pair_order(xp.conj(spectra)).transpose(2, 1, 0)  # (P, nz, R)
    return xp.ascontiguousarray(
        xp.concatenate([conj.real, conj.imag], axis=1).astype(xp.float32, copy=False)
    )


def layout_spectra(layout):
    """The conjugated spectra (P, nz, R) complex64 of a :func:`template_layout`."""
    nz = layout.shape[1] // 2
    return layout[:, :nz] + 1j * layout[:, nz:]


def pair_order(spectra):
    """Spectra (..., nz, ny, kx) as (..., nz, P), the (ky, kx) pairs kx-major (p = ikx * ny +
    iky): a block of kx columns holds whole ky lines."""
    return spectra.swapaxes(-1, -2).reshape(spectra.shape[:-2] + (-1,))


def rfft_order(per_pair, ny: int):
    """The inverse of :func:`pair_order` for arrays (P, nz, ...) in the layout's pair order:
    (nz, ny, kx, ...)."""
    p, nz = per_pair.shape[:2]
    out = per_pair.reshape((p // ny, ny, nz) + per_pair.shape[2:])
    return out.transpose((2, 1, 0) + tuple(range(3, out.ndim)))


def columns_of(layout, index=None):
    """Templates by column, (n, P, nz) complex64, from a :func:`template_layout` (all
    columns, or those in ``index``)."""
    xp = array_module(layout)
    if index is not None:
        layout = layout[..., xp.asarray(index)]
    return xp.ascontiguousarray(layout_spectra(layout).transpose(2, 0, 1).astype(xp.complex64))


def shift_grid(max_shifts, step: float = 1.0, centre=(0.0, 0.0, 0.0)) -> list[np.ndarray]:
    """Per-axis shift coordinates ``centre +- max_shift`` at ``step`` (z, y, x)."""
    out = []
    for m, c in zip(max_shifts, centre, strict=True):
        n = int(np.floor(m / step + 1e-9))
        out.append(c + step * np.arange(-n, n + 1, dtype=np.float64))
    return out


def _phases(n: int, coords, half: bool, xp):
    """exp(2 pi i k d / n) as (*coords.shape, K) complex64, k = fftfreq (or rfftfreq) * n."""
    k = np.fft.rfftfreq(n) * n if half else np.fft.fftfreq(n) * n
    e = np.exp(2j * np.pi * np.asarray(coords, dtype=np.float64)[..., None] * k / n)
    return xp.asarray(e.astype(np.complex64))


def window_correlation(spectra, templates, shape, coords):
    """Correlations over a window of shifts, for every (subvolume, template) pair.

    spectra (S, nz, ny, nx//2+1): rfftn of the subvolumes (Nyquist planes zero);
    templates (P, 2 nz, R): :func:`template_layout` of R templates' rfftn; shape
    (nz, ny, nx); coords: shift coordinates (z, y, x) in voxels, each a 1D array (see
    :func:`shift_grid`). Returns float32 (S, R, wz, wy, wx): ``sum_x t_r(x) v_s(x + d)``.
    The pairs are taken a block of kx columns at a time (working set ~ CHUNK_BYTES per
    subvolume); per block the contraction over ky is one matrix product per kx, that over
    kx (real part only) one accumulated product.
    """
    xp = array_module(spectra)
    nz, ny, nx = shape
    s, r = spectra.shape[0], templates.shape[-1]
    kx = nx // 2 + 1
    cz, cy, cx = coords
    wz, wy, wx = len(cz), len(cy), len(cx)
    m = s * wz * r
    ez = _phases(nz, cz, False, xp)  # (wz, nz)
    ey = _phases(ny, cy, False, xp)  # (wy, ny)
    # kx half-spectrum: the other half is the complex conjugate (weight 2), except kx = 0
    # (and the Nyquist plane, which is zero); 1/N normalizes the inverse DFT.
    hermitian = np.full(kx, 2.0)
    hermitian[0] = 1.0
    ex = _phases(nx, cx, True, xp) * xp.asarray((hermitian / (nz * ny * nx)).astype(np.float32))
    a_all = pair_order(spectra)  # (S, nz, P)
    if r <= FEW_TEMPLATES:
        return _few_templates(a_all, templates, ez, ey, ex)
    eys = xp.ascontiguousarray(xp.concatenate([ey.real, ey.imag]))  # (2 wy, ny)
    exr, exi = xp.ascontiguousarray(ex.real), xp.ascontiguousarray(ex.imag)
    out = xp.zeros((wx, wy * m), dtype=xp.float32)
    sw = s * wz
    cols = max(1, int(CHUNK_BYTES // (wz * r * 8 * ny)))
    used = nx // 2 if nx % 2 == 0 else kx  # the Nyquist column (zero) is left out
    for c0 in range(0, used, cols):
        c1 = min(used, c0 + cols)
        pairs = slice(c0 * ny, c1 * ny)
        # contraction over kz, batched over the (ky, kx) pairs, the complex product X B of
        # the subvolumes' phased spectra X (S wz, nz) and the templates' B (nz, R) as one
        # real one: [[Xr, -Xi], [Xi, Xr]] (2 S wz, 2 nz) @ [Br; Bi] (2 nz, R) = [Re; Im]
        a = a_all[:, :, pairs].transpose(2, 0, 1)[:, :, None, :] * ez  # (Pc, S, wz, nz)
        a = a.reshape(-1, sw, nz)
        x = xp.empty((len(a), 2 * sw, 2 * nz), dtype=xp.float32)
        x[:, :sw, :nz] = a.real
        xp.negative(a.imag, out=x[:, :sw, nz:])
        x[:, sw:, :nz] = a.imag
        x[:, sw:, nz:] = a.real
        c = xp.matmul(x, templates[pairs])  # (Pc, 2 S wz, R)
        cr, ci = c[:, :sw], c[:, sw:]
        # contraction over ky per kx column: [ey_r; ey_i] (2 wy, ny) @ (ny, S wz R)
        n = c1 - c0
        yr = xp.matmul(eys, cr.reshape(n, ny, m))  # [ey_r Cr; ey_i Cr] (n, 2 wy, m)
        yi = xp.matmul(eys, ci.reshape(n, ny, m))  # [ey_r Ci; ey_i Ci]
        y_re = yr[:, :wy]
        y_re -= yi[:, wy:]
        y_im = yi[:, :wy]
        y_im += yr[:, wy:]
        # contraction over these kx, real part only, accumulated: (wx, wy S wz R)
        out += exr[:, c0:c1] @ y_re.reshape(n, wy * m)
        out -= exi[:, c0:c1] @ y_im.reshape(n, wy * m)
    c = out.reshape(wx, wy, s, wz, r).transpose(2, 4, 3, 1, 0)
    return xp.ascontiguousarray(c)


def _few_templates(a_all, templates, ez, ey, ex):
    """:func:`window_correlation` for a few templates (a mask's local statistics), spectra
    a_all (S, nz, P) in pair order: the products of the spectra first, then each
    contraction as one matrix product per subvolume over all its templates and pairs (per
    pair they would be matrices of a few columns). Subvolumes a block at a time (products
    within PRODUCT_BYTES)."""
    xp = array_module(a_all)
    s, nz = a_all.shape[:2]
    r = templates.shape[-1]
    wz, wy, wx = len(ez), len(ey), len(ex)
    # the (ky, kx) -> (dy, dx) inverse DFT as one matrix: E[(dy, dx), (kx, ky)], pair order
    e2 = (ey[:, None, None, :] * ex[None, :, :, None]).reshape(wy * wx, -1)
    e2r, e2i = xp.ascontiguousarray(e2.real.T), xp.ascontiguousarray(e2.imag.T)
    b = layout_spectra(templates).astype(xp.complex64).transpose(1, 2, 0)  # (nz, R, P)
    a = a_all[:, :, None]
    out = xp.empty((s, r, wz, wy, wx), dtype=xp.float32)
    step = max(1, int(PRODUCT_BYTES // (r * a[0].size * 8)))
    for lo in range(0, s, step):
        prod = (a[lo : lo + step] * b[None]).reshape(len(a[lo : lo + step]), nz, -1)
        c = xp.matmul(ez, prod).reshape(len(prod), wz * r, -1)  # over kz: (n, wz * R, P)
        real = xp.matmul(c.real, e2r)  # over (ky, kx), real part: (n, wz * R, wy * wx)
        real -= xp.matmul(c.imag, e2i)
        out[lo : lo + len(prod)] = real.reshape(-1, wz, r, wy, wx).transpose(0, 2, 1, 3, 4)
    return out


def paired_window_correlation(spectra, columns, shape, coords):
    """Like :func:`window_correlation`, with K templates and K windows per subvolume.

    columns (S*K, P, nz): templates' conjugated spectra by column, see :func:`columns_of`
    (column s*K + k pairs with subvolume s), or (1, P, nz) (one for all); coords: three
    (S, K, w) arrays of shifts (or (S, w) for K = 1). Returns float32 (S, K, wz, wy, wx)
    (or (S, wz, wy, wx)).
    """
    xp = array_module(spectra)
    nz, ny, nx = shape
    s = spectra.shape[0]
    kx = nx // 2 + 1
    single = np.ndim(coords[0]) == 2
    cz, cy, cx = (np.asarray(c, dtype=np.float64).reshape(s, -1, np.shape(c)[-1]) for c in coords)
    k = cz.shape[1]
    wz, wy, wx = cz.shape[-1], cy.shape[-1], cx.shape[-1]
    hermitian = np.full(kx, 2.0)
    hermitian[0] = 1.0
    ez = _phases(nz, cz, False, xp)  # (S, K, wz, nz)
    ey = _phases(ny, cy, False, xp)  # (S, K, wy, ny)
    ex = _phases(nx, cx, True, xp) * xp.asarray((hermitian / (nz * ny * nx)).astype(np.float32))
    b = columns.reshape(s, k, ny * kx, nz) if len(columns) > 1 else columns[None]
    a = pair_order(spectra)[:, None].swapaxes(-1, -2)  # (S, 1, P, nz)
    c = xp.matmul(a * b, xp.swapaxes(ez, -1, -2))  # contraction over kz: (S, K, P, wz)
    c = xp.matmul(ey[:, :, None], c.reshape(s, k, kx, ny, wz))  # over ky: (S, K, kx, wy, wz)
    c = c.transpose(0, 1, 3, 4, 2).reshape(s, k, wy * wz, kx)
    c = xp.matmul(c, xp.swapaxes(ex, -1, -2)).real  # over kx: (S, K, wy * wz, wx)
    c = c.reshape(s, k, wy, wz, wx).transpose(0, 1, 3, 2, 4)
    c = xp.ascontiguousarray(c.astype(xp.float32, copy=False))
    return c[:, 0] if single else c
