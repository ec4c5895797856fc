"""Batched translational registration of image pairs: cross-correlation with upsampled-DFT
refinement, and pyramid least-squares.

Convention: every function returns the shift (x, y) in pixels that, applied to ``mov``
(content moved by +shift), best matches ``ref``. Inputs are batches (n, ny, nx) of pairs.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, fft_module


def frequency_grids(ny: int, nx: int, xp=np):
    """fft2 frequency grids (ky, kx) in cycles per pixel, shapes (ny, 1) and (1, nx)."""
    return xp.fft.fftfreq(ny)[:, None], xp.fft.fftfreq(nx)[None, :]


def bandpass(ny: int, nx: int, lowpass: float | None, highpass: float | None, xp=np):
    """Gaussian band-pass on the fft2 grid: exp(-f^2 / 2 lp^2) (1 - exp(-f^2 / 2 hp^2)), with
    f, lp, hp in cycles per pixel (None: no low- or high-pass)."""
    ky, kx = frequency_grids(ny, nx, xp)
    f2 = ky**2 + kx**2
    g = xp.ones((ny, nx))
    if lowpass:
        g = g * xp.exp(-f2 / (2 * lowpass**2))
    if highpass:
        g = g * (1 - xp.exp(-f2 / (2 * highpass**2)))
    return g


def cross_power(f_ref, f_mov, whiten: float = 1.0, weight=None):
    """``F_ref conj(F_mov) / |.|^whiten`` (whiten 1: phase correlation, 0: plain
    cross-correlation), times an optional real ``weight`` on the same grid."""
    xp = array_module(f_ref)
    x = f_ref * xp.conj(f_mov)
    if whiten:
        mag = xp.abs(x)
        x = x / xp.maximum(mag, 1e-12 * float(mag.max()) + 1e-30) ** whiten
    if weight is not None:
        x = x * weight
    return x


def upsampled_peak(x, upsample_factor: int = 1, max_shift=None, refine: bool = True):
    """Peak (x, y) of the cross-correlation whose spectrum is ``x`` (n, ny, nx).

    Integer peak by inverse FFT, then (Guizar-Sicairos, Thurman & Fienup 2008, Opt. Lett.
    33:156) the correlation on a grid 1/upsample_factor apart in a 1.5-pixel window around it,
    evaluated as two batched matrix products with partial DFT matrices; ``refine`` adds a
    parabolic fit through the best grid point and its neighbours. ``max_shift`` (pixels)
    restricts the integer search.
    """
    xp = array_module(x)
    fft = fft_module(xp)
    n, ny, nx = x.shape
    cc = fft.ifft2(x, axes=(-2, -1)).real
    if max_shift is not None:
        dy = xp.abs(xp.fft.fftfreq(ny) * ny)[:, None]
        dx = xp.abs(xp.fft.fftfreq(nx) * nx)[None, :]
        cc = xp.where((dy <= max_shift) & (dx <= max_shift), cc, -xp.inf)
    flat = xp.argmax(cc.reshape(n, -1), axis=1)
    py, px = flat // nx, flat % nx
    py = xp.where(py > ny // 2, py - ny, py).astype(np.float64)
    px = xp.where(px > nx // 2, px - nx, px).astype(np.float64)
    if upsample_factor <= 1:
        peak_y, peak_x = py, px
        if refine:
            ly, lx = (py % ny).astype(np.int64), (px % nx).astype(np.int64)
            idx = xp.arange(n)
            peak_y = py + _parabola(
                cc[idx, (ly - 1) % ny, lx], cc[idx, ly, lx], cc[idx, (ly + 1) % ny, lx]
            )
            peak_x = px + _parabola(
                cc[idx, ly, (lx - 1) % nx], cc[idx, ly, lx], cc[idx, ly, (lx + 1) % nx]
            )
        return xp.stack([peak_x, peak_y], axis=1)
    size = int(np.ceil(1.5 * upsample_factor))
    size += 1 - size % 2  # odd: the integer peak sits on the centre sample
    offsets = (xp.arange(size) - size // 2) / upsample_factor  # pixels
    ky, kx = xp.fft.fftfreq(ny), xp.fft.fftfreq(nx)
    c64 = np.complex64  # single precision: batched BLAS, ample for a peak position
    ey = xp.exp(2j * np.pi * (py[:, None] + offsets[None])[:, :, None] * ky[None, None, :])
    ex = xp.exp(2j * np.pi * (px[:, None] + offsets[None])[:, None, :] * kx[None, :, None])
    up = xp.matmul(xp.matmul(ey.astype(c64), x.astype(c64, copy=False)), ex.astype(c64)).real
    flat = xp.argmax(up.reshape(n, -1), axis=1)
    jy, jx = flat // size, flat % size
    peak_y = py + offsets[jy]
    peak_x = px + offsets[jx]
    if refine:
        idx = xp.arange(n)
        inside_y = (jy > 0) & (jy < size - 1)
        inside_x = (jx > 0) & (jx < size - 1)
        cy, cx_ = xp.clip(jy, 1, size - 2), xp.clip(jx, 1, size - 2)
        dy = _parabola(up[idx, cy - 1, jx], up[idx, cy, jx], up[idx, cy + 1, jx])
        dx = _parabola(up[idx, jy, cx_ - 1], up[idx, jy, cx_], up[idx, jy, cx_ + 1])
        peak_y = peak_y + xp.where(inside_y, dy, 0.0) / upsample_factor
        peak_x = peak_x + xp.where(inside_x, dx, 0.0) / upsample_factor
    return xp.stack([peak_x, peak_y], axis=1)


def _parabola(a, b, c):
    """Vertex offset (in samples, within +-0.5) of the parabola through (-1, a), (0, b), (1, c)."""
    xp = array_module(b)
    denom = a - 2 * b + c
    safe = xp.where(xp.abs(denom) > 1e-30, denom, -1.0)
    return xp.clip(xp.where(xp.abs(denom) > 1e-30, 0.5 * (a - c) / safe, 0.0), -0.5, 0.5)


def register_translation(
    ref,
    mov,
    upsample_factor: int = 1,
    whiten: float = 1.0,
    weight=None,
    max_shift=None,
    refine: bool = True,
):
    """Shifts (n, 2) = (x, y) that register each ``mov`` image onto its ``ref`` (batched).

    ``whiten`` 1 is phase correlation (as scikit-image's ``phase_cross_correlation``), 0 plain
    cross-correlation; ``weight`` a real filter on the fft2 grid (e.g. :func:`bandpass`).
    """
    xp = array_module(ref)
    fft = fft_module(xp)
    f_ref = fft.fft2(ref, axes=(-2, -1))
    f_mov = fft.fft2(mov, axes=(-2, -1))
    return upsampled_peak(
        cross_power(f_ref, f_mov, whiten, weight), upsample_factor, max_shift, refine
    )


def block_reduce(images, factor: int = 2):
    """Average ``factor`` x ``factor`` blocks of images (n, ny, nx), cropping the remainder."""
    n, ny, nx = images.shape
    my, mx = ny // factor, nx // factor
    cropped = images[:, : my * factor, : mx * factor]
    return cropped.reshape(n, my, factor, mx, factor).mean(axis=(2, 4))


def lsq_translation(
    ref, mov, levels: int | None = None, iterations: int = 20, tolerance: float = 1e-3, start=None
):
    """Least-squares translation of ``mov`` onto ``ref`` on an image pyramid (after
    Thevenaz, Ruttimann & Unser 1998, IEEE Trans. Image Process. 7:27).

    Coarse to fine: at each level a damped Gauss-Newton (Levenberg-Marquardt) minimizes
    ``sum (ref - mov shifted by t)^2`` over the pixels that stay inside the image; the
    coarsest level starts from the integer cross-correlation peak (or ``start``). Pyramid
    levels halve the size down to about 16 pixels. Batched over pairs (n, ny, nx).
    """
    xp = array_module(ref)
    n, ny, nx = ref.shape
    if levels is None:
        levels = max(0, int(np.floor(np.log2(min(ny, nx) / 16))))
    pyramid = [(ref, mov)]
    for _ in range(levels):
        r, m = pyramid[-1]
        pyramid.append((block_reduce(r), block_reduce(m)))
    r, m = pyramid[-1]
    scale = 2.0**levels
    if start is None:
        t = register_translation(
            r - r.mean(axis=(1, 2), keepdims=True),
            m - m.mean(axis=(1, 2), keepdims=True),
            1,
            whiten=0.0,
            refine=False,
        )
    else:
        t = xp.asarray(start, dtype=np.float64) / scale
    for level in range(levels, -1, -1):
        r, m = pyramid[level]
        if level != levels:
            t = t * 2.0
        t = _gauss_newton(r, m, t, iterations, tolerance)
    return t


def _gauss_newton(ref, mov, t, iterations, tolerance):
    """Levenberg-Marquardt on the translation of each pair (n, ny, nx), from ``t`` (n, 2)."""
    xp = array_module(ref)
    fft = fft_module(xp)
    n, ny, nx = ref.shape
    ky = xp.fft.fftfreq(ny)[None, :, None]
    kx = xp.fft.rfftfreq(nx)[None, None, :]
    f_mov = fft.rfft2(mov, axes=(-2, -1))
    yy = xp.arange(ny)[None, :, None]
    xx = xp.arange(nx)[None, None, :]

    cdt = np.complex64 if ref.dtype == np.float32 else np.complex128
    # pixels whose source stays inside the image (no wrapped-around content); fixed for the
    # level so that the cost is smooth in t
    mx = xp.ceil(xp.abs(t[:, 0]))[:, None, None] + 2
    my = xp.ceil(xp.abs(t[:, 1]))[:, None, None] + 2
    mask = (xx >= mx) & (xx < nx - mx) & (yy >= my) & (yy < ny - my)
    count = xp.maximum(mask.sum(axis=(1, 2)), 1)

    def evaluate(t):
        """Mean squared residual, J^T J and J^T r at t (J = d residual / d t = grad warped)."""
        phase = xp.exp(-2j * np.pi * kx * t[:, 0, None, None]).astype(cdt) * xp.exp(
            -2j * np.pi * ky * t[:, 1, None, None]
        ).astype(cdt)
        spec = f_mov * phase
        warped = fft.irfft2(spec, s=(ny, nx), axes=(-2, -1))
        gx = fft.irfft2(spec * (2j * np.pi * kx).astype(cdt), s=(ny, nx), axes=(-2, -1))
        gy = fft.irfft2(spec * (2j * np.pi * ky).astype(cdt), s=(ny, nx), axes=(-2, -1))
        res = xp.where(mask, ref - warped, 0.0)
        gx, gy = gx * mask, gy * mask

        def total(a):  # sums in double precision: LM compares costs near the optimum
            return a.sum(axis=(1, 2), dtype=np.float64)

        h = xp.stack(
            [
                xp.stack([total(gx * gx), total(gx * gy)], -1),
                xp.stack([total(gx * gy), total(gy * gy)], -1),
            ],
            -2,
        )
        g = xp.stack([total(gx * res), total(gy * res)], -1)
        return total(res**2) / count, h / count[:, None, None], g / count[:, None]

    cost, h, g = evaluate(t)
    lam = xp.full(n, 1e-3)
    eye = xp.eye(2)[None]
    for _ in range(iterations):
        diag = xp.einsum("nii->ni", h)[:, :, None] * eye
        step = -xp.linalg.solve(h + lam[:, None, None] * diag + 1e-12 * eye, g[:, :, None])[..., 0]
        cand = t + step
        c_cost, c_h, c_g = evaluate(cand)
        ok = c_cost <= cost
        t = xp.where(ok[:, None], cand, t)
        cost = xp.where(ok, c_cost, cost)
        h = xp.where(ok[:, None, None], c_h, h)
        g = xp.where(ok[:, None], c_g, g)
        lam = xp.where(ok, lam / 10, lam * 10)
        if float(xp.abs(step).max()) < tolerance:  # accepted or not, no move is left
            break
    return t
