"""Tilt-series models: which Fourier components a subvolume holds (the missing wedge).

Shaped like acryo's ``acryo.tilt`` so that code ports: :func:`single_axis`,
:func:`dual_axis`, :func:`no_wedge`, and models with ``create_mask(rotator, shape)``
(the 0/1 mask on the full ``numpy.fft.fftn`` grid, unshifted). The alignment models use
:meth:`TiltSeriesModel.rfft_mask`, the same mask on the rfftn grid. Geometry: see
:mod:`cryomatch.kernels.wedge`.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from ..errors import CryomatchError
from ..kernels.wedge import wedge_mask, wedge_normals


class TiltSeriesModel:
    """Base class: a set of wedge normal pairs (none means no missing wedge)."""

    def normal_pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return []

    def _rotated_pairs(self, rotator: Rotation | None):
        inv = (rotator or Rotation.identity()).inv()
        return [(inv.apply(n0), inv.apply(n1)) for n0, n1 in self.normal_pairs()]

    def rfft_mask(self, rotator: Rotation | None, shape, xp=np):
        """0/1 float32 mask (nz, ny, nx // 2 + 1) for a subvolume at orientation ``rotator``."""
        return wedge_mask(tuple(shape), self._rotated_pairs(rotator), xp)

    def create_mask(self, rotator: Rotation | None = None, shape=(49, 49, 49)) -> np.ndarray:
        """0/1 float32 mask on the full fftn grid (acryo's ``create_mask``)."""
        shape = tuple(shape)
        half = self.rfft_mask(rotator, shape)
        full = np.empty(shape, dtype=np.float32)
        nx = shape[2]
        full[..., : nx // 2 + 1] = half
        # the other half by Hermitian symmetry: mask(-k) = mask(k)
        neg = (-np.arange(nx // 2 + 1, nx)) % nx
        iz, iy = (-np.arange(shape[0])) % shape[0], (-np.arange(shape[1])) % shape[1]
        full[..., nx // 2 + 1 :] = half[iz][:, iy][..., neg]
        return full

    def is_identity(self) -> bool:
        return not self.normal_pairs()


class NoWedge(TiltSeriesModel):
    """Every Fourier component is present."""

    def __repr__(self) -> str:
        return "NoWedge()"


class SingleAxis(TiltSeriesModel):
    """A single-axis tilt series over ``tilt_range`` (min, max) degrees about ``axis``."""

    def __init__(self, tilt_range=(-60.0, 60.0), axis: str = "y"):
        lo, hi = (float(a) for a in tilt_range)
        if not lo < hi:
            raise CryomatchError(f"tilt range {tilt_range!r} does not satisfy min < max")
        if lo < -90 or hi > 90:
            raise CryomatchError(f"tilt range {tilt_range!r} is not within -90..90 degrees")
        if axis not in ("y", "x"):
            raise CryomatchError(f"tilt axis must be 'y' or 'x', got {axis!r}")
        self.tilt_range, self.axis = (lo, hi), axis

    def normal_pairs(self):
        return [wedge_normals(self.tilt_range, self.axis)]

    def __repr__(self) -> str:
        return f"SingleAxis<{self.axis}>({self.tilt_range[0]:.1f}, {self.tilt_range[1]:.1f})"


class UnionAxes(TiltSeriesModel):
    """Several tilt series of one specimen (e.g. dual-axis): the union of what they sample."""

    def __init__(self, wedges):
        self.wedges = list(wedges)

    def normal_pairs(self):
        if any(w.is_identity() for w in self.wedges):
            return []
        return [p for w in self.wedges for p in w.normal_pairs()]

    def __repr__(self) -> str:
        return f"UnionAxes({', '.join(map(repr, self.wedges))})"


def single_axis(tilt_range=None, axis: str = "y") -> TiltSeriesModel:
    """A single-axis tilt model; ``tilt_range`` None gives :class:`NoWedge`."""
    return NoWedge() if tilt_range is None else SingleAxis(tilt_range, axis)


def dual_axis(tilt_range_y, tilt_range_x) -> UnionAxes:
    """A dual-axis tilt model: series about y and about x."""
    return UnionAxes([SingleAxis(tilt_range_y, "y"), SingleAxis(tilt_range_x, "x")])


def no_wedge() -> NoWedge:
    return NoWedge()


def as_tilt_model(tilt) -> TiltSeriesModel:
    """None, a (min, max) range about y, or a model."""
    if tilt is None:
        return NoWedge()
    if isinstance(tilt, TiltSeriesModel):
        return tilt
    try:
        lo, hi = tilt
    except (TypeError, ValueError):
        raise CryomatchError(
            f"tilt must be (min, max) degrees or a tilt model, got {tilt!r}"
        ) from None
    return SingleAxis((lo, hi), "y")


def add_tilt_arguments(parser) -> None:
    """``--tilt MIN MAX`` (about y, default -60 60) and ``--no-wedge`` of a command."""
    parser.add_argument(
        "--tilt",
        type=float,
        nargs=2,
        default=(-60.0, 60.0),
        metavar=("MIN", "MAX"),
        help="tilt range about y in degrees (the missing wedge)",
    )
    parser.add_argument("--no-wedge", action="store_true", help="no missing wedge")


def tilt_from_arguments(args):
    """The (min, max) tilt range of :func:`add_tilt_arguments`, or None for no wedge."""
    return None if args.no_wedge else tuple(args.tilt)
