"""Align a tilt series (per-tilt shifts, tilt-axis angle and offset) and reconstruct it.

Methods (etspy's names and parameters): ``PC`` chained phase correlation with
``upsample_factor``; ``StackReg`` chained pyramid least squares; ``COM`` centre of mass and
conservation of mass (``xrange``, ``p``, ``nslices``); ``COM-CL`` centre of mass and common
line (``com_ref_index``, ``cl_ref_index``, ``cl_resolution``, ``cl_div_factor``); and
cryomatch's ``reprojection`` (global first guess refined against leave-one-out
reprojections; nothing chained). ``start`` defaults to the tilt nearest 0 degrees.
``fiducial`` (gold beads) and ``patch`` (patch tracking) fit a projection model
(:mod:`~cryomatch.stages.tomo.model_align`); ``auto`` (the default) picks fiducial,
reprojection or patch from the data and logs why.

The raw images are first turned so that the tilt axis (nominal angle from the config or the
.mdoc; with neither, and ``fit_tilt_axis``, the best of a search over the whole half circle,
:func:`~cryomatch.kernels.tiltaxis.search_tilt_axis`) runs along y and aligned; with
``fit_tilt_axis`` the residual angle is then estimated from the common line of the aligned
stack (:func:`~cryomatch.kernels.tiltaxis.tilt_axis_angle`) and the raw images turned and
aligned again; with ``center_axis`` the axis offset
(centre-of-mass fit, :func:`~cryomatch.kernels.tiltaxis.tilt_axis_offset`) is removed from
the shifts. The projection model of fiducial and patch fits the tilt-axis angle itself and
puts the axis through the centre of the image nearest 0 degrees.

Outputs in OUT/tomo/NAME: ``shifts.csv`` (index, angle, shift_x, shift_y in pixels of the
input), ``NAME.xf`` and ``NAME.tlt`` (IMOD), ``aligned.mrc`` (the input images turned and
shifted: tilt axis along y), ``reconstruction.mrc`` (WBP or SIRT of the aligned images with
their background removed and, with ``invert``, their contrast inverted; (z, y, x)),
``alignment.json`` (tilt axis, offset, method and why, warnings, record, model figures),
``alignment.png``, ``points.csv`` (bead or patch 3D positions and residuals) and
``model.csv`` (per image: fitted tilt angle, axis angle, magnification, shift, residual).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ... import geometry, provenance
from ...backend import get_xp, to_numpy
from ...cli import positive_float, positive_int
from ...errors import CryomatchError
from ...io.atomic import Outputs
from ...io.figures import save_png
from ...io.files import write_csv, write_json
from ...io.mrc import write_mrc
from ...kernels import tiltalign, tiltaxis
from ...kernels.tomography import ParallelBeamProjector, sirt, wbp
from ...progress import progress
from . import model_align
from .common import check_order, prepare, read_tilt_series, summary_figure, write_shift_files

METHODS = ("PC", "COM", "COM-CL", "StackReg", "reprojection")  # image-based (align_stack)
STAGE_METHODS = ("auto", "fiducial", "patch", *METHODS)


@dataclass
class StackAlignment:
    """Result of :func:`align_stack`: shifts (n, 2) = (x across the axis, y along it) in
    pixels, moving each image's content by +shift; the aligned stack; per-round record."""

    shifts: np.ndarray
    aligned: np.ndarray
    method: str
    record: list = field(default_factory=list)


def align_stack(
    stack,
    method: str = "reprojection",
    start: int | None = None,
    angles=None,
    show_progressbar: bool = True,
    upsample_factor: int = 3,
    xrange=None,
    p: int = 20,
    nslices: int = 20,
    com_ref_index: int | None = None,
    cl_ref_index: int | None = None,
    cl_resolution: float = 0.05,
    cl_div_factor: int = 8,
    initial="COM",
    iterations: int = 10,
    tolerance: float = 0.01,
    smooth_degree: int = 12,
    thickness: int | None = None,
    batch_size: int = 16,
    xp=np,
) -> StackAlignment:
    """Per-tilt shifts of a tilt series (n, ny, nx) whose tilt axis runs along y.

    ``method`` and the keyword names follow etspy's ``align_stack``; ``angles`` (degrees) are
    needed by COM and reprojection. ``start`` (default: the tilt nearest 0 degrees, or the
    middle image when no angles are given) is the image chained methods start from and that
    COM-CL's references default to. reprojection's options: ``initial`` ('COM', 'chain' or
    shifts), ``iterations``, ``tolerance`` (pixels), ``smooth_degree``, ``thickness``.
    """
    if method not in METHODS:
        raise CryomatchError(f"unknown alignment method {method!r} (use {', '.join(METHODS)})")
    stack = np.asarray(stack)
    if stack.ndim != 3 or len(stack) < 2:
        raise CryomatchError(f"expected a stack of at least 2 images, got shape {stack.shape}")
    n = len(stack)
    if angles is not None:
        angles = np.asarray(angles, dtype=np.float64)
        if len(angles) != n:
            raise CryomatchError(f"{len(angles)} tilt angles for {n} images")
    elif method in ("COM", "reprojection"):
        raise CryomatchError(f"method {method} needs the tilt angles")
    if start is None:
        start = tiltalign.default_start(angles) if angles is not None else n // 2
    if not 0 <= start < n:
        raise CryomatchError(f"start {start} is not an image index (0..{n - 1})")
    data = stack.astype(np.float32, copy=False)
    units = {"PC": n - 1, "StackReg": n - 1, "COM": 2, "COM-CL": 2, "reprojection": 1 + iterations}
    bar = (
        progress(total=units[method], desc=f"align {method}", unit="step")
        if show_progressbar
        else None
    )
    step = bar.update if bar is not None else tiltalign._noop
    record = []
    try:
        if method == "PC":
            shifts = tiltalign.shifts_pc(data, start, upsample_factor, batch_size, step)
        elif method == "StackReg":
            shifts = tiltalign.shifts_stackreg(data, start, batch_size, step)
        elif method == "COM":
            shifts = tiltalign.shifts_com(data, angles, xrange, p, nslices, step)
        elif method == "COM-CL":
            com_ref = start if com_ref_index is None else int(com_ref_index)
            cl_ref = start if cl_ref_index is None else int(cl_ref_index)
            for ref in (com_ref, cl_ref):
                if not 0 <= ref < n:
                    raise CryomatchError(f"reference index {ref} is not an image index")
            try:
                shifts = tiltalign.shifts_com_cl(
                    data, com_ref, cl_ref, cl_resolution, cl_div_factor, step
                )
            except ValueError as exc:
                raise CryomatchError(str(exc)) from None
        else:
            shifts, record = tiltalign.shifts_reprojection(
                data,
                angles,
                start,
                initial,
                smooth_degree,
                iterations,
                tolerance,
                thickness=thickness,
                xp=xp,
                progress=step,
            )
    finally:
        if bar is not None:
            bar.close()
    return StackAlignment(shifts, tiltalign.shift_stack(data, shifts), method, record)


def reconstruct(
    aligned, angles, thickness: int | None = None, method: str = "wbp", iterations: int = 30, xp=np
) -> np.ndarray:
    """Reconstruction (nz, ny, nx) of an aligned stack: weighted back-projection or SIRT."""
    projector = ParallelBeamProjector(angles, aligned.shape[2], thickness, xp=xp)
    data = xp.asarray(aligned, dtype=np.float32)
    if method == "wbp":
        return to_numpy(wbp(projector, data))
    if method == "sirt":
        return to_numpy(sirt(projector, data, iterations))
    raise CryomatchError(f"unknown reconstruction method {method!r} (use wbp or sirt)")


def tomo_align(
    stack: str | Path,
    out: str | Path,
    name: str | None = None,
    angles=None,
    method: str = "auto",
    tilt_axis: float | None = None,
    fit_tilt_axis: bool = True,
    tilt_axis_search: float = 5.0,
    center_axis: bool = True,
    start: int | None = None,
    binning: int = 1,
    invert: bool = False,
    thickness: int | None = None,
    reconstruction: str = "wbp",
    sirt_iterations: int = 30,
    pixel_size: float | None = None,
    backend: str = "numpy",
    bead_size: float | None = None,
    min_beads: int = 5,
    max_beads: int = 60,
    patch_size: int | None = None,
    patch_spacing: float | None = None,
    model_rotation: str = "global",
    model_tilt_angles: bool = False,
    model_magnification: bool = False,
    max_residual: float = 1.0,
    **options,
) -> Path:
    """Align and reconstruct one tilt series into ``out/tomo/NAME`` (see module doc);
    ``options`` go to :func:`align_stack`. Returns the output folder."""
    params = {k: v for k, v in locals().items() if k not in ("out", "options")} | options
    prov = provenance.record("tomo-align", params)
    xp = get_xp(backend)
    if method not in STAGE_METHODS:
        raise CryomatchError(
            f"unknown alignment method {method!r} (use {', '.join(STAGE_METHODS)})"
        )
    if binning < 1:
        raise CryomatchError(f"binning must be at least 1, got {binning}")
    if reconstruction not in ("wbp", "sirt"):
        raise CryomatchError(f"unknown reconstruction method {reconstruction!r} (use wbp or sirt)")
    if model_rotation not in ("global", "per_view"):
        raise CryomatchError(f"model_rotation must be global or per_view, got {model_rotation!r}")
    series = read_tilt_series(stack, angles, tilt_axis, pixel_size)
    name = name or series.stack_path.stem
    folder = Path(out) / "tomo" / name
    check_order(series.angles, method, series.angles_path or series.stack_path)
    if method == "reprojection" and options.get("initial") == "chain":
        check_order(series.angles, "PC", series.angles_path or series.stack_path)
    data = prepare(series.data, invert)
    n = len(series.angles)
    if start is not None and not 0 <= start < n:
        raise CryomatchError(f"start {start} is not an image index (0..{n - 1})")
    first = tiltalign.default_start(series.angles) if start is None else start

    axis = series.tilt_axis
    searched = None
    if fit_tilt_axis and not series.tilt_axis_known:  # no axis given: search the half circle
        axis, searched = tiltaxis.search_tilt_axis(data, first)
        model_align.log(
            f"tilt axis unknown: searched the half circle, {axis:.2f} deg (its mirror"
            f" {axis + 180:.2f} fits the data equally: give the series' tilt_axis to choose)"
        )
    base_axis = axis  # the images are turned by this before any method runs
    turned = tiltalign.rotate_stack(data, axis)
    small = tiltalign.bin_stack(turned, binning)
    notes: list[str] = []
    chosen, reason, fitted = method, "asked for", None
    if method in ("auto", *model_align.MODEL_METHODS):
        fit_options = {
            "rotation": model_rotation if fit_tilt_axis else "fixed",
            "tilt_angles": model_tilt_angles,
            "magnification": model_magnification,
        }
        chosen, reason, fitted = model_align.choose_and_align(
            small,
            series.angles,
            first,
            method,
            series.pixel_size * binning,
            bead_size,
            min_beads,
            max_beads,
            None if patch_size is None else max(8, patch_size // binning),
            None if patch_spacing is None else patch_spacing / binning,
            fit_options,
            max_residual,
            binning,
            notes,
        )
    how = "chosen" if method == "auto" else "asked for"
    model_align.log(f"method {chosen} ({how})" + ("" if reason == "asked for" else f": {reason}"))
    delta = offset = 0.0
    record = []
    fitted_angles = series.angles
    matrices = None
    if fitted is None:
        if method == "auto":
            check_order(series.angles, chosen, series.angles_path or series.stack_path)
        model_align.check_com_assumption(small, chosen, options.get("initial"), notes)
        result = align_stack(small, chosen, start, series.angles, xp=xp, **options)
        if fit_tilt_axis:  # on the aligned stack, then align again about the fitted axis
            delta = tiltaxis.tilt_axis_angle(
                tiltalign.shift_stack(small, result.shifts), tilt_axis_search
            )
            if abs(delta) > 0.01:
                axis = base_axis + delta
                turned = tiltalign.rotate_stack(data, axis)
                small = tiltalign.bin_stack(turned, binning)
                result = align_stack(small, chosen, start, series.angles, xp=xp, **options)
        shifts = result.shifts * binning
        record = result.record
        if center_axis:
            offset = (
                tiltaxis.tilt_axis_offset(
                    tiltalign.shift_stack(small, result.shifts), series.angles
                )
                * binning
            )
            shifts[:, 0] -= offset
        rotations = np.full(n, axis)
        magnifications = np.ones(n)
        aligned_raw = tiltalign.rotate_stack(series.data, axis)
    else:
        # the model puts the tilt axis through the reference image's centre: nothing to centre
        model = fitted.model
        model_align.check_residual(fitted, max_residual, binning, notes)
        delta = model.tilt_axis
        axis = base_axis + delta
        rotations = base_axis + model.rotations
        magnifications = model.magnifications
        shifts = model.shifts * binning / magnifications[:, None]
        fitted_angles = model.angles
        pairs = zip(rotations, magnifications, strict=True)
        matrices = np.stack([geometry.tilt_axis_rotation(r) / m for r, m in pairs])
        turned = rotate_each(data, rotations)
        aligned_raw = rotate_each(series.data, rotations)
    volume = reconstruct(
        tiltalign.shift_stack(turned, shifts),
        fitted_angles,
        thickness,
        reconstruction,
        sirt_iterations,
        xp,
    )
    aligned = tiltalign.shift_stack(aligned_raw, shifts)

    labels = provenance.mrc_labels(prov)
    summary = {
        "name": name,
        "stack": str(series.stack_path),
        "angles_file": str(series.angles_path) if series.angles_path else None,
        "n_images": n,
        "shape": list(series.data.shape[1:]),
        "pixel_size": series.pixel_size,
        "method_requested": method,
        "method": chosen,
        "method_reason": reason,
        "warnings": notes,
        "tilt_axis": axis,
        "tilt_axis_nominal": series.tilt_axis if series.tilt_axis_known else None,
        "tilt_axis_searched": None if searched is None else searched.tolist(),
        "tilt_axis_fit": delta,
        "axis_offset": offset,
        "binning": binning,
        "invert": invert,
        "record": [{"round": r[0], "max_update": r[1], "rms_update": r[2]} for r in record],
        "model": None if fitted is None else model_summary(fitted, binning),
        "provenance": prov,
    }
    points, views = model_tables(
        fitted, series.angles, fitted_angles, rotations, magnifications, shifts, binning
    )
    residuals = None
    title = f"{name}: {chosen}, tilt axis {axis:.2f} deg, offset {offset:.2f} px"
    if fitted is not None:
        label = "bead" if chosen == "fiducial" else "patch"
        residuals = (views["mean_residual"], points["mean_residual"], label)
        title = (
            f"{name}: {chosen} ({len(points)} {label}es), tilt axis {axis:.2f} deg, "
            f"mean residual {fitted.model.mean_residual * binning:.2f} px"
        ).replace("beades", "beads")
    with Outputs() as outputs:
        write_shift_files(
            folder, name, fitted_angles, shifts, axis, prov, outputs, matrices=matrices
        )
        write_csv(folder / "points.csv", points, prov, outputs)
        write_csv(folder / "model.csv", views, prov, outputs)
        write_mrc(
            folder / "aligned.mrc", aligned, series.pixel_size, labels, outputs, is_stack=True
        )
        write_mrc(folder / "reconstruction.mrc", volume, series.pixel_size, labels, outputs)
        write_json(folder / "alignment.json", summary, outputs)
        fig = summary_figure(fitted_angles, shifts, volume, title, residuals=residuals)
        save_png(fig, folder / "alignment.png", outputs)
    return folder


def rotate_each(data, rotations) -> np.ndarray:
    """Each image turned by its own tilt-axis angle (one turn when they are all equal)."""
    rotations = np.asarray(rotations, dtype=np.float64)
    if np.ptp(rotations) < 1e-9:
        return tiltalign.rotate_stack(data, float(rotations[0]))
    return np.concatenate(
        [tiltalign.rotate_stack(data[i : i + 1], float(r)) for i, r in enumerate(rotations)]
    )


def model_summary(fitted: model_align.ModelAlignment, binning: int) -> dict:
    """The projection model's figures for alignment.json (pixels of the input)."""
    model = fitted.model
    return {
        "kind": fitted.method,
        "n_points": int(model.used.any(axis=0).sum()),
        "n_observations": int(model.used.sum()),
        "n_rejected": int(model.rejected.sum()),
        "mean_residual": model.mean_residual * binning,
        "bead_radius": None if fitted.radius is None else fitted.radius * binning,
        "tilt_axis_fit": model.tilt_axis,
    }


def model_tables(fitted, angles, fitted_angles, rotations, magnifications, shifts, binning):
    """points.csv (per bead or patch: 3D position in px about the centre of the aligned
    volume, images used, rejected, mean residual) and model.csv (per image: nominal and
    fitted tilt angle, tilt-axis angle, magnification, shift, mean residual), pixels of the
    input; without a model, points.csv is empty and the residuals NaN."""
    n = len(angles)
    if fitted is None:
        points = pd.DataFrame(
            columns=["point", "x", "y", "z", "n_images", "n_rejected", "mean_residual"]
        )
        per_view = np.full(n, np.nan)
        count = np.zeros(n, dtype=int)
    else:
        model = fitted.model
        pos = model.positions * binning
        points = pd.DataFrame(
            {
                "point": np.arange(len(pos)),
                "x": pos[:, 0],
                "y": pos[:, 1],
                "z": pos[:, 2],
                "n_images": model.used.sum(axis=0),
                "n_rejected": model.rejected.sum(axis=0),
                "mean_residual": model.point_residuals * binning,
            }
        )
        per_view = model.view_residuals * binning
        count = model.used.sum(axis=1)
    views = pd.DataFrame(
        {
            "index": np.arange(n),
            "angle": angles,
            "tilt_angle": fitted_angles,
            "tilt_axis": rotations,
            "magnification": magnifications,
            "shift_x": shifts[:, 0],
            "shift_y": shifts[:, 1],
            "n_points": count,
            "mean_residual": per_view,
        }
    )
    return points, views


def add_method_arguments(p) -> None:
    """Options shared by tomo-align and tomo-refine: the input series and its geometry."""
    p.add_argument("--stack", required=True, help="tilt series (MRC)")
    p.add_argument("--out", required=True, help="output folder (writes OUT/tomo/NAME)")
    p.add_argument("--name", help="name of the series (default: the stack's file stem)")
    p.add_argument(
        "--angles",
        nargs="+",
        help="a .rawtlt/.tlt/.mdoc file or the angles themselves (default: a file "
        "beside the stack)",
    )
    p.add_argument(
        "--pixel-size", type=positive_float, help="Angstrom per pixel (default: .mdoc/header)"
    )
    p.add_argument("--invert", action="store_true", help="dark objects on a bright background")
    p.add_argument(
        "--thickness", type=positive_int, help="reconstruction thickness (default: width)"
    )
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])


def parse_angles(values):
    if values is None:
        return None
    if len(values) == 1:
        try:
            return [float(values[0])]
        except ValueError:
            return values[0]
    try:
        return [float(v) for v in values]
    except ValueError:
        raise CryomatchError(f"--angles: give one file or numbers, got {values}") from None


def add_arguments(p) -> None:
    add_method_arguments(p)
    p.add_argument(
        "--method",
        default="auto",
        choices=STAGE_METHODS,
        help="auto: fiducial when gold beads are found, reprojection for an object inside "
        "the field of view, else patch (the choice and its reason are logged)",
    )
    p.add_argument("--bead-size", type=float, help="gold bead diameter, nm (default: estimated)")
    p.add_argument("--min-beads", type=int, default=5, help="fiducial: fewest beads to use")
    p.add_argument("--max-beads", type=int, default=60, help="fiducial: most beads tracked")
    p.add_argument("--patch-size", type=int, help="patch: patch size, px (default: size/4)")
    p.add_argument("--patch-spacing", type=float, help="patch: grid spacing, px (default: size/2)")
    p.add_argument(
        "--model-rotation",
        default="global",
        choices=["global", "per_view"],
        help="fiducial/patch: one tilt-axis angle, or one per image",
    )
    p.add_argument(
        "--model-tilt-angles", action="store_true", help="fiducial/patch: fit tilt-angle offsets"
    )
    p.add_argument(
        "--model-magnification",
        action="store_true",
        help="fiducial/patch: fit a magnification per image",
    )
    p.add_argument(
        "--max-residual",
        type=float,
        default=1.0,
        help="fiducial/patch: warn when the mean residual exceeds this (px)",
    )
    p.add_argument(
        "--tilt-axis",
        type=float,
        help="nominal tilt-axis angle, degrees counter-clockwise from +y (default: .mdoc, else 0)",
    )
    p.add_argument(
        "--no-fit-tilt-axis",
        dest="fit_tilt_axis",
        action="store_false",
        help="keep the nominal tilt-axis angle",
    )
    p.add_argument(
        "--tilt-axis-search",
        type=float,
        default=5.0,
        help="search the tilt axis within +- this many degrees of the nominal",
    )
    p.add_argument(
        "--no-center-axis",
        dest="center_axis",
        action="store_false",
        help="do not move the tilt axis to the image centre",
    )
    p.add_argument("--start", type=int, help="image index to start from (default: nearest 0)")
    p.add_argument("--binning", type=positive_int, default=1, help="align at this binning")
    p.add_argument("--reconstruction", default="wbp", choices=["wbp", "sirt"])
    p.add_argument("--sirt-iterations", type=positive_int, default=30)
    p.add_argument("--upsample-factor", type=int, help="PC: subpixel upsampling (default 3)")
    p.add_argument("--xrange", type=float, nargs=2, help="COM: rows along the axis to use")
    p.add_argument("--p", type=int, help="COM: largest shift along the axis (default 20)")
    p.add_argument("--nslices", type=int, help="COM: rows for the centre of mass (default 20)")
    p.add_argument("--com-ref-index", type=int, help="COM-CL: centre-of-mass reference image")
    p.add_argument("--cl-ref-index", type=int, help="COM-CL: common-line reference image")
    p.add_argument("--cl-resolution", type=float, help="COM-CL: subpixel resolution (0.05)")
    p.add_argument("--cl-div-factor", type=int, help="COM-CL: subdivision factor (8)")
    p.add_argument(
        "--initial", choices=["COM", "chain"], help="reprojection: first guess (default COM)"
    )
    p.add_argument("--iterations", type=int, help="reprojection: largest number of rounds (10)")
    p.add_argument("--tolerance", type=float, help="reprojection: stop below (0.01 px)")
    p.add_argument(
        "--smooth-degree", type=int, help="reprojection: slow terms kept from the first guess (12)"
    )


OPTION_NAMES = (
    "upsample_factor",
    "xrange",
    "p",
    "nslices",
    "com_ref_index",
    "cl_ref_index",
    "cl_resolution",
    "cl_div_factor",
    "initial",
    "iterations",
    "tolerance",
    "smooth_degree",
)


def run(args) -> None:
    options = {k: getattr(args, k) for k in OPTION_NAMES if getattr(args, k) is not None}
    tomo_align(
        args.stack,
        args.out,
        args.name,
        parse_angles(args.angles),
        args.method,
        args.tilt_axis,
        args.fit_tilt_axis,
        args.tilt_axis_search,
        args.center_axis,
        args.start,
        args.binning,
        args.invert,
        args.thickness,
        args.reconstruction,
        args.sirt_iterations,
        args.pixel_size,
        args.backend,
        args.bead_size,
        args.min_beads,
        args.max_beads,
        args.patch_size,
        args.patch_spacing,
        args.model_rotation,
        args.model_tilt_angles,
        args.model_magnification,
        args.max_residual,
        **options,
    )
