"""Refine tilt-series shifts by phase matching against reprojections (mumott's algorithm).

Starts from an alignment (``alignment.json`` of ``cryomatch tomo-align``, or shifts from a
CSV or IMOD .xf with a tilt-axis angle) and runs
:func:`~cryomatch.kernels.phasematch.run_phase_matching_alignment` with mumott's parameter
names: each iteration reconstructs (SIRT warm-started from the previous iteration's volume),
forward-projects, finds each sampled image's subpixel shift by correlation, clips it to
``shift_cutoff``, relaxes, moves toward the centre of mass, and stops when the largest shift
found is below ``shift_tolerance``. Seeded.

Outputs in OUT/tomo/NAME: ``refined_shifts.csv``, ``NAME_refined.xf`` and
``NAME_refined.tlt``, ``refinement.csv`` (per iteration: largest and rms shift found,
images sampled, reprojection residual, seconds), ``refined_reconstruction.mrc`` (sirt: the
refinement's volume after 10 more plain SIRT updates on the refined stack; else WBP) and
``refinement.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ... import provenance
from ...backend import get_xp, to_numpy
from ...cli import positive_int
from ...errors import CryomatchError
from ...io.atomic import Outputs
from ...io.figures import save_png
from ...io.files import write_csv
from ...io.mrc import write_mrc
from ...kernels import tiltalign
from ...kernels.phasematch import run_phase_matching_alignment
from ...kernels.tomography import ParallelBeamProjector, sirt
from ...progress import progress
from .align import add_method_arguments, parse_angles, reconstruct
from .common import prepare, read_shifts, read_tilt_series, summary_figure, write_shift_files

FINAL_SIRT_ITERATIONS = 10  # plain SIRT updates of the written reconstruction


def read_alignment(path: str | Path) -> dict:
    """An ``alignment.json`` of tomo-align (its shifts.csv must lie beside it)."""
    path = Path(path)
    if not path.is_file():
        raise CryomatchError("file does not exist", path)
    try:
        summary = json.loads(path.read_text())
        summary["tilt_axis"] = float(summary["tilt_axis"])
    except (ValueError, KeyError, TypeError):
        raise CryomatchError("not an alignment.json of cryomatch tomo-align", path) from None
    summary["shifts_file"] = path.with_name("shifts.csv")
    return summary


def tomo_refine(
    stack: str | Path,
    out: str | Path,
    alignment: str | Path | None = None,
    shifts: str | Path | None = None,
    name: str | None = None,
    angles=None,
    tilt_axis: float | None = None,
    invert: bool | None = None,
    pixel_size: float | None = None,
    thickness: int | None = None,
    maxiter: int = 50,
    upsampling: int = 10,
    shift_tolerance: float | None = None,
    shift_cutoff: float | None = None,
    relative_sample_size: float = 1.0,
    relaxation_weight: float = 0.0,
    center_of_mass_shift_weight: float = 0.0,
    align_j: bool = True,
    align_k: bool = True,
    ignored_subset=None,
    projection_cropping: int = 0,
    reconstruction: str = "sirt",
    reconstruction_iterations: int = 2,
    seed: int = 0,
    backend: str = "numpy",
) -> Path:
    """Refine the shifts of one tilt series into ``out/tomo/NAME`` (see module doc).

    Starting shifts and tilt axis come from ``alignment`` (tomo-align's alignment.json) or
    from ``shifts`` (CSV or .xf) with ``tilt_axis``; with neither, from zero.
    ``projection_cropping`` here is a border width in pixels left out of the comparison.
    """
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("tomo-refine", params)
    xp = get_xp(backend)
    if reconstruction not in ("sirt", "wbp", "loo"):
        raise CryomatchError(f"unknown reconstruction {reconstruction!r} (use sirt, wbp or loo)")
    summary = read_alignment(alignment) if alignment else {}
    axis = summary.get("tilt_axis") if tilt_axis is None else tilt_axis
    if invert is None:
        invert = bool(summary.get("invert", False))
    series = read_tilt_series(stack, angles, axis, pixel_size)
    name = name or summary.get("name") or series.stack_path.stem
    n = len(series.angles)
    if shifts is not None:
        start = read_shifts(shifts, n)
    elif summary:
        start = read_shifts(summary["shifts_file"], n)
    else:
        start = np.zeros((n, 2))
    ignored = set() if ignored_subset is None else {int(i) for i in ignored_subset}
    if any(not 0 <= i < n for i in ignored):
        raise CryomatchError(f"ignored_subset holds indices outside 0..{n - 1}")
    if projection_cropping < 0 or 2 * projection_cropping >= min(series.data.shape[1:]):
        raise CryomatchError(f"projection_cropping {projection_cropping} leaves no image")
    crop = slice(projection_cropping, -projection_cropping or None)

    turned = tiltalign.rotate_stack(prepare(series.data, invert), series.tilt_axis)
    bar = progress(total=maxiter, desc="phase matching", unit="it")
    try:
        result = run_phase_matching_alignment(
            turned,
            series.angles,
            start,
            ignored,
            (crop, crop),
            maxiter,
            upsampling,
            shift_tolerance,
            shift_cutoff,
            relative_sample_size,
            relaxation_weight,
            center_of_mass_shift_weight,
            align_j,
            align_k,
            reconstruction,
            reconstruction_iterations,
            thickness,
            seed,
            xp,
            callback=lambda row: bar.update(1),
        )
    except ValueError as exc:
        raise CryomatchError(str(exc)) from None
    finally:
        bar.close()
    refined = result["shifts"]
    aligned = tiltalign.shift_stack(turned, refined)
    if reconstruction == "sirt":  # continue the refinement's regularized volume, unleaked
        projector = ParallelBeamProjector(series.angles, aligned.shape[2], thickness, xp=xp)
        volume = to_numpy(
            sirt(
                projector,
                xp.asarray(aligned, dtype=np.float32),
                FINAL_SIRT_ITERATIONS,
                start=xp.asarray(result["reconstruction"]),
            )
        )
    else:
        volume = reconstruct(aligned, series.angles, thickness, "wbp", xp=xp)
    folder = Path(out) / "tomo" / name
    record = result["record"]
    with Outputs() as outputs:
        write_shift_files(
            folder,
            f"{name}_refined",
            series.angles,
            refined,
            series.tilt_axis,
            prov,
            outputs,
            prefix="refined_",
        )
        write_csv(folder / "refinement.csv", pd.DataFrame(record), prov, outputs)
        write_mrc(
            folder / "refined_reconstruction.mrc",
            to_numpy(volume),
            series.pixel_size,
            provenance.mrc_labels(prov),
            outputs,
        )
        fig = summary_figure(
            series.angles,
            refined,
            volume,
            f"{name}: phase matching, {len(record)} iterations",
            record,
        )
        save_png(fig, folder / "refinement.png", outputs)
    return folder


def add_arguments(p) -> None:
    add_method_arguments(p)
    p.add_argument("--alignment", help="alignment.json of tomo-align (start shifts, tilt axis)")
    p.add_argument("--shifts", help="start shifts instead: shifts.csv or IMOD .xf")
    p.add_argument("--tilt-axis", type=float, help="tilt-axis angle (default: the alignment's)")
    p.add_argument("--maxiter", type=positive_int, default=50, help="largest number of iterations")
    p.add_argument("--upsampling", type=positive_int, default=10, help="subpixel upsampling factor")
    p.add_argument("--shift-tolerance", type=float, help="stop below (default 1/upsampling)")
    p.add_argument("--shift-cutoff", type=float, help="largest step (default 5/upsampling)")
    p.add_argument(
        "--relative-sample-size",
        type=float,
        default=1.0,
        help="fraction of images aligned per iteration",
    )
    p.add_argument("--relaxation-weight", type=float, default=0.0)
    p.add_argument("--center-of-mass-shift-weight", type=float, default=0.0)
    p.add_argument(
        "--no-align-j", dest="align_j", action="store_false", help="keep shifts across the axis"
    )
    p.add_argument(
        "--no-align-k", dest="align_k", action="store_false", help="keep shifts along the axis"
    )
    p.add_argument("--ignored-subset", type=int, nargs="+", help="image indices kept fixed")
    p.add_argument(
        "--projection-cropping",
        type=int,
        default=0,
        help="border (pixels) left out of the comparison",
    )
    p.add_argument(
        "--reconstruction",
        default="sirt",
        choices=["sirt", "wbp", "loo"],
        help="sirt (as mumott), wbp, or loo: leave-one-out WBP reprojections",
    )
    p.add_argument(
        "--reconstruction-iterations",
        type=positive_int,
        default=2,
        help="sirt: updates per iteration of the warm-started reconstruction",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the image sampling")


def run(args) -> None:
    tomo_refine(
        args.stack,
        args.out,
        args.alignment,
        args.shifts,
        args.name,
        parse_angles(args.angles),
        args.tilt_axis,
        args.invert or None,
        args.pixel_size,
        args.thickness,
        args.maxiter,
        args.upsampling,
        args.shift_tolerance,
        args.shift_cutoff,
        args.relative_sample_size,
        args.relaxation_weight,
        args.center_of_mass_shift_weight,
        args.align_j,
        args.align_k,
        args.ignored_subset,
        args.projection_cropping,
        args.reconstruction,
        args.reconstruction_iterations,
        args.seed,
        args.backend,
    )
