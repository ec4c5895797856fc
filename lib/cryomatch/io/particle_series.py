"""Particle series: per-particle 2D tilt images with their per-tilt geometry and CTF.

Two layouts are read into one :class:`ParticleSeries`:

* RELION 5 / WarpTools (``--star`` an optimisation-set STAR naming rlnTomoParticlesFile and
  rlnTomoTomogramsFile, or the particles STAR itself with ``tomograms``): the particles STAR
  has one row per particle (rlnTomoName, rlnImageName of a 2D stack holding one image per
  tilt, rlnAngleRot/Tilt/Psi, rlnOriginX/Y/ZAngst, rlnTomoVisibleFrames; data_optics with
  rlnImagePixelSize, rlnCtfDataAreCtfPremultiplied); the tomograms STAR has data_global
  (rlnTomoName, voltage, Cs, amplitude contrast, rlnTomoHand) and one block per tomogram with
  one row per tilt: rlnTomoProjX/Y/Z/W (rows of the 4x4 matrix taking a tomogram position to
  the tilt image), defocus, rlnCtfScalefactor, rlnMicrographPreExposure (e/A^2).
  The tilt image of a particle with RELION matrix A is the projection along z of the
  reference at ``R = M A diag(1, 1, -1)``, M the 3x3 rotation part of the projection matrix
  (verified on the WarpTools data against the RELION reconstruction shipped with it; without
  the z-mirror the map comes out mirrored).
* RELION 3 style series (one STAR row per tilt image, as cryoDRGN-ET's test data): each row
  carries its own image (``N@stack``), full pose (rlnAngleRot/Tilt/Psi of that tilt), CTF,
  rlnCtfScalefactor and rlnCtfBfactor (dose weighting); rows are grouped into particles by
  rlnGroupName (or rlnTomoParticleName / rlnTomoParticleId). R = A of the row.
  rlnCtfBfactor is Warp's (negative: exp(B k^2 / 4) dampens) when every value is <= 0,
  else RELION's (exp(-B k^2 / 4)); the reader says which it took.

Each tilt row of :attr:`ParticleSeries.tilts` holds: ``particle`` (0-based), ``image_file``,
``image_index`` (0-based), CTF columns (rlnDefocusU/V/Angle, rlnVoltage,
rlnSphericalAberration, rlnAmplitudeContrast, rlnPhaseShift), ``scale`` (rlnCtfScalefactor),
``exposure`` (e/A^2 before the image, NaN if unknown), ``bfactor`` (A^2, positive dampens),
``shift_x``/``shift_y`` (A, where the particle sits relative to the image centre).
``matrices`` (n_tilts, 3, 3) are the R of each tilt image; ``frames`` (n_tilts, 3, 3) with
``mirror`` give R = frames A_p mirror for the particle's pose A_p (:meth:`compose`), so that
a refined particle pose gives new tilt matrices.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import geometry
from ..errors import CryomatchError, CryomatchWarning
from .mrc import open_mrc, stack_shape
from .particles import CTF_COLUMNS as IMAGE_CTF_COLUMNS
from .star import read_star

CTF_COLUMNS = [*IMAGE_CTF_COLUMNS, "rlnPhaseShift"]  # kernels.ctf.ctf's order
Z_MIRROR = np.diag([1.0, 1.0, -1.0])


@dataclass
class ParticleSeries:
    """Tilt images of particles (see the module docstring)."""

    tilts: pd.DataFrame
    frames: np.ndarray  # (n_tilts, 3, 3)
    mirror: np.ndarray  # (3, 3)
    particles: pd.DataFrame  # one row per particle: the STAR's, plus 'half' (1 or 2)
    poses: np.ndarray  # (n_particles, 3, 3) RELION A of each particle
    pixel_size: float
    box: int
    premultiplied: bool
    layout: str  # "relion5" or "relion3"
    source: Path
    notes: list[str] = field(default_factory=list)
    tomograms: Path | None = None  # the RELION 5 tomograms STAR

    @property
    def n_particles(self) -> int:
        return len(self.particles)

    @property
    def matrices(self) -> np.ndarray:
        return self.compose(self.poses)

    def compose(self, poses) -> np.ndarray:
        """Tilt matrices R (n_tilts, 3, 3) = frame A_p mirror for particle poses (n_p, 3, 3)."""
        a = np.asarray(poses, dtype=np.float64)[self.tilts["particle"].to_numpy()]
        return self.frames @ a @ self.mirror

    def rows_of(self, particles) -> np.ndarray:
        """Tilt rows (indices) of the given particles, in order."""
        p = self.tilts["particle"].to_numpy()
        return np.flatnonzero(np.isin(p, np.asarray(particles)))


def read_particle_series(path, tomograms=None, pixel_size=None) -> ParticleSeries:
    """Read an optimisation-set or particles STAR (RELION 5) or a per-tilt STAR (RELION 3)."""
    path = Path(path).resolve()
    blocks = read_star(path)
    first = next(iter(blocks.values()))
    if isinstance(first, dict) and "rlnTomoParticlesFile" in first:
        particles_path = _beside(first["rlnTomoParticlesFile"], path)
        tomo_name = first.get("rlnTomoTomogramsFile")
        tomograms = tomograms or (_beside(tomo_name, path) if tomo_name else None)
        path, blocks = particles_path, read_star(particles_path)
    table = _particle_table(blocks, path)
    if "rlnTomoName" in table and "rlnAngleRot" in table and _is_relion5_stack(blocks, table):
        if tomograms is None:
            raise CryomatchError(
                "a RELION 5 particles STAR needs its tomograms STAR (rlnTomoTomogramsFile of an "
                "optimisation set, or --tomograms)",
                path,
            )
        return _read_relion5(path, blocks, table, Path(tomograms).resolve(), pixel_size)
    return _read_relion3(path, blocks, table, pixel_size)


# --- shared helpers -------------------------------------------------------------------------
def _beside(name, star: Path) -> Path:
    p = Path(str(name))
    options = [p] if p.is_absolute() else [star.parent / p, *(d / p for d in star.parents)]
    found = next((o for o in options if o.is_file()), None)
    if found is None:
        raise CryomatchError(f"file {name!r} named in the STAR file does not exist", star)
    return found.resolve()


def _particle_table(blocks, path) -> pd.DataFrame:
    if isinstance(blocks.get("particles"), pd.DataFrame):
        return blocks["particles"]
    tables = [v for k, v in blocks.items() if isinstance(v, pd.DataFrame) and "rlnImageName" in v]
    if not tables:
        raise CryomatchError("no particle block with rlnImageName in the STAR file", path)
    return tables[0]


def _is_relion5_stack(blocks, table) -> bool:
    general = blocks.get("general")
    flag = isinstance(general, dict) and int(general.get("rlnTomoSubTomosAre2DStacks", 0)) == 1
    return flag or "rlnTomoVisibleFrames" in table


def _require(table, columns, path, what="column"):
    missing = [c for c in columns if c not in table]
    if missing:
        raise CryomatchError(f"missing required {what}(s) {', '.join(missing)}", path)
    for c in columns:
        if table[c].dtype.kind in "biuf":
            bad = ~np.isfinite(table[c].to_numpy(dtype=np.float64))
            if bad.any():
                raise CryomatchError(
                    f"row {int(np.flatnonzero(bad)[0]) + 1}: {c} is not finite", path
                )


def _halves(table: pd.DataFrame) -> np.ndarray:
    if "rlnRandomSubset" in table:
        halves = table["rlnRandomSubset"].to_numpy(dtype=np.int64)
        if set(np.unique(halves)) <= {1, 2} and len(np.unique(halves)) == 2:
            return halves
    return (np.arange(len(table)) % 2) + 1


def _check_stacks(tilts: pd.DataFrame, star: Path) -> int:
    boxes = set()
    for file, rows in tilts.groupby("image_file", sort=False):
        with open_mrc(file) as mrc:
            n, ny, nx = stack_shape(mrc)
        if ny != nx:
            raise CryomatchError(f"images are not square ({nx} x {ny} pixels)", file)
        top = int(rows["image_index"].max())
        if top >= n:
            raise CryomatchError(f"the STAR asks for image {top + 1} but the stack holds {n}", star)
        boxes.add(nx)
    if len(boxes) != 1:
        raise CryomatchError(f"stacks have different box sizes {sorted(boxes)}", star)
    return boxes.pop()


def _visible(value, n_frames: int, path: Path, row: int) -> np.ndarray:
    try:
        flags = np.asarray(json.loads(str(value)), dtype=bool)
    except (ValueError, TypeError) as exc:
        raise CryomatchError(
            f"row {row + 1}: rlnTomoVisibleFrames {value!r} is not a list", path
        ) from exc
    if len(flags) != n_frames:
        raise CryomatchError(
            f"row {row + 1}: rlnTomoVisibleFrames has {len(flags)} entries, the tomogram "
            f"{n_frames} tilts",
            path,
        )
    return flags


def _matrix_rows(series: pd.Series, path: Path, column: str) -> np.ndarray:
    try:
        rows = np.array([json.loads(str(v)) for v in series], dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise CryomatchError(f"{column} is not a list of 4 numbers per row", path) from exc
    if rows.ndim != 2 or rows.shape[1] != 4 or not np.isfinite(rows).all():
        raise CryomatchError(f"{column} is not a list of 4 finite numbers per row", path)
    return rows


# --- RELION 5 / WarpTools -------------------------------------------------------------------
def _read_relion5(path, blocks, table, tomo_path, pixel_size) -> ParticleSeries:
    _require(
        table, ["rlnTomoName", "rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], path
    )
    optics = blocks.get("optics")
    table = table.reset_index(drop=True).copy()
    if isinstance(optics, pd.DataFrame) and "rlnOpticsGroup" in table:
        extra = [c for c in optics.columns if c not in table or c == "rlnOpticsGroup"]
        table = table.merge(optics[extra], on="rlnOpticsGroup", how="left")
    if pixel_size is None:
        if "rlnImagePixelSize" not in table:
            raise CryomatchError("no rlnImagePixelSize in data_optics: give the pixel size", path)
        sizes = np.unique(np.round(table["rlnImagePixelSize"].to_numpy(float), 6))
        if len(sizes) != 1:
            raise CryomatchError(f"optics groups have different pixel sizes {list(sizes)}", path)
        pixel_size = float(sizes[0])
    premult = bool(int(table.get("rlnCtfDataAreCtfPremultiplied", pd.Series([0])).iloc[0]))
    tomo_blocks = read_star(tomo_path)
    glob = tomo_blocks.get("global")
    if not isinstance(glob, pd.DataFrame):
        raise CryomatchError("no data_global block in the tomograms STAR", tomo_path)
    _require(
        glob,
        ["rlnTomoName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"],
        tomo_path,
    )
    glob = glob.set_index("rlnTomoName")
    notes = []
    rows, frames = [], []
    for p, particle in table.iterrows():
        name = particle["rlnTomoName"]
        if name not in glob.index or not isinstance(tomo_blocks.get(name), pd.DataFrame):
            raise CryomatchError(
                f"tomogram {name!r} (particle row {p + 1}) is not in the tomograms STAR", tomo_path
            )
        tilt_table = tomo_blocks[name]
        _require(
            tilt_table,
            [
                "rlnTomoProjX",
                "rlnTomoProjY",
                "rlnTomoProjZ",
                "rlnDefocusU",
                "rlnDefocusV",
                "rlnDefocusAngle",
            ],
            tomo_path,
            f"column of block {name}",
        )
        proj = np.stack(
            [
                _matrix_rows(tilt_table[f"rlnTomoProj{a}"], tomo_path, f"rlnTomoProj{a}")
                for a in "XYZ"
            ],
            axis=1,
        )  # (n_frames, 3 rows, 4)
        n_frames = len(tilt_table)
        visible = (
            _visible(particle["rlnTomoVisibleFrames"], n_frames, path, p)
            if "rlnTomoVisibleFrames" in table
            else np.ones(n_frames, dtype=bool)
        )
        file = _beside(str(particle["rlnImageName"]).split("@")[-1], path)
        g = glob.loc[name]
        for t in range(n_frames):
            if not visible[t]:
                continue
            tr = tilt_table.iloc[t]
            rows.append(
                {
                    "particle": p,
                    "tilt": t,
                    "image_file": str(file),
                    "image_index": t,
                    "rlnDefocusU": float(tr["rlnDefocusU"]),
                    "rlnDefocusV": float(tr["rlnDefocusV"]),
                    "rlnDefocusAngle": float(tr["rlnDefocusAngle"]),
                    "rlnVoltage": float(g["rlnVoltage"]),
                    "rlnSphericalAberration": float(g["rlnSphericalAberration"]),
                    "rlnAmplitudeContrast": float(g["rlnAmplitudeContrast"]),
                    "rlnPhaseShift": float(tr.get("rlnPhaseShift", 0.0)),
                    "scale": float(tr.get("rlnCtfScalefactor", 1.0)),
                    "exposure": float(tr.get("rlnMicrographPreExposure", np.nan)),
                    "bfactor": 0.0,
                    "shift_x": 0.0,
                    "shift_y": 0.0,
                }
            )
            frames.append(proj[t, :, :3])
    if not rows:
        raise CryomatchError("no visible tilt images", path)
    tilts = pd.DataFrame(rows)
    box = _check_stacks(tilts, path)
    origins = np.stack(
        [
            table.get(f"rlnOrigin{a}Angst", pd.Series(np.zeros(len(table)))).to_numpy(float)
            for a in "XYZ"
        ],
        axis=1,
    )
    if np.abs(origins).max() > 0:
        # RELION 5: the particle sits at coordinate - origin (tomogram frame); its image moves by
        # the projection of -origin
        disp = np.einsum("tij,tj->ti", np.stack(frames), -origins[tilts["particle"].to_numpy()])
        tilts["shift_x"], tilts["shift_y"] = disp[:, 0], disp[:, 1]
    poses = geometry.euler_to_matrix(
        table["rlnAngleRot"].to_numpy(float),
        table["rlnAngleTilt"].to_numpy(float),
        table["rlnAnglePsi"].to_numpy(float),
    )
    table["half"] = _halves(table)
    notes.append(
        f"RELION 5 particle series: {len(table)} particles, {len(tilts)} visible tilt images "
        f"of {box} px at {pixel_size:g} A; CTF premultiplied: {premult}; "
        "tilt image = projection at M A diag(1,1,-1)"
    )
    return ParticleSeries(
        tilts,
        np.stack(frames),
        Z_MIRROR.copy(),
        table,
        poses,
        float(pixel_size),
        box,
        premult,
        "relion5",
        path,
        notes,
        tomo_path,
    )


# --- RELION 3 per-tilt rows (cryoDRGN-ET) -------------------------------------------------------
def _read_relion3(path, blocks, table, pixel_size) -> ParticleSeries:
    table = table.reset_index(drop=True).copy()
    _require(
        table,
        ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", *CTF_COLUMNS[:6]],
        path,
    )
    key = next(
        (c for c in ("rlnGroupName", "rlnTomoParticleName", "rlnTomoParticleId") if c in table),
        None,
    )
    if key is None:
        raise CryomatchError(
            "per-tilt rows need rlnGroupName, rlnTomoParticleName or rlnTomoParticleId to group "
            "them into particles",
            path,
        )
    if pixel_size is None:
        if "rlnImagePixelSize" in table:
            pixel_size = float(table["rlnImagePixelSize"].iloc[0])
        elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table):
            pixel_size = float(
                table["rlnDetectorPixelSize"].iloc[0] * 1e4 / table["rlnMagnification"].iloc[0]
            )
        else:
            raise CryomatchError("no pixel size in the STAR: give the pixel size", path)
    names = table["rlnImageName"].astype(str).str.split("@", n=1, expand=True)
    if names.shape[1] != 2 or names[1].isna().any():
        raise CryomatchError("rlnImageName must be 'N@stack' in per-tilt rows", path)
    index = pd.to_numeric(names[0], errors="coerce")
    if index.isna().any() or (index < 1).any():
        raise CryomatchError("rlnImageName must be 'N@stack' with N >= 1", path)
    files = {n: str(_beside(n, path)) for n in names[1].unique()}
    codes, uniques = pd.factorize(table[key], sort=False)
    particles = pd.DataFrame({key: uniques})
    first_rows = np.array([np.flatnonzero(codes == p)[0] for p in range(len(uniques))])
    bf = _column(table, "rlnCtfBfactor", 0.0)
    warp_sign = bool((bf <= 0).all())
    notes = [
        f"RELION 3 per-tilt rows grouped by {key}: {len(uniques)} particles, "
        f"{len(table)} tilt images at {pixel_size:g} A/px",
        "rlnCtfBfactor read as Warp's (negative dampens)"
        if warp_sign and bf.any()
        else "rlnCtfBfactor read as RELION's (positive dampens)",
    ]
    origin = [_origin(table, a, pixel_size) for a in "XY"]
    tilts = pd.DataFrame(
        {
            "particle": codes,
            "tilt": table.groupby(codes).cumcount().to_numpy(),
            "image_file": names[1].map(files).to_numpy(),
            "image_index": index.astype(np.int64).to_numpy() - 1,
            **{c: _column(table, c, 0.0) for c in CTF_COLUMNS},
            "scale": _column(table, "rlnCtfScalefactor", 1.0),
            "exposure": np.full(len(table), np.nan),
            "bfactor": -bf if warp_sign else bf,
            "shift_x": -origin[0],
            "shift_y": -origin[1],
        }
    )
    if "rlnRandomSubset" in table:
        particles["rlnRandomSubset"] = table["rlnRandomSubset"].to_numpy()[first_rows]
    particles["half"] = _halves(particles)
    box = _check_stacks(tilts, path)
    a = geometry.euler_to_matrix(
        *(table[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    )
    poses = a[first_rows]
    frames = a @ np.swapaxes(poses[codes], -1, -2)  # R = frame A_p: frame = A_t A_p^T
    return ParticleSeries(
        tilts,
        frames,
        np.eye(3),
        particles,
        poses,
        float(pixel_size),
        box,
        premultiplied_flag(table),
        "relion3",
        path,
        notes,
    )


def _column(table: pd.DataFrame, name: str, default: float) -> np.ndarray:
    if name in table:
        return table[name].to_numpy(float)
    return np.full(len(table), default)


def _origin(table: pd.DataFrame, axis: str, pixel_size: float) -> np.ndarray:
    """rlnOrigin{axis}Angst, or RELION 3.0's rlnOrigin{axis} in pixels, in A (0 if absent)."""
    if f"rlnOrigin{axis}Angst" in table:
        return _column(table, f"rlnOrigin{axis}Angst", 0.0)
    return _column(table, f"rlnOrigin{axis}", 0.0) * pixel_size


def premultiplied_flag(table: pd.DataFrame) -> bool:
    if "rlnCtfDataAreCtfPremultiplied" in table:
        return bool(int(table["rlnCtfDataAreCtfPremultiplied"].iloc[0]))
    return False


def read_tilt_images(series: ParticleSeries, rows) -> np.ndarray:
    """Images (len(rows), box, box) float32 of the given tilt rows; NaN/inf raise."""
    sub = series.tilts.iloc[np.asarray(rows)]
    out = np.empty((len(sub), series.box, series.box), dtype=np.float32)
    for file, group in sub.groupby("image_file", sort=False):
        with warnings.catch_warnings():  # a broken header was warned about when read
            warnings.simplefilter("ignore", CryomatchWarning)
            mrc = open_mrc(file)
        with mrc:
            data = mrc.data
            block = np.asarray(data[group["image_index"].to_numpy()], dtype=np.float32)
        if not np.isfinite(block).all():
            raise CryomatchError("the stack holds NaN or inf pixels", file)
        out[np.flatnonzero(sub["image_file"].to_numpy() == file)] = block
    return out
