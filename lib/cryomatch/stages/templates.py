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
from ..geometry import matrix_to_euler, wrap_degrees
from ..io.atomic import Outputs
from ..io.files import write_npy
from ..io.polar_files import read_fourier_stack, write_set
from ..io.structures import read_frames, read_map, read_model, structure_kind
from ..kernels.polar_fourier import PolarGrid
from ..kernels.rotate import rotate_volumes
from ..kernels.templates import atom_templates, map_templates, view_matrices, viewing_directions
from ..progress import progress
from ..symmetry import check_symbol, equivalent_poses, generators, in_asymmetric_unit


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
    symmetry: str = "C1",
):
    """(templates (S, R, W) complex64, rot, tilt, weights, dc, kind) for one structure, its
    views over the asymmetric unit of ``symmetry``."""
    if not viewing_distance > 0:
        raise CryomatchError(f"viewing_distance must be positive, got {viewing_distance}")
    kind = structure_kind(structure)
    rot, tilt, weights = symmetric_views(viewing_distance, symmetry)
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
        check_map_symmetry(volume, symmetry, structure)
        values = map_templates(volume, grid, matrices, method=method)
        dc = float(np.sum(volume, dtype=np.float64))
    else:
        values, dc = gaussian_templates(
            read_model(structure, selection, atom_sigma), grid, pixel_size, matrices
        )
    return values, rot, tilt, weights, dc, kind


def symmetric_views(viewing_distance: float, symmetry: str = "C1"):
    """(rot, tilt, weights) of CryoLike's views (see :func:`viewing_directions`) in RELION's
    asymmetric unit of ``symmetry`` (boundaries included; rot in (-180, 180] as RELION writes
    it), the weights renormalized to sum 1 (a boundary view's weight divided by its symmetry
    copies in the unit)."""
    rot, tilt, weights = viewing_directions(viewing_distance)
    if check_symbol(symmetry) == "C1":
        return rot, tilt, weights
    keep = in_asymmetric_unit(rot, tilt, symmetry)
    rot, tilt, weights = wrap_degrees(rot[keep]), tilt[keep], weights[keep]  # as RELION
    # a view on the unit's boundary stands for the copies of it that the unit also holds:
    # its weight is shared among them (so the weights stay a quadrature of the sphere)
    rot_eq, tilt_eq, _ = matrix_to_euler(equivalent_poses(view_matrices(rot, tilt), symmetry))
    copies = np.sum(in_asymmetric_unit(rot_eq, tilt_eq, symmetry), axis=-1)
    weights = weights / np.maximum(copies, 1)
    return rot, tilt, weights / weights.sum()


SYMMETRY_MIN_CORRELATION = 0.9


def check_map_symmetry(volume: np.ndarray, symmetry: str, path) -> None:
    """Warn when the map correlates below ``SYMMETRY_MIN_CORRELATION`` with itself rotated
    by a generator of the point group (rotations about the box centre n // 2)."""
    gens = generators(symmetry)
    if not len(gens):
        return
    swap = np.eye(3)[::-1]  # (x, y, z) <-> (z, y, x)
    rotated = rotate_volumes(volume, swap @ gens @ swap, np.array(volume.shape) // 2)
    worst = min(float(np.corrcoef(volume.ravel(), r.ravel())[0, 1]) for r in rotated)
    if worst < SYMMETRY_MIN_CORRELATION:
        warnings.warn(
            f"{path}: the map correlates {worst:.2f} with itself under {symmetry}'s rotations "
            "about the box centre: it may not have that symmetry (poses and likelihoods "
            "searched over the asymmetric unit are then wrong)",
            CryomatchWarning,
            stacklevel=3,
        )


def gaussian_templates(atoms, grid: PolarGrid, pixel_size: float, matrices):
    """(templates (S, R, W), projection sum) of Gaussian atoms (Angstrom) at the views."""
    values = atom_templates(
        atoms.coords / pixel_size,
        atoms.amplitudes * pixel_size**3,
        atoms.sigmas / pixel_size,
        grid,
        matrices,
    )
    return values, float(np.sum(atoms.amplitudes * (2 * np.pi * atoms.sigmas**2) ** 1.5))


def templates(
    structure: str | Path,
    grid_from: str | Path,
    out: str | Path,
    viewing_distance: float = 0.25,
    selection: str = "all",
    atom_sigma: float = 1.0,
    name: str | None = None,
    method: str = "auto",
    symmetry: str = "C1",
) -> Path:
    """Write the templates of ``structure`` on the grid of the Fourier stack ``grid_from``."""
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("templates", params)
    stack = read_fourier_stack(grid_from)
    name = name or structure_name(structure)
    values, rot, tilt, weights, dc, kind = make_templates(
        structure,
        stack.grid,
        stack.pixel_size,
        viewing_distance,
        selection,
        atom_sigma,
        method,
        symmetry,
    )
    npy = Path(out) / f"templates_fourier_{name}.npy"
    meta = {
        "name": name,
        "source": str(Path(structure).resolve()),
        "kind": kind,
        "symmetry": check_symbol(symmetry),
    }
    with Outputs() as outputs:
        write_scaled(
            npy, values, (rot, tilt, weights), dc, stack, meta, viewing_distance, prov, outputs
        )
    return npy


def write_scaled(npy, values, views, dc, stack, meta, viewing_distance, prov, outputs) -> None:
    """Write templates scaled to unit weighted mean power, with their metadata."""
    rot, tilt, weights = views
    power = np.sum(
        weights[:, None]
        * stack.grid.weights[None, :]
        * np.sum(np.abs(values.astype(np.complex128)) ** 2, axis=-1)
    )
    if not power > 0:
        raise CryomatchError("the structure's projections are zero", meta["source"])
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
        **meta,
        "scale": scale,
        "viewing_distance": viewing_distance,
    }
    write_set(npy, (values * scale).astype(np.complex64), meta, prov, outputs)


def frame_name(ensemble: str, frame: int) -> str:
    """The template name of an ensemble's frame."""
    return f"{ensemble}_frame{frame:06d}"


def ensemble_templates(
    topology: str | Path,
    trajectory: str | Path | None,
    frames: list[int],
    grid_from: str | Path,
    out: str | Path,
    name: str,
    viewing_distance: float = 0.25,
    atom_filter: str | None = None,
    selection: str = "all",
    atom_sigma: float = 1.0,
    symmetry: str = "C1",
) -> list[Path]:
    """One template set per frame of an ensemble (a trajectory or a multi-model file), named
    :func:`frame_name`, and ``OUT/template_file_list.npy`` of them (in ``frames`` order)."""
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("templates", params)
    if not viewing_distance > 0:
        raise CryomatchError(f"viewing_distance must be positive, got {viewing_distance}")
    if not frames:
        raise CryomatchError("no frames to make templates of", trajectory or topology)
    stack = read_fourier_stack(grid_from)
    rot, tilt, weights = symmetric_views(viewing_distance, symmetry)
    matrices = view_matrices(rot, tilt)
    source = str(Path(trajectory or topology).resolve())
    paths = []
    with Outputs() as outputs:
        for frame, atoms in progress(
            read_frames(topology, trajectory, frames, atom_filter, selection, atom_sigma),
            total=len(frames),
            desc=f"templates {name}",
            unit="frame",
        ):
            values, dc = gaussian_templates(atoms, stack.grid, stack.pixel_size, matrices)
            npy = Path(out) / f"templates_fourier_{frame_name(name, frame)}.npy"
            meta = {
                "name": frame_name(name, frame),
                "source": source,
                "topology": str(Path(topology).resolve()),
                "frame": frame,
                "atom_filter": atom_filter or "",
                "kind": "model",
                "symmetry": check_symbol(symmetry),
            }
            write_scaled(
                npy, values, (rot, tilt, weights), dc, stack, meta, viewing_distance, prov, outputs
            )
            paths.append(npy)
        write_npy(Path(out) / "template_file_list.npy", np.array([str(p) for p in paths]), outputs)
    return paths


def write_template_list(path: str | Path, files: list[str]) -> None:
    """CryoLike's ``template_file_list.npy``: the template files in structure order. A folder
    among ``files`` stands for the sets listed in its own ``template_file_list.npy`` (an
    ensemble's group of frames)."""
    if not files:
        raise CryomatchError("the structure list is empty")
    listed = []
    for f in files:
        if Path(f).is_dir():
            listed += [str(x) for x in read_template_list(Path(f) / "template_file_list.npy")]
        else:
            listed.append(str(f))
    write_npy(path, np.array(listed))


def read_template_list(path: str | Path) -> list[Path]:
    """The template files of a ``template_file_list.npy``."""
    path = Path(path)
    if not path.is_file():
        raise CryomatchError("file does not exist", path)
    try:
        return [Path(str(f)) for f in np.load(path, allow_pickle=False)]
    except (ValueError, OSError) as exc:
        raise CryomatchError(f"not a readable template list ({exc})", path) from exc


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
        "--symmetry",
        default="C1",
        help="point group (Cn, Dn, T, O, I...): views over its asymmetric unit only",
    )
    p.add_argument(
        "--method",
        default="auto",
        choices=["auto", "numpy", "finufft"],
        help="non-uniform FFT of maps",
    )
    p.add_argument(
        "--topology",
        help="instead of --structure: an ensemble's topology (pdb/gro) or multi-model PDB/mmCIF",
    )
    p.add_argument("--trajectory", help="the ensemble's trajectory (xtc/dcd/nc/trr/h5; mdtraj)")
    p.add_argument("--frames", type=int, nargs="+", help="the ensemble's frames (0-based)")
    p.add_argument(
        "--atom-filter",
        help="ensemble atoms: mdtraj selection (trajectories, .gro) or gemmi CID (PDB/mmCIF)",
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
    if args.topology:
        missing = [f for f, v in (("--frames", args.frames), ("--name", args.name)) if not v]
        missing += [f for f, v in (("--grid-from", args.grid_from), ("--out", args.out)) if not v]
        if missing:
            raise CryomatchError(f"an ensemble needs {', '.join(missing)}")
        ensemble_templates(
            args.topology,
            args.trajectory,
            args.frames,
            args.grid_from,
            args.out,
            args.name,
            args.viewing_distance,
            args.atom_filter,
            args.atoms,
            args.atom_sigma,
            args.symmetry,
        )
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
        args.symmetry,
    )
