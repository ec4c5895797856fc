"""Alignment models shaped like acryo's (``acryo.alignment``), so that user code ports.

A model holds one template or several (same shape), a mask, and a search (rotations,
low-pass cutoff, tilt model). ``align(img, max_shifts)`` returns an
:class:`AlignmentResult` ``(label, shift, quat, score)``: ``scipy.ndimage.shift(img,
-shift)`` moves the subvolume onto the template rotated by ``quat`` (scipy's (x, y, z, w),
acting on (z, y, x) about ``shape / 2 - 0.5``), i.e. the subvolume is approximately
``shift(rotate(template, quat), shift)``; ``label`` is the index of the best template.

Writing your own model (as with acryo's base classes): subclass :class:`TomographyInput`
(or :class:`RotationImplemented` / :class:`BaseAlignmentModel`) and define

``pre_transform(self, image, backend)``
    the transform applied to the masked subvolume and to each masked, rotated template
    (for example a Fourier transform, ``backend.fftn(image)``);
``_optimize(self, subvolume, template, max_shifts, quaternion, pos, backend)``
    given both pre-transformed, return ``(shift, quat, score)``: the shift (z, y, x) in
    voxels, any quaternion (ignored when the model searches rotations itself) and a score
    where larger is better. Optionally ``_landscape`` with the same arguments returns the
    score over shifts.

The base class then searches templates x rotations (template-major order) and builds the
result; ``backend`` is a :class:`Backend` (``backend.xp`` is numpy or cupy; numpy and
``numpy.fft`` functions are also its attributes, e.g. ``backend.fftn``). See
``docs/subtomo.md`` for an example. :class:`~cryomatch.alignment.ZNCCAlignment` and
:class:`~cryomatch.alignment.PCCAlignment` replace the per-rotation loop by batched
matrix products.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
from scipy.spatial.transform import Rotation

from .. import geometry
from ..backend import get_xp, to_numpy
from ..errors import CryomatchError
from ..kernels.rotate import affine_resample, ndimage_module, rotate_volumes
from ..kernels.wedge import butterworth
from .rotations import normalize_rotations
from .tilt import as_tilt_model

IDENTITY = np.array([0.0, 0.0, 0.0, 1.0])
# templates (less their face mean) and masks are turned by cubic spline with scipy's mode
# "constant": 1.5x faster than "grid-constant", the same where they are flat at the faces
TEMPLATE_MODE = "constant"


class AlignmentResult(NamedTuple):
    """label: best template (0-based); shift (3,) z, y, x voxels; quat (4,) (x, y, z, w);
    score: larger is better."""

    label: int
    shift: np.ndarray
    quat: np.ndarray
    score: float

    def affine_matrix(self, shape) -> np.ndarray:
        """4x4 matrix M with ``aligned(x) = img(M x)`` (x = (z, y, x, 1)): the transform
        that :meth:`BaseAlignmentModel.fit` applies."""
        return affine_matrix(self.quat, self.shift, shape)


def affine_matrix(quat, shift, shape) -> np.ndarray:
    """``x -> R (x - c) + c + shift`` as a 4x4 matrix, c = shape / 2 - 0.5."""
    rot = Rotation.from_quat(np.asarray(quat, dtype=np.float64)).as_matrix()
    c = geometry.acryo_centre(shape)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = c - rot @ c + np.asarray(shift, dtype=np.float64)
    return out


class Backend:
    """numpy or cupy, with numpy/cupy, their ``fft`` and ``ndimage`` functions as
    attributes (``backend.fftn``, ``backend.affine_transform``) and ``asnumpy``."""

    def __init__(self, name: str = "numpy"):
        self.name = name
        self.xp = get_xp(name)

    def asnumpy(self, a):
        return to_numpy(a)

    def __getattr__(self, attr):
        for source in (self.xp, self.xp.fft, ndimage_module(self.xp)):
            if hasattr(source, attr):
                return getattr(source, attr)
        raise AttributeError(attr)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def as_backend(backend) -> Backend:
    """None (numpy), 'numpy', 'cupy', a module or a :class:`Backend`."""
    if backend is None:
        return Backend("numpy")
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str):
        return Backend(backend)
    name = getattr(backend, "__name__", "")
    if name in ("numpy", "cupy"):
        return Backend(name)
    name = getattr(backend, "name", None)  # acryo's Backend has .name
    if name in ("numpy", "cupy"):
        return Backend(name)
    raise CryomatchError(f"unknown backend {backend!r} (use 'numpy' or 'cupy')")


class BaseAlignmentModel(ABC):
    """Templates, a mask and the search; see the module docstring for custom models."""

    def __init__(self, template, mask=None):
        self._template = _as_templates(template)
        self._mask = _as_mask(mask, self._template)

    # --- what a custom model defines --------------------------------------------------
    @abstractmethod
    def pre_transform(self, image, backend: Backend):
        """Transform of a masked image (subvolume or rotated template)."""

    @abstractmethod
    def _optimize(self, subvolume, template, max_shifts, quaternion, pos, backend: Backend):
        """(shift (3,), quat (4,), score) of pre-transformed subvolume vs template."""

    def _landscape(self, subvolume, template, max_shifts, quaternion, pos, backend: Backend):
        raise NotImplementedError(f"{type(self).__name__} has no _landscape")

    # --- properties as in acryo ---------------------------------------------------------
    @property
    def template(self) -> np.ndarray:
        """The template (3D), or the stacked templates (4D)."""
        return self._template[0] if len(self._template) == 1 else self._template

    @property
    def mask(self) -> np.ndarray:
        return self._mask

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self._template.shape[1:])

    @property
    def has_rotation(self) -> bool:
        return False

    @property
    def has_hetero_templates(self) -> bool:
        return len(self._template) > 1

    @property
    def niter(self) -> int:
        return len(self._template)

    @property
    def is_multi_templates(self) -> bool:
        return self.niter > 1

    @classmethod
    def with_params(cls, **params):
        """A factory ``f(template, mask)`` that builds this model with ``params``."""
        return functools.partial(cls, **params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self._template.shape})"

    # --- the generic search (custom models) ---------------------------------------------
    def _candidates(self):
        """(template index, quaternion, rotated template, rotated mask) in template-major
        order; without rotations, the templates themselves."""
        for k, t in enumerate(self._template):
            yield k, IDENTITY, t, self._mask

    def align(self, img, max_shifts, quaternion=None, pos=None, backend=None) -> AlignmentResult:
        """Best template, rotation and shift of one subvolume (see the module docstring)."""
        be = as_backend(backend)
        img = self._check_image(img)
        max_shifts = check_max_shifts(max_shifts, self.input_shape)
        quaternion = IDENTITY if quaternion is None else np.asarray(quaternion, dtype=np.float64)
        pos = np.zeros(3) if pos is None else np.asarray(pos)
        best = None
        for k, quat, t, m in self._candidates():
            m = be.xp.asarray(m)
            sub = self.pre_transform(be.xp.asarray(img) * m, be)
            ref = self.pre_transform(be.xp.asarray(t) * m, be)
            shift, _, score = self._optimize(sub, ref, max_shifts, quaternion, pos, be)
            if best is None or float(score) > best.score:
                best = AlignmentResult(
                    k, np.asarray(to_numpy(shift), dtype=np.float64), quat, float(score)
                )
        return best

    def landscape(
        self, img, max_shifts, quaternion=None, pos=None, upsample: int = 1, backend=None
    ):
        """Scores over shifts, stacked over (template, rotation) pairs when there are several."""
        be = as_backend(backend)
        img = self._check_image(img)
        max_shifts = check_max_shifts(max_shifts, self.input_shape)
        quaternion = IDENTITY if quaternion is None else np.asarray(quaternion, dtype=np.float64)
        pos = np.zeros(3) if pos is None else np.asarray(pos)
        out = []
        for _, _, t, m in self._candidates():
            m = be.xp.asarray(m)
            sub = self.pre_transform(be.xp.asarray(img) * m, be)
            ref = self.pre_transform(be.xp.asarray(t) * m, be)
            out.append(to_numpy(self._landscape(sub, ref, max_shifts, quaternion, pos, be)))
        return out[0] if len(out) == 1 else np.stack(out)

    def fit(self, img, max_shifts, cval: float | None = None, backend=None):
        """(the subvolume moved onto the template, its :class:`AlignmentResult`).

        Cubic-spline resampling; outside the box ``cval`` (default: the 1st percentile
        of the subvolume, as in acryo).
        """
        be = as_backend(backend)
        result = self.align(img, max_shifts, backend=be)
        img = self._check_image(img)
        return to_numpy(transform_subvolume(be.xp.asarray(img), result, cval)), result

    # --- checks -------------------------------------------------------------------------
    def _check_image(self, img) -> np.ndarray:
        shape = tuple(np.shape(img))
        if shape != self.input_shape:
            raise CryomatchError(
                f"the subvolume has shape {shape}, the template {self.input_shape}"
            )
        return img


def transform_subvolume(img, result: AlignmentResult, cval: float | None = None):
    """The subvolume resampled onto the template frame (see :meth:`BaseAlignmentModel.fit`)."""
    if cval is None:
        cval = float(np.percentile(to_numpy(img), 1))
    m = affine_matrix(result.quat, result.shift, img.shape)
    return affine_resample(img, m[:3, :3], m[:3, 3], cval=cval)


class RotationImplemented(BaseAlignmentModel):
    """Adds a rotation search (see :mod:`cryomatch.alignment.rotations`) to a model whose
    ``_optimize`` finds shifts only."""

    def __init__(self, template, mask=None, rotations=None):
        self.quaternions = normalize_rotations(rotations)
        self._rotations_arg = rotations
        super().__init__(template, mask)
        self._rotated = None

    @property
    def has_rotation(self) -> bool:
        return len(self.quaternions) > 1

    @property
    def niter(self) -> int:
        return len(self._template) * len(self.quaternions)

    def rotated_templates(self) -> tuple[np.ndarray, np.ndarray]:
        """(templates (T, R, *shape), masks (R or 1, *shape)) rotated by every quaternion,
        computed once (cubic spline about ``shape / 2 - 0.5``)."""
        if self._rotated is None:
            matrices = Rotation.from_quat(self.quaternions).as_matrix()
            c = geometry.acryo_centre(self.input_shape)
            templates = np.stack(
                [
                    rotate_volumes(t, matrices, c, cval=_edge_mean(t), mode=TEMPLATE_MODE)
                    for t in self._template
                ]
            )
            self._rotated = templates, self._rotated_masks(matrices, c)
        return self._rotated

    def _rotated_masks(self, matrices, centre) -> np.ndarray:
        if np.all(self._mask == self._mask.flat[0]):  # no mask: nothing to turn
            return self._mask[None]
        turned = rotate_volumes(self._mask, matrices, centre, cval=0.0, mode=TEMPLATE_MODE)
        return np.clip(turned, 0.0, None)

    def _candidates(self):
        templates, masks = self.rotated_templates()
        for k in range(len(self._template)):
            for r, quat in enumerate(self.quaternions):
                yield k, quat, templates[k, r], masks[r % len(masks)]


class TomographyInput(RotationImplemented):
    """Adds a low-pass ``cutoff`` (relative frequency, Butterworth of order 2; Nyquist is
    0.5 along an axis, 0.5 sqrt(3) at the corner) and a tilt model (the missing wedge)."""

    def __init__(self, template, mask=None, rotations=None, cutoff=None, tilt=None):
        self._cutoff = cutoff
        self._tilt_model = as_tilt_model(tilt)
        super().__init__(template, mask, rotations)

    @property
    def tilt_model(self):
        return self._tilt_model

    def pre_transform(self, image, backend: Backend):
        """Low-pass filter, returned in Fourier space (full fftn grid, complex64)."""
        xp = backend.xp
        spectrum = xp.fft.fftn(image).astype(xp.complex64)
        if self._cutoff is None:
            return spectrum
        weights = butterworth(image.shape, self._cutoff, xp=xp)
        return spectrum * _hermitian_full(weights, image.shape, xp)

    def get_missing_wedge_mask(self, quat, backend=None):
        """The 0/1 mask on the full fftn grid for a subvolume at orientation ``quat``."""
        be = as_backend(backend)
        rot = Rotation.from_quat(np.asarray(quat, dtype=np.float64))
        return be.xp.asarray(self._tilt_model.create_mask(rot, self.input_shape))

    _get_missing_wedge_mask = get_missing_wedge_mask

    def mask_missing_wedge(self, image, quaternion, backend=None):
        """A Fourier-space image multiplied by the missing-wedge mask."""
        be = as_backend(backend)
        return be.asnumpy(be.xp.asarray(image) * self.get_missing_wedge_mask(quaternion, be))


def _hermitian_full(half, shape, xp):
    """Full fftn-grid array from an rfftn-grid one that is symmetric under k -> -k."""
    nx = shape[2]
    neg = (-np.arange(half.shape[2], nx)) % nx
    iz = (-np.arange(shape[0])) % shape[0]
    iy = (-np.arange(shape[1])) % shape[1]
    rest = half[xp.asarray(iz)][:, xp.asarray(iy)][..., xp.asarray(neg)]
    return xp.concatenate([half, rest], axis=-1)


def _edge_mean(volume) -> float:
    """Mean of the box faces: the value a rotation brings in from outside."""
    v = np.asarray(volume)
    faces = [v[0], v[-1], v[:, 0], v[:, -1], v[:, :, 0], v[:, :, -1]]
    return float(np.mean([f.mean() for f in faces]))


def _as_templates(template) -> np.ndarray:
    if isinstance(template, np.ndarray) and template.ndim == 3:
        stack = template[None]
    else:
        arrays = [np.asarray(t) for t in template]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise CryomatchError(f"the templates have different shapes: {sorted(shapes)}")
        stack = np.stack(arrays)
    if stack.ndim != 4 or 0 in stack.shape:
        raise CryomatchError(f"a template must be a 3D array, got shape {stack.shape[1:]}")
    stack = stack.astype(np.float32)
    if not np.isfinite(stack).all():
        raise CryomatchError("the template holds NaN or inf values")
    return stack


def _as_mask(mask, templates: np.ndarray) -> np.ndarray:
    shape = templates.shape[1:]
    if mask is None:
        return np.ones(shape, dtype=np.float32)
    if callable(mask):
        # several templates share one mask: the largest, so that scores compare
        mask = np.max([np.asarray(mask(t)) for t in templates], axis=0)
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape != shape:
        raise CryomatchError(f"the mask has shape {mask.shape}, the template {shape}")
    if not np.isfinite(mask).all() or mask.min() < 0 or not mask.max() > 0:
        raise CryomatchError("the mask must be finite, non-negative and not all zero")
    return mask


def check_max_shifts(max_shifts, shape) -> tuple[float, float, float]:
    """(z, y, x) maximum shifts in voxels; each must be >= 0 and below half the box."""
    values = np.broadcast_to(np.asarray(max_shifts, dtype=np.float64), (3,))
    for m, n, axis in zip(values, shape, "zyx", strict=True):
        if not np.isfinite(m) or m < 0:
            raise CryomatchError(f"max_shifts must be finite and >= 0, got {m} along {axis}")
        if m >= n / 2:
            raise CryomatchError(
                f"max_shifts {m:g} along {axis} reaches half the box ({n} voxels): a shift "
                f"must stay below {n / 2:g}"
            )
    return tuple(float(m) for m in values)
