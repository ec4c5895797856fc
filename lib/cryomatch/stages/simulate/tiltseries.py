"""A tilt series of a 3D phantom of Gaussian ellipsoids and dense beads, with known shifts:
an isolated object inside the field of view (``specimen`` 'object') or an extended
specimen, a slab wider than the field of view with gold beads (``specimen`` 'slab',
:func:`~cryomatch.kernels.ellipsoids.slab_phantom`), as in most cryo-ET.

Projections are exact (closed form, :mod:`cryomatch.kernels.ellipsoids`) at tilts
``min..max`` step ``step`` degrees about an axis at ``tilt_axis`` degrees (counter-clockwise
from +y), each displaced by a known subpixel shift drawn uniformly in +-``max_shift``
pixels, plus white Gaussian noise of ``noise`` times the standard deviation of the
noise-free stack. The truth is the alignment of each image in :mod:`cryomatch.geometry`'s
convention (``truth.csv``, ``truth.xf``, ``truth.json``), so an alignment can be compared with
it directly after removing the unobservable components.

Outputs in OUT: ``tiltseries.mrc`` (the stack), ``tiltseries.rawtlt``, ``truth.csv``
(index, angle, shift_x, shift_y), ``truth.xf``, ``truth.json`` (tilt axis, noise sigma) and
``phantom.mrc`` (the phantom sampled on a size^3 grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ... import geometry, provenance
from ...cli import nonnegative_float, nonnegative_int, positive_float, positive_int
from ...errors import CryomatchError
from ...io.atomic import Outputs
from ...io.files import write_csv, write_json
from ...io.mrc import write_mrc
from ...io.tilts import write_tlt, write_xf
from ...kernels.ellipsoids import project, random_phantom, slab_phantom, voxelize
from ...progress import progress


def tilt_range(first: float, last: float, step: float) -> np.ndarray:
    """Angles first, first + step, ... up to last (inclusive within 1e-6)."""
    if step <= 0 or last < first:
        raise CryomatchError(f"bad tilt range {first}..{last} step {step}")
    return np.round(np.arange(first, last + step * 1e-6, step), 6)


def simulate_tiltseries(
    out: str | Path,
    size: int = 64,
    tilts: tuple[float, float, float] = (-60.0, 60.0, 2.0),
    max_shift: float = 8.0,
    noise: float = 0.15,
    seed: int = 0,
    tilt_axis: float = 0.0,
    pixel_size: float = 10.0,
    n_ellipsoids: int = 24,
    n_beads: int = 12,
    specimen: str = "object",
    batch_size: int = 16,
) -> Path:
    """Write a simulated tilt series to ``out`` (see module doc); returns the stack path."""
    out = Path(out)
    if size < 16:
        raise CryomatchError(f"the image size must be at least 16 pixels, got {size}")
    if specimen not in ("object", "slab"):
        raise CryomatchError(f"specimen must be 'object' or 'slab', got {specimen!r}")
    if noise < 0 or max_shift < 0:
        raise CryomatchError("noise and max_shift must not be negative")
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("simulate tiltseries", params)
    angles = tilt_range(*tilts)
    rng = np.random.default_rng([seed, 6])
    if specimen == "slab":
        phantom = slab_phantom(rng, size, n_ellipsoids, n_beads)
    else:
        phantom = random_phantom(rng, size, n_ellipsoids, n_beads)
    shifts = rng.uniform(-max_shift, max_shift, size=(len(angles), 2))
    stack = np.empty((len(angles), size, size), dtype=np.float32)
    for lo in progress(range(0, len(angles), batch_size), desc="simulate", unit="batch"):
        hi = lo + batch_size
        stack[lo:hi] = project(phantom, angles[lo:hi], (size, size), shifts[lo:hi], tilt_axis)
    sigma = float(noise * stack.std())
    stack += rng.standard_normal(stack.shape, dtype=np.float32) * sigma
    labels = provenance.mrc_labels(prov)
    with Outputs() as outputs:
        write_mrc(out / "tiltseries.mrc", stack, pixel_size, labels, outputs, is_stack=True)
        write_tlt(out / "tiltseries.rawtlt", angles, outputs)
        table = pd.DataFrame(
            {
                "index": np.arange(len(angles)),
                "angle": angles,
                "shift_x": shifts[:, 0],
                "shift_y": shifts[:, 1],
            }
        )
        write_csv(out / "truth.csv", table, prov, outputs)
        write_xf(out / "truth.xf", geometry.tilt_axis_rotation(tilt_axis), shifts, outputs)
        write_json(
            out / "truth.json",
            {
                "tilt_axis": tilt_axis,
                "noise_sigma": sigma,
                "pixel_size": pixel_size,
                "provenance": prov,
            },
            outputs,
        )
        write_mrc(out / "phantom.mrc", voxelize(phantom, (size,) * 3), pixel_size, labels, outputs)
    return out / "tiltseries.mrc"


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=positive_int, default=64, help="image size in pixels")
    p.add_argument(
        "--tilts",
        type=float,
        nargs=3,
        default=(-60.0, 60.0, 2.0),
        metavar=("MIN", "MAX", "STEP"),
        help="tilt range in degrees",
    )
    p.add_argument(
        "--max-shift", type=nonnegative_float, default=8.0, help="largest shift per axis, pixels"
    )
    p.add_argument(
        "--noise",
        type=nonnegative_float,
        default=0.15,
        help="noise sigma as a fraction of the noise-free stack's standard deviation",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--tilt-axis",
        type=float,
        default=0.0,
        help="tilt-axis angle, degrees counter-clockwise from +y",
    )
    p.add_argument("--pixel-size", type=positive_float, default=10.0, help="Angstrom per pixel")
    p.add_argument("--n-ellipsoids", type=nonnegative_int, default=24, help="number of ellipsoids")
    p.add_argument("--n-beads", type=nonnegative_int, default=12, help="number of beads")
    p.add_argument(
        "--specimen",
        default="object",
        choices=["object", "slab"],
        help="an isolated object inside the field of view, or a slab wider than it",
    )


def run(args) -> None:
    simulate_tiltseries(
        args.out,
        args.size,
        tuple(args.tilts),
        args.max_shift,
        args.noise,
        args.seed,
        args.tilt_axis,
        args.pixel_size,
        args.n_ellipsoids,
        args.n_beads,
        args.specimen,
    )
