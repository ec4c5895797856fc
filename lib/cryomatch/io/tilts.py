"""Tilt-series metadata: tilt angles (.rawtlt/.tlt, SerialEM .mdoc) and IMOD .xf transforms.

* ``.rawtlt`` / ``.tlt``: one tilt angle (degrees) per line, in the order of the stack.
* SerialEM ``.mdoc``: one ``[ZValue = k]`` section per image with ``TiltAngle``; the stack
  order is the ZValue order, which for dose-symmetric schemes is not sorted by angle. The
  tilt-axis angle comes from the ``[T = ... Tilt axis angle = A, ...]`` title line and the
  pixel size (Angstrom) from ``PixelSpacing``.
* IMOD ``.xf``: per image ``A11 A12 A21 A22 DX DY``, the transform that takes raw image
  coordinates (about the centre) to aligned ones: ``aligned(A q + d) = raw(q)``
  (see :mod:`cryomatch.geometry`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CryomatchError
from .atomic import Outputs, write_text

ANGLE_SUFFIXES = (".rawtlt", ".tlt", ".mdoc")


@dataclass
class TiltMetadata:
    """Angles (degrees, stack order) and what else the file says (None when absent)."""

    angles: np.ndarray
    tilt_axis: float | None = None  # degrees counter-clockwise from +y (IMOD/SerialEM)
    pixel_size: float | None = None  # Angstrom


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise CryomatchError("file does not exist", path)
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        raise CryomatchError(f"cannot read the file ({exc.strerror})", path) from exc


def read_angle_list(path: str | os.PathLike) -> np.ndarray:
    """Tilt angles from a .rawtlt/.tlt file: one number per line (blank lines skipped)."""
    path = Path(path)
    angles = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            angles.append(float(text.split()[0]))
        except ValueError:
            raise CryomatchError(
                f"line {number} is not a tilt angle: {text[:40]!r}", path
            ) from None
    if not angles:
        raise CryomatchError("no tilt angles in the file", path)
    return np.asarray(angles)


def read_mdoc(path: str | os.PathLike) -> TiltMetadata:
    """Angles in ZValue (stack) order, tilt-axis angle and pixel size of a SerialEM .mdoc."""
    path = Path(path)
    sections: dict[int, dict[str, str]] = {}
    header: dict[str, str] = {}
    current = header
    tilt_axis = None
    for line in _read_text(path).splitlines():
        text = line.strip()
        z = re.fullmatch(r"\[ZValue\s*=\s*(-?\d+)\s*\]", text)
        if z:
            k = int(z.group(1))
            if k in sections:
                raise CryomatchError(f"ZValue {k} appears twice", path)
            current = sections[k] = {}
            continue
        axis = re.search(r"Tilt\s*axis\s*angle\s*=\s*(-?[\d.]+)", text, flags=re.IGNORECASE)
        if axis and tilt_axis is None:
            tilt_axis = float(axis.group(1))
        if "=" in text and not text.startswith("["):
            key, value = (s.strip() for s in text.split("=", 1))
            current[key] = value
    if not sections:
        raise CryomatchError("no [ZValue = ...] sections: not a SerialEM .mdoc file", path)
    order = sorted(sections)
    if order != list(range(len(order))):
        raise CryomatchError(f"ZValues are not 0..{len(order) - 1} (found {order[:5]}...)", path)
    angles = []
    for k in order:
        if "TiltAngle" not in sections[k]:
            raise CryomatchError(f"section ZValue {k} has no TiltAngle", path)
        try:
            angles.append(float(sections[k]["TiltAngle"].split()[0]))
        except ValueError:
            raise CryomatchError(f"section ZValue {k}: TiltAngle is not a number", path) from None
    spacing = header.get("PixelSpacing") or sections[order[0]].get("PixelSpacing")
    pixel_size = float(spacing.split()[0]) if spacing else None
    return TiltMetadata(np.asarray(angles), tilt_axis, pixel_size)


def read_angles(path: str | os.PathLike) -> TiltMetadata:
    """Tilt angles (and whatever else the file holds) from a .rawtlt, .tlt or .mdoc file."""
    path = Path(path)
    if path.suffix.lower() == ".mdoc":
        return read_mdoc(path)
    if path.suffix.lower() in (".rawtlt", ".tlt", ".txt"):
        return TiltMetadata(read_angle_list(path))
    raise CryomatchError(
        f"unknown tilt-angle file type {path.suffix!r} (use {', '.join(ANGLE_SUFFIXES)})", path
    )


def write_tlt(path: str | os.PathLike, angles, outputs: Outputs | None = None) -> None:
    """IMOD .tlt/.rawtlt: one angle per line."""
    write_text(path, "".join(f"{a:9.3f}\n" for a in np.asarray(angles, dtype=float)), outputs)


def write_xf(path: str | os.PathLike, matrices, shifts, outputs: Outputs | None = None) -> None:
    """IMOD .xf: matrices (2, 2) or (n, 2, 2) and shifts (n, 2) = (dx, dy) in pixels."""
    shifts = np.asarray(shifts, dtype=float).reshape(-1, 2)
    matrices = np.broadcast_to(np.asarray(matrices, dtype=float), (len(shifts), 2, 2))
    lines = [
        f"{m[0, 0]:12.7f}{m[0, 1]:12.7f}{m[1, 0]:12.7f}{m[1, 1]:12.7f}{d[0]:12.3f}{d[1]:12.3f}\n"
        for m, d in zip(matrices, shifts, strict=True)
    ]
    write_text(path, "".join(lines), outputs)


def read_xf(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """IMOD .xf: matrices (n, 2, 2) and shifts (n, 2)."""
    path = Path(path)
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            raise CryomatchError(f"line {number} is not six numbers", path) from None
        if len(values) != 6:
            raise CryomatchError(f"line {number} has {len(values)} numbers, not 6", path)
        rows.append(values)
    if not rows:
        raise CryomatchError("no transforms in the file", path)
    table = np.asarray(rows)
    return table[:, :4].reshape(-1, 2, 2), table[:, 4:]
