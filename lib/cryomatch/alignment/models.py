"""ZNCC and PCC alignment: all rotations of a batch of subvolumes as matrix products.

Per model (once): every template is rotated by every rotation (cubic spline, about
``shape / 2 - 0.5``); per wedge orientation (once): the rotated templates are filtered,
masked, and their spectra kept. Per subvolume: one forward FFT (ZNCC: two more for its
local statistics); the correlations over the window of shifts ``|d| <= max_shifts`` for
all rotations come from :mod:`cryomatch.kernels.correlation3d` (no inverse FFT per
rotation). Columns (template, rotation) are compared by their sub-voxel peaks, quadratics
fitted to the 3x3x3 samples around each column's best shift (to logarithms for ZNCC's
Gaussian-like peaks; the integer maxima alone favour whichever column's peak falls near a
voxel). With ``interpolate`` (default) the rotation moves between grid points to the
maximum of a quadratic fitted to the best column's neighbouring rotations; with ``refine``
those neighbours are scored more exactly (samples half a voxel apart: the same correlation
evaluated between voxels is its band-limited interpolation) together with seven rotations
around the interpolated one built afresh (:mod:`cryomatch.alignment.refine`). The shift is
last searched on a 0.1-voxel grid around the peak, with a 3-point parabola per axis.

ZNCC is the masked, locally normalized cross-correlation (FLCF; Roseman, Ultramicroscopy
94, 225, 2003): the filtered, rotated template t is masked by the rotated mask M and made
zero-mean and unit-norm under it, ``t' = M (t - mu) / sqrt(sum M (t - mu)^2)``, and

    score(d) = sum_x t'(x) v(x + d) / sqrt(sum M v(.+d)^2 - (sum M v(.+d))^2 / sum M)

with v the low-passed subvolume: the Pearson correlation under the mask that moves with
the template, invariant to offsets and scalings of the subvolume (acryo subtracts a global
mean and masks the subvolume at a fixed place instead, which biases shifts towards the
centre). Subvolumes are windows cut out of a wedge-filtered tomogram, so the templates get
the wedge (and low-pass) on a twice larger box, cropped: filtering in the box itself would
wrap the wedge's streaks around.

PCC is phase correlation (Kuglin and Hines, 1975): both spectra reduced to unit modulus,
weighted by the low-pass and the wedge, normalized so that a perfect match scores 1. Unlike
a raw correlation magnitude (acryo's), it does not favour rotations that put more of the
template's power inside the sampled wedge. Whitening amplifies noise: at low SNR it needs
a low-pass ``cutoff``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from ..backend import array_module, fft_module, to_numpy
from ..errors import CryomatchError
from ..geometry import acryo_centre
from ..kernels.correlation3d import (
    columns_of,
    paired_window_correlation,
    rfft_spectra,
    shift_grid,
    template_layout,
    window_correlation,
)
from ..kernels.peaks import grid_peaks, parabolic_peaks, stencil_maximum
from ..kernels.rotate import rotate_coefficients, rotate_volumes, spline_coefficients
from ..kernels.wedge import butterworth, without_nyquist
from . import refine as refine_rotation
from .base import (
    IDENTITY,
    TEMPLATE_MODE,
    AlignmentResult,
    TomographyInput,
    _edge_mean,
    as_backend,
    check_max_shifts,
    transform_subvolume,
)

FINE_STEP = 0.1  # voxels: the sub-voxel shift grid around the integer peak
# window scores of one batch of subvolumes: on CPUs the rotations alone fill the matrix
# products (batching more subvolumes only streams a larger accumulator, measured slower);
# GPUs want large batches
BATCH_BYTES = {"numpy": 2**19, "cupy": 2**26}
BY_COLUMN_BYTES = 2**27  # templates' layouts up to this size are also kept by column


@dataclass
class _Prepared:
    """Template-side arrays for one backend and one wedge orientation."""

    filt: object  # (subvolume weights (nz, ny, nx//2+1), template weights or None)
    templates: object  # (P, 2 nz, T*R) float32, template_layout
    masks: object = None  # ZNCC: (P, 2 nz, Rm) mask spectra' layout, Rm = 1 or R
    mask_sum: object = None  # ZNCC: (Rm,) sum of each mask
    norm: float = 1.0  # PCC: correlation of a perfect match
    by_column: object = None  # (T*R, P, nz) complex64 copy for fast gathers
    mask_column: object = None  # (1, P, nz) complex64: the one mask by column (cached)

    def columns(self, index):
        """Templates ``index`` (n,) by column (n, P, nz) complex64, for paired products."""
        if self.by_column is not None:
            xp = array_module(self.by_column)
            return self.by_column[xp.asarray(index)]
        return columns_of(self.templates, index)

    def mask_columns(self, index):
        """The masks of columns ``index`` and their sums: ((1 or n, P, nz), (1 or n,))."""
        n_masks = self.masks.shape[-1]
        if n_masks == 1:
            if self.mask_column is None:
                self.mask_column = columns_of(self.masks)
            return self.mask_column, self.mask_sum
        sel = np.asarray(index) % n_masks
        return columns_of(self.masks, sel), self.mask_sum[array_module(self.masks).asarray(sel)]


class _BatchedModel(TomographyInput):
    """Shared search of :class:`ZNCCAlignment` and :class:`PCCAlignment`.

    ``interpolate``: rotation between grid points from the neighbours' scores (no extra
    templates); ``refine``: then a local search below the grid step with templates rotated
    afresh for each subvolume (slower; more accurate).
    """

    def __init__(
        self,
        template,
        mask=None,
        rotations=None,
        cutoff=None,
        tilt=None,
        interpolate: bool = True,
        refine: bool = False,
    ):
        super().__init__(template, mask, rotations, cutoff, tilt)
        self.interpolate = bool(interpolate)
        self.refine = bool(refine)
        self._prepared: dict = {}
        self._neighbours = None
        self._coefficients = None

    # the batched search replaces the generic per-rotation optimizer
    def _optimize(self, subvolume, template, max_shifts, quaternion, pos, backend):
        raise NotImplementedError("the batched models do not use _optimize; call align()")

    # --- template side ------------------------------------------------------------------
    def _rotated_masks(self, matrices, centre) -> np.ndarray:
        """One mask for all rotations when it is (nearly) symmetric under them about its
        own centre of mass (a sphere: then one set of local statistics serves every
        rotation), else the mask turned by each rotation."""
        mask = self._mask
        if np.all(mask == mask.flat[0]):
            return mask[None]
        grid = np.indices(mask.shape).reshape(3, -1)
        com = grid @ mask.ravel() / mask.sum()
        far = np.argsort(Rotation.from_matrix(matrices).magnitude())[-2:]
        turned = rotate_volumes(mask, matrices[far], com)
        if float(np.abs(turned - mask).max()) <= 0.1 * float(mask.max()):
            return mask[None]
        return super()._rotated_masks(matrices, centre)

    def _wedge_key(self, quat):
        if self._tilt_model.is_identity():
            return None
        q = Rotation.from_quat(np.asarray(quat, dtype=np.float64)).as_quat(canonical=True)
        return tuple(np.round(q, 6))

    def _prepare(self, xp, quat) -> _Prepared:
        """Template-side arrays for a backend and a wedge orientation (a few cached)."""
        key = (xp.__name__, self._wedge_key(quat))
        if key not in self._prepared:
            if len(self._prepared) >= 4:
                self._prepared.pop(next(iter(self._prepared)))
            shape = self.input_shape
            filt = self._filters(xp, Rotation.from_quat(np.asarray(quat, dtype=np.float64)))
            if self.has_rotation:
                templates, masks = self.rotated_templates()
            else:
                templates, masks = self._template[:, None], self._mask[None]
            templates = templates.reshape((-1,) + shape)
            prep = self._prepare_templates(xp, filt, templates, masks)
            if prep.templates.nbytes <= BY_COLUMN_BYTES:  # gathering a column out of the
                prep.by_column = columns_of(prep.templates)  # layout reads a line per value
            if self.has_rotation and (self.interpolate or self.refine):
                self._neighbour_table()  # per model, with the templates (job setup)
            self._prepared[key] = prep
        return self._prepared[key]

    def _filters(self, xp, orientation):
        """(weights of the subvolumes' spectra, weights for the templates) for a wedge
        orientation; see the subclasses."""
        shape = self.input_shape
        wedge = self._tilt_model.rfft_mask(orientation, shape, xp)
        return butterworth(shape, self._cutoff, xp=xp) * wedge * without_nyquist(shape, xp), None

    def _prepare_templates(self, xp, filt, templates, masks) -> _Prepared:
        """Spectra of templates (n, *shape) in layout; masks (1 or n, *shape) (the mask of
        template i is ``masks[i % len(masks)]``); filt from :meth:`_filters`. Processed a
        few at a time."""
        out = None
        for lo in range(0, len(templates), 8):
            t = xp.asarray(templates[lo : lo + 8])
            m = _masks_for(xp, masks, lo, len(t))
            layout = template_layout(self._template_spectra(xp, filt, t, m))
            if out is None:
                out = xp.empty(layout.shape[:-1] + (len(templates),), dtype=xp.float32)
            out[..., lo : lo + len(t)] = layout
        return self._finish_prepared(xp, filt, out, xp.asarray(masks))

    # --- the search ----------------------------------------------------------------------
    def align(self, img, max_shifts, quaternion=None, pos=None, backend=None) -> AlignmentResult:
        """Best template, rotation and shift of one subvolume (see :mod:`.base`)."""
        self._check_image(img)
        quats = None if quaternion is None else np.asarray(quaternion, dtype=np.float64)[None]
        labels, shifts, out_quats, scores = self.align_batch(img[None], max_shifts, quats, backend)
        return AlignmentResult(int(labels[0]), shifts[0], out_quats[0], float(scores[0]))

    def align_batch(self, imgs, max_shifts, quaternions=None, backend=None):
        """Align many subvolumes (n, *shape): (labels (n,), shifts (n, 3), quats (n, 4),
        scores (n,)) as in :meth:`align`; ``quaternions`` (n, 4): each subvolume's
        orientation for its missing wedge (default identity). Batched over subvolumes
        sharing a wedge orientation (see :meth:`_batch_size`)."""
        be = as_backend(backend)
        xp = be.xp
        n = len(imgs)
        if tuple(imgs.shape[1:]) != self.input_shape:
            shape = tuple(imgs.shape[1:])
            raise CryomatchError(
                f"the subvolumes have shape {shape}, the template {self.input_shape}"
            )
        max_shifts = check_max_shifts(max_shifts, self.input_shape)
        if quaternions is None:
            quaternions = np.broadcast_to(IDENTITY, (n, 4))
        quaternions = np.asarray(quaternions, dtype=np.float64).reshape(n, 4)
        labels = np.zeros(n, dtype=np.int64)
        shifts, quats, scores = np.zeros((n, 3)), np.zeros((n, 4)), np.zeros(n)
        keys = [self._wedge_key(q) for q in quaternions]
        batch = self._batch_size(max_shifts, xp.__name__)
        for key in dict.fromkeys(keys):
            rows = np.flatnonzero([k == key for k in keys])
            prep = self._prepare(xp, quaternions[rows[0]])
            for lo in range(0, len(rows), batch):
                sel = rows[lo : lo + batch]
                out = self._search(xp.asarray(imgs[sel], dtype=xp.float32), prep, max_shifts)
                labels[sel], shifts[sel], quats[sel], scores[sel] = out
        return labels, shifts, quats, scores

    def _batch_size(self, max_shifts, backend: str = "numpy") -> int:
        """Subvolumes per batch: their window scores (S x columns x window), the
        accumulator of the correlations, stay within BATCH_BYTES of the backend."""
        window = np.prod([2 * int(m) + 1 for m in max_shifts])
        columns = len(self._template) * len(self.quaternions)
        return int(np.clip(BATCH_BYTES[backend] // (window * columns * 4), 1, 64))

    def _search(self, v, prep: _Prepared, max_shifts):
        s = len(v)
        rows = np.arange(s)
        n_rot = len(self.quaternions)
        data = self._subvolume_data(_standardize(v), prep)
        grid = shift_grid(max_shifts)
        origin = np.array([g[0] for g in grid])
        scores = to_numpy(self._scores(data, prep, grid))  # (S, C, wz, wy, wx)
        # compare columns by their sub-voxel peaks (quadratic fits on the integer grid):
        # the integer maxima favour whichever column's peak falls near a voxel
        position, value = grid_peaks(scores, self._gaussian_peaks)  # (S, C, 3), (S, C)
        centres = origin + position
        column = np.argmax(value, axis=1)
        d0 = centres[rows, column]
        quats = self.quaternions[column % n_rot]
        if self.has_rotation and self.refine:
            column, d0, quats, neighbours = self._around_best(
                data, prep, column, centres, max_shifts
            )
            quats, d0, local = self._refine_locally(
                data, prep, column // n_rot, quats, neighbours, d0, max_shifts
            )
            shift, score = self._subvoxel(data, prep, d0, max_shifts, local=local)
            return column // n_rot, shift, quats, score
        if self.has_rotation and self.interpolate:
            quats = self._interpolated_rotations(value, column)
        shift, score = self._subvoxel(data, prep, d0, max_shifts, column=column)
        return column // n_rot, shift, quats, score

    def _interpolated_rotations(self, value, column):
        """Quaternions (S, 4) interpolated between each subvolume's best column and its
        neighbouring rotations from their peak values (S, C)."""
        table = self._neighbour_table()
        rows = np.arange(len(column))
        r0 = column % len(self.quaternions)
        nbr = table.index[r0]
        cols = np.where(nbr >= 0, (column - r0)[:, None] + nbr, column[:, None])
        values = np.where(nbr >= 0, value[rows[:, None], cols], -np.inf)
        quats, _ = refine_rotation.interpolate_rotation(values, r0, self.quaternions, table)
        return quats

    def _around_best(self, data, prep, column, centres, max_shifts):
        """Sub-voxel peaks of the best column's neighbouring rotations from samples half a
        voxel apart (then of the new best's, if one of them beats it): the best column,
        its shift, the rotation interpolated between them and the interpolating
        quadratic's coefficients. centres (S, C, 3): the grid-level peaks."""
        if prep.by_column is None:
            prep.by_column = columns_of(prep.templates)
        table = self._neighbour_table()
        n_rot = len(self.quaternions)
        rows = np.arange(len(column))
        for round_ in range(2):
            r0 = column % n_rot
            nbr = table.index[r0]  # (S, K)
            cols = np.where(nbr >= 0, (column - r0)[:, None] + nbr, column[:, None])
            peaks, values = self._stencil_peaks(
                data, prep, cols, centres[rows[:, None], cols], max_shifts
            )
            values = np.where(nbr >= 0, values, -np.inf)
            best = cols[rows, np.argmax(values, axis=1)]
            if round_ == 1 or np.all(best == column):
                break
            column = best  # one more round around the new best
        best_k = np.argmax(values, axis=1)
        column, d0 = cols[rows, best_k], peaks[rows, best_k]
        quats, _ = refine_rotation.interpolate_rotation(
            values, r0, self.quaternions, table, self.quaternions[column % n_rot]
        )
        neighbours = (self.quaternions[cols % n_rot], values, self.quaternions[table.centre[r0]])
        return column, d0, quats, neighbours

    def _neighbour_table(self):
        if self._neighbours is None:
            self._neighbours = refine_rotation.neighbour_table(
                self.quaternions, self._rotations_arg
            )
        return self._neighbours

    def _stencil_peaks(self, data, prep, cols, centres, max_shifts, local=None):
        """Sub-voxel peaks of K columns per subvolume, ``cols`` (S, K) (or the S*K
        per-subvolume templates prepared in ``local``, column s*K + k), from 3x3x3 samples
        half a voxel apart around ``centres`` (S, K, 3): (shifts (S, K, 3), values (S, K))."""
        s, k = centres.shape[:2]
        h = 0.5
        limit = np.asarray(max_shifts)
        centres = np.clip(centres, -limit, limit)
        coords = [centres[..., a, None] + h * np.array([-1.0, 0.0, 1.0]) for a in range(3)]
        sample = to_numpy(self._scores(data, prep, coords, cols, local))  # (S, K, 3, 3, 3)
        offset, values = stencil_maximum(sample.reshape(-1, 3, 3, 3), h, self._gaussian_peaks)
        shifts = np.clip(centres + offset.reshape(s, k, 3), -limit, limit)
        return shifts, values.reshape(s, k)

    def _refine_locally(self, data, prep, label, quats, neighbours, d0, max_shifts):
        """Score seven rotations around each subvolume's (rotations built afresh), move the
        rotation to the maximum of a quadratic fitted to them and to the grid neighbours
        (``neighbours``: their quaternions (S, K, 4), scores (S, K) and the fit's centre
        (S, 4); see :mod:`.refine`). Returns (quats (S, 4), shifts (S, 3), the templates
        at the new rotations, prepared)."""
        xp = array_module(data[0])
        s = len(quats)
        step = self._neighbour_table().step / 2
        stencil = refine_rotation.local_stencil(quats, step)  # (S, 7, 4)
        local = self._templates_at(xp, prep, np.repeat(label, 7), stencil.reshape(-1, 4))
        centres = np.repeat(d0[:, None], 7, axis=1)
        peaks, values = self._stencil_peaks(data, prep, None, centres, max_shifts, local=local)
        points = np.concatenate([neighbours[0], stencil], axis=1)
        scores = np.concatenate([neighbours[1], values], axis=1)
        table = self._neighbour_table()
        radius = np.full(s, table.radius.max())
        quats = refine_rotation.fit_rotation(points, scores, neighbours[2], quats, 2 * step, radius)
        best = np.argmax(values, axis=1)
        return quats, peaks[np.arange(s), best], self._templates_at(xp, prep, label, quats)

    def _templates_at(self, xp, prep, labels, quats):
        """Templates ``labels`` (n,) rotated by ``quats`` (n, 4), prepared like the grid's
        (one column each: per-subvolume rotations)."""
        if self._coefficients is None:
            self._coefficients = [
                (spline_coefficients(t, _edge_mean(t), mode=TEMPLATE_MODE), _edge_mean(t))
                for t in self._template
            ]
        c = acryo_centre(self.input_shape)
        matrices = Rotation.from_quat(quats).as_matrix()
        volumes = np.empty((len(quats),) + self.input_shape, dtype=np.float32)
        for k, (coefficients, cval) in enumerate(self._coefficients):
            sel = np.flatnonzero(labels == k)
            if len(sel):
                volumes[sel] = rotate_coefficients(
                    coefficients, matrices[sel], c, cval, mode=TEMPLATE_MODE
                )
        masks = self.rotated_templates()[1] if self.has_rotation else self._mask[None]
        if len(masks) > 1:  # the mask turns with the template
            masks = np.clip(rotate_volumes(self._mask, matrices, c, mode=TEMPLATE_MODE), 0.0, None)
        return self._prepare_templates(xp, prep.filt, volumes, masks)

    def _subvoxel(self, data, prep, d0, max_shifts, column=None, local=None):
        """Shift on a FINE_STEP grid within half a voxel of the estimate d0 (S, 3), then a
        3-point parabola per axis. Returns (shifts (S, 3), scores (S,))."""
        offsets = FINE_STEP * np.arange(-round(0.5 / FINE_STEP), round(0.5 / FINE_STEP) + 1)
        limit = np.asarray(max_shifts)
        coords = [d0[:, a, None] + offsets[None] for a in range(3)]
        scores = to_numpy(self._scores(data, prep, coords, column, local))  # (S, w, w, w)
        out = [np.abs(c) > limit[a] + 1e-9 for a, c in enumerate(coords)]
        scores = np.where(
            out[0][:, :, None, None] | out[1][:, None, :, None] | out[2][:, None, None, :],
            -np.inf,
            scores,
        )
        position, best = parabolic_peaks(scores)
        return np.clip(d0 + offsets[0] + FINE_STEP * position, -limit, limit), best

    # --- landscape and fit ----------------------------------------------------------------
    def landscape(
        self, img, max_shifts, quaternion=None, pos=None, upsample: int = 1, backend=None
    ):
        """Scores over the shifts ``-max_shifts .. max_shifts`` at ``1 / upsample`` voxel
        (z, y, x); stacked over (template, rotation) pairs in template-major order
        (``k = i_template * n_rotations + i_rotation``) when there are several."""
        be = as_backend(backend)
        self._check_image(img)
        max_shifts = check_max_shifts(max_shifts, self.input_shape)
        if int(upsample) < 1:
            raise CryomatchError(f"upsample must be a positive integer, got {upsample}")
        quat = IDENTITY if quaternion is None else quaternion
        prep = self._prepare(be.xp, quat)
        v = _standardize(be.xp.asarray(img, dtype=be.xp.float32)[None])
        grid = shift_grid(max_shifts, 1 / int(upsample))
        scores = to_numpy(self._scores(self._subvolume_data(v, prep), prep, grid)[0])
        return scores[0] if len(scores) == 1 else scores

    def fit(self, img, max_shifts, cval: float | None = None, backend=None):
        """(the subvolume moved onto the template, its :class:`AlignmentResult`)."""
        be = as_backend(backend)
        result = self.align(img, max_shifts, backend=be)
        return to_numpy(transform_subvolume(be.xp.asarray(img), result, cval)), result


class ZNCCAlignment(_BatchedModel):
    """Masked, locally normalized cross-correlation (see the module docstring)."""

    _gaussian_peaks = True  # correlation peaks of smooth maps: fit logarithms

    def _filters(self, xp, orientation):
        """Subvolumes: low-pass only (they hold the wedge already; zeroing it again in the
        box would wrap the streaks of their window around). Templates: low-pass and wedge
        on a twice larger box, as the tomogram was filtered before the subvolumes were cut
        out of it."""
        shape = self.input_shape
        big = tuple(2 * n for n in shape)
        wedge = self._tilt_model.rfft_mask(orientation, big, xp)
        return (
            butterworth(shape, self._cutoff, xp=xp) * without_nyquist(shape, xp),
            butterworth(big, self._cutoff, xp=xp) * wedge,
        )

    def _template_spectra(self, xp, filt, t, m):
        """Filtered templates t made zero-mean and unit-norm under their masks m."""
        fft = fft_module(xp)
        n = len(t)
        shape = self.input_shape
        big = tuple(2 * k for k in shape)
        inner = (slice(None),) + tuple(slice(k // 2, k // 2 + k) for k in shape)
        padded = xp.empty((n, *big), dtype=xp.float32)
        padded[...] = _face_means(t)[:, None, None, None]  # what lies beyond the box
        padded[inner] = t
        tw = fft.irfftn(rfft_spectra(padded) * filt[1], s=big, axes=(-3, -2, -1))[inner]
        msum = m.reshape(len(m), -1).sum(axis=1)
        mu = (m * tw).reshape(n, -1).sum(axis=1) / msum
        dev = tw - mu[:, None, None, None]
        norm = xp.sqrt(xp.maximum((m * dev * dev).reshape(n, -1).sum(axis=1), 1e-30))
        return rfft_spectra(m * dev / norm[:, None, None, None])

    def _finish_prepared(self, xp, filt, layout, masks) -> _Prepared:
        mask_sum = masks.reshape(len(masks), -1).sum(axis=1).astype(xp.float32)
        return _Prepared(filt, layout, template_layout(rfft_spectra(masks)), mask_sum)

    def _subvolume_data(self, v, prep):
        xp = array_module(v)
        fft = fft_module(xp)
        a = rfft_spectra(v) * prep.filt[0]
        vf = fft.irfftn(a, s=self.input_shape, axes=(-3, -2, -1))
        a2 = rfft_spectra(vf * vf) * without_nyquist(self.input_shape, xp)
        return a, a2

    def _scores(self, data, prep, coords, column=None, local=None):
        """Scores (S, C, wz, wy, wx) of all columns on shared coords; or, on per-subvolume
        coords (three (S, K, w) or (S, w)), (S, K, wz, wy, wx) (or (S, wz, wy, wx)) of the
        columns ``column`` (S, K) (or (S,)) of each subvolume, or of per-subvolume templates
        (``local``, prepared with S*K columns)."""
        xp = array_module(data[0])
        a, a2 = data
        s, shape = len(a), self.input_shape
        n_masks = prep.masks.shape[-1]
        if column is None and local is None:
            num = window_correlation(a, prep.templates, shape, coords)
            local = window_correlation(xp.concatenate([a, a2]), prep.masks, shape, coords)
            den = _local_std(local[:s], local[s:], prep.mask_sum[None, :, None, None, None])
            if n_masks == 1:
                return num / den
            t = len(self._template)
            return (num.reshape((s, t, n_masks) + num.shape[2:]) / den[:, None]).reshape(num.shape)
        source = prep if local is None else local
        index = np.arange(local.templates.shape[-1]) if local is not None else np.ravel(column)
        templates = source.columns(index)
        masks, mask_sum = source.mask_columns(index)
        num = paired_window_correlation(a, templates, shape, coords)
        m1 = paired_window_correlation(a, masks, shape, coords)
        m2 = paired_window_correlation(a2, masks, shape, coords)
        if len(mask_sum) == 1:
            return num / _local_std(m1, m2, mask_sum[0])
        ms = mask_sum.reshape(num.shape[:-3])[..., None, None, None]
        return num / _local_std(m1, m2, ms)


class PCCAlignment(_BatchedModel):
    """Phase correlation (see the module docstring)."""

    _gaussian_peaks = False  # sinc-like peaks of whitened spectra

    def _template_spectra(self, xp, filt, t, m):
        return _unit_modulus(rfft_spectra(t * m))

    def _finish_prepared(self, xp, filt, layout, masks) -> _Prepared:
        nz, ny, nx = self.input_shape
        hermitian = xp.full(nx // 2 + 1, 2.0, dtype=xp.float32)
        hermitian[0] = 1.0
        norm = float((filt[0] * hermitian).sum()) / (nz * ny * nx)
        return _Prepared(filt, layout, norm=norm)

    def _subvolume_data(self, v, prep):
        return (_unit_modulus(rfft_spectra(v)) * prep.filt[0],)

    def _scores(self, data, prep, coords, column=None, local=None):
        (a,) = data
        if column is None and local is None:
            return window_correlation(a, prep.templates, self.input_shape, coords) / prep.norm
        source = prep if local is None else local
        index = np.arange(local.templates.shape[-1]) if local is not None else np.ravel(column)
        templates = source.columns(index)
        return paired_window_correlation(a, templates, self.input_shape, coords) / prep.norm


def _masks_for(xp, masks, lo: int, n: int):
    """The masks of templates lo .. lo + n (``masks[i % len(masks)]``)."""
    if len(masks) == 1:
        return xp.asarray(masks)
    return xp.asarray(masks[np.arange(lo, lo + n) % len(masks)])


def _face_means(v):
    """Mean of the six faces of each volume (n, *shape): the value beyond the box."""
    xp = array_module(v)
    faces = [v[:, 0], v[:, -1], v[:, :, 0], v[:, :, -1], v[:, :, :, 0], v[:, :, :, -1]]
    return xp.mean(xp.stack([f.reshape(len(v), -1).mean(axis=1) for f in faces]), axis=0)


def _standardize(v):
    """Subvolumes (S, ...) to mean 0 and standard deviation 1 each (scores do not depend
    on it; it keeps float32 sums accurate). Constant subvolumes become 0."""
    xp = array_module(v)
    flat = v.reshape(len(v), -1)
    mean = flat.mean(axis=1)
    std = flat.std(axis=1)
    std = xp.where(std > 0, std, 1.0)
    return (v - mean[:, None, None, None]) / std[:, None, None, None]


def _local_std(m1, m2, mask_sum):
    """sqrt of the masked sum of squares about the masked mean, kept away from 0."""
    xp = array_module(m1)
    var = m2 - m1 * m1 / mask_sum
    return xp.sqrt(xp.maximum(var, 1e-6 * xp.maximum(m2, 1e-12)))


def _unit_modulus(spectra):
    xp = array_module(spectra)
    mag = xp.abs(spectra)
    return (spectra / xp.maximum(mag, 1e-20)).astype(xp.complex64, copy=False)
