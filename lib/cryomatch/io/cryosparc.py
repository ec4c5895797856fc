"""cryoSPARC .cs particle files (numpy structured arrays) into RELION-named columns.

Conventions follow pyem's csparc2star (Asarnow): alignments3D/pose is a rotation vector
whose matrix, transposed, is RELION's Euler matrix; shifts (pixels at alignments*/psize_A)
have RELION's origin sign; alignments2D/pose is rlnAnglePsi in radians; ctf/df_angle_rad and
ctf/phase_shift_rad are in radians; 0-based classes and exposure groups become 1-based.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from ..errors import CryomatchError
from ..geometry import matrix_to_euler

_CTF = {
    "ctf/accel_kv": "rlnVoltage",
    "ctf/cs_mm": "rlnSphericalAberration",
    "ctf/amp_contrast": "rlnAmplitudeContrast",
    "ctf/df1_A": "rlnDefocusU",
    "ctf/df2_A": "rlnDefocusV",
    "ctf/bfactor": "rlnCtfBfactor",
}


def read_cs(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise CryomatchError("file does not exist", path)
    try:
        cs = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CryomatchError(f"not a readable cryoSPARC .cs file ({exc})", path) from exc
    if cs.dtype.names is None:
        raise CryomatchError("not a cryoSPARC .cs file (no named fields)", path)
    return cs


def cs_to_relion(cs: np.ndarray, path) -> pd.DataFrame:
    """Particle rows with RELION column names; image paths stay as in the file."""
    names = set(cs.dtype.names)
    missing = [n for n in ("blob/path", "blob/idx") if n not in names]
    if missing:
        raise CryomatchError(f"missing cryoSPARC fields: {', '.join(missing)}", path)
    df = pd.DataFrame(
        {
            "image_file_raw": [p.decode() for p in cs["blob/path"]],
            "image_index": cs["blob/idx"].astype(np.int64),
        }
    )
    for field, column in _CTF.items():
        if field in names:
            df[column] = cs[field].astype(np.float64)
    if "ctf/df_angle_rad" in names:
        df["rlnDefocusAngle"] = np.rad2deg(cs["ctf/df_angle_rad"].astype(np.float64))
    if "ctf/phase_shift_rad" in names:
        df["rlnPhaseShift"] = np.rad2deg(cs["ctf/phase_shift_rad"].astype(np.float64))
    if "blob/psize_A" in names:
        df["rlnImagePixelSize"] = cs["blob/psize_A"].astype(np.float64)
    if "blob/shape" in names:
        df["rlnImageSize"] = cs["blob/shape"][:, 0].astype(np.int64)
    df["rlnOpticsGroup"] = (
        cs["ctf/exp_group_id"].astype(np.int64) + 1 if "ctf/exp_group_id" in names else 1
    )
    for kind in ("alignments3D", "alignments2D"):
        if f"{kind}/pose" not in names:
            continue
        psize = cs[f"{kind}/psize_A"] if f"{kind}/psize_A" in names else cs["blob/psize_A"]
        shift = cs[f"{kind}/shift"].astype(np.float64) * psize[:, None]
        df["rlnOriginXAngst"], df["rlnOriginYAngst"] = shift[:, 0], shift[:, 1]
        pose = cs[f"{kind}/pose"].astype(np.float64)
        if kind == "alignments3D":
            matrices = Rotation.from_rotvec(pose).as_matrix().transpose(0, 2, 1)
            rot, tilt, psi = matrix_to_euler(matrices)
            df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = rot, tilt, psi
        else:
            df["rlnAnglePsi"] = np.rad2deg(pose)
        if f"{kind}/class" in names:
            df["rlnClassNumber"] = cs[f"{kind}/class"].astype(np.int64) + 1
        break
    return df
