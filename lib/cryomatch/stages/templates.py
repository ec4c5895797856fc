"""Templates: a structure's projections on the particles' polar Fourier grid, per view.

The structure is an MRC map (central slices of its 3D DFT) or a PDB/mmCIF model (Gaussian
atoms with an analytic transform; all atoms, or C-alpha with per-residue radii), see
:mod:`cryomatch.kernels.templates` and :mod:`cryomatch.io.structures`. Views are spaced by
``viewing_distance`` radians on the sphere (CryoLike's meaning). The grid, box and pixel
size come from a Fourier stack (``--grid-from``): a map must have that box and pixel size
(within 1%). Templates are scaled to unit weighted mean power, so that structures compare
on the same footing in the likelihood. Writes ``OUT/templates_fourier_NAME.npy`` (complex64
[view, shell, angle]) and ``.npz`` (see :mod:`cryomatch.io.polar_files`); with ``--list``,
``OUT/template_file_list.npy`` of the given template files (CryoLike's index of templates).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from .. import provenance
from ..cli import positive_float
from ..errors import CryomatchError, CryomatchWarning
from ..io.atomic import Outputs
from ..io.files import write_npy
from ..io.polar_files import read_fourier_stack, write_set
from ..io.structures import read_map, read_model, structure_kind
from ..kernels.polar_fourier import PolarGrid
from ..kernels.templates import atom_templates, map_templates, view_matrices, viewing_directions


def structure_name(path: str | Path) -> str:
    """A file-name-safe name from the structure's file name (without extensions)."""
    name = Path(path).name
    for suffix in (".gz", ".mrc", ".map", ".mrcs", ".rec", ".pdb", ".ent", ".cif", ".mmcif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "structure"


def unique_structure_names(paths) -> list[str]:
    """:func:`structure_name` of each path, repeated names suffixed _2, _3, ..."""
    names, seen = [], {}
    for p in paths:
        name = structure_name(p)
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def make_templates(
    structure: str | Path,
    grid: PolarGrid,
    pixel_size: float,
    viewing_distance: float,
    selection: str = "all",
    atom_sigma: float = 1.0,
    method: str = "auto",
):
    """(templates (S, R, W) complex64, rot, tilt, weights, dc, kind) for one structure."""
    if not viewing_distance > 0:
        raise CryomatchError(f"viewing_distance must be positive, got {viewing_distance}")
    kind = structure_kind(structure)
    rot, tilt, weights = viewing_directions(viewing_distance)
    matrices = view_matrices(rot, tilt)
    if kind == "map":
        volume, voxel = read_map(structure)
        if volume.shape[0] != grid.box:
            raise CryomatchError(
                f"the map's box is {volume.shape[0]} voxels but the particles' is {grid.box} "
                "pixels after preprocessing (resample the map, or set preprocess.box)",
                structure,
            )
        if voxel is None:
            warnings.warn(
                f"{structure}: no voxel size in the header; assuming the particles' "
                f"{pixel_size:g} A",
                CryomatchWarning,
                stacklevel=2,
            )
        elif abs(voxel - pixel_size) > 0.01 * pixel_size:
            raise CryomatchError(
                f"the map's voxel size {voxel:g} A differs from the particles' pixel size "
                f"{pixel_size:g} A after preprocessing by more than 1%",
                structure,
            )
        values = map_templates(volume, grid, matrices, method=method)
        dc = float(np.sum(volume, dtype=np.float64))
    else:
        atoms = read_model(structure, selection, atom_sigma)
        values = atom_templates(
            atoms.coords / pixel_size,
            atoms.amplitudes * pixel_size**3,
            atoms.sigmas / pixel_size,
            grid,
            matrices,
        )
        dc = float(np.sum(atoms.amplitudes * (2 * np.pi * atoms.sigmas**2) ** 1.5))
    return values, rot, tilt, weights, dc, kind


def templates(
    structure: str | Path,
    grid_from: str | Path,
    out: str | Path,
    viewing_distance: float = 0.25,
    selection: str = "all",
    atom_sigma: float = 1.0,
    name: str | None = None,
    method: str = "auto",
) -> Path:
    """Write the templates of ``structure`` on the grid of the Fourier stack ``grid_from``."""
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("templates", params)
    stack = read_fourier_stack(grid_from)
    name = name or structure_name(structure)
    values, rot, tilt, weights, dc, kind = make_templates(
        structure, stack.grid, stack.pixel_size, viewing_distance, selection, atom_sigma, method
    )
    power = np.sum(
        weights[:, None]
        * stack.grid.weights[None, :]
        * np.sum(np.abs(values.astype(np.complex128)) ** 2, axis=-1)
    )
    if not power > 0:
        raise CryomatchError("the structure's projections are zero", structure)
    scale = 1.0 / np.sqrt(power)
    meta = {
        **{
            k: stack.meta[k]
            for k in ("box", "radii", "shell_weights", "n_inplanes", "resolution_factor")
        },
        "pixel_size": stack.pixel_size,
        "rot": rot,
        "tilt": tilt,
        "view_weights": weights,
        "dc": np.full(len(rot), dc * scale),
        "name": name,
        "source": str(Path(structure).resolve()),
        "kind": kind,
        "scale": scale,
        "viewing_distance": viewing_distance,
    }
    npy = Path(out) / f"templates_fourier_{name}.npy"
    with Outputs() as outputs:
        write_set(npy, (values * scale).astype(np.complex64), meta, prov, outputs)
    return npy


def write_template_list(path: str | Path, files: list[str]) -> None:
    """CryoLike's ``template_file_list.npy``: the template files in structure order."""
    if not files:
        raise CryomatchError("the structure list is empty")
    write_npy(path, np.array([str(f) for f in files]))


def add_arguments(p) -> None:
    p.add_argument("--structure", help="MRC map or PDB/mmCIF model")
    p.add_argument(
        "--grid-from", help="a Fourier stack (.npy) whose grid, box and pixel size to use"
    )
    p.add_argument("--out", help="output folder (e.g. results/templates)")
    p.add_argument(
        "--viewing-distance",
        type=float,
        default=0.25,
        help="spacing of viewing directions on the sphere (radians)",
    )
    p.add_argument(
        "--atoms",
        default="all",
        choices=["all", "ca"],
        help="atomic models: all atoms, or C-alpha with per-residue radii",
    )
    p.add_argument(
        "--atom-sigma",
        type=positive_float,
        default=1.0,
        help="Gaussian width of atoms (A), all-atom",
    )
    p.add_argument("--name", help="template name (default: the structure's file name)")
    p.add_argument(
        "--method",
        default="auto",
        choices=["auto", "numpy", "finufft"],
        help="non-uniform FFT of maps",
    )
    p.add_argument(
        "--list",
        nargs="*",
        metavar="NPY",
        help="instead: write OUT (a .npy path) listing these template files",
    )


def run(args) -> None:
    if args.list is not None:
        if not args.out:
            raise CryomatchError("--list needs --out (the list file)")
        write_template_list(args.out, args.list)
        return
    missing = [
        f
        for f, v in (
            ("--structure", args.structure),
            ("--grid-from", args.grid_from),
            ("--out", args.out),
        )
        if not v
    ]
    if missing:
        raise CryomatchError(f"missing {', '.join(missing)}")
    templates(
        args.structure,
        args.grid_from,
        args.out,
        args.viewing_distance,
        args.atoms,
        args.atom_sigma,
        args.name,
        args.method,
    )
