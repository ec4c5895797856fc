"""Stacks of subvolumes and tomograms in MRC files, memory-mapped.

A subvolume stack is an MRC volume stack (4D data, space group 401: what mrcfile writes
for a (n, nz, ny, nx) array) or a 3D file of cubic volumes concatenated along z
(nz = n * nx, ny = nx). Only the volumes a batch asks for are read.
"""

from __future__ import annotations

import os

import mrcfile
import numpy as np

from ..errors import CryomatchError
from .atomic import Outputs, atomic_path, mapped
from .mrc import _set_header, check_finite, finish_mrc_writer, header_voxel_size, open_mrc


class VolumeStackReader:
    """Read subvolumes (n, nz, ny, nx) batch by batch as float32."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self._mrc = open_mrc(path)
        data = self._mrc.data
        if data.ndim == 4:
            self._data = data
        elif (
            data.ndim == 3 and data.shape[1] == data.shape[2] and data.shape[0] % data.shape[2] == 0
        ):
            n = data.shape[2]
            self._data = data.reshape(data.shape[0] // n, n, n, n)
        else:
            self._mrc.close()
            raise CryomatchError(
                f"not a stack of subvolumes: shape {data.shape} (expected a volume stack, or "
                "cubic volumes concatenated along z)",
                path,
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    def __len__(self) -> int:
        return self._data.shape[0]

    def voxel_size(self) -> float | None:
        return header_voxel_size(self._mrc, self.path)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.asarray(self._data[start:stop], dtype=np.float32)
        check_finite(out, self.path, start, what="subvolume")
        return out

    def close(self) -> None:
        self._mrc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class VolumeStackWriter:
    """Write ``n`` subvolumes of ``shape`` batch by batch into a volume stack (renamed
    into place when complete; removed on error)."""

    def __init__(
        self, path, n: int, shape, voxel_size: float, labels=None, outputs: Outputs | None = None
    ):
        self._ctx = atomic_path(path, outputs)
        self._mrc = mapped(
            self._ctx,
            lambda tmp: mrcfile.new_mmap(tmp, shape=(n, *shape), mrc_mode=2, overwrite=True),
            lambda mrc: mrc.close(),
        )
        _set_header(self._mrc, voxel_size, labels, False)
        self._next, self.n = 0, n

    def write(self, volumes: np.ndarray) -> None:
        self._mrc.data[self._next : self._next + len(volumes)] = volumes
        self._next += len(volumes)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        finish_mrc_writer(self, exc)
        return False


def extract_boxes(tomogram, centres, shape) -> np.ndarray:
    """Boxes (n, *shape) float32 of a (memory-mapped) tomogram around integer voxel centres
    (n, 3) (z, y, x): a centre lands at index ``shape // 2`` of its box. Parts outside the
    tomogram are filled with the mean of the part inside; a box wholly outside is an error."""
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
    box = np.asarray(shape, dtype=np.int64)
    limit = np.array(tomogram.shape)
    out = np.empty((len(centres), *shape), dtype=np.float32)
    for i, c in enumerate(centres):  # one slicing per box: reads only that region
        lo = c - box // 2
        a, b = np.maximum(lo, 0), np.minimum(lo + box, limit)
        if np.any(b <= a):
            raise CryomatchError(
                f"box {i + 1} centred at (z, y, x) {tuple(int(v) for v in c)} lies outside the "
                f"tomogram of shape {tuple(int(v) for v in limit)}"
            )
        part = np.asarray(tomogram[a[0] : b[0], a[1] : b[1], a[2] : b[2]], dtype=np.float32)
        (i0, j0, k0), (i1, j1, k1) = a - lo, b - lo
        out[i] = part.mean()
        out[i, i0:i1, j0:j1, k0:k1] = part
    return out
