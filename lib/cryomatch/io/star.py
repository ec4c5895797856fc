"""STAR files through starfile: reading blocks, writing atomically with provenance."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import starfile

from .. import provenance
from ..errors import CryomatchError
from .atomic import Outputs, atomic_path


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame | dict]:
    """All data blocks of a STAR file, by name (an unnamed block is '')."""
    path = Path(path)
    if not path.is_file():
        raise CryomatchError("file does not exist", path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises a variety of parse errors
        raise CryomatchError(f"not a readable STAR file ({exc})", path) from exc
    if not blocks:
        raise CryomatchError("the STAR file holds no data blocks", path)
    return blocks


def write_star(
    path: str | os.PathLike,
    blocks: dict[str, pd.DataFrame],
    prov: dict | None = None,
    outputs: Outputs | None = None,
) -> None:
    """Write data blocks atomically. starfile's first line (a timestamp) is replaced by the
    provenance comments, so that the same inputs give byte-identical files."""
    path = Path(path)
    with atomic_path(path, outputs) as tmp:
        starfile.write(blocks, tmp, overwrite=True)
        lines = tmp.read_text().splitlines(keepends=True)
        if lines and lines[0].startswith("# Created by the starfile"):
            lines = lines[1:]
        head = [line + "\n" for line in provenance.comment_lines(prov)] if prov else []
        tmp.write_text("".join(head + lines))
