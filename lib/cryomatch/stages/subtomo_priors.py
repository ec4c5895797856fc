"""Prior poses of subtomograms from a STAR, and subvolumes named by rlnImageName.

Priors are the rows' rlnAngleRot/Tilt/Psi and origins (rlnOriginX/Y/ZAngst, or RELION
3.0's rlnOriginX/Y/Z in pixels). RELION 5's rlnTomoSubtomogramRot/Tilt/Psi give the
subtomogram's own frame: the particle's orientation in the tomogram is ``A_sub A_particle``
and its origin ``A_sub origin`` (RELION's ParticleSet::getMatrix3x3 and getPosition).

Two kinds of boxes:
- cut out of a tomogram by cryomatch (``--tomogram``): the box is in the tomogram's frame,
  the prior in the box is ``A_sub A_particle``, the wedge is the tomogram's;
- read from rlnImageName (RELION 3/4 subtomograms, one MRC per particle or ``k@stack``):
  the box is in the subtomogram frame (the tomogram turned by ``A_sub``; identity without
  those columns), the prior in the box is ``A_particle`` and the wedge is turned by ``A_sub``.

Outputs keep the input's frame: rlnAngle* relative to the subtomogram frame, origins added
to the input's (turned by ``A_sub^T`` for tomogram boxes). The pose the cone and in-plane
limits are measured from is kept in rlnCryomatchPriorRot/Tilt/Psi (the input's angles the
first time), so that iterations do not drift away from the original priors unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from .. import geometry
from ..errors import CryomatchError
from ..io.mrc import read_volume
from ..io.star import read_star
from ..io.volumes import VolumeStackReader

ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
SUBTOMO = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
REFERENCE = ("rlnCryomatchPriorRot", "rlnCryomatchPriorTilt", "rlnCryomatchPriorPsi")


def has_priors(table: pd.DataFrame) -> bool:
    return all(c in table for c in ANGLES)


def check_priors(table: pd.DataFrame, path) -> None:
    """One error if some prior angles or origins are missing or not finite."""
    cols = [c for c in (*ANGLES, *SUBTOMO, *REFERENCE) if c in table]
    origins = [f"rlnOrigin{a}{u}" for u in ("Angst", "") for a in "XYZ"]
    cols += [c for c in origins if c in table]
    values = table[cols].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise CryomatchError(f"row {row + 1}: {cols[col]} is not a number", path)


def subtomogram_matrices(table: pd.DataFrame) -> np.ndarray:
    """RELION matrices (n, 3, 3) of the rows' subtomogram frames (identity without them)."""
    if all(c in table for c in SUBTOMO):
        return geometry.euler_to_matrix(*(table[c].to_numpy(float) for c in SUBTOMO))
    return np.broadcast_to(np.eye(3), (len(table), 3, 3)).copy()


def origins_pixels(table: pd.DataFrame, angpix: float) -> np.ndarray:
    """Origins (n, 3) x, y, z in pixels: rlnOrigin*Angst / angpix, else rlnOriginX/Y/Z."""
    if all(f"rlnOrigin{a}Angst" in table for a in "XYZ"):
        return table[[f"rlnOrigin{a}Angst" for a in "XYZ"]].to_numpy(float) / angpix
    if all(f"rlnOrigin{a}" in table for a in "XYZ"):
        return table[[f"rlnOrigin{a}" for a in "XYZ"]].to_numpy(float)
    return np.zeros((len(table), 3))


def row_priors(table, offsets_zyx, shape, box_in_subtomogram_frame: bool):
    """Priors of rows in their boxes: (quats (n, 4), shifts (n, 3) z, y, x voxels, box
    orientations (n, 4) for the wedge, reference quats (n, 4) for the cone), in the
    alignment API's convention. offsets_zyx (n, 3): where each row puts its particle
    relative to the box centre (RELION's centre)."""
    a_part = geometry.euler_to_matrix(*(table[c].to_numpy(float) for c in ANGLES))
    a_sub = subtomogram_matrices(table)
    ref_cols = REFERENCE if all(c in table for c in REFERENCE) else ANGLES
    a_ref = geometry.euler_to_matrix(*(table[c].to_numpy(float) for c in ref_cols))
    if box_in_subtomogram_frame:
        box = Rotation.from_matrix(geometry.relion_to_zyx_matrix(a_sub)).as_quat()
    else:
        a_part, a_ref = a_sub @ a_part, a_sub @ a_ref
        box = np.tile([0.0, 0.0, 0.0, 1.0], (len(table), 1))
    origin = geometry.origin_from_displacement(np.asarray(offsets_zyx)[:, ::-1])
    quats, shifts = geometry.relion_to_subvolume_pose(
        *geometry.matrix_to_euler(a_part), origin, shape
    )
    ref, _ = geometry.relion_to_subvolume_pose(*geometry.matrix_to_euler(a_ref), origin, shape)
    return quats, shifts, box, ref


def output_columns(table, columns, box_in_subtomogram_frame: bool, angpix: float):
    """The input rows with the results: ``columns`` (from
    :func:`cryomatch.stages.subtomo.pose_columns` of poses in the box, origins relative to
    the rows' positions) turned into the input's frames (module docstring)."""
    columns = columns.copy()
    a_sub = subtomogram_matrices(table)
    origin = columns[[f"rlnOrigin{a}Angst" for a in "XYZ"]].to_numpy(float)
    angles = geometry.euler_to_matrix(*(columns[c].to_numpy(float) for c in ANGLES))
    if not box_in_subtomogram_frame:
        origin = np.einsum("nji,nj->ni", a_sub, origin)  # A_sub^T origin
        angles = np.swapaxes(a_sub, -1, -2) @ angles
    origin = origin + origins_pixels(table, angpix) * angpix
    for i, a in enumerate("XYZ"):
        columns[f"rlnOrigin{a}Angst"] = origin[:, i]
    for c, v in zip(ANGLES, geometry.matrix_to_euler(angles), strict=True):
        columns[c] = v
    if has_priors(table) and not all(c in table for c in REFERENCE):
        for c, r in zip(REFERENCE, ANGLES, strict=True):
            columns[c] = table[r].to_numpy(float)
    drop = [c for c in table if c in columns or c in ("rlnOriginX", "rlnOriginY", "rlnOriginZ")]
    return pd.concat([table.drop(columns=drop).reset_index(drop=True), columns], axis=1)


def read_particle_block(star) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(particle rows, optics block or None) of a STAR: data_particles, else its last table."""
    blocks = read_star(star)
    table = blocks.get("particles")
    if table is None:
        frames = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
        table = frames[-1] if frames else None
    if table is None or len(table) == 0:
        raise CryomatchError("no particle rows", star)
    return table.reset_index(drop=True), blocks.get("optics")


def optics_pixel_size(optics) -> float | None:
    """rlnImagePixelSize (A) of the first optics group, or None."""
    if optics is not None and "rlnImagePixelSize" in optics:
        return float(optics["rlnImagePixelSize"].iloc[0])
    return None


class ImageSource:
    """Subvolumes named by a STAR's rlnImageName (``path`` or ``k@path``; paths relative to
    the STAR's folder or the working folder), one output row each."""

    box_in_subtomogram_frame = True

    def __init__(self, star):
        self.star = Path(star)
        self.table, self.optics = read_particle_block(star)
        if "rlnImageName" not in self.table:
            raise CryomatchError("no rlnImageName column (or give --tomogram)", star)
        self._readers = {}
        self._names = [self._parse(str(n)) for n in self.table["rlnImageName"]]
        self._shape = self._volume(0).shape

    def _parse(self, name):
        index, _, path = name.rpartition("@")
        for base in (self.star.parent, Path.cwd()):
            if (base / path).is_file():
                return int(index) - 1 if index else None, base / path
        raise CryomatchError(f"rlnImageName {name!r}: no such file", self.star)

    def _volume(self, i):
        index, path = self._names[i]
        if index is None:
            data, _ = read_volume(path)
            if data.ndim != 3:
                raise CryomatchError(f"not a 3D subvolume: shape {data.shape}", path)
            return np.asarray(data, dtype=np.float32)
        if path not in self._readers:
            self._readers[path] = VolumeStackReader(path)
        reader = self._readers[path]
        if not 0 <= index < len(reader):
            raise CryomatchError(f"no subvolume {index + 1} (the stack has {len(reader)})", path)
        return reader.read(index, index + 1)[0]

    def __len__(self) -> int:
        return len(self.table)

    def shape(self):
        return self._shape

    def pixel_size(self):
        index, path = self._names[0]
        with VolumeStackReader(path) if index is not None else _Header(path) as r:
            return optics_pixel_size(self.optics), r.voxel_size()

    def read(self, start: int, stop: int, shape) -> tuple[np.ndarray, np.ndarray]:
        """(subvolumes, where the rows put their particles relative to the box centre, z, y,
        x voxels: minus their origins)."""
        out = np.stack([self._volume(i) for i in range(start, stop)])
        if out.shape[1:] != tuple(shape):
            raise CryomatchError(
                f"the subvolumes have shape {out.shape[1:]}, the template {tuple(shape)}",
                self.star,
            )
        origin = origins_pixels(self.table.iloc[start:stop], self._angpix)
        return out, -origin[:, ::-1]

    def close(self):
        for r in self._readers.values():
            r.close()


class _Header:
    def __init__(self, path):
        from ..io.mrc import header_voxel_size, open_mrc

        self.path, self._mrc = path, open_mrc(path)
        self._size = header_voxel_size

    def voxel_size(self):
        return self._size(self._mrc, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._mrc.close()
        return False
