"""Atomic writers for arrays and tables (.npy, .npz, .csv, .json)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from .. import provenance
from .atomic import Outputs, atomic_path


def write_npy(path: str | os.PathLike, array, outputs: Outputs | None = None) -> None:
    with atomic_path(path, outputs) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array))


def write_npz(path: str | os.PathLike, outputs: Outputs | None = None, **arrays) -> None:
    with atomic_path(path, outputs) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def write_csv(
    path: str | os.PathLike,
    table: pd.DataFrame,
    prov: dict | None = None,
    outputs: Outputs | None = None,
) -> None:
    """CSV with provenance as leading '#' lines (read back with ``comment='#'``)."""
    with atomic_path(path, outputs) as tmp, open(tmp, "w") as f:
        if prov is not None:
            f.write("\n".join(provenance.comment_lines(prov)) + "\n")
        table.to_csv(f, index=False, float_format="%.6g")


def write_json(path: str | os.PathLike, data: dict, outputs: Outputs | None = None) -> None:
    with atomic_path(path, outputs) as tmp:
        tmp.write_text(json.dumps(provenance._jsonable(data), indent=2, sort_keys=True) + "\n")


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path, comment="#")
