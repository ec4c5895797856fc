"""The one internal particle table, read from RELION STAR (3.0, 3.1, 5) or cryoSPARC .cs.

:class:`Particles` holds ``table``: one row per image with RELION column names, the optics
group's values (voltage, Cs, amplitude contrast, pixel size) merged into every row, origins
in Angstrom, and two internal columns: ``image_file`` (absolute path) and ``image_index``
(0-based). ``optics`` keeps one row per optics group for writing RELION 3.1 STAR files.

Pixel size comes from the metadata (rlnImagePixelSize, rlnDetectorPixelSize and
rlnMagnification, or blob/psize_A), never from MRC headers; a header that disagrees is
warned about.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CryomatchError, CryomatchWarning
from . import cryosparc
from .atomic import Outputs
from .mrc import open_mrc, pixel_size_from, stack_shape
from .star import read_star, write_star

CTF_COLUMNS = [
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
]
# The CTF columns in the order of kernels.ctf.ctf's parameters (see ctf_arguments).
CTF_ARGUMENT_COLUMNS = [*CTF_COLUMNS, "rlnPhaseShift", "rlnCtfBfactor"]
POSE_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
OPTICS_COLUMNS = [
    "rlnOpticsGroup",
    "rlnOpticsGroupName",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
]
_INTERNAL = ["image_file", "image_index"]
_RELION30_ONLY = ["rlnMagnification", "rlnDetectorPixelSize", "rlnOriginX", "rlnOriginY"]


@dataclass
class Particles:
    """Particle images and their metadata (see the module docstring)."""

    table: pd.DataFrame
    optics: pd.DataFrame
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.table)

    def pixel_size(self) -> float:
        """The pixel size in Angstrom shared by all particles (error if they differ)."""
        sizes = np.unique(np.round(self.table["rlnImagePixelSize"].to_numpy(), 6))
        if len(sizes) != 1:
            raise CryomatchError(
                f"optics groups have different pixel sizes ({', '.join(map(str, sizes))} A); "
                "set preprocess.pixel_size to bring them to one",
                self.source,
            )
        return float(sizes[0])

    def subset(self, rows) -> Particles:
        return Particles(self.table.iloc[rows].reset_index(drop=True), self.optics, self.source)


# --- reading -----------------------------------------------------------------------------
def read_particles(
    path: str | os.PathLike,
    pixel_size: float | None = None,
    require_ctf: bool = True,
    images: bool = True,
    duplicates: str | None = None,
) -> Particles:
    """Read a STAR or .cs file into :class:`Particles`.

    Rows naming the same image twice are an error naming them (``duplicates='error'``, the
    default with ``images``), or dropped with a warning that counts them (``'drop'``: the
    first is kept), or kept (``'keep'``, the default without ``images``: metadata only).

    ``pixel_size`` (Angstrom) overrides the metadata's, for files that lack one. With
    ``images`` the image files must exist (their paths become absolute); without, the
    names are kept as written (metadata-only use, e.g. borrowing CTF values).
    """
    path = Path(path).resolve()
    if path.suffix == ".cs":
        table = cryosparc.cs_to_relion(cryosparc.read_cs(path), path)
        raw_names = table.pop("image_file_raw").str.lstrip(">")
        optics = None
        what = "cryoSPARC file"
    else:
        table, optics = _star_tables(path)
        if len(table) == 0:
            raise CryomatchError("the file lists no particles", path)
        if "rlnImageName" not in table:
            raise CryomatchError("missing required STAR column rlnImageName", path)
        table = table.copy()
        table["image_index"], raw_names = _parse_image_names(table["rlnImageName"], path)
        what = "STAR file"
    duplicates = duplicates or ("error" if images else "keep")
    table = _check_duplicates(table, raw_names, path, duplicates)
    raw_names = raw_names.loc[table.index]
    table["image_file"] = _resolve_files(raw_names, path, what) if images else raw_names
    if len(table) == 0:
        raise CryomatchError("the file lists no particles", path)
    table, optics = _merge_optics(table, optics, path, pixel_size)
    _check_columns(table, path, require_ctf)
    table = _fill_defaults(table)
    return Particles(table.reset_index(drop=True), optics, path)


def _check_duplicates(table, raw_names, path, duplicates: str):
    """The table without rows that repeat an earlier row's image (see read_particles)."""
    if duplicates == "keep":
        return table
    key = pd.DataFrame({"file": raw_names.to_numpy(), "index": table["image_index"].to_numpy()})
    repeated = key.duplicated().to_numpy()
    if not repeated.any():
        return table
    rows = np.flatnonzero(repeated)
    if duplicates == "drop":
        warnings.warn(
            f"{path}: dropped {len(rows)} particle row(s) that repeat an earlier row's image",
            CryomatchWarning,
            stacklevel=3,
        )
        return table[~repeated]
    names = [f"{key['index'][r] + 1:06d}@{key['file'][r]} (row {r + 1})" for r in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    raise CryomatchError(
        f"{len(rows)} particle row(s) repeat an earlier row's image: {', '.join(names)}{more} "
        "(remove them, or set preprocess.drop_duplicates / --drop-duplicates)",
        path,
    )


def _star_tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    blocks = {k: v for k, v in read_star(path).items() if isinstance(v, pd.DataFrame)}
    optics = blocks.get("optics")
    if "particles" in blocks:
        return blocks["particles"], optics
    with_images = [v for k, v in blocks.items() if k != "optics" and "rlnImageName" in v]
    if with_images:
        return with_images[0], optics
    others = [v for k, v in blocks.items() if k != "optics"]
    if not others:
        raise CryomatchError("no particle data block (data_particles) in the STAR file", path)
    return others[0], optics


def _parse_image_names(names: pd.Series, path: Path) -> tuple[pd.Series, pd.Series]:
    names = names.astype(str)
    has_at = names.str.contains("@", regex=False)
    split = names.str.split("@", n=1, expand=True)
    if split.shape[1] == 1:
        split[1] = None
    index_text = split[0].where(has_at, "1")
    files = split[1].where(has_at, names)
    index = pd.to_numeric(index_text, errors="coerce")
    bad = index.isna() | (index < 1)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise CryomatchError(
            f"row {row + 1}: rlnImageName {names.iloc[row]!r} is not 'N@file' with N >= 1", path
        )
    return (index.astype(np.int64) - 1), files


def _resolve_files(raw: pd.Series, meta_path: Path, what: str) -> pd.Series:
    """Absolute image paths: relative names are looked up beside the metadata file, then in
    each folder above it (RELION names paths from its project folder), then in the current
    directory."""
    resolved = {}
    for name in raw.unique():
        candidate = Path(name)
        if candidate.is_absolute():
            options = [candidate]
        else:
            options = [d / candidate for d in [meta_path.parent, *meta_path.parent.parents]]
            options.append(Path.cwd() / candidate)
        found = next((p for p in options if p.is_file()), None)
        if found is None:
            raise CryomatchError(
                f"image file {name!r} named in the {what} does not exist "
                f"(looked beside the file and in the folders above it)",
                meta_path,
            )
        resolved[name] = str(found.resolve())
    return raw.map(resolved)


def _merge_optics(table, optics, path, pixel_size):
    table = table.drop(columns=[c for c in ("rlnImageName",) if c in table])
    if optics is not None and len(optics):
        if "rlnOpticsGroup" not in table:
            raise CryomatchError("missing required STAR column rlnOpticsGroup", path)
        unknown = sorted(set(table["rlnOpticsGroup"]) - set(optics["rlnOpticsGroup"]))
        if unknown:
            raise CryomatchError(f"particles name optics groups {unknown} not in data_optics", path)
        dup = [c for c in optics.columns if c in table.columns and c != "rlnOpticsGroup"]
        table = table.drop(columns=dup).merge(optics, on="rlnOpticsGroup", how="left")
    else:
        table = _relion30_columns(table, path)
    if pixel_size is not None:
        table["rlnImagePixelSize"] = float(pixel_size)
    elif "rlnImagePixelSize" not in table:
        raise CryomatchError(
            "no pixel size in the metadata (rlnImagePixelSize, or rlnDetectorPixelSize with "
            "rlnMagnification); give one with --angpix / particles.pixel_size",
            path,
        )
    if "rlnOpticsGroup" not in table:  # RELION 3.0: one group per distinct optics
        keys = [c for c in OPTICS_COLUMNS[2:] if c in table]
        table["rlnOpticsGroup"] = table.groupby(keys, sort=False).ngroup() + 1 if keys else 1
    if "rlnAmplitudeContrast" not in table and "rlnDefocusU" in table:
        warnings.warn(
            f"{path}: no rlnAmplitudeContrast; using 0.1 (RELION's usual value)",
            CryomatchWarning,
            stacklevel=3,
        )
        table["rlnAmplitudeContrast"] = 0.1
        if optics is not None:
            optics = optics.assign(rlnAmplitudeContrast=0.1)
    optics = _optics_from_table(table, optics)
    return table, optics


def _relion30_columns(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """RELION 3.0 (and cryoSPARC) rows: pixel size and origins in RELION 3.1 form."""
    table = table.copy()
    if "rlnImagePixelSize" not in table:
        if "rlnPixelSize" in table:
            table["rlnImagePixelSize"] = table.pop("rlnPixelSize")
        elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table):
            table["rlnImagePixelSize"] = (
                table["rlnDetectorPixelSize"] * 1e4 / table["rlnMagnification"]
            )
    for axis in ("X", "Y"):
        if f"rlnOrigin{axis}" in table and f"rlnOrigin{axis}Angst" not in table:
            if "rlnImagePixelSize" not in table:
                raise CryomatchError(f"rlnOrigin{axis} in pixels but no pixel size", path)
            table[f"rlnOrigin{axis}Angst"] = table[f"rlnOrigin{axis}"] * table["rlnImagePixelSize"]
    return table.drop(columns=[c for c in _RELION30_ONLY if c in table])


def _optics_from_table(table: pd.DataFrame, optics: pd.DataFrame | None) -> pd.DataFrame:
    """One row per optics group, with every optics column that the rows carry."""
    if optics is not None and len(optics):
        cols = list(optics.columns)
    else:
        cols = [c for c in OPTICS_COLUMNS if c in table]
    cols = [c for c in dict.fromkeys(["rlnOpticsGroup", *cols]) if c in table]
    out = table[cols].drop_duplicates("rlnOpticsGroup").sort_values("rlnOpticsGroup")
    out = out.reset_index(drop=True)
    if "rlnOpticsGroupName" not in out:
        out.insert(1, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in out["rlnOpticsGroup"]])
        table["rlnOpticsGroupName"] = table["rlnOpticsGroup"].map(
            dict(zip(out["rlnOpticsGroup"], out["rlnOpticsGroupName"], strict=True))
        )
    return out


def _check_columns(table: pd.DataFrame, path: Path, require_ctf: bool) -> None:
    required = ["rlnImagePixelSize", *(CTF_COLUMNS if require_ctf else [])]
    missing = [c for c in required if c not in table]
    if missing:
        raise CryomatchError(f"missing required column(s) {', '.join(missing)}", path)
    for column in required + [c for c in POSE_COLUMNS if c in table]:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CryomatchError(f"row {row + 1}: {column} is not a finite number", path)
    if (table["rlnImagePixelSize"] <= 0).any():
        raise CryomatchError("pixel size must be positive", path)


def _fill_defaults(table: pd.DataFrame) -> pd.DataFrame:
    for column in ("rlnPhaseShift", "rlnCtfBfactor"):
        if column not in table:
            table[column] = 0.0
    return table


def ctf_arguments(table: pd.DataFrame) -> list[np.ndarray]:
    """Per-particle CTF parameters of a (merged) table, in the order
    ``kernels.ctf.ctf(kx, ky, *ctf_arguments(table))`` takes them."""
    return [table[c].to_numpy(dtype=np.float64) for c in CTF_ARGUMENT_COLUMNS]


# --- images ------------------------------------------------------------------------------
def flat_images_error(particles: Particles, rows, where: str = "background") -> CryomatchError:
    """The error naming images (``rows`` of ``particles``) with no variance in their
    ``where`` (constant or all-zero images: nothing to normalize or score)."""
    table = particles.table.iloc[rows[:5]]
    pairs = zip(table["image_index"], table["image_file"], strict=True)
    names = [f"{i + 1:06d}@{f}" for i, f in pairs]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return CryomatchError(
        f"{len(rows)} image(s) have no variance in the {where} (constant or all-zero "
        f"images cannot be normalized or scored): {', '.join(names)}{more}; remove them "
        "from the particle file",
        particles.source,
    )


class ImageReader:
    """Reads particle images by row from memory-mapped stacks (open files are cached)."""

    def __init__(self, particles: Particles):
        self.particles = particles
        self._open: dict[str, object] = {}

    def _mrc(self, file: str):
        if file not in self._open:
            self._open[file] = open_mrc(file)
        return self._open[file]

    def check(self) -> int:
        """Validate every referenced stack: MRC, square, one box size, indices in range,
        header pixel size consistent with the metadata (warning). Returns the box size."""
        table = self.particles.table
        boxes = {}
        for file, rows in table.groupby("image_file", sort=False):
            mrc = self._mrc(file)
            n, ny, nx = stack_shape(mrc)
            if n == 0:
                raise CryomatchError("the stack holds no images", file)
            if ny != nx:
                raise CryomatchError(f"images are not square ({nx} x {ny} pixels)", file)
            top = int(rows["image_index"].max())
            if top >= n:
                raise CryomatchError(
                    f"the metadata asks for image {top + 1} but the stack holds {n}",
                    self.particles.source,
                )
            boxes[file] = nx
            # warns where the header disagrees with the metadata
            pixel_size_from(None, float(rows["rlnImagePixelSize"].iloc[0]), mrc.voxel_size.x, file)
        sizes = sorted(set(boxes.values()))
        if len(sizes) != 1:
            raise CryomatchError(f"stacks have different box sizes {sizes}", self.particles.source)
        return sizes[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Images of rows [start, stop) as float32 (n, box, box); NaN/inf raise."""
        rows = self.particles.table.iloc[start:stop]
        out = None
        for file, group in rows.groupby("image_file", sort=False):
            data = self._mrc(file).data
            index = group["image_index"].to_numpy()
            order = np.argsort(index, kind="stable")
            block = np.empty((len(index), *data.shape[-2:]), dtype=np.float32)
            block[order] = data[index[order]] if data.ndim == 3 else data[None]
            finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
            if not finite.all():
                bad = int(index[np.flatnonzero(~finite)[0]])
                raise CryomatchError(f"image {bad + 1} holds NaN or inf pixels", file)
            if out is None:
                out = np.empty((len(rows), *block.shape[1:]), dtype=np.float32)
            out[np.flatnonzero(rows["image_file"].to_numpy() == file)] = block
        return out

    def close(self) -> None:
        for mrc in self._open.values():
            mrc.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# --- writing -----------------------------------------------------------------------------
def relion_blocks(particles: Particles, image_names: list[str] | None = None) -> dict:
    """RELION 3.1 data_optics and data_particles blocks for a particle set."""
    optics = particles.optics.copy()
    optics_only = [c for c in optics.columns if c != "rlnOpticsGroup"]
    table = particles.table.drop(
        columns=[c for c in optics_only + _INTERNAL if c in particles.table]
    )
    if image_names is None:
        image_names = [
            f"{i + 1:06d}@{f}"
            for i, f in zip(
                particles.table["image_index"], particles.table["image_file"], strict=True
            )
        ]
    table.insert(0, "rlnImageName", image_names)
    return {"optics": optics, "particles": table}


def write_particles(
    path: str | os.PathLike,
    particles: Particles,
    prov: dict | None = None,
    outputs: Outputs | None = None,
    image_names: list[str] | None = None,
) -> None:
    """Write a RELION 3.1 STAR (optics + particles) atomically."""
    write_star(path, relion_blocks(particles, image_names), prov, outputs)
