"""Patch tracking for tilt series without fiducials (after IMOD's tiltxcorr -patch and
AreTomo's patch alignment; Zheng et al. 2022, J. Struct. Biol. X 6:100068): a grid of
patches of the image nearest 0 degrees is followed outwards in tilt, each patch
cross-correlated between neighbouring images after stretching the lower-tilt one by
cos(theta_b) / cos(theta_a) across the tilt axis; the tracked patch centres are then fitted
with the projection model of :mod:`cryomatch.kernels.projection_model`, like beads.

Images (n, ny, nx) have their tilt axis about along y; positions are (x, y) px about the
image centre (nx // 2, ny // 2).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .fiducials import outward_order
from .projection_model import fit_projection_model
from .registration import bandpass, register_translation
from .tiltalign import taper


def patch_grid(shape: tuple[int, int], patch: int, spacing: float) -> np.ndarray:
    """Patch centres (k, 2) x, y px about the image centre, ``spacing`` apart, every patch
    of ``patch`` px at least ``patch`` / 4 inside the frame."""
    ny, nx = shape
    out = []
    for m in (nx, ny):
        reach = m / 2 - 0.75 * patch
        k = max(0, int(np.floor(reach / spacing)))
        out.append(np.arange(-k, k + 1) * spacing)
    x, y = np.meshgrid(*out)
    return np.stack([x.ravel(), y.ravel()], axis=1).astype(np.float64)


def _sample(coeffs, centres, patch: int, stretch: float = 1.0) -> np.ndarray:
    """Patches (k, patch, patch) of a spline-filtered image at ``centres`` (k, 2), read at
    centre + (x / stretch, y): what the patch looks like stretched by ``stretch`` across
    the axis."""
    ny, nx = coeffs.shape
    g = np.arange(patch) - patch // 2
    gy, gx = np.meshgrid(g, g, indexing="ij")
    ys = centres[:, 1, None, None] + gy[None] + ny // 2
    xs = centres[:, 0, None, None] + gx[None] / stretch + nx // 2
    return ndimage.map_coordinates(coeffs, [ys, xs], order=3, mode="nearest", prefilter=False)


def _register(ref, mov, window, weight) -> np.ndarray:
    """Shifts (k, 2) moving each ``mov`` patch onto its ``ref`` (band-passed, tapered)."""
    ref = (ref - ref.mean(axis=(1, 2), keepdims=True)) * window
    mov = (mov - mov.mean(axis=(1, 2), keepdims=True)) * window
    return register_translation(ref, mov, 20, whiten=0.0, weight=weight)


def _register_profiles(ref, mov, window, weight) -> np.ndarray:
    """Shifts (k,) along the axis (y) moving each ``mov`` patch onto its ``ref``, from their
    profiles along y (sums across the axis): features at different heights shear across
    the axis from one tilt to the next, which biases a 2D registration along oblique edges;
    the profiles do not change."""
    k, p, _ = ref.shape
    profiles = [((a - a.mean(axis=(1, 2), keepdims=True)) * window).sum(axis=2) for a in (ref, mov)]
    wide = [np.repeat(x[:, :, None], 8, axis=2) for x in profiles]  # (k, p, 8): no x shift
    return register_translation(*wide, 20, whiten=0.0, weight=bandpass(p, 8, 0.2, 0.02))[:, 1]


def track_patches(
    stack,
    angles,
    start: int,
    patch: int | None = None,
    spacing: float | None = None,
    lowpass: float = 0.2,
    highpass: float = 0.02,
    passes: int = 2,
    along_from_profiles: bool = True,
    fit_options: dict | None = None,
):
    """Track a grid of patches (``patch`` px, default a quarter of the smaller image side
    rounded to even; ``spacing`` default half a patch) from image ``start`` outwards. For
    each image b and its done neighbour a, the whole of a, stretched about the centre,
    gives a first translation; then every patch of a, stretched about its own centre by
    cos(theta_b) / cos(theta_a), is registered onto b at the predicted place (``passes``
    times, resampling at the new place). A patch that would leave the frame stops there.
    The tracks are then fitted with the projection model.
    Returns (observed (n, k, 2) with NaN where not tracked, the fitted ModelFit)."""
    stack = np.asarray(stack, dtype=np.float64)
    angles = np.asarray(angles, dtype=np.float64)
    n, ny, nx = stack.shape
    if patch is None:
        patch = max(16, 2 * (min(ny, nx) // 8))
    spacing = patch / 2 if spacing is None else spacing
    centres = patch_grid((ny, nx), patch, spacing)
    observed = np.full((n, len(centres), 2), np.nan)
    observed[start] = centres
    coeffs = [None] * n

    def spline(i):
        if coeffs[i] is None:
            coeffs[i] = ndimage.spline_filter(stack[i], order=3)
        return coeffs[i]

    window = taper(patch, patch, 0.2)
    weight = bandpass(patch, patch, lowpass, highpass)
    side = 2 * (min(ny, nx) // 2) - 2 * max(2, min(ny, nx) // 16)
    big_window = taper(side, side, 0.2)
    big_weight = bandpass(side, side, lowpass, highpass)
    limit = np.array([nx / 2 - patch / 2 - 1, ny / 2 - patch / 2 - 1])
    for b, a in outward_order(angles, start):
        c = np.cos(np.deg2rad(angles[b])) / np.cos(np.deg2rad(angles[a]))
        whole = _register(
            _sample(spline(a), np.zeros((1, 2)), side, c),
            _sample(spline(b), np.zeros((1, 2)), side),
            big_window,
            big_weight,
        )[0]
        prev = observed[a]
        ok = np.isfinite(prev[:, 0])
        pos = prev.copy()
        pos[:, 0] *= c
        pos -= whole
        ok &= (np.abs(pos) < limit).all(axis=1)
        if not ok.any():
            continue
        template = _sample(spline(a), prev[ok], patch, c)
        current = pos[ok]
        for _ in range(passes):
            region = _sample(spline(b), current, patch)
            moved = _register(template, region, window, weight)
            if along_from_profiles:
                moved[:, 1] = _register_profiles(template, region, window, weight)
            current = current - moved
        inside = (np.abs(current) < limit).all(axis=1)
        rows = np.flatnonzero(ok)[inside]
        observed[b, rows] = current[inside]
    model = fit_projection_model(observed, angles, reference=start, **(fit_options or {}))
    return observed, model
