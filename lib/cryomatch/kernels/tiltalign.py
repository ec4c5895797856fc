"""Tilt-series alignment kernels: per-tilt shifts by etspy's four methods and by matching
leave-one-out reprojections, and the stack transforms they need (tilt axis: tiltaxis.py).

Stacks are (n, ny, nx) with the tilt axis along y (the aligned frame of
:mod:`cryomatch.geometry`); shifts are (n, 2) = (x across the axis, y along it) in pixels and
move image content by +shift. ``progress``, where taken, is called with the number of items
done since its last call (the stage layer turns it into a progress bar).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .. import geometry
from ..backend import array_module, fft_module, to_numpy
from .fourier import shift_images
from .registration import (
    bandpass,
    cross_power,
    lsq_translation,
    register_translation,
    upsampled_peak,
)
from .tomography import ParallelBeamProjector, angular_weights, ramp_filter


def _noop(_):
    return None


# --- stack transforms --------------------------------------------------------------------
def rotate_stack(stack, tilt_axis: float):
    """Turn raw images so that a tilt axis at ``tilt_axis`` degrees (counter-clockwise from
    +y) runs along +y: ``out(R q) = in(q)`` about the centres n // 2 (R from
    :func:`cryomatch.geometry.tilt_axis_rotation`). Multiples of 90 degrees are exact index
    permutations (odd multiples swap ny and nx); other angles use cubic splines. Outside
    the input, edge values are repeated."""
    stack = np.asarray(stack)
    n, ny, nx = stack.shape
    inv = np.linalg.inv(geometry.tilt_axis_rotation(tilt_axis))  # out q -> in R^-1 q, (x, y)
    quarter = float(tilt_axis) / 90.0
    if abs(quarter - round(quarter)) < 1e-9:
        if round(quarter) % 4 == 0:
            return stack
        inv = np.round(inv)
        oy, ox = (nx, ny) if round(quarter) % 2 else (ny, nx)
        y, x = np.mgrid[0:oy, 0:ox]
        q = np.stack([x - ox // 2, y - oy // 2])
        src = np.einsum("ij,jyx->iyx", inv, q).astype(np.int64)
        sx = np.clip(src[0] + nx // 2, 0, nx - 1)
        sy = np.clip(src[1] + ny // 2, 0, ny - 1)
        return np.ascontiguousarray(stack[:, sy, sx])
    m = np.eye(3)
    m[1:, 1:] = inv[::-1, ::-1]  # (y, x) order
    centre = np.array([0.0, ny // 2, nx // 2])
    return ndimage.affine_transform(
        stack.astype(np.float32, copy=False), m, offset=centre - m @ centre, order=3, mode="nearest"
    )


def shift_stack(stack, shifts, pad: bool = True):
    """Move each image's content by ``shifts`` (n, 2) = (x, y) pixels (Fourier shift; with
    ``pad`` the images are first extended by their edge values so nothing wraps around)."""
    xp = array_module(stack)
    shifts = xp.asarray(shifts, dtype=np.float64)
    if not pad:
        return shift_images(stack, shifts)
    m = int(np.ceil(float(xp.abs(shifts).max()))) + 2 if len(shifts) else 2
    padded = xp.pad(stack, ((0, 0), (m, m), (m, m)), mode="edge")
    return shift_images(padded, shifts)[:, m:-m, m:-m]


def bin_stack(stack, factor: int):
    """Fourier-crop images (n, ny, nx) by an integer ``factor`` (pixel size x factor)."""
    if factor == 1:
        return stack
    xp = array_module(stack)
    fft = fft_module(xp)
    n, ny, nx = stack.shape
    my, mx = ny // factor, nx // factor
    spec = fft.rfft2(stack, axes=(-2, -1))
    keep_y = np.r_[0 : (my + 1) // 2, ny - my // 2 : ny]
    out = fft.irfft2(spec[:, keep_y, : mx // 2 + 1], s=(my, mx), axes=(-2, -1))
    return (out / factor**2).astype(stack.dtype, copy=False)


def background_level(stack) -> np.ndarray:
    """Per-image background (n,): the median of the outermost 5% frame of pixels."""
    xp = array_module(stack)
    n, ny, nx = stack.shape
    by, bx = max(1, ny // 20), max(1, nx // 20)
    frame = xp.concatenate(
        [
            stack[:, :by].reshape(n, -1),
            stack[:, -by:].reshape(n, -1),
            stack[:, :, :bx].reshape(n, -1),
            stack[:, :, -bx:].reshape(n, -1),
        ],
        axis=1,
    )
    return xp.median(frame, axis=1)


def taper(ny: int, nx: int, width: float = 0.08, xp=np):
    """Separable cosine edge taper (1 inside, falling to 0 over ``width`` of each side)."""

    def ramp(m):
        w = max(1, int(width * m))
        r = np.ones(m)
        edge = 0.5 * (1 - np.cos(np.pi * (np.arange(w) + 0.5) / w))
        r[:w], r[m - w :] = edge, edge[::-1]
        return r

    return xp.asarray(ramp(ny)[:, None] * ramp(nx)[None, :])


def default_start(angles) -> int:
    """Index of the tilt nearest 0 degrees."""
    return int(np.argmin(np.abs(np.asarray(angles, dtype=float))))


def chain(pair_shifts, start: int) -> np.ndarray:
    """Absolute shifts from neighbour shifts: ``pair_shifts[i]`` (n - 1, 2) registers image
    i + 1 onto image i (or i onto i + 1 when below start, see :func:`pairwise_shifts`)."""
    pair_shifts = np.asarray(pair_shifts, dtype=np.float64)
    n = len(pair_shifts) + 1
    out = np.zeros((n, 2))
    # above start: s[i+1] = s[i] + d(i -> i+1); below: s[i-1] = s[i] + d(i -> i-1)
    up = pair_shifts[start:]
    out[start + 1 :] = np.cumsum(up, axis=0)
    down = pair_shifts[:start][::-1]
    out[:start] = np.cumsum(down, axis=0)[::-1]
    return out


def pairwise_shifts(stack, start: int, register, batch_size: int = 16, progress=_noop):
    """Chained registration as etspy does: image i + 1 onto image i above ``start``, image
    i - 1 onto image i below it; ``register(ref, mov)`` (batched) gives the shifts. Returns
    absolute shifts (n, 2) with image ``start`` fixed. Memory: ``batch_size`` pairs."""
    n = len(stack)
    pairs = [(i, i + 1) for i in range(start, n - 1)] + [(i, i - 1) for i in range(start, 0, -1)]
    d = np.zeros((n - 1, 2))
    for lo in range(0, len(pairs), batch_size):
        batch = pairs[lo : lo + batch_size]
        ref = np.stack([stack[a] for a, _ in batch])
        mov = np.stack([stack[b] for _, b in batch])
        shifts = to_numpy(register(ref, mov))
        for (a, b), s in zip(batch, shifts, strict=True):
            d[min(a, b)] = s
        progress(len(batch))
    return chain(d, start)


# --- etspy's methods ------------------------------------------------------------------------
def shifts_pc(stack, start: int, upsample_factor: int = 3, batch_size: int = 16, progress=_noop):
    """Chained phase correlation (etspy 'PC'; Guizar-Sicairos et al. 2008)."""

    def register(ref, mov):
        return register_translation(ref, mov, upsample_factor, whiten=1.0, refine=False)

    return pairwise_shifts(stack, start, register, batch_size, progress)


def shifts_stackreg(stack, start: int, batch_size: int = 16, progress=_noop):
    """Chained pyramid least-squares translation (etspy 'StackReg'; Thevenaz et al. 1998)."""

    def register(ref, mov):
        return lsq_translation(ref.astype(np.float32), mov.astype(np.float32))

    return pairwise_shifts(stack, start, register, batch_size, progress)


def along_axis_shifts(
    stack, xrange=None, p: int = 20, upsample_factor: int = 10, passes: int = 2
) -> np.ndarray:
    """Shifts along the tilt axis by conservation of mass (Sanders 2015): every image's
    profile along the axis (summed across it) should equal the mean profile. The profiles
    are zero-padded by ``p`` so any image size works; shifts are limited to +-p, subpixel by
    upsampled cross-correlation; ``xrange`` (lo, hi) limits the rows used."""
    n, ny, nx = stack.shape
    lo, hi = (
        (0, ny)
        if xrange is None
        else (max(0, int(round(xrange[0]))), min(ny, int(round(xrange[1]))))
    )
    profiles = np.asarray(stack[:, lo:hi].sum(axis=2), dtype=np.float64)
    padded = np.pad(profiles, ((0, 0), (p, p)))[:, None, :]  # (n, 1, L)
    shifts = np.zeros(n)
    for _ in range(passes):
        moved = shift_images(padded, np.stack([shifts, np.zeros(n)], 1))
        mean = moved.mean(axis=0, keepdims=True)
        delta = register_translation(
            np.broadcast_to(mean, moved.shape), moved, upsample_factor, whiten=0.0, max_shift=p
        )[:, 0]
        shifts = np.clip(shifts + delta, -p, p)
    return shifts


def best_slices(stack, nslices: int) -> np.ndarray:
    """Rows (positions along the axis) whose mass varies least with tilt relative to its
    size (etspy's choice for the centre-of-mass method)."""
    mass = np.asarray(stack.sum(axis=2), dtype=np.float64)  # (n, ny)
    std = mass.std(axis=0)
    ratio = mass.sum(axis=0) / np.where(std > 0, std, 1e-5)
    return np.sort(np.argsort(ratio)[::-1][: min(nslices, stack.shape[1])])


def across_axis_com_shifts(stack, angles, rows) -> np.ndarray:
    """Shifts across the axis from the centres of mass of the given rows (Sanders 2015):
    a row's centre of mass moves as ``x0 cos(theta) - z0 sin(theta)`` about the axis at the
    image centre; the shifts are what remains after projecting out span(cos, sin), averaged
    over rows with their mass as weight."""
    angles = np.asarray(angles, dtype=np.float64)
    n, ny, nx = stack.shape
    sub = np.asarray(stack[:, rows, :], dtype=np.float64)  # (n, r, nx)
    x = np.arange(nx) - nx // 2
    mass = sub.sum(axis=2)
    com = (sub * x).sum(axis=2) / np.where(mass != 0, mass, 1.0)  # (n, r)
    gamma = np.stack([np.cos(np.deg2rad(angles)), -np.sin(np.deg2rad(angles))], 1)
    resid = com - gamma @ np.linalg.lstsq(gamma, com, rcond=None)[0]
    w = np.abs(mass).mean(axis=0)
    return -(resid * w).sum(axis=1) / max(w.sum(), 1e-30)


def shifts_com(
    stack, angles, xrange=None, p: int = 20, nslices: int = 20, progress=_noop
) -> np.ndarray:
    """etspy's 'COM' (Sanders 2015): along-axis shifts by conservation of mass, applied to the
    stack before the across-axis shifts come from the centres of mass of ``nslices`` rows
    (etspy computes the latter on the unshifted stack and fails with jitter along the axis)."""
    along = along_axis_shifts(stack, xrange, p)
    progress(1)
    moved = shift_stack(stack, np.stack([np.zeros(len(along)), along], 1))
    rows = best_slices(moved, nslices)
    across = across_axis_com_shifts(moved, angles, rows)
    progress(1)
    return np.stack([across, along], axis=1)


def shifts_com_cl(
    stack,
    com_ref_index: int,
    cl_ref_index: int,
    cl_resolution: float = 0.05,
    cl_div_factor: int = 8,
    progress=_noop,
) -> np.ndarray:
    """etspy's 'COM-CL' (Scott et al. 2012): across the axis, each image's centre of mass is
    moved onto that of image ``com_ref_index`` (etspy subtracts the index itself, a tilt
    number used as a pixel row); along the axis, each image's common line (the profile along
    the axis) is registered onto that of image ``cl_ref_index`` to ``cl_resolution`` pixels by
    repeated ``cl_div_factor``-fold subdivision of the subpixel interval."""
    if not 0 < cl_resolution < 0.5:
        raise ValueError(f"cl_resolution must be in (0, 0.5), got {cl_resolution}")
    if cl_div_factor < 2:
        raise ValueError(f"cl_div_factor must be at least 2, got {cl_div_factor}")
    n, ny, nx = stack.shape
    data = np.asarray(stack, dtype=np.float64)
    x = np.arange(nx) - nx // 2
    mass = data.sum(axis=(1, 2))
    com = (data.sum(axis=1) * x).sum(axis=1) / np.where(mass != 0, mass, 1.0)
    across = com[com_ref_index] - com
    progress(1)
    lines = data.sum(axis=2)  # (n, ny): profile along the axis
    along = common_line_shifts(lines, lines[cl_ref_index], cl_resolution, cl_div_factor)
    progress(1)
    return np.stack([across, along], axis=1)


def common_line_shifts(lines, ref_line, resolution: float, div_factor: int) -> np.ndarray:
    """Shifts (n,) moving each line (n, m) onto ``ref_line`` (m,): the cross-correlation
    maximum over candidate subpixel phases, the interval narrowed ``div_factor``-fold per
    round until ``resolution``, then the integer peak at the best phase (zero padding to
    2m - 1 keeps the correlation linear)."""
    n, m = lines.shape
    size = 2 * m - 1
    f_ref = np.fft.fft(ref_line, n=size)
    f = np.fft.fft(lines, n=size, axis=1)
    k = np.fft.fftfreq(size) * size
    cross = f_ref[None] * np.conj(f)  # peak at the shift moving line onto ref
    rounds = max(1, int(np.abs(np.floor(np.log(resolution) / np.log(div_factor)))))
    lo, hi = np.full(n, -0.5), np.full(n, 0.5)
    for _ in range(rounds):
        edges = lo[:, None] + (hi - lo)[:, None] * np.arange(div_factor + 1) / div_factor
        mids = (edges[:, :-1] + edges[:, 1:]) / 2  # (n, d)
        phase = np.exp(-2j * np.pi * mids[:, :, None] * k[None, None, :] / size)
        peaks = np.abs(np.fft.ifft(cross[:, None, :] * phase, axis=2)).max(axis=2)
        best = np.argmax(peaks, axis=1)
        idx = np.arange(n)
        lo, hi = edges[idx, best], edges[idx, best + 1]
    sub = (lo + hi) / 2
    phase = np.exp(-2j * np.pi * sub[:, None] * k[None, :] / size)
    xc = np.abs(np.fft.ifft(cross * phase, axis=1))
    integer = np.argmax(xc, axis=1)
    integer = np.where(integer > size // 2, integer - size, integer)
    return integer - sub  # the phase moved the peak by sub onto the integer


# --- cryomatch's method: leave-one-out reprojection matching -------------------------------
def coarse_shifts(
    stack,
    start: int,
    lowpass: float = 0.12,
    highpass: float = 0.01,
    batch_size: int = 16,
    progress=_noop,
) -> np.ndarray:
    """Chained band-pass cross-correlation (no whitening, edge taper): a noise-robust first
    guess for :func:`shifts_reprojection` (errors still add up along the chain)."""
    n, ny, nx = stack.shape
    window = taper(ny, nx)
    weight = bandpass(ny, nx, lowpass, highpass)

    def register(ref, mov):
        ref = (ref - ref.mean(axis=(1, 2), keepdims=True)) * window
        mov = (mov - mov.mean(axis=(1, 2), keepdims=True)) * window
        return register_translation(ref, mov, 10, whiten=0.0, weight=weight)

    return pairwise_shifts(stack, start, register, batch_size, progress)


def loo_reprojections(projector: ParallelBeamProjector, stack, window: str = "ramp"):
    """For every tilt i, the projection at tilt i of the weighted back-projection of all the
    other tilts: ``A_i sum_j w_j A_j^T h*p_j - w_i A_i A_i^T h*p_i`` (exact, linear)."""
    w = projector.xp.asarray(angular_weights(projector.angles), dtype=projector.dtype)
    filtered = ramp_filter(stack.astype(projector.dtype, copy=False), window) * w[:, None, None]
    sino = projector.to_sinograms(filtered)
    volume = projector.back_project(sino)
    reproj = projector.project(volume) - projector.self_projection(sino)
    return projector.from_sinograms(reproj)


def match_to_reprojections(
    stack,
    reproj,
    upsample_factor: int = 20,
    lowpass: float = 0.25,
    highpass: float = 0.01,
    max_shift=None,
):
    """Shifts (n, 2) moving each image onto its reprojection (band-pass cross-correlation
    with edge taper, upsampled-DFT refinement)."""
    xp = array_module(stack)
    fft = fft_module(xp)
    n, ny, nx = stack.shape
    window = taper(ny, nx, xp=xp)
    weight = bandpass(ny, nx, lowpass, highpass, xp)
    a = (reproj - reproj.mean(axis=(1, 2), keepdims=True)) * window
    b = (stack - stack.mean(axis=(1, 2), keepdims=True)) * window
    x = cross_power(fft.fft2(a, axes=(-2, -1)), fft.fft2(b, axes=(-2, -1)), 0.0, weight)
    return upsampled_peak(x, upsample_factor, max_shift)


def project_out_unobservable(delta, angles) -> np.ndarray:
    """Remove from shift updates the components alignment cannot see (object motion):
    span(1, cos, sin) across the axis and a constant along it."""
    return geometry.remove_unobservable(delta, angles)


def remove_smooth(delta, angles, degree: int) -> np.ndarray:
    """``delta`` (n, 2) minus its least-squares fit by Legendre polynomials of degree <=
    ``degree`` in the tilt angle (scaled to [-1, 1]); ``degree`` < 0 leaves it as it is."""
    if degree < 0:
        return delta
    t = np.asarray(angles, dtype=np.float64)
    span = max(float(np.ptp(t)), 1e-9)
    basis = np.polynomial.legendre.legvander(2 * (t - t.min()) / span - 1, degree)
    coef = np.linalg.lstsq(basis, delta, rcond=None)[0]
    return delta - basis @ coef


def shifts_reprojection(
    stack,
    angles,
    start: int,
    initial="COM",
    smooth_degree: int = 12,
    iterations: int = 10,
    tolerance: float = 0.01,
    upsample_factor: int = 20,
    thickness: int | None = None,
    lowpass: float = 0.16,
    highpass: float = 0.01,
    memory: int = 5,
    binning: int | None = None,
    xp=np,
    progress=_noop,
):
    """cryomatch's method: global first guess, then projection matching (cf. Odstrcil et al.
    2019, Opt. Express 27:36637) against leave-one-out reprojections; nothing is chained.

    Each round registers every image onto the projection, at its tilt, of the weighted
    back-projection of all the *other* images (:func:`loo_reprojections`), so neither its own
    noise nor its own misalignment is in its reference. Such a reference is made mostly by
    neighbouring tilts, so it pins errors that change quickly from tilt to tilt but hardly
    those that vary slowly over the whole series (and the missing wedge biases those). The
    first guess supplies the slow part: 'COM' (:func:`shifts_com`, the centre-of-mass and
    mass-conservation laws of single-axis tomography, global and exact for an object inside
    the field of view; its errors are independent per tilt, i.e. fast) or 'chain'
    (:func:`coarse_shifts`, for specimens that leave the field of view), or an array of
    shifts. Updates keep only what Legendre polynomials of degree <= ``smooth_degree`` in
    the tilt angle do not describe (-1: keep everything) and never the unobservable
    components. Rounds are Anderson-accelerated (``memory``) and stop when the largest update
    is below ``tolerance`` pixels. Images are matched binned to about 64 pixels (``binning``
    None; 1 keeps full size): on the phantoms of the tests the results are as accurate as at
    full size, at a small fraction of the cost. ``lowpass`` (Gaussian sigma, cycles per pixel
    of the *matched* images) keeps the matching off the frequencies where the projector's
    linear interpolation and the binning's aliasing are: scaled with the binning instead
    (0.25 per input pixel, no filter left at 128 px binned to 64), a noise-free series of
    hard-edged ellipsoids and dense beads started at its true shifts drifted 0.05-0.11 px;
    with 0.16 and ``smooth_degree`` 12 it stays within 0.025 px. What remains is the bias of
    the leave-one-out reference itself (it grows with the tilt step and is the same at twice
    the sampling), amplified in the components that vary over a few tilts, which such
    references pin weakly (``smooth_degree`` 4: 0.2 px, 8: 0.045 px, 12: 0.024 px).
    Returns (shifts, record), record a list of (round, max update, rms update) in pixels.
    """
    angles = np.asarray(angles, dtype=np.float64)
    n, ny, nx = stack.shape
    if isinstance(initial, str):
        if initial == "COM":
            shifts = shifts_com(stack, angles)
        elif initial == "chain":
            shifts = coarse_shifts(stack, start)
        else:
            raise ValueError(f"initial must be 'COM', 'chain' or shifts, got {initial!r}")
    else:
        shifts = np.asarray(initial, dtype=np.float64).copy()
    progress(1)
    if binning is None:  # matched at about 64 pixels: as accurate here, far cheaper
        binning = 2 ** max(0, int(np.log2(min(ny, nx) / 64)))
    data = xp.asarray(bin_stack(np.asarray(stack, dtype=np.float32), binning))
    projector = ParallelBeamProjector(
        angles, data.shape[2], max(1, (thickness or nx) // binning), xp=xp
    )
    record = []
    accelerate = Anderson(memory)
    for it in range(iterations):
        aligned = shift_stack(data, xp.asarray(shifts / binning))
        reproj = loo_reprojections(projector, aligned)
        delta = binning * to_numpy(
            match_to_reprojections(aligned, reproj, upsample_factor, lowpass, highpass * binning)
        )
        delta = remove_smooth(project_out_unobservable(delta, angles), angles, smooth_degree)
        shifts = accelerate(shifts, delta)
        size = np.hypot(delta[:, 0], delta[:, 1])
        record.append((it + 1, float(size.max()), float(np.sqrt((size**2).mean()))))
        progress(1)
        if size.max() < tolerance:
            break
    return shifts, record


class Anderson:
    """Anderson acceleration of a fixed-point iteration x <- x + f(x) (Walker & Ni 2011,
    SIAM J. Numer. Anal. 49:1715): the next x combines the last ``memory`` iterates so that
    their combined update is smallest. Projection matching corrects errors that vary slowly
    with tilt only a little per round (neighbouring tilts share them); this removes them in
    a few rounds. ``memory`` 0 is the plain iteration."""

    def __init__(self, memory: int = 5):
        self.memory = memory
        self.xs, self.fs = [], []

    def __call__(self, x, f):
        x, f = np.ravel(x).astype(np.float64), np.ravel(f).astype(np.float64)
        shape = np.shape(x)
        if self.memory <= 0:
            return (x + f).reshape(-1, 2)
        self.xs.append(x)
        self.fs.append(f)
        self.xs, self.fs = self.xs[-(self.memory + 1) :], self.fs[-(self.memory + 1) :]
        if len(self.fs) == 1:
            return (x + f).reshape(-1, 2)
        df = np.diff(np.array(self.fs), axis=0).T  # (p, m)
        dx = np.diff(np.array(self.xs), axis=0).T
        ridge = 1e-8 * float((df**2).sum()) + 1e-30
        gamma = np.linalg.solve(df.T @ df + ridge * np.eye(df.shape[1]), df.T @ f)
        return (x + f - (dx + df) @ gamma).reshape(shape[0] // 2, 2)
