"""Inputs and outputs shared by ``cryomatch tomo-align`` and ``cryomatch tomo-refine``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ... import geometry
from ...errors import CryomatchError
from ...io.figures import draw_orthogonal_slices, new_figure
from ...io.files import read_csv, write_csv
from ...io.mrc import check_finite, open_mrc, pixel_size_from
from ...io.tilts import TiltMetadata, read_angles, write_tlt, write_xf

# methods whose result depends on the order of the images (neighbours are registered)
ORDERED_METHODS = {"PC", "StackReg"}


@dataclass
class TiltSeries:
    """A tilt series as read: images (n, ny, nx) float32 as in the file, angles (degrees),
    the nominal tilt-axis angle (degrees counter-clockwise from +y) and the pixel size (A)."""

    data: np.ndarray
    angles: np.ndarray
    tilt_axis: float
    pixel_size: float
    stack_path: Path
    angles_path: Path | None
    tilt_axis_known: bool = True  # False: neither given nor in the .mdoc (0 is a guess)


def find_angle_file(stack: Path) -> Path | None:
    """A tilt-angle file beside the stack: STEM.rawtlt, STEM.tlt, STACK.mdoc or STEM.mdoc."""
    for candidate in (
        stack.with_suffix(".rawtlt"),
        stack.with_suffix(".tlt"),
        stack.with_name(stack.name + ".mdoc"),
        stack.with_suffix(".mdoc"),
    ):
        if candidate.is_file():
            return candidate
    return None


def read_tilt_series(
    stack: str | os.PathLike,
    angles=None,
    tilt_axis: float | None = None,
    pixel_size: float | None = None,
) -> TiltSeries:
    """Open an MRC tilt series (permissively, with a warning, when its header is broken) and
    its angles: a .rawtlt/.tlt/.mdoc path, a list of numbers, or None for a file beside the
    stack. The tilt axis comes from the argument, else the .mdoc, else 0; the pixel size from
    the argument, else the .mdoc, else the header (warning: headers are often wrong)."""
    stack = Path(stack)
    with open_mrc(stack) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
        header_pixel = float(mrc.voxel_size.x)
    if data.ndim != 3 or data.shape[0] < 2:
        raise CryomatchError(
            f"expected a tilt series (a stack of at least 2 images), found a single image of "
            f"shape {data.shape}",
            stack,
        )
    check_finite(data, stack)
    angles_path = None
    if angles is None:
        angles_path = find_angle_file(stack)
        if angles_path is None:
            raise CryomatchError(
                "no tilt angles: give them, or put STEM.rawtlt/.tlt/.mdoc beside the stack", stack
            )
    elif isinstance(angles, (str, os.PathLike)):
        angles_path = Path(angles)
    meta = read_angles(angles_path) if angles_path else TiltMetadata(np.asarray(angles, float))
    source = angles_path or stack
    if len(meta.angles) != len(data):
        raise CryomatchError(
            f"{len(meta.angles)} tilt angles for {len(data)} images in {stack.name}", source
        )
    values, counts = np.unique(np.round(meta.angles, 3), return_counts=True)
    if (counts > 1).any():
        raise CryomatchError(f"duplicate tilt angles: {values[counts > 1].tolist()}", source)
    known = tilt_axis is not None or meta.tilt_axis is not None
    if tilt_axis is None:
        tilt_axis = meta.tilt_axis if meta.tilt_axis is not None else 0.0
    pixel_size = pixel_size_from(pixel_size, meta.pixel_size, header_pixel, stack, default=1.0)
    return TiltSeries(
        data,
        np.asarray(meta.angles, dtype=np.float64),
        float(tilt_axis),
        float(pixel_size),
        stack,
        angles_path,
        known,
    )


def check_order(angles, method: str, source) -> None:
    """Chained methods register neighbours in stack order: the angles must be sorted."""
    d = np.diff(np.asarray(angles, dtype=float))
    if method in ORDERED_METHODS and not ((d > 0).all() or (d < 0).all()):
        raise CryomatchError(
            f"method {method} registers neighbouring images, but the tilt angles are not in "
            "order (dose-symmetric acquisition?): sort the stack by tilt, or use COM, COM-CL "
            "or reprojection",
            source,
        )


def prepare(data: np.ndarray, invert: bool = False) -> np.ndarray:
    """Images for alignment and reconstruction: contrast inverted when asked (dark objects
    become positive density) and each image's background (median of its frame) removed."""
    from ...kernels.tiltalign import background_level

    out = -data if invert else data.astype(np.float32, copy=True)
    return out - background_level(out)[:, None, None]


def write_shift_files(
    folder: Path,
    stem: str,
    angles,
    shifts,
    tilt_axis: float,
    prov,
    outputs,
    prefix: str = "",
    matrices=None,
) -> None:
    """``{prefix}shifts.csv``, IMOD ``{stem}.xf`` and ``{stem}.tlt``; ``matrices`` (n, 2, 2)
    replace the tilt-axis rotation in the .xf (per-image rotations and magnifications)."""
    table = pd.DataFrame(
        {
            "index": np.arange(len(angles)),
            "angle": angles,
            "shift_x": shifts[:, 0],
            "shift_y": shifts[:, 1],
        }
    )
    write_csv(folder / f"{prefix}shifts.csv", table, prov, outputs)
    if matrices is None:
        matrices = geometry.tilt_axis_rotation(tilt_axis)
    write_xf(folder / f"{stem}.xf", matrices, shifts, outputs)
    write_tlt(folder / f"{stem}.tlt", angles, outputs)


def read_shifts(path: str | os.PathLike, n: int) -> np.ndarray:
    """Shifts (n, 2) from a shifts.csv (columns shift_x, shift_y) or an IMOD .xf."""
    path = Path(path)
    if path.suffix == ".xf":
        from ...io.tilts import read_xf

        shifts = read_xf(path)[1]
    else:
        if not path.is_file():
            raise CryomatchError("file does not exist", path)
        table = read_csv(path)
        if not {"shift_x", "shift_y"} <= set(table.columns):
            raise CryomatchError("no shift_x and shift_y columns", path)
        shifts = table[["shift_x", "shift_y"]].to_numpy(dtype=np.float64)
    if len(shifts) != n:
        raise CryomatchError(f"{len(shifts)} shifts for {n} images", path)
    return shifts


def summary_figure(angles, shifts, volume, title: str, record=None, residuals=None):
    """Shifts per tilt, optionally the refinement record or a projection model's residuals
    (``residuals``: (per image (n,), per point (m,), label) in px), and central slices."""
    n_axes = 4 + (record is not None) + 2 * (residuals is not None)
    fig = new_figure(2.6 * n_axes, 2.8)
    axes = fig.subplots(1, n_axes)
    ax = axes[0]
    ax.plot(angles, shifts[:, 0], "o-", ms=2, label="x (across axis)")
    ax.plot(angles, shifts[:, 1], "s-", ms=2, label="y (along axis)")
    ax.set_xlabel("tilt (degrees)")
    ax.set_ylabel("shift (pixels)")
    ax.legend(fontsize=7)
    k = 1
    if record is not None:
        it = [r["iteration"] for r in record]
        axes[1].semilogy(it, [max(r["max_shift"], 1e-4) for r in record], "o-", ms=3, label="max")
        axes[1].semilogy(it, [max(r["rms_shift"], 1e-4) for r in record], "s-", ms=3, label="rms")
        axes[1].set_xlabel("iteration")
        axes[1].set_ylabel("shift found (pixels)")
        axes[1].legend(fontsize=7)
        k = 2
    if residuals is not None:
        per_view, per_point, label = residuals
        axes[k].plot(angles, per_view, "o-", ms=2)
        axes[k].set_xlabel("tilt (degrees)")
        axes[k].set_ylabel("mean residual (pixels)")
        axes[k + 1].bar(np.arange(1, len(per_point) + 1), per_point)
        axes[k + 1].set_xlabel(label)
        axes[k + 1].set_ylabel("mean residual (pixels)")
        k += 2
    draw_orthogonal_slices(axes[k:], volume)
    fig.suptitle(title, fontsize=9)
    return fig
