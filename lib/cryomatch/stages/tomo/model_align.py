"""Alignment by a fitted projection model (gold beads or patches) and the choice of method
from the data, for ``cryomatch tomo-align`` (``method`` fiducial, patch or auto).

``auto`` picks, in this order: ``fiducial`` when the image nearest 0 degrees holds at least
``min_beads`` gold beads (blobs of the bead size, from ``bead_size`` in nm or estimated,
clearly denser than everything else) and tracking them leaves at least ``min_beads`` good
tracks; ``reprojection`` (centre-of-mass start) when the specimen stays inside the field of
view across the tilt axis in (nearly) every image (an isolated object); else ``patch``.
The reason is logged and recorded. Warnings (logged as CryomatchWarning and recorded):
centre-of-mass methods (COM, COM-CL, reprojection with its COM start) on a specimen that
crosses the frame edges; a model's mean residual above ``max_residual`` px.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from ...errors import CryomatchError, CryomatchWarning
from ...kernels import fiducials, patch_tracking
from ...kernels.field_of_view import edge_signal
from ...kernels.projection_model import ModelFit, fit_projection_model

MODEL_METHODS = ("fiducial", "patch")
COM_METHODS = ("COM", "COM-CL", "reprojection")
EDGE_LIMIT = 0.08  # edge_signal above this: the image's specimen crosses the frame edges
CROSSING_FRACTION = 0.1  # more images than this crossing: not an isolated object
DETECTION_THRESHOLD = 5.0  # bead candidates: response above 5 x its robust noise level


@dataclass
class ModelAlignment:
    """A projection-model alignment in the frame it was fitted in (binned, turned)."""

    method: str
    model: ModelFit
    observed: np.ndarray  # (n, m, 2) tracked positions, NaN gaps
    radius: float | None = None  # bead radius, px of the fitted frame
    notes: list = field(default_factory=list)


def log(message: str) -> None:
    print(f"tomo-align: {message}", file=sys.stderr)


def warn(message: str, record: list) -> None:
    """Warn in the log and keep the warning for the outputs."""
    record.append(message)
    warnings.warn(message, CryomatchWarning, stacklevel=3)


def crossing_images(stack) -> tuple[int, np.ndarray]:
    """Number of images whose specimen crosses the frame edges across the tilt axis, and the
    edge signal of every image (:func:`~cryomatch.kernels.field_of_view.edge_signal`)."""
    signal = edge_signal(stack)
    return int((signal > EDGE_LIMIT).sum()), signal


def bead_radius(stack, start: int, bead_size: float | None, pixel_size: float) -> float:
    """Bead radius in px of ``stack``: half ``bead_size`` (nm) at ``pixel_size`` (A per px
    of this stack), else estimated on image ``start`` (NaN: no bead-like blobs)."""
    if bead_size is not None:
        if bead_size <= 0:
            raise CryomatchError(f"bead_size must be positive (nm), got {bead_size}")
        return 10.0 * bead_size / 2 / pixel_size
    return fiducials.estimate_radius(stack[start])


def find_beads(stack, start: int, radius: float, min_beads: int, max_beads: int):
    """Bead seeds (k, 2) in image ``start`` (round blobs much stronger than the rest:
    :func:`~cryomatch.kernels.fiducials.count_beads`) and every image's candidates; None
    when the image holds fewer than ``min_beads`` beads."""
    if not np.isfinite(radius):
        return None, None
    image = stack[start : start + 1]
    first = fiducials.find_peaks(
        fiducials.bead_response(image, radius),
        radius,
        DETECTION_THRESHOLD,
        4 * max_beads,
        fiducials.curvatures(image, radius),
    )[0]
    round_ = first.roundness >= fiducials.ROUND
    strengths = first.strengths[round_]
    k = fiducials.count_beads(strengths, DETECTION_THRESHOLD, min_beads, max_beads)
    if k < min_beads:
        return None, None
    seeds = first.positions[round_][:k]
    candidates = fiducials.find_peaks(
        fiducials.bead_response(stack, radius), radius, DETECTION_THRESHOLD, 4 * max_beads
    )
    return seeds, candidates


def fiducial_alignment(
    stack, angles, start, radius, seeds, candidates, fit_options, min_beads, max_residual
) -> tuple[ModelAlignment | None, str]:
    """Track the beads, fit the model, drop poor tracks and fit again. Returns (alignment,
    why): why is '' on success; (None, why) when fewer than ``min_beads`` (or half the
    seeds) good tracks remain; (alignment, why) when their mean residual exceeds
    ``max_residual`` px (of ``stack``)."""
    shape = stack.shape[1:]
    tol = max(2.0, radius)
    observed, model = fiducials.track(
        candidates, angles, start, shape, seeds, tol=tol, fit_options=fit_options
    )
    keep = fiducials.drop_poor_tracks(observed, model)
    need = max(min_beads, int(np.ceil(0.5 * len(seeds))))
    if keep.sum() < need:
        return None, f"only {keep.sum()} of {len(seeds)} beads could be tracked ({need} needed)"
    observed = observed[:, keep]
    model = fit_projection_model(observed, angles, reference=start, **fit_options)
    result = ModelAlignment("fiducial", model, observed, radius)
    if not model.mean_residual <= max_residual:
        return result, (
            f"the bead model's mean residual {model.mean_residual:.2f} px (this binning) is "
            f"above max_residual {max_residual:g} px"
        )
    return result, ""


def patch_alignment(stack, angles, start, patch, spacing, fit_options) -> ModelAlignment:
    observed, model = patch_tracking.track_patches(
        stack, angles, start, patch, spacing, fit_options=fit_options
    )
    return ModelAlignment("patch", model, observed)


def choose_and_align(
    stack,
    angles,
    start: int,
    method: str,
    pixel_size: float,
    bead_size: float | None,
    min_beads: int,
    max_beads: int,
    patch_size: int | None,
    patch_spacing: float | None,
    fit_options: dict,
    max_residual: float,
    binning: int,
    notes: list,
):
    """Run ``method`` (fiducial, patch) or choose one (auto) on a stack whose tilt axis runs
    about along y (binned by ``binning``; ``max_residual`` in px of the input). Returns
    (method, reason, ModelAlignment or None: an image-based method (reprojection) is to be
    run by the caller)."""
    n = len(stack)
    limit = max_residual / binning
    crossing, _ = crossing_images(stack)
    isolated = crossing <= CROSSING_FRACTION * n
    if method in ("fiducial", "auto"):
        radius = bead_radius(stack, start, bead_size, pixel_size)
        seeds, candidates = find_beads(stack, start, radius, min_beads, max_beads)
        if seeds is not None:
            result, why = fiducial_alignment(
                stack, angles, start, radius, seeds, candidates, fit_options, min_beads, limit
            )
            if result is not None and (not why or method == "fiducial"):
                used = result.model.used.any(axis=0).sum()
                reason = (
                    f"{len(seeds)} gold beads (radius {radius:.1f} px) found in the image at "
                    f"{angles[start]:g} deg, {used} tracked through the series"
                )
                return "fiducial", reason, result
            why = f"{len(seeds)} bead-like blobs found, but {why}"
        else:
            size = "no bead-sized blobs" if not np.isfinite(radius) else f"radius {radius:.1f} px"
            why = f"no gold beads found ({size}; at least {min_beads} needed)"
        if method == "fiducial":
            warn(f"fiducial alignment failed: {why}; aligning by patch tracking instead", notes)
            result = patch_alignment(stack, angles, start, patch_size, patch_spacing, fit_options)
            return "patch", why + ": patch tracking instead", result
    else:
        why = "patch tracking asked for"
    if method == "auto" and isolated:
        reason = (
            f"{why}; the specimen stays inside the field of view across the tilt axis "
            f"({crossing} of {n} images cross the frame edges): an isolated object"
        )
        return "reprojection", reason, None
    if method == "auto":
        why += (
            f"; the specimen crosses the frame edges in {crossing} of {n} images (extended "
            "specimen: centre-of-mass methods do not hold)"
        )
    result = patch_alignment(stack, angles, start, patch_size, patch_spacing, fit_options)
    return "patch", why, result


def check_com_assumption(stack, method: str, initial, notes: list) -> None:
    """Warn when a centre-of-mass method runs on a specimen crossing the frame edges."""
    if method not in COM_METHODS or (method == "reprojection" and initial not in (None, "COM")):
        return
    crossing, _ = crossing_images(stack)
    if crossing > CROSSING_FRACTION * len(stack):
        warn(
            f"method {method} assumes the specimen stays inside the field of view (centre "
            f"of mass), but it crosses the frame edges across the tilt axis in {crossing} of "
            f"{len(stack)} images: the shifts may be pixels off; use fiducial or patch (or "
            "auto)",
            notes,
        )


def check_residual(result: ModelAlignment, max_residual: float, binning: int, notes: list):
    """Warn when the model's mean residual (px of the input) exceeds ``max_residual``."""
    mean = result.model.mean_residual * binning
    if not np.isfinite(mean) or mean > max_residual:
        warn(
            f"{result.method} alignment: mean residual {mean:.2f} px is above "
            f"max_residual {max_residual:g} px (poor tracks, or a model without the "
            "per-image rotation, tilt-angle or magnification variables the data need)",
            notes,
        )
