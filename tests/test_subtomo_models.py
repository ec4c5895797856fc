"""The alignment API (acryo's shape): known answers on exact phantoms, conventions,
invariances, custom models, backends and bad input."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from cryomatch.alignment import (
    AlignmentResult,
    PCCAlignment,
    TomographyInput,
    ZNCCAlignment,
    single_axis,
)
from cryomatch.alignment.rotations import euler_zyx_to_rotation
from cryomatch.errors import CryomatchError, CryomatchWarning
from cryomatch.kernels.projection import voxelize_atoms
from cryomatch.kernels.volumes import fourier_filter, soft_sphere
from cryomatch.stages.simulate.particles import phantom_structures
from cryomatch.stages.simulate.subvolumes import place_atoms

BOX, APIX = 32, 8.0


@pytest.fixture(scope="module")
def phantoms():
    atoms = phantom_structures(2, BOX, APIX, np.random.default_rng(11))
    templates = [voxelize_atoms(a.coords, a.amplitudes, a.sigmas, BOX, APIX) for a in atoms]
    return atoms, templates


def subvolume(atoms, angles, shift, wedge=(-60, 60), noise=0.0, seed=0):
    """An exact subvolume: rendered and wedge-filtered in a twice larger box, then cropped
    (as a window of a tomogram)."""
    quat = euler_zyx_to_rotation(angles).as_quat()
    moved = place_atoms(atoms.coords, quat, shift, BOX, APIX)
    vol = voxelize_atoms(moved, atoms.amplitudes, atoms.sigmas, 2 * BOX, APIX)
    if noise:
        vol = vol + noise * vol.std() * np.random.default_rng(seed).standard_normal(vol.shape)
    if wedge is not None:
        vol = fourier_filter(vol.astype(np.float32), single_axis(wedge).rfft_mask(None, vol.shape))
    inner = slice(BOX // 2, BOX // 2 + BOX)
    return vol[inner, inner, inner].astype(np.float32), quat


def rotation_error(q1, q2) -> float:
    return float(np.rad2deg((Rotation.from_quat(q1) * Rotation.from_quat(q2).inv()).magnitude()))


@pytest.fixture(scope="module")
def zncc(phantoms):
    mask = soft_sphere((BOX,) * 3, 12, 3)
    return ZNCCAlignment(phantoms[1][0], mask=mask, rotations=[(4, 4)] * 3, tilt=(-60, 60))


def test_zncc_recovers_grid_rotation_and_subvoxel_shift(phantoms, zncc):
    shift = np.array([1.3, -0.7, 2.2])
    img, quat = subvolume(phantoms[0][0], [4, -4, 0], shift)
    result = zncc.align(img, (3, 3, 3))
    assert isinstance(result, AlignmentResult) and result.label == 0
    np.testing.assert_allclose(result.shift, shift, atol=0.1)
    assert rotation_error(result.quat, quat) < 1.0  # interpolated between grid rotations
    assert result.score > 0.95


def test_rotation_below_the_grid_step(phantoms, zncc):
    img, quat = subvolume(phantoms[0][0], [2.5, -1.5, 2.0], [0.4, 1.1, -0.6])
    zncc.interpolate, zncc.refine = False, False
    grid = rotation_error(zncc.align(img, 3).quat, quat)
    zncc.interpolate = True
    interpolated = rotation_error(zncc.align(img, 3).quat, quat)
    zncc.refine = True
    refined = zncc.align(img, 3)
    zncc.refine = False
    assert grid > 2.0
    assert interpolated < 0.6 * grid
    assert rotation_error(refined.quat, quat) < 0.5
    np.testing.assert_allclose(refined.shift, [0.4, 1.1, -0.6], atol=0.1)


def test_batch_equals_single_and_fit_moves_onto_template(phantoms, zncc):
    imgs = np.stack(
        [subvolume(phantoms[0][0], [0, 4, -4], s)[0] for s in ([1, 0, 0], [0, -2, 1.5])]
    )
    labels, shifts, quats, scores = zncc.align_batch(imgs, (3, 3, 3))
    single = zncc.align(imgs[1], (3, 3, 3))
    np.testing.assert_allclose(shifts[1], single.shift, atol=1e-6)
    assert scores[1] == pytest.approx(single.score, abs=1e-6)
    img, _ = subvolume(phantoms[0][0], [0, 4, -4], [0, -2, 1.5], wedge=None)
    aligned, result = zncc.fit(img, (3, 3, 3))
    template = phantoms[1][0]

    def corr(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    assert corr(aligned, template) > 0.99
    assert corr(img, template) < 0.9


def test_shift_convention_is_scipys(phantoms):
    model = ZNCCAlignment(phantoms[1][0], tilt=None)  # no rotations
    img = ndimage.shift(phantoms[1][0], [2.0, -1.0, 0.5], order=3)
    result = model.align(img, (3, 3, 3))
    np.testing.assert_allclose(result.shift, [2.0, -1.0, 0.5], atol=0.05)
    np.testing.assert_allclose(result.quat, [0, 0, 0, 1])
    back = ndimage.shift(img, -result.shift, order=3)
    assert np.abs(back - phantoms[1][0]).max() < 0.05 * phantoms[1][0].max()


def test_landscape_shapes_and_peak(phantoms, zncc):
    img, _ = subvolume(phantoms[0][0], [0, 0, 0], [1, -2, 0])
    land = zncc.landscape(img, (2, 2, 2))
    assert land.shape == (27, 5, 5, 5)
    best = np.unravel_index(np.argmax(land), land.shape)
    assert best == (13, 3, 0, 2)  # the identity rotation, shift (1, -2, 0)
    assert zncc.landscape(img, (2, 2, 2), upsample=2).shape == (27, 9, 9, 9)


def test_zncc_ignores_offset_and_scale(phantoms, zncc):
    img, _ = subvolume(phantoms[0][0], [4, 0, 4], [0.5, 0.5, -1], noise=1.0)
    a = zncc.align(img, 3)
    b = zncc.align(3.0 * img + 5.0, 3)
    assert b.score == pytest.approx(a.score, abs=1e-4)
    np.testing.assert_allclose(b.shift, a.shift, atol=1e-3)


def test_pcc_recovers_shift_and_rotation(phantoms):
    model = PCCAlignment(
        phantoms[1][0],
        mask=soft_sphere((BOX,) * 3, 12, 3),
        rotations=[(4, 4)] * 3,
        tilt=(-60, 60),
        cutoff=0.3,
    )
    img, quat = subvolume(phantoms[0][0], [-4, 0, 4], [-1.2, 0.3, 0.8])
    result = model.align(img, (3, 3, 3))
    np.testing.assert_allclose(result.shift, [-1.2, 0.3, 0.8], atol=0.15)
    assert rotation_error(result.quat, quat) < 1.5
    assert 0.3 < result.score <= 1.0


def test_two_templates_give_labels(phantoms):
    model = ZNCCAlignment(phantoms[1], rotations=[(4, 4)] * 3, tilt=(-60, 60))
    for k in (0, 1):
        img, _ = subvolume(phantoms[0][k], [0, -4, 4], [1, 1, -1], noise=2.0, seed=k)
        assert model.align(img, 2).label == k


def test_custom_model_through_the_base_classes(phantoms):
    """A model written as with acryo: a pre-transform and an optimizer of shifts."""

    class RealSpaceNCC(TomographyInput):
        def pre_transform(self, image, backend):
            return image - image.mean()

        def _optimize(self, subvolume, template, max_shifts, quaternion, pos, backend):
            m = int(max_shifts[0])
            best = (-np.inf, None)
            for d in np.ndindex(2 * m + 1, 2 * m + 1, 2 * m + 1):
                d = np.array(d) - m
                moved = np.roll(subvolume, -d, axis=(0, 1, 2))
                score = np.sum(moved * template) / np.sqrt(np.sum(moved**2) * np.sum(template**2))
                best = max(best, (score, d), key=lambda x: x[0])
            return best[1].astype(float), np.array([0, 0, 0, 1.0]), best[0]

    model = RealSpaceNCC(phantoms[1][0], rotations=[(4, 4), (0, 0), (0, 0)])
    img, quat = subvolume(phantoms[0][0], [4, 0, 0], [1, 0, -1], wedge=None)
    result = model.align(img, (1, 1, 1))
    assert rotation_error(result.quat, quat) < 0.1
    np.testing.assert_allclose(result.shift, [1, 0, -1])
    aligned, _ = model.fit(img, (1, 1, 1))
    assert aligned.shape == img.shape


def test_bad_input(phantoms):
    template = phantoms[1][0]
    with pytest.raises(CryomatchError, match="mask has shape"):
        ZNCCAlignment(template, mask=np.ones((BOX, BOX, BOX + 1)))
    with pytest.raises(CryomatchError, match="different shapes"):
        ZNCCAlignment([template, template[:-1]])
    model = ZNCCAlignment(template)
    with pytest.raises(CryomatchError, match="subvolume has shape"):
        model.align(np.zeros((BOX, BOX, BOX - 2), np.float32), 2)
    with pytest.raises(CryomatchError, match="half the box"):
        model.align(template, (2, BOX / 2, 2))
    with pytest.raises(CryomatchError, match=">= 0"):
        model.align(template, -1)
    with pytest.warns(CryomatchWarning, match="identity"):
        ZNCCAlignment(template, rotations=Rotation.from_euler("z", [[5], [10]], degrees=True))
    with pytest.raises(CryomatchError, match="min < max"):
        ZNCCAlignment(template, tilt=(60, -60))


@pytest.mark.gpu
def test_cupy_backend_matches_numpy(phantoms, zncc):
    img, _ = subvolume(phantoms[0][0], [4, -4, 0], [1.3, -0.7, 2.2], noise=1.0)
    a = zncc.align(img, 3)
    b = zncc.align(img, 3, backend="cupy")
    np.testing.assert_allclose(b.shift, a.shift, atol=0.02)
    assert rotation_error(a.quat, b.quat) < 0.1
    assert b.score == pytest.approx(a.score, abs=1e-3)
