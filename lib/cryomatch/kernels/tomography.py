"""Parallel-beam single-axis tomography: projector, back-projector, WBP and SIRT.

Geometry (:mod:`cryomatch.geometry`): tilt theta turns the map about its y axis; the map point
(X, Z) of every y slice lands on image column ``u = X cos(theta) - Z sin(theta)`` (about the
centre ``n // 2``). Every slice perpendicular to the tilt axis is the same 2D problem, so one
sparse matrix ``A`` (rows: tilt x detector column; columns: voxels of one x-z slice) serves
all slices at once as a sparse x dense product. ``A`` samples each ray with Joseph's method
(P. M. Joseph 1982, IEEE Trans. Med. Imaging 1:192): step one voxel along the axis closer to
the ray, interpolate linearly across it, weight by the path length per step. The
back-projector is ``A^T`` itself, so forward and back projection are exact adjoints.

Arrays: volumes (nz, ny, nx), stacks (n_tilts, ny, nx). Internally the products run on
"sinogram layout" (n_tilts * nx, ny) and (nz * nx, ny): y is the last, contiguous axis. On
the CPU a product takes ``BLOCK`` columns (y positions) at a time, so that the dense operand
of each sparse x dense product stays in cache (about twice as fast as one product at 256^3).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..backend import array_module, fft_module

BLOCK = 32  # y positions per sparse x dense product on the CPU


class ParallelBeamProjector:
    """Projection of (nz, ny, nx) volumes at ``angles`` (degrees) onto (n, ny, nx) stacks.

    ``width`` is nx (image width across the tilt axis), ``thickness`` nz (default nx).
    ``xp`` is numpy or cupy (the matrices move to the GPU with cupyx.scipy.sparse).
    """

    def __init__(self, angles, width: int, thickness: int | None = None, xp=np, dtype=np.float32):
        self.angles = np.asarray(angles, dtype=np.float64)
        self.nx = int(width)
        self.nz = int(thickness or width)
        self.n = len(self.angles)
        self.xp = xp
        self.dtype = dtype
        a = joseph_matrix(self.angles, self.nx, self.nz).astype(dtype)
        at = a.T.tocsr()
        if xp is np:
            self.a, self.at = a, at
        else:  # pragma: no cover - GPU
            import cupyx.scipy.sparse as csp

            self.a, self.at = csp.csr_matrix(a), csp.csr_matrix(at)
        self._self_blocks = None
        self._row_scale = self._col_scale = None

    # --- layout ---------------------------------------------------------------------------
    def to_sinograms(self, stack):
        """(n, ny, nx) -> (n * nx, ny)."""
        n, ny, nx = stack.shape
        return self.xp.ascontiguousarray(stack.transpose(0, 2, 1)).reshape(n * nx, ny)

    def from_sinograms(self, sinograms):
        """(n * nx, ny) -> (n, ny, nx)."""
        ny = sinograms.shape[1]
        return self.xp.ascontiguousarray(sinograms.reshape(-1, self.nx, ny).transpose(0, 2, 1))

    def to_slices(self, volume):
        """(nz, ny, nx) -> (nz * nx, ny)."""
        nz, ny, nx = volume.shape
        return self.xp.ascontiguousarray(volume.transpose(0, 2, 1)).reshape(nz * nx, ny)

    def from_slices(self, slices):
        """(nz * nx, ny) -> (nz, ny, nx)."""
        ny = slices.shape[1]
        return self.xp.ascontiguousarray(slices.reshape(self.nz, self.nx, ny).transpose(0, 2, 1))

    # --- operators --------------------------------------------------------------------------
    def project(self, slices):
        """``A`` on slice layout (nz * nx, ny) -> sinogram layout (n * nx, ny)."""
        return _product(self.a, slices, self.xp)

    def back_project(self, sinograms):
        """``A^T`` on sinogram layout (n * nx, ny) -> slice layout (nz * nx, ny)."""
        return _product(self.at, sinograms, self.xp)

    def forward(self, volume):
        """Projections (n, ny, nx) of a volume (nz, ny, nx)."""
        return self.from_sinograms(
            self.project(self.to_slices(volume.astype(self.dtype, copy=False)))
        )

    def back(self, stack):
        """Back-projection (nz, ny, nx) of a stack (n, ny, nx): the exact adjoint of forward."""
        return self.from_slices(
            self.back_project(self.to_sinograms(stack.astype(self.dtype, copy=False)))
        )

    def self_projection(self, sinograms):
        """``A_i A_i^T`` applied to each tilt's own sinogram rows: what projecting back, at
        tilt i, the back-projection of tilt i alone gives (for leave-one-out reprojections)."""
        if self._self_blocks is None:
            cpu = self.a if self.xp is np else self.a.get()
            blocks = [cpu[i * self.nx : (i + 1) * self.nx] for i in range(self.n)]
            s = sp.block_diag([b @ b.T for b in blocks], format="csr").astype(self.dtype)
            if self.xp is np:
                self._self_blocks = s
            else:  # pragma: no cover - GPU
                import cupyx.scipy.sparse as csp

                self._self_blocks = csp.csr_matrix(s)
        return self._self_blocks @ sinograms

    def sirt_scales(self):
        """1 / row sums and 1 / column sums of A (zeros where a sum is 0), as columns."""
        if self._row_scale is None:
            xp = self.xp
            rows = xp.asarray(self.a.sum(axis=1)).ravel()
            cols = xp.asarray(self.at.sum(axis=1)).ravel()
            self._row_scale = xp.where(rows > 0, 1.0 / xp.maximum(rows, 1e-12), 0.0)[:, None]
            self._col_scale = xp.where(cols > 0, 1.0 / xp.maximum(cols, 1e-12), 0.0)[:, None]
            self._row_scale = self._row_scale.astype(self.dtype)
            self._col_scale = self._col_scale.astype(self.dtype)
        return self._row_scale, self._col_scale


def _product(matrix, dense, xp):
    """``matrix @ dense`` (sparse x dense); on the CPU ``BLOCK`` columns at a time."""
    if xp is not np or dense.shape[1] <= BLOCK:
        return matrix @ dense
    out = np.empty((matrix.shape[0], dense.shape[1]), dtype=np.result_type(matrix, dense))
    for lo in range(0, dense.shape[1], BLOCK):
        out[:, lo : lo + BLOCK] = matrix @ np.ascontiguousarray(dense[:, lo : lo + BLOCK])
    return out


def joseph_matrix(angles, nx: int, nz: int) -> sp.csr_matrix:
    """Sparse (n * nx, nz * nx) projection matrix of one x-z slice (see module doc)."""
    t = np.deg2rad(np.asarray(angles, dtype=np.float64))
    c, s = np.cos(t), np.sin(t)
    cx, cz = nx // 2, nz // 2
    u = np.arange(nx) - cx
    rows_all, cols_all, vals_all = [], [], []
    for steep in (True, False):  # steep: |cos| >= |sin|, step along z
        pick = np.flatnonzero((np.abs(c) >= np.abs(s)) == steep)
        if not len(pick):
            continue
        ci, si = c[pick, None, None], s[pick, None, None]
        uu = u[None, :, None]
        if steep:
            step = (np.arange(nz) - cz)[None, None, :]
            across = (uu + step * si) / ci + cx  # fractional x index
            weight = 1.0 / np.abs(ci)
            limit = nx
        else:
            step = (np.arange(nx) - cx)[None, None, :]
            across = (step * ci - uu) / si + cz  # fractional z index
            weight = 1.0 / np.abs(si)
            limit = nz
        lo = np.floor(across)
        frac = across - lo
        lo = lo.astype(np.int64)
        shape = np.broadcast_shapes(across.shape)
        row = np.broadcast_to(pick[:, None, None] * nx + np.arange(nx)[None, :, None], shape)
        stepi = np.broadcast_to(step + (cz if steep else cx), shape)
        for idx, w in ((lo, 1.0 - frac), (lo + 1, frac)):
            ok = (idx >= 0) & (idx < limit) & (w > 0)
            col = stepi * nx + idx if steep else idx * nx + stepi
            rows_all.append(row[ok])
            cols_all.append(col[ok])
            vals_all.append(np.broadcast_to(w * weight, shape)[ok])
    a = sp.coo_matrix(
        (np.concatenate(vals_all), (np.concatenate(rows_all), np.concatenate(cols_all))),
        shape=(len(t) * nx, nz * nx),
    )
    return a.tocsr()


def angular_weights(angles) -> np.ndarray:
    """Angular spacing (radians) each tilt stands for: half the gap to each neighbour."""
    angles = np.deg2rad(np.asarray(angles, dtype=np.float64))
    if len(angles) == 1:
        return np.ones(1)
    order = np.argsort(angles)
    a = angles[order]
    gaps = np.diff(a)
    w = np.empty_like(a)
    w[1:-1] = (gaps[1:] + gaps[:-1]) / 2
    w[0], w[-1] = gaps[0], gaps[-1]
    out = np.empty_like(w)
    out[order] = w
    return out


def ramp_filter(stack, window: str = "ramp"):
    """Filter each image row (across the tilt axis) with the discrete ramp of Kak & Slaney
    (Principles of Computerized Tomographic Imaging, 1988, eq. 3.61), zero-padded to twice
    the width; ``window`` 'ramp', 'shepp-logan', 'cosine' or 'hann' damps high frequencies."""
    xp = array_module(stack)
    fft = fft_module(xp)
    nx = stack.shape[-1]
    size = 2 ** int(np.ceil(np.log2(2 * nx)))
    k = np.concatenate([np.arange(0, size // 2 + 1), np.arange(-size // 2 + 1, 0)])
    h = np.zeros(size)
    h[0] = 0.25
    odd = k % 2 == 1
    h[odd] = -1.0 / (np.pi * k[odd]) ** 2
    response = np.real(np.fft.rfft(h))  # ~ |f| for f in cycles per pixel
    f = np.fft.rfftfreq(size)
    if window == "shepp-logan":
        response *= np.sinc(f)
    elif window == "cosine":
        response *= np.cos(np.pi * f)
    elif window == "hann":
        response *= 0.5 * (1 + np.cos(2 * np.pi * f))
    elif window != "ramp":
        raise ValueError(f"unknown WBP filter window {window!r}")
    spectrum = fft.rfft(stack, n=size, axis=-1) * xp.asarray(response, dtype=np.float32)
    return fft.irfft(spectrum, n=size, axis=-1)[..., :nx].astype(stack.dtype, copy=False)


def wbp(projector: ParallelBeamProjector, stack, window: str = "ramp"):
    """Weighted (filtered) back-projection of a stack (n, ny, nx) into (nz, ny, nx)."""
    xp = projector.xp
    w = xp.asarray(angular_weights(projector.angles), dtype=projector.dtype)[:, None, None]
    return projector.back(ramp_filter(stack, window) * w)


def sirt(
    projector: ParallelBeamProjector,
    stack,
    iterations: int = 20,
    start=None,
    nonnegative: bool = False,
):
    """SIRT: ``x += C A^T R (b - A x)`` with R, C the inverse row and column sums of A
    (Gregor & Benson 2008, IEEE Trans. Med. Imaging 27:918). ``start``: initial volume."""
    solver = SIRT(projector, start, nonnegative)
    solver.run(stack, iterations)
    return solver.volume()


class SIRT:
    """SIRT (see :func:`sirt`) whose volume carries over from one :meth:`run` to the next, for
    data that change a little between runs (re-aligned stacks): a warm start. With ``leak``
    each update is ``x <- (1 - leak) x + C A^T R (b - A x)``, whose fixed point
    ``(leak I + C A^T R A) x = C A^T R b`` is a Tikhonov-regularized solution. The volume's
    projection ``A x`` is kept, so an update costs one back- and one forward-projection.
    Slices along y are independent problems: on the CPU the volume is held as contiguous
    blocks of ``BLOCK`` y positions, each iterated on its own (no copies between products)."""

    def __init__(
        self, projector: ParallelBeamProjector, start=None, nonnegative: bool = False, leak=0.0
    ):
        self.projector = projector
        self.nonnegative = nonnegative
        self.leak = leak
        self.blocks = None  # [(slice of y, x block (nz * nx, width), A x block or None)]
        self.iterations = 0
        if start is not None:
            self.blocks = [
                [cut, self._part(projector.to_slices(start.astype(projector.dtype)), cut), None]
                for cut in self._cuts(start.shape[1])
            ]

    def _cuts(self, ny: int):
        width = BLOCK if self.projector.xp is np else ny
        return [slice(lo, min(lo + width, ny)) for lo in range(0, ny, width)]

    def _part(self, columns, cut):
        return self.projector.xp.ascontiguousarray(columns[:, cut])

    def run(self, stack, iterations: int) -> None:
        """``iterations`` updates toward the stack (n, ny, nx) from the current volume."""
        p, xp = self.projector, self.projector.xp
        rows, cols = p.sirt_scales()
        b = p.to_sinograms(stack.astype(p.dtype, copy=False))
        if self.blocks is None:
            self.blocks = [
                [cut, xp.zeros((p.nz * p.nx, cut.stop - cut.start), dtype=p.dtype), None]
                for cut in self._cuts(b.shape[1])
            ]
            for block in self.blocks:
                block[2] = xp.zeros((b.shape[0], block[0].stop - block[0].start), p.dtype)
        for block in self.blocks:
            cut, x, ax = block
            bk = self._part(b, cut)
            for _ in range(iterations):
                ax = p.a @ x if ax is None else ax
                update = cols * (p.at @ (rows * (bk - ax)))
                if self.leak:
                    x *= 1 - self.leak
                x += update
                if self.nonnegative:
                    xp.maximum(x, 0, out=x)
                ax = None
            block[2] = ax
        self.iterations += iterations

    def volume(self):
        """The current volume (nz, ny, nx)."""
        xp = self.projector.xp
        return self.projector.from_slices(xp.concatenate([x for _, x, _ in self.blocks], axis=1))

    def projections(self):
        """Its projections (n, ny, nx), ``A x``."""
        p, xp = self.projector, self.projector.xp
        for block in self.blocks:
            if block[2] is None:
                block[2] = p.a @ block[1]
        return p.from_sinograms(xp.concatenate([ax for _, _, ax in self.blocks], axis=1))
