"""Atomic writers for arrays and tables (.npy, .npz, .csv, .json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    """A plain CSV (``pandas.read_csv(path)`` reads it) and, with ``prov``, its provenance
    beside it in ``NAME.csv.provenance.json`` (:func:`provenance_sidecar`)."""
    with atomic_path(path, outputs) as tmp, open(tmp, "w") as f:
        table.to_csv(f, index=False, float_format="%.6g")
    if prov is not None:
        write_json(provenance_sidecar(path), prov, outputs)


def provenance_sidecar(path: str | os.PathLike) -> Path:
    """Where the provenance of an output that cannot hold it (CSV) goes: NAME.provenance.json."""
    path = Path(path)
    return path.with_name(path.name + ".provenance.json")


def write_json(path: str | os.PathLike, data: dict, outputs: Outputs | None = None) -> None:
    with atomic_path(path, outputs) as tmp:
        tmp.write_text(json.dumps(provenance._jsonable(data), indent=2, sort_keys=True) + "\n")


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV output (also older ones with leading '#' provenance lines)."""
    return pd.read_csv(path)
