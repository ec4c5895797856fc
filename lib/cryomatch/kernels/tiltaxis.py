"""Tilt-axis angle (common line) and offset (centre-of-mass trajectories) of a tilt series
whose axis runs about along y (the frame of :mod:`cryomatch.kernels.tiltalign`), and the
search over the whole half circle when no axis is known."""

from __future__ import annotations

import numpy as np

from .tiltalign import background_level, bin_stack, coarse_shifts, rotate_stack, shift_stack
from .tomography import joseph_matrix


def common_line_mismatch(stack, deltas, max_frequency: float = 0.15) -> np.ndarray:
    """For each candidate turn in ``deltas`` (degrees), how much the images disagree about the
    common line: the profile along the tilt axis (the sum across it), which is the same for
    every tilt when the axis runs along the candidate direction and each image holds the
    whole object across the axis. Profiles are scaled to unit sum (image intensity often
    changes with tilt, e.g. in HAADF) and compared by their Fourier magnitudes below
    ``max_frequency`` (cycles per pixel), which shifts along the axis do not change, so the
    stack need not be aligned. All candidates come from one sparse product: the profile at
    turn d is the Joseph projection (:func:`joseph_matrix`) of each image at angle d."""
    data = np.asarray(stack, dtype=np.float64)
    n, ny, nx = data.shape
    data = data - background_level(data)[:, None, None]
    deltas = np.asarray(deltas, dtype=np.float64)
    # image (y, x) as a Joseph slice with X = y (width ny) and Z = x (thickness nx):
    # u = y cos(d) - x sin(d) is the coordinate along the axis after turning by d
    radon = joseph_matrix(deltas, ny, nx)
    columns = np.ascontiguousarray(data.transpose(2, 1, 0)).reshape(nx * ny, n)
    profiles = (radon @ columns).reshape(len(deltas), ny, n)
    # a window along the axis keeps the frame edges (where the candidate lines leave the
    # image, and where specimens that extend beyond it are cut) out of the comparison
    profiles *= _edge_window(ny, 0.1)[None, :, None]
    total = profiles.sum(axis=1, keepdims=True)
    profiles = profiles / np.where(np.abs(total) > 0, total, 1.0)  # intensity varies with tilt
    spectrum = np.abs(np.fft.rfft(profiles, n=2 * ny, axis=1))
    f = np.fft.rfftfreq(2 * ny)
    spectrum = spectrum[:, (f > 0) & (f < max_frequency), :]
    mean = spectrum.mean(axis=2, keepdims=True)
    return ((spectrum - mean) ** 2).sum(axis=(1, 2)) / np.maximum((mean**2).sum(axis=(1, 2)), 1e-30)


def _edge_window(m: int, margin: float) -> np.ndarray:
    """0 over ``margin`` of each end, a Hann rise, 1 over the middle half."""
    w = np.ones(m)
    edge = int(margin * m)
    rise = max(1, m // 4 - edge)
    ramp = 0.5 * (1 - np.cos(np.pi * (np.arange(rise) + 0.5) / rise))
    w[:edge], w[m - edge :] = 0.0, 0.0
    w[edge : edge + rise], w[m - edge - rise : m - edge] = ramp, ramp[::-1]
    return w


def tilt_axis_angle(stack, search: float = 5.0, step: float = 0.25) -> float:
    """Residual tilt-axis angle (degrees, counter-clockwise from +y) of a stack whose axis runs
    about along y: the turn whose common line all images share best
    (:func:`common_line_mismatch`) on a grid of ``step`` over +-``search`` degrees, refined
    on a grid ten times finer around the best and by a parabola through the best three.
    :func:`rotate_stack` by this angle then puts the axis on y."""
    grid = np.arange(-search, search + step / 2, step)
    best = grid[np.argmin(common_line_mismatch(stack, grid))]
    fine = best + np.linspace(-1.0, 1.0, 21) * step
    scores = common_line_mismatch(stack, fine)
    k = int(np.clip(np.argmin(scores), 1, len(fine) - 2))
    a, b, c = scores[k - 1 : k + 2]
    denom = a - 2 * b + c
    vertex = 0.5 * (a - c) / denom if denom > 0 else 0.0
    return float(fine[k] + np.clip(vertex, -1, 1) * (fine[1] - fine[0]))


def search_tilt_axis(
    stack, start: int, coarse_step: float = 10.0, fine_step: float = 2.0, size: int = 64
) -> tuple[float, np.ndarray]:
    """Tilt-axis angle (degrees in [-45, 135), counter-clockwise from +y) of raw images
    (n, ny, nx) when none is known. Each candidate turns the images (binned to about
    ``size`` pixels) so that it runs along y, aligns them by chained band-pass correlation
    from image ``start`` (:func:`~cryomatch.kernels.tiltalign.coarse_shifts`, no assumption
    about the specimen) and scores how well the aligned images share the common line
    (:func:`common_line_mismatch` at 0). Candidates: every ``coarse_step`` degrees, then every
    ``fine_step`` within +-``coarse_step`` of the best, then a parabola through the best three.
    The images must be aligned first: on the raw images the common line is cut differently
    by the frame in every image (on the NIST needle the raw-image minimum lies 68 degrees
    off). An axis and the axis + 180 degrees give mirror-image reconstructions that the data
    cannot tell apart; the one in [-45, 135) is returned, so that axes near the usual nominal
    0 and 90 degrees keep those values (not 180 or -90). Returns (angle, table (m, 2) of
    candidate angle and mismatch, sorted by angle)."""
    data = np.asarray(stack, dtype=np.float32)
    factor = 2 ** max(0, int(np.log2(min(data.shape[1:]) / size)))
    small = bin_stack(data, factor)

    def score(angle):
        turned = rotate_stack(small, angle)
        aligned = shift_stack(turned, coarse_shifts(turned, start))
        return float(common_line_mismatch(aligned, [0.0])[0])

    table = {float(a): score(a) for a in np.arange(0.0, 180.0, coarse_step)}
    best = min(table, key=table.get)
    for a in best + np.arange(-coarse_step, coarse_step + fine_step / 2, fine_step):
        table.setdefault(float(a), score(a))
    angles = np.array(sorted(table))
    scores = np.array([table[a] for a in angles])
    k = int(np.clip(np.argmin(scores), 1, len(angles) - 2))
    a, b, c = scores[k - 1 : k + 2]
    denom = a - 2 * b + c
    vertex = 0.5 * (a - c) / denom if denom > 0 else 0.0
    angle = angles[k] + np.clip(vertex, -1, 1) * (angles[k + 1] - angles[k - 1]) / 2
    return float((angle + 45.0) % 180.0 - 45.0), np.stack([angles % 360.0, scores], 1)


def tilt_axis_offset(stack, angles, min_mass: float = 0.2) -> float:
    """Where the tilt axis crosses the image centre row, in pixels across the axis, in an
    aligned stack (axis along y): every row's centre of mass moves with tilt as
    ``r + a cos(theta) + b sin(theta)``, r being the axis position in that row (Sanders
    2015); r is fitted for all rows at once and averaged over the rows holding at least
    ``min_mass`` of the heaviest row's mass, weighted by mass and fit quality. Shifting the
    stack by -offset across the axis centres the axis."""
    angles = np.asarray(angles, dtype=np.float64)
    data = np.asarray(stack, dtype=np.float64)
    data = data - background_level(data)[:, None, None]
    n, ny, nx = data.shape
    x = np.arange(nx) - nx // 2
    mass = data.sum(axis=2)  # (n, ny)
    com = (data * x).sum(axis=2) / np.where(mass != 0, mass, 1.0)
    t = np.deg2rad(angles)
    design = np.stack([np.ones_like(t), np.cos(t), np.sin(t)], 1)
    coef = np.linalg.lstsq(design, com, rcond=None)[0]  # (3, ny)
    fit_err = np.sqrt(((com - design @ coef) ** 2).mean(axis=0))
    row_mass = mass.mean(axis=0)
    w = np.where(row_mass >= min_mass * row_mass.max(), row_mass / (1.0 + fit_err**2), 0.0)
    return float((w * coef[0]).sum() / max(w.sum(), 1e-30))
