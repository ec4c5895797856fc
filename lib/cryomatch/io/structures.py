"""Structures for template projection: 3D maps (MRC) and atomic models (PDB/mmCIF via gemmi).

Atomic models become Gaussian atoms (coordinates in Angstrom about the model's centre of
mass, the centre of the projections):

* ``selection='all'``: every atom except waters, integrated density = atomic number (its
  electrons), width ``sigma`` Angstrom;
* ``selection='ca'``: one Gaussian per residue at its C-alpha, integrated density
  proportional to the residue's volume and the radius of gyration of a sphere of that
  volume (sigma = R / sqrt(5)); volumes from Zamyatnin 1972 (Prog. Biophys. Mol. Biol.
  24:107), 140 A^3 for residues not in the table.

Ensembles (conformations to weigh against the images): a topology plus a trajectory readable
by mdtraj (pdb/gro + xtc/dcd/nc/trr/h5, coordinates in nm there), or a multi-model PDB/mmCIF
read by gemmi (each model a frame). :func:`selected_frames` picks frames (a stride and/or a
list), :func:`read_frames` gives each as Gaussian atoms by the rules above, after an
optional atom selection (mdtraj's selection language for trajectories and .gro files,
gemmi's CID selections for PDB/mmCIF models); waters are left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import CryomatchError
from ..kernels.phantom import PseudoAtoms
from .mrc import read_volume

MAP_SUFFIXES = {".mrc", ".map", ".mrcs", ".rec"}
MODEL_SUFFIXES = {".pdb", ".ent", ".cif", ".mmcif"}
TRAJECTORY_SUFFIXES = {".xtc", ".dcd", ".nc", ".trr", ".h5"}

# residue volumes in A^3 (Zamyatnin 1972)
RESIDUE_VOLUMES = {
    "GLY": 60.1,
    "ALA": 88.6,
    "SER": 89.0,
    "CYS": 108.5,
    "ASP": 111.1,
    "PRO": 112.7,
    "ASN": 114.1,
    "THR": 116.1,
    "GLU": 138.4,
    "VAL": 140.0,
    "GLN": 143.8,
    "HIS": 153.2,
    "MET": 162.9,
    "ILE": 166.7,
    "LEU": 166.7,
    "LYS": 168.6,
    "ARG": 173.4,
    "PHE": 189.9,
    "TYR": 193.6,
    "TRP": 227.8,
}
_DEFAULT_VOLUME = 140.0


def structure_kind(path: str | os.PathLike) -> str:
    """'map' or 'model' from the file name (a trailing .gz is allowed for models)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix in MAP_SUFFIXES:
        return "map"
    if suffix in MODEL_SUFFIXES:
        return "model"
    raise CryomatchError(
        f"unknown structure file type {suffix or '(none)'!r}: use an MRC map "
        f"({', '.join(sorted(MAP_SUFFIXES))}) or an atomic model "
        f"({', '.join(sorted(MODEL_SUFFIXES))})",
        path,
    )


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """A cubic 3D map (z, y, x) float32 and its header voxel size (None when unset)."""
    volume, voxel = read_volume(path)
    if len(set(volume.shape)) != 1:
        raise CryomatchError(f"the map is not cubic: {volume.shape}", path)
    return volume, voxel


def read_model(path: str | os.PathLike, selection: str = "all", sigma: float = 1.0) -> PseudoAtoms:
    """Gaussian atoms of a PDB/mmCIF model (see the module docstring); amplitudes are peak
    densities so that each atom's integral is its weight."""
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise CryomatchError("file does not exist", path)
    if selection not in ("all", "ca"):
        raise CryomatchError(f"atom selection must be 'all' or 'ca', got {selection!r}")
    if not sigma > 0:
        raise CryomatchError(f"atom sigma must be positive, got {sigma}")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own message
        raise CryomatchError(f"not a readable atomic model ({exc})", path) from exc
    if len(st) == 0:
        raise CryomatchError("the model file holds no models", path)
    st.remove_waters()
    return gaussian_atoms(_gemmi_atoms(st[0]), selection, sigma, path)


def _gemmi_atoms(model):
    """(residue name, atom name, atomic number, position A) of a gemmi model's atoms."""
    for chain in model:
        for residue in chain:
            for atom in residue:
                yield residue.name, atom.name, atom.element.atomic_number, atom.pos.tolist()


def gaussian_atoms(atoms, selection: str, sigma: float, path) -> PseudoAtoms:
    """Gaussian atoms (see the module docstring) of (residue, atom name, atomic number,
    position A) tuples, about their centre of mass."""
    coords, weights, sigmas = [], [], []
    for residue, name, number, pos in atoms:
        if selection == "ca":
            if name != "CA":
                continue
            volume = RESIDUE_VOLUMES.get(residue.upper(), _DEFAULT_VOLUME)
            coords.append(pos)
            weights.append(volume)
            sigmas.append((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0) / np.sqrt(5.0))
        else:
            coords.append(pos)
            weights.append(float(number))
            sigmas.append(sigma)
    if not coords:
        what = "C-alpha atoms" if selection == "ca" else "atoms"
        raise CryomatchError(f"the model holds no {what}", path)
    coords = np.asarray(coords, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    coords -= np.average(coords, axis=0, weights=weights)
    amplitudes = weights / (2.0 * np.pi * sigmas**2) ** 1.5  # peak density from the integral
    return PseudoAtoms(coords, amplitudes, sigmas)


# --- ensembles: trajectories and multi-model files ------------------------------------------
def _uses_gemmi(topology, trajectory) -> bool:
    return trajectory is None and structure_kind(topology) == "model"


def _check_ensemble_files(topology, trajectory) -> None:
    for p in (topology, trajectory):
        if p is not None and not Path(p).is_file():
            raise CryomatchError("file does not exist", p)
    if trajectory is not None:
        suffix = Path(trajectory).suffix.lower()
        if suffix not in TRAJECTORY_SUFFIXES:
            raise CryomatchError(
                f"unknown trajectory type {suffix or '(none)'!r}: use one of "
                f"{', '.join(sorted(TRAJECTORY_SUFFIXES))}",
                trajectory,
            )


def count_frames(topology: str | os.PathLike, trajectory: str | os.PathLike | None = None) -> int:
    """Frames of a trajectory (mdtraj), or models of a multi-model PDB/mmCIF (gemmi), or
    frames of a .gro file."""
    _check_ensemble_files(topology, trajectory)
    try:
        if _uses_gemmi(topology, trajectory):
            import gemmi

            return len(gemmi.read_structure(str(topology)))
        import mdtraj

        with mdtraj.open(str(trajectory or topology)) as f:
            return len(f)
    except CryomatchError:
        raise
    except Exception as exc:  # the readers raise their own exception types
        raise CryomatchError(f"not a readable ensemble ({exc})", trajectory or topology) from exc


def selected_frames(n_frames: int, stride: int = 1, frames=None, path=None) -> list[int]:
    """Frame indices (0-based): ``frames`` if given (each < n_frames), else every
    ``stride``-th frame."""
    if stride < 1:
        raise CryomatchError(f"the frame stride must be >= 1, got {stride}", path)
    if frames is None:
        return list(range(0, n_frames, stride))
    frames = [int(f) for f in frames]
    bad = [f for f in frames if not 0 <= f < n_frames]
    if bad:
        raise CryomatchError(f"frames {bad[:5]} are not in 0..{n_frames - 1}", path)
    if not frames:
        raise CryomatchError("the frame list is empty", path)
    return frames[::stride]


def read_frames(
    topology: str | os.PathLike,
    trajectory: str | os.PathLike | None,
    frames: list[int],
    atom_filter: str | None = None,
    selection: str = "all",
    sigma: float = 1.0,
) -> Iterator[tuple[int, PseudoAtoms]]:
    """(frame, Gaussian atoms) of each frame in ``frames``; ``atom_filter`` selects atoms
    (mdtraj's language, or gemmi's CID selection for PDB/mmCIF models)."""
    _check_ensemble_files(topology, trajectory)
    source = trajectory or topology
    if _uses_gemmi(topology, trajectory):
        import gemmi

        try:
            st = gemmi.read_structure(str(topology))
            st.remove_waters()
            chosen = gemmi.Selection(atom_filter) if atom_filter else None
        except Exception as exc:
            raise CryomatchError(f"not a readable model or selection ({exc})", topology) from exc
        for frame in frames:
            if not 0 <= frame < len(st):
                raise CryomatchError(f"no model {frame} (it has {len(st)})", topology)
            model = chosen.copy_model_selection(st[frame]) if chosen else st[frame]
            yield frame, gaussian_atoms(_gemmi_atoms(model), selection, sigma, topology)
        return
    import mdtraj

    try:
        top = mdtraj.load_topology(str(topology))
        query = f"(not water) and ({atom_filter})" if atom_filter else "not water"
        indices = top.select(query)
    except Exception as exc:
        raise CryomatchError(f"not a readable topology or selection ({exc})", topology) from exc
    sub = top.subset(indices)
    atoms = list(sub.atoms)
    for frame in frames:
        try:
            xyz = mdtraj.load_frame(str(source), frame, top=top, atom_indices=indices).xyz[0]
        except Exception as exc:
            raise CryomatchError(f"frame {frame} is not readable ({exc})", source) from exc
        rows = (
            (a.residue.name, a.name, a.element.atomic_number if a.element else 0, 10.0 * x)
            for a, x in zip(atoms, xyz.astype(np.float64), strict=True)
        )
        yield frame, gaussian_atoms(rows, selection, sigma, source)
