"""ZNCC alignment about each subvolume's prior pose (local search).

A prior (rotation R_P, shift s_P in the alignment API's convention, see
:mod:`cryomatch.alignment.base`) says the subvolume is roughly the template moved by
(R_P, s_P). Each subvolume is turned back by its prior once, ``v_p(y) = v(R_P (y - c) + c
+ s_P)`` (linear interpolation, see RESAMPLE_ORDER), so that one small rotation grid
about the identity, rotated into the templates once per model, serves every particle; the
search finds a correction (R_C, s_C) and the pose is ``(R_P R_C, s_P + R_P s_C)``
(:func:`cryomatch.geometry.compose_subvolume_poses`).

The missing wedge turns with the subvolume: in the prior's frame it is the tomogram's
wedge at orientation R_P (``W_p(k) = W(R_P k)``, times the box's own orientation when the
box is not cut in the tomogram's frame). It differs from particle to particle, so the
templates are not filtered by it (that would be one template set per particle); the
filter G = low-pass x W_p acts on the subvolume side, and each (subvolume, rotation) score
is normalized by the norm of the template filtered by G, which one matrix product gives
for all pairs (the templates' power spectra against the particles' filters):

    score(d) = <G t', G v(. + d)> / (||G t'|| std_M(G v(. + d)))

with t' the rotated template made zero-mean and unit-norm under its mask M, and std_M the
local standard deviation of the filtered subvolume under the mask (Roseman's FLCF; the
wedge normalization is the constrained correlation of Foerster et al., J. Struct. Biol.
161, 276, 2008). Without that normalization, rotations that put more of the template's
power inside the particle's wedge would score higher.

The grid is acryo's (range, step) per axis; ``cone`` and ``inplane`` (degrees) keep, per
particle, only the rotations whose final pose's viewing direction lies within ``cone`` of
the reference pose's, and whose in-plane angle is within ``inplane`` (RELION's sense: the
viewing direction is ``A^T e_z``, the in-plane angle the twist about the particle's z).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from .. import geometry
from ..backend import array_module, fft_module, to_numpy
from ..errors import CryomatchError
from ..kernels.correlation3d import (
    layout_spectra,
    paired_window_correlation,
    rfft_order,
    rfft_spectra,
    shift_grid,
    window_correlation,
)
from ..kernels.peaks import grid_peaks
from ..kernels.rotate import affine_resample
from ..kernels.wedge import butterworth, without_nyquist
from .base import as_backend, check_max_shifts
from .models import ZNCCAlignment, _local_std, _standardize

# the subvolumes are turned back by their priors with linear interpolation: 4x faster than
# cubic (half the search's time otherwise); its attenuation of the high frequencies is
# the same for every rotation searched, and the search runs low-passed. Mode "constant"
# (the mean at once beyond the box's last voxel, no ramp across its surface) is 1.5x
# faster than "grid-constant" and differs only within a voxel of the box's faces
RESAMPLE_ORDER, RESAMPLE_MODE = 1, "constant"


def to_prior_frame(volume, quat, shift, xp=np, order: int = 3, mode: str = "constant"):
    """The subvolume turned back by its prior: ``v_p(y) = v(R_P (y - c) + c + s_P)`` with c
    acryo's centre (spline of ``order``; outside the box: the volume's mean, ``mode`` of
    :func:`cryomatch.kernels.rotate.affine_resample`: "constant" is 2x faster than
    "grid-constant" at order 3 and differs within a few voxels of the box's faces)."""
    rot = Rotation.from_quat(np.asarray(quat, dtype=np.float64)).as_matrix()
    c = geometry.acryo_centre(volume.shape)
    volume = xp.asarray(volume, dtype=xp.float32)
    offset = c - rot @ c + np.asarray(shift)
    return affine_resample(volume, rot, offset, float(volume.mean()), order, mode)


def allowed_rotations(reference_matrices, prior_matrices, grid_quats, cone, inplane):
    """Which grid corrections (C,) each particle (S,) may take: (S, C) bool.

    reference_matrices (S, 3, 3): RELION matrices of the pose the cone and in-plane range
    are measured from; prior_matrices (S, 3, 3): RELION matrices of the search's centre;
    grid_quats (C, 4): corrections in the alignment API's convention. The final pose is
    ``A_P A_C`` (:func:`cryomatch.geometry.compose_subvolume_poses`).
    """
    corr = geometry.zyx_to_relion_matrix(Rotation.from_quat(grid_quats).as_matrix())
    final = np.einsum("sij,cjk->scik", prior_matrices, corr)
    ref = np.asarray(reference_matrices)[:, None]
    ok = np.ones(final.shape[:2], dtype=bool)
    if cone is not None:
        d_final = np.swapaxes(final, -1, -2)[..., 2]  # A^T e_z
        d_ref = np.swapaxes(ref, -1, -2)[..., 2]
        ok &= geometry.angle_between_directions(d_final, d_ref) <= cone + 1e-6
    if inplane is not None:
        ok &= np.abs(geometry.inplane_angle_between(final, ref)) <= inplane + 1e-6
    ok[~ok.any(axis=1)] = True  # nothing allowed (a cone below the step): keep the search
    return ok


class LocalZNCC(ZNCCAlignment):
    """ZNCC about each subvolume's prior (module docstring): ``align_priors``."""

    def __init__(
        self,
        template,
        mask=None,
        angular_range: float = 10.0,
        angular_step: float = 5.0,
        cutoff=None,
        tilt=None,
        cone=None,
        inplane=None,
        interpolate: bool = True,
    ):
        if not angular_step > 0 or angular_range < 0:
            raise CryomatchError(
                f"angular range {angular_range} and step {angular_step}: the step must be "
                "positive and the range not negative"
            )
        rotations = [(float(angular_range), float(angular_step))] * 3
        super().__init__(template, mask, rotations, cutoff, tilt, interpolate, refine=False)
        self.cone = None if cone is None else float(cone)
        self.inplane = None if inplane is None else float(inplane)

    # --- template side: masked, zero-mean, unit-norm, no filter ------------------------------
    def _filters(self, xp, orientation):
        shape = self.input_shape
        return butterworth(shape, self._cutoff, xp=xp) * without_nyquist(shape, xp), None

    def _template_spectra(self, xp, filt, t, m):
        msum = m.reshape(len(m), -1).sum(axis=1)
        mu = (m * t).reshape(len(t), -1).sum(axis=1) / msum
        dev = m * (t - mu[:, None, None, None])
        norm = xp.sqrt(xp.maximum((dev * dev).reshape(len(t), -1).sum(axis=1), 1e-30))
        return rfft_spectra(dev / norm[:, None, None, None])

    def _finish_prepared(self, xp, filt, layout, masks):
        prep = super()._finish_prepared(xp, filt, layout, masks)
        nz, ny, nx = self.input_shape
        hermitian = np.full(nx // 2 + 1, 2.0, dtype=np.float32)
        hermitian[0] = 1.0
        h = xp.asarray(hermitian / (nz * ny * nx))  # per kx
        # |T|^2 in the rfftn grid's (nz, ny, kx) order, times the squared low-pass: a
        # particle's ||G t'||^2 is then its 0/1 wedge, flattened, times this matrix
        spectra = layout_spectra(layout)  # (P, nz, C)
        power = rfft_order(spectra.real**2 + spectra.imag**2, ny) * h[:, None]  # (nz, ny, kx, C)
        power = power * (filt[0] * filt[0])[..., None]
        prep.power = xp.ascontiguousarray(power.reshape(-1, power.shape[-1]))
        prep.nyquist = without_nyquist(self.input_shape, xp)
        return prep

    # --- the search ------------------------------------------------------------------------
    def align_priors(
        self,
        imgs,
        max_shifts,
        prior_quats,
        prior_shifts,
        box_quats=None,
        reference_quats=None,
        backend=None,
    ):
        """Align subvolumes (n, *shape) about their priors: (labels (n,), shifts (n, 3),
        quats (n, 4), scores (n,)): the best template and the full poses (prior composed
        with the correction).

        prior_quats (n, 4), prior_shifts (n, 3): the priors (alignment API's convention);
        box_quats (n, 4): each box's orientation in the tomogram (its wedge; default
        identity); reference_quats (n, 4): the poses ``cone`` and ``inplane`` are measured
        from (default the priors)."""
        be = as_backend(backend)
        xp = be.xp
        n = len(imgs)
        if tuple(imgs.shape[1:]) != self.input_shape:
            raise CryomatchError(
                f"the subvolumes have shape {tuple(imgs.shape[1:])}, the template "
                f"{self.input_shape}"
            )
        max_shifts = check_max_shifts(max_shifts, self.input_shape)
        prior_quats = np.asarray(prior_quats, dtype=np.float64).reshape(n, 4)
        prior_shifts = np.asarray(prior_shifts, dtype=np.float64).reshape(n, 3)
        box = np.tile([0.0, 0, 0, 1], (n, 1)) if box_quats is None else np.asarray(box_quats)
        ref = prior_quats if reference_quats is None else np.asarray(reference_quats)
        prep = self._prepare(xp, np.array([0.0, 0, 0, 1]))
        shifts, quats, scores = np.zeros((n, 3)), np.zeros((n, 4)), np.zeros(n)
        labels = np.zeros(n, dtype=np.int64)
        batch = self._batch_size(max_shifts, xp.__name__)
        for lo in range(0, n, batch):
            sel = np.arange(lo, min(n, lo + batch))
            v = xp.stack(
                [
                    to_prior_frame(
                        imgs[i], prior_quats[i], prior_shifts[i], xp, RESAMPLE_ORDER, RESAMPLE_MODE
                    )
                    for i in sel
                ]
            )
            wedge_rot = Rotation.from_quat(box[sel]) * Rotation.from_quat(prior_quats[sel])
            weights = xp.stack(
                [self._tilt_model.rfft_mask(r, self.input_shape, xp) for r in wedge_rot]
            )
            allowed = self._allowed(prior_quats[sel], ref[sel])
            lab, d, q, sc = self._search_local(_standardize(v), weights, prep, max_shifts, allowed)
            labels[sel] = lab
            quats[sel], shifts[sel] = geometry.compose_subvolume_poses(
                prior_quats[sel], prior_shifts[sel], q, d
            )
            scores[sel] = sc
        return labels, shifts, quats, scores

    def _allowed(self, prior_quats, reference_quats):
        if self.cone is None and self.inplane is None:
            return None
        relion = [
            geometry.zyx_to_relion_matrix(Rotation.from_quat(q).as_matrix())
            for q in (reference_quats, prior_quats)
        ]
        return allowed_rotations(*relion, self.quaternions, self.cone, self.inplane)

    def _search_local(self, v, wedges, prep, max_shifts, allowed):
        """(labels (S,), corrections' shifts (S, 3), quats (S, 4), scores (S,)) of subvolumes
        in their priors' frames, with their wedges (S, nz, ny, nx//2+1)."""
        s = len(v)
        rows = np.arange(s)
        n_rot = len(self.quaternions)
        data = self._subvolume_data_local(v, wedges, prep)
        grid = shift_grid(max_shifts)
        origin = np.array([g[0] for g in grid])
        scores = to_numpy(self._scores(data, prep, grid))  # (S, C, wz, wy, wx)
        position, value = grid_peaks(scores, self._gaussian_peaks)
        if allowed is not None:
            value = np.where(np.tile(allowed, (1, len(self._template))), value, -np.inf)
        centres = origin + position
        column = np.argmax(value, axis=1)
        d0 = centres[rows, column]
        quats = self.quaternions[column % n_rot]
        if self.has_rotation and self.interpolate:
            quats = self._interpolated_rotations(value, column)
        shift, score = self._subvoxel(data, prep, d0, max_shifts, column=column)
        return column // n_rot, shift, quats, score

    def _subvolume_data_local(self, v, wedges, prep):
        """(G^2 V, G V, spectrum of (G v)^2, ||G t'||^2 per (subvolume, column)); G the
        low-pass times each subvolume's wedge."""
        xp = array_module(v)
        fft = fft_module(xp)
        g = prep.filt[0][None] * wedges  # (S, nz, ny, kx), wedge is 0/1
        a = rfft_spectra(v) * g
        vf = fft.irfftn(a, s=self.input_shape, axes=(-3, -2, -1))
        a2 = rfft_spectra(vf * vf) * prep.nyquist
        energy = xp.maximum(wedges.reshape(len(v), -1) @ prep.power, 1e-12)  # (S, C)
        return a * prep.filt[0][None], a, a2, xp.sqrt(energy)

    def _scores(self, data, prep, coords, column=None, local=None):
        xp = array_module(data[0])
        a_num, a, a2, norm = data
        s, shape = len(a), self.input_shape
        if column is None:
            num = window_correlation(a_num, prep.templates, shape, coords)
            stats = window_correlation(xp.concatenate([a, a2]), prep.masks, shape, coords)
            den = _local_std(stats[:s], stats[s:], prep.mask_sum[None, :, None, None, None])
            n_masks = prep.masks.shape[-1]
            if n_masks > 1:
                t = len(self._template)
                den = xp.concatenate([den] * t, axis=1)
            return num / den / norm[:, :, None, None, None]
        index = np.ravel(column)
        masks, mask_sum = prep.mask_columns(index)
        num = paired_window_correlation(a_num, prep.columns(index), shape, coords)
        m1 = paired_window_correlation(a, masks, shape, coords)
        m2 = paired_window_correlation(a2, masks, shape, coords)
        ms = (
            mask_sum[0]
            if len(mask_sum) == 1
            else mask_sum.reshape(num.shape[:-3])[..., None, None, None]
        )
        cnorm = norm[xp.asarray(np.arange(s)), xp.asarray(index)].reshape(num.shape[:-3])
        return num / _local_std(m1, m2, ms) / cnorm[..., None, None, None]
