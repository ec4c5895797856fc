"""Gold-bead fiducials: detection (scale-normalized Laplacian of Gaussian, non-maximum
suppression, subpixel peaks) and tracking through a tilt series from the zero tilt outwards
with positions predicted by the projection model (after IMOD's beadtrack; Mastronarde and
Held 2017, J. Struct. Biol. 197:102).

Images (n, ny, nx) have their tilt axis about along y and beads bright (dense objects as
positive density: invert TEM images first). Positions are (x, y) pixels about the image
centre (nx // 2, ny // 2), as in :mod:`cryomatch.kernels.projection_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .projection_model import ModelFit, fit_projection_model, project_points

ROUND = 0.75  # beads: smaller / larger principal curvature at least this


@dataclass
class Candidates:
    """Bead candidates of one image: positions (k, 2) x, y px about the centre, strengths
    (k,) in units of the response's robust noise level, strongest first, and roundness
    (k,): the ratio of the smaller to the larger principal curvature at the peak (1 for a
    round blob, near 0 along an edge or ridge)."""

    positions: np.ndarray
    strengths: np.ndarray
    roundness: np.ndarray


def bead_response(images, radius: float) -> np.ndarray:
    """Scale-normalized negative Laplacian of Gaussian (n, ny, nx) at sigma = radius / sqrt 2,
    the scale at which a projected sphere of ``radius`` px responds most; bright blobs give
    positive peaks, smooth backgrounds nothing."""
    sigma = max(radius / np.sqrt(2.0), 0.7)
    images = np.asarray(images, dtype=np.float32)
    sigmas = (0, sigma, sigma)  # nothing across images
    dyy = ndimage.gaussian_filter(images, sigmas, order=(0, 2, 0))
    dxx = ndimage.gaussian_filter(images, sigmas, order=(0, 0, 2))
    return -(sigma**2) * (dyy + dxx)


def noise_level(response) -> np.ndarray:
    """Robust spread (n,) of each response image: 1.4826 x median absolute deviation."""
    flat = np.asarray(response).reshape(len(response), -1)
    med = np.median(flat, axis=1, keepdims=True)
    return 1.4826 * np.median(np.abs(flat - med), axis=1) + 1e-30


def curvatures(images, radius: float):
    """Hessian (hxx, hyy, hxy), each (n, ny, nx), of images smoothed at sigma = radius / sqrt 2."""
    sigma = max(radius / np.sqrt(2.0), 0.7)
    images = np.asarray(images, dtype=np.float32)
    return tuple(
        ndimage.gaussian_filter(images, (0, sigma, sigma), order=o)
        for o in ((0, 0, 2), (0, 2, 0), (0, 1, 1))
    )


def find_peaks(
    response, radius: float, threshold: float, max_count: int, hessian=None
) -> list[Candidates]:
    """Local maxima of each response image (n, ny, nx) above ``threshold`` x its noise
    level, at least ``radius`` + 1 px from the frame and ~``radius`` px from a stronger peak
    (non-maximum suppression), at most ``max_count`` per image, with subpixel positions from
    a Gaussian through each peak and its neighbours along x and y. ``hessian``
    (:func:`curvatures` of the images) gives each peak's roundness (else 1)."""
    response = np.asarray(response, dtype=np.float64)
    n, ny, nx = response.shape
    size = 2 * int(np.ceil(radius)) + 1
    local = ndimage.maximum_filter(response, size=(1, size, size), mode="nearest")
    border = int(np.ceil(radius)) + 1
    level = noise_level(response)
    out = []
    for i in range(n):
        r = response[i]
        peak = (r == local[i]) & (r > threshold * level[i] + np.median(r))
        peak[:border], peak[-border:], peak[:, :border], peak[:, -border:] = False, 0, 0, 0
        y, x = np.nonzero(peak)
        order = np.argsort(r[y, x])[::-1][:max_count]
        y, x = y[order], x[order]
        dx = _gauss3(r[y, x - 1], r[y, x], r[y, x + 1])
        dy = _gauss3(r[y - 1, x], r[y, x], r[y + 1, x])
        positions = np.stack([x + dx - nx // 2, y + dy - ny // 2], axis=1).astype(np.float64)
        strengths = (r[y, x] - np.median(r)) / level[i]
        roundness = np.ones(len(x))
        if hessian is not None:
            hxx, hyy, hxy = (h[i, y, x].astype(np.float64) for h in hessian)
            mean, dev = (hxx + hyy) / 2, np.hypot((hxx - hyy) / 2, hxy)
            big, small = mean - dev, mean + dev  # bright blob: both negative, |big| >= |small|
            roundness = np.where(big < 0, np.clip(small / np.minimum(big, -1e-30), 0, 1), 0)
        out.append(Candidates(positions, strengths, roundness))
    return out


def _gauss3(a, b, c):
    """Vertex of the Gaussian (parabola of logs) through (-1, a), (0, b), (1, c); parabola
    where a value is not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb, lc = np.log(a), np.log(b), np.log(c)
        g = 0.5 * (la - lc) / (la - 2 * lb + lc)
        p = 0.5 * (a - c) / (a - 2 * b + c)
    ok = (a > 0) & (b > 0) & (c > 0) & np.isfinite(g)
    return np.clip(np.where(ok, g, np.nan_to_num(p)), -0.5, 0.5)


def estimate_radius(image, radii=None, count: int = 10) -> float:
    """Bead radius (px) of an image: the scale whose ``count`` strongest round (roundness
    >= ROUND) normalized-LoG peaks (relative to the response's noise) are strongest, refined
    by a parabola; NaN when that is the smallest or largest of ``radii`` (no blob scale)."""
    radii = np.arange(1.0, 8.01, 0.5) if radii is None else np.asarray(radii, dtype=float)
    score = []
    for r in radii:
        resp = bead_response(np.asarray(image)[None], r)
        peaks = find_peaks(resp, r, 3.0, 4 * count, curvatures(np.asarray(image)[None], r))[0]
        peaks = peaks.strengths[peaks.roundness >= ROUND]
        score.append(np.sort(peaks)[::-1][:count].mean() if len(peaks) else 0)
    score = np.array(score)
    if np.argmax(score) in (0, len(radii) - 1):
        return float("nan")
    k = int(np.argmax(score))
    a, b, c = score[k - 1 : k + 2]
    denom = a - 2 * b + c
    step = radii[1] - radii[0]
    return float(radii[k] + (np.clip(0.5 * (a - c) / denom, -1, 1) * step if denom < 0 else 0.0))


def count_beads(strengths, floor: float, min_beads: int = 4, max_beads: int = 100, gap=2.0) -> int:
    """How many of the strongest candidates are gold beads: the largest drop in strength
    (sorted, strongest first, ``floor`` appended: the detection threshold),
    s[k - 1] / s[k] over k = ``min_beads`` .. ``max_beads``, separates them from the
    specimen's own blobs when it is at least ``gap`` (gold is far denser than biological
    matter); 0 when there is no such drop."""
    s = np.append(np.sort(np.asarray(strengths, dtype=np.float64))[::-1], floor)
    k = np.arange(min_beads, min(max_beads, len(s) - 1) + 1)
    if not len(k):
        return 0
    ratio = s[k - 1] / np.maximum(s[k], 1e-30)
    best = int(np.argmax(ratio))
    return int(k[best]) if ratio[best] >= gap else 0


def match_offset(predicted, candidates, search: float, tol: float):
    """Translation (2,) that puts most ``predicted`` positions (m, 2) onto ``candidates``
    (k, 2): the densest cluster (within ``tol``) of all their differences up to ``search``
    px, then the mean of that cluster; None when nothing matches."""
    predicted = predicted[np.isfinite(predicted).all(axis=1)]
    if not len(predicted) or not len(candidates):
        return None
    diff = (candidates[None, :, :] - predicted[:, None, :]).reshape(-1, 2)
    diff = diff[np.hypot(diff[:, 0], diff[:, 1]) <= search]
    if not len(diff):
        return None
    tree = cKDTree(diff)
    counts = tree.query_ball_point(diff, tol, return_length=True)
    best = diff[np.argmax(counts)]
    near = diff[np.hypot(*(diff - best).T) <= tol]
    return near.mean(axis=0)


def assign(predicted, candidates, tol: float) -> np.ndarray:
    """For each predicted position (m, 2), the nearest candidate (k, 2) within ``tol`` px
    that no nearer prediction claims (NaN where none): (m, 2)."""
    out = np.full(predicted.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(predicted).all(axis=1))
    if not len(ok) or not len(candidates):
        return out
    dist, idx = cKDTree(candidates).query(predicted[ok], distance_upper_bound=tol)
    taken = set()
    for j in np.argsort(dist):
        if np.isfinite(dist[j]) and idx[j] not in taken:
            taken.add(idx[j])
            out[ok[j]] = candidates[idx[j]]
    return out


def outward_order(angles, start: int) -> list[tuple[int, int]]:
    """(image, neighbour already done) pairs from ``start`` outwards in tilt, alternating
    sides, so that each image's prediction comes from a model fitted on lower tilts."""
    order = np.argsort(angles)
    rank = int(np.flatnonzero(order == start)[0])
    up = [(int(order[k]), int(order[k - 1])) for k in range(rank + 1, len(order))]
    down = [(int(order[k]), int(order[k + 1])) for k in range(rank - 1, -1, -1)]
    pairs = []
    for k in range(max(len(up), len(down))):
        pairs += up[k : k + 1] + down[k : k + 1]
    return pairs


def track(
    candidates: list[Candidates],
    angles,
    start: int,
    shape: tuple[int, int],
    seeds,
    search: float | None = None,
    tol: float = 2.0,
    margin: float = 3.0,
    fit_options: dict | None = None,
):
    """Track points through a series: the ``seeds`` (m, 2) in image ``start`` (e.g. the
    beads :func:`count_beads` accepts) are followed outwards in tilt (:func:`outward_order`);
    each image's positions are predicted from the projection model fitted so far, moved by
    the translation that matches most candidates (:func:`match_offset` within ``search`` px,
    default 0.4 x the image side) and assigned to the nearest candidate within ``tol`` px.
    Positions predicted within ``margin`` px of the frame are not searched. Then the model is
    fitted to all tracks (``fit_options`` go to :func:`fit_projection_model`), gaps and
    rejected observations are searched again at the positions the final model predicts, and
    it is fitted once more. Returns (observed (n, m, 2) with NaN gaps, ModelFit)."""
    angles = np.asarray(angles, dtype=np.float64)
    n = len(angles)
    ny, nx = shape
    search = 0.4 * min(ny, nx) if search is None else search
    fit_options = dict(fit_options or {})
    seeds = np.asarray(seeds, dtype=np.float64).reshape(-1, 2)
    m = len(seeds)
    observed = np.full((n, m, 2), np.nan)
    if m == 0:
        return observed, None
    observed[start] = seeds
    positions = np.column_stack([seeds / [np.cos(np.deg2rad(angles[start])), 1.0], np.zeros(m)])
    shifts = np.zeros((n, 2))
    axis = fit_options.get("tilt_axis", 0.0)
    done = [start]
    next_fit = 2
    model = None
    for image, neighbour in outward_order(angles, start):
        shifts[image] = shifts[neighbour]
        pred = project_points(positions, angles[[image]], shifts[[image]], [axis])[0]
        inside = (np.abs(pred[:, 0]) < nx / 2 - margin) & (np.abs(pred[:, 1]) < ny / 2 - margin)
        pred[~inside] = np.nan
        cand = candidates[image].positions
        offset = match_offset(pred, cand, search, 1.5)
        if offset is not None:
            observed[image] = assign(pred + offset, cand, tol)
            shifts[image] -= offset  # approximately: rotation by the small residual axis
        done.append(image)
        if len(done) >= next_fit:
            sub = np.array(sorted(done))
            model = fit_projection_model(
                observed[sub],
                angles[sub],
                reference=int(np.flatnonzero(sub == start)[0]),
                rotation="fixed" if fit_options.get("rotation") == "fixed" else "global",
                tilt_axis=fit_options.get("tilt_axis", 0.0),
                loss="linear",
                rounds=1,
                min_views=2,
            )
            positions = np.nan_to_num(model.positions)
            shifts[sub] = model.shifts
            axis = model.tilt_axis
            next_fit = int(np.ceil(len(done) * 1.25))
    model = fit_projection_model(observed, angles, reference=start, **fit_options)
    predicted = model.predict()
    missing = ~model.used
    for image in range(n):
        todo = missing[image] & np.isfinite(model.positions[:, 0])
        if todo.any():
            pred = np.where(todo[:, None], predicted[image], np.nan)
            inside = (np.abs(pred[:, 0]) < nx / 2 - margin) & (np.abs(pred[:, 1]) < ny / 2 - margin)
            pred[~inside] = np.nan
            found = assign(pred, candidates[image].positions, tol)
            observed[image, todo] = found[todo]
    model = fit_projection_model(observed, angles, reference=start, initial=model, **fit_options)
    return observed, model


def drop_poor_tracks(observed, model: ModelFit, min_fraction: float = 0.5, factor: float = 3.0):
    """Tracks to keep (m,) bool: seen and used in at least ``min_fraction`` of the images
    and a mean residual at most ``factor`` x the median track's (and 0.5 px)."""
    used = model.used.sum(axis=0) >= min_fraction * len(observed)
    res = model.point_residuals
    limit = max(factor * np.nanmedian(res[used]) if used.any() else 0.0, 0.5)
    return used & (res <= limit)
