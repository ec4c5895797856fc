"""Structures for template projection: 3D maps (MRC) and atomic models (PDB/mmCIF via gemmi).

Atomic models become Gaussian atoms (coordinates in Angstrom about the model's centre of
mass, the centre of the projections):

* ``selection='all'``: every atom except waters, integrated density = atomic number (its
  electrons), width ``sigma`` Angstrom;
* ``selection='ca'``: one Gaussian per residue at its C-alpha, integrated density
  proportional to the residue's volume and the radius of gyration of a sphere of that
  volume (sigma = R / sqrt(5)); volumes from Zamyatnin 1972 (Prog. Biophys. Mol. Biol.
  24:107), 140 A^3 for residues not in the table.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CryomatchError
from ..kernels.phantom import PseudoAtoms
from .mrc import read_volume

MAP_SUFFIXES = {".mrc", ".map", ".mrcs", ".rec"}
MODEL_SUFFIXES = {".pdb", ".ent", ".cif", ".mmcif"}

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
    coords, weights, sigmas = [], [], []
    for chain in st[0]:
        for residue in chain:
            if selection == "ca":
                ca = residue.find_atom("CA", "*")
                if ca is None:
                    continue
                volume = RESIDUE_VOLUMES.get(residue.name.upper(), _DEFAULT_VOLUME)
                coords.append(ca.pos.tolist())
                weights.append(volume)
                sigmas.append((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0) / np.sqrt(5.0))
            else:
                for atom in residue:
                    coords.append(atom.pos.tolist())
                    weights.append(float(atom.element.atomic_number))
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
