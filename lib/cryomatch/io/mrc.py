"""MRC maps and image stacks through mrcfile.

Stacks are memory-mapped: only the images a batch asks for are read. Files with broken
headers (no 'MAP ' id, no machine stamp, voxel size 0) open permissively with a
:class:`~cryomatch.errors.CryomatchWarning`; files that are not MRC at all, or shorter than
their header promises, raise :class:`~cryomatch.errors.CryomatchError` naming the file.
Voxel sizes in headers are often wrong: stages take pixel sizes from metadata.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import mrcfile.dtypes
import mrcfile.utils
import numpy as np

from ..errors import CryomatchError, CryomatchWarning
from .atomic import Outputs, atomic_path, finish_mapped, mapped

_MODES = {0, 1, 2, 3, 4, 6, 12}
HEADER_BYTES = 1024


def _header_problem(path: Path) -> tuple[str | None, bool]:
    """Check the raw header: returns (problem or None, whether it is strictly valid MRC)."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        return f"not an MRC file: {size} bytes, shorter than the {HEADER_BYTES}-byte header", False
    raw = np.fromfile(path, dtype=np.uint8, count=HEADER_BYTES)
    for order in ("<", ">"):
        header = raw.view(mrcfile.dtypes.HEADER_DTYPE.newbyteorder(order))[0]
        nx, ny, nz, mode = (int(header[k]) for k in ("nx", "ny", "nz", "mode"))
        if mode in _MODES and 0 < nx < 10**6 and 0 < ny < 10**6 and nz == 0:
            return "empty MRC file: it holds no images (nz = 0)", False
        if mode in _MODES and 0 < nx < 10**6 and 0 < ny < 10**6 and 0 < nz < 10**8:
            itemsize = mrcfile.utils.dtype_from_mode(mode).itemsize
            expected = HEADER_BYTES + int(header["nsymbt"]) + nx * ny * nz * itemsize
            if size < expected:
                return (
                    f"truncated MRC file: the header promises {nx}x{ny}x{nz} values "
                    f"(mode {mode}, {expected} bytes) but the file has {size} bytes"
                ), False
            return None, bytes(header["map"]) == b"MAP "
    return "not an MRC file: the header has no valid mode and dimensions", False


def open_mrc(path: str | os.PathLike, mode: str = "r"):
    """Open an MRC file memory-mapped; permissive (with a warning) when the header is broken."""
    path = Path(path)
    if not path.is_file():
        raise CryomatchError("file does not exist", path)
    problem, strict_ok = _header_problem(path)
    if problem:
        raise CryomatchError(problem, path)
    if strict_ok:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return mrcfile.mmap(path, mode=mode)
        except ValueError:
            pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mrc = mrcfile.mmap(path, mode=mode, permissive=True)
    if mrc.data is None:
        mrc.close()
        raise CryomatchError("not a readable MRC file (mrcfile could not read its data)", path)
    messages = "; ".join(sorted({str(w.message) for w in caught})) or "non-standard header"
    warnings.warn(f"{path}: opened permissively ({messages})", CryomatchWarning, stacklevel=2)
    return mrc


def header_voxel_size(mrc, path) -> float | None:
    """The header's x voxel size in Angstrom, or None (with a warning) when it is 0."""
    size = float(mrc.voxel_size.x)
    if not size > 0:
        warnings.warn(f"{path}: the header's voxel size is {size}", CryomatchWarning, stacklevel=2)
        return None
    return size


def pixel_size_from(given, metadata, header, path, default: float | None = None) -> float:
    """The pixel size (A) a stage uses: ``given``, else the ``metadata``'s (a ``header`` that
    differs from it by more than 1% is warned about), else the MRC ``header``'s (warned
    about: headers are often wrong), else ``default`` (warned about); with none of them, an
    error naming ``path``. Missing values are None (or <= 0)."""
    if given is not None:
        return float(given)
    header = float(header) if header is not None and header > 0 else None
    if metadata is not None and metadata > 0:
        if header and abs(header - metadata) > 0.01 * metadata:
            warnings.warn(
                f"{path}: the MRC header's voxel size {header:g} A differs from the metadata's "
                f"{metadata:g} A; using the metadata's",
                CryomatchWarning,
                stacklevel=2,
            )
        return float(metadata)
    if header:
        warnings.warn(
            f"{path}: no pixel size in the metadata; using the MRC header's {header:g} A "
            "(headers are often wrong: give the pixel size)",
            CryomatchWarning,
            stacklevel=2,
        )
        return header
    if default is not None:
        warnings.warn(
            f"{path}: no pixel size anywhere; using {default:g} A", CryomatchWarning, stacklevel=2
        )
        return float(default)
    raise CryomatchError(
        "no pixel size in the metadata or the MRC header: give the pixel size", path
    )


def stack_shape(mrc) -> tuple[int, int, int]:
    """(n_images, ny, nx) of an image stack or a single 2D image."""
    shape = mrc.data.shape
    return (1, *shape) if len(shape) == 2 else tuple(shape)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """A 3D map as float32 (z, y, x) and its header voxel size (None when 0); a map that
    is all zeros (or NaN/inf anywhere) is an error."""
    with open_mrc(path) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
        voxel = header_voxel_size(mrc, path)
    if data.ndim != 3:
        raise CryomatchError(f"expected a 3D map, found shape {data.shape}", path)
    check_finite(data, path)
    if not data.any():
        raise CryomatchError("the map is all zeros", path)
    return data, voxel


def read_images(path: str | os.PathLike) -> np.ndarray:
    """A whole (small) image stack as float32 (n, y, x); for big stacks use :func:`open_mrc`."""
    with open_mrc(path) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
    return data[None] if data.ndim == 2 else data


def check_finite(data: np.ndarray, path, first_index: int = 0, what: str = "image") -> None:
    """Raise naming the file and the first image (1-based) that holds NaN or inf."""
    finite = np.isfinite(data)
    if finite.all():
        return
    if data.ndim == 3 and what == "image":
        bad = int(np.flatnonzero(~finite.reshape(len(data), -1).all(axis=1))[0]) + first_index
        raise CryomatchError(f"{what} {bad + 1} holds NaN or inf pixels", path)
    raise CryomatchError(f"the {what} holds NaN or inf values", path)


def _set_header(mrc, voxel_size: float, labels: list[str] | None, is_stack: bool) -> None:
    mrc.voxel_size = voxel_size
    if is_stack:
        mrc.header.ispg = 0
    labels = (labels or [])[:10]
    mrc.header.nlabl = len(labels)
    for i, text in enumerate(labels):
        mrc.header.label[i] = text[:80].encode("ascii", "replace")


def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size: float,
    labels: list[str] | None = None,
    outputs: Outputs | None = None,
    is_stack: bool | None = None,
) -> None:
    """Write a map (3D, .mrc) or stack (.mrcs) atomically as float32."""
    path = Path(path)
    is_stack = path.suffix == ".mrcs" if is_stack is None else is_stack
    with atomic_path(path, outputs) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            if is_stack:
                mrc.set_image_stack()
            _set_header(mrc, voxel_size, labels, is_stack)
            mrc.update_header_stats()


class StackWriter:
    """Write a stack of ``n`` images batch by batch (memory-mapped), renamed when closed."""

    def __init__(self, path, n: int, box: int, voxel_size: float, labels=None, outputs=None):
        self._ctx = atomic_path(path, outputs)
        self._mrc = mapped(
            self._ctx,
            lambda tmp: mrcfile.new_mmap(tmp, shape=(n, box, box), mrc_mode=2, overwrite=True),
            lambda mrc: mrc.close(),
        )
        self._mrc.set_image_stack()
        _set_header(self._mrc, voxel_size, labels, True)
        self._next = 0
        self.n = n

    def write(self, images: np.ndarray) -> None:
        k = len(images)
        self._mrc.data[self._next : self._next + k] = images
        self._next += k

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        finish_mrc_writer(self, exc)
        return False


def finish_mrc_writer(writer, exc: BaseException | None) -> None:
    """Close a memory-mapped MRC writer (``_ctx``, ``_mrc``, ``_next`` of ``n`` written):
    header statistics and rename when complete; else remove it and raise."""
    if exc is None and writer._next != writer.n:
        exc = RuntimeError(f"{type(writer).__name__} got {writer._next} of {writer.n}")

    def close():
        if exc is None:
            writer._mrc.update_header_stats()
        writer._mrc.close()

    finish_mapped(writer._ctx, close, exc)
