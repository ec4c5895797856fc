"""Files of the likelihood stages: polar Fourier stacks and template sets.

A set is a complex64 ``.npy`` array [item, shell, in-plane angle] (memory-mapped when
read) and an ``.npz`` of the same name with its metadata: the polar grid (box, radii,
shell_weights, n_inplanes, resolution_factor), the pixel size, per-item arrays, and
``provenance`` (JSON text).

* Fourier stacks (``particles_fourier_stack_NNNNNN``): per image the CTF parameters
  (RELION columns, lower-case: defocus_u, defocus_v, defocus_angle, voltage,
  spherical_aberration, amplitude_contrast, phase_shift, ctf_bfactor, optics_group),
  ``image_mean`` and ``image_ss`` (sum of squares about the mean, over all pixels) of the
  real image, ``prior_displacement`` (x, y pixels of the particle from the box centre,
  from rlnOriginX/YAngst), ``image_names``. The transform is of the mean-removed image.
* Templates (``templates_fourier_NAME``): per view ``rot``, ``tilt`` (RELION degrees, psi 0),
  ``view_weights`` (sum 1), ``dc`` (the projection's sum, its transform at k = 0), plus
  ``name``, ``source``, ``kind`` ('map' or 'model') and ``scale`` (the factor the templates
  were multiplied by: unit weighted mean power).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import CryomatchError
from ..kernels.polar_fourier import PolarGrid
from .atomic import Outputs, atomic_path, finish_mapped, mapped
from .files import write_npz

CTF_FIELDS = {
    "defocus_u": "rlnDefocusU",
    "defocus_v": "rlnDefocusV",
    "defocus_angle": "rlnDefocusAngle",
    "voltage": "rlnVoltage",
    "spherical_aberration": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast",
    "phase_shift": "rlnPhaseShift",
    "ctf_bfactor": "rlnCtfBfactor",
}


def grid_fields(grid: PolarGrid, resolution_factor: float) -> dict:
    return {**grid.as_dict(), "resolution_factor": float(resolution_factor)}


class ArrayWriter:
    """A complex64 .npy of known shape written in slices (memory-mapped), renamed when closed."""

    def __init__(self, path, shape, outputs: Outputs | None = None, dtype=np.complex64):
        self._ctx = atomic_path(path, outputs)
        self.array = mapped(
            self._ctx,
            lambda tmp: np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape)),
        )

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        def close():
            self.array.flush()
            del self.array

        finish_mapped(self._ctx, close, exc)
        return False


def write_set(
    npy: str | os.PathLike, values, meta: dict, prov: dict, outputs: Outputs | None = None
):
    """Write a whole set (values in memory) and its .npz."""
    with ArrayWriter(npy, values.shape, outputs) as w:
        w.array[...] = values
    write_meta(npy, meta, prov, outputs)


def write_meta(npy: str | os.PathLike, meta: dict, prov: dict, outputs: Outputs | None = None):
    write_npz(
        Path(npy).with_suffix(".npz"), outputs, provenance=json.dumps(prov, sort_keys=True), **meta
    )


class PolarSet:
    """A polar Fourier set read back: ``values`` (memory-mapped), ``meta`` (dict of arrays),
    ``grid`` and ``pixel_size``."""

    def __init__(self, npy: str | os.PathLike, required: tuple[str, ...] = ()):
        npy = Path(npy)
        meta_path = npy.with_suffix(".npz")
        for p in (npy, meta_path):
            if not p.is_file():
                raise CryomatchError("file does not exist", p)
        try:
            self.values = np.load(npy, mmap_mode="r")
            with np.load(meta_path, allow_pickle=False) as z:
                self.meta = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as exc:
            raise CryomatchError(f"not a readable cryomatch polar set ({exc})", npy) from exc
        missing = [
            k
            for k in ("box", "radii", "shell_weights", "n_inplanes", "pixel_size", *required)
            if k not in self.meta
        ]
        if missing:
            raise CryomatchError(f"metadata lacks {', '.join(missing)}", meta_path)
        self.path = npy
        self.grid = PolarGrid.from_dict(self.meta)
        self.pixel_size = float(self.meta["pixel_size"])
        n = len(self.values)
        if self.values.ndim != 3 or self.values.shape[1:] != (
            self.grid.n_shells,
            self.grid.n_inplanes,
        ):
            raise CryomatchError(
                f"array shape {self.values.shape} does not match the grid "
                f"({self.grid.n_shells} shells x {self.grid.n_inplanes} angles)",
                npy,
            )
        for key in required:
            if np.ndim(self.meta[key]) >= 1 and len(self.meta[key]) != n:
                raise CryomatchError(
                    f"metadata {key} has {len(self.meta[key])} entries for {n} items", meta_path
                )

    def __len__(self) -> int:
        return len(self.values)


def read_fourier_stack(npy) -> PolarSet:
    return PolarSet(npy, ("image_mean", "image_ss", "prior_displacement", *CTF_FIELDS))


def read_templates(npy) -> PolarSet:
    return PolarSet(npy, ("rot", "tilt", "view_weights", "dc"))
