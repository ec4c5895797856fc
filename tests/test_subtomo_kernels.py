"""Kernels of subtomogram alignment against direct computations: windowed correlations,
missing wedge, low-pass, peak fits, rotations, and the subvolume geometry helpers."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryomatch import geometry
from cryomatch.alignment.rotations import euler_zyx_to_rotation, normalize_rotations
from cryomatch.alignment.tilt import dual_axis, single_axis
from cryomatch.errors import CryomatchWarning
from cryomatch.kernels.correlation3d import (
    FEW_TEMPLATES,
    columns_of,
    paired_window_correlation,
    rfft_spectra,
    shift_grid,
    template_layout,
    window_correlation,
)
from cryomatch.kernels.peaks import grid_peaks, stencil_maximum
from cryomatch.kernels.projection import voxelize_atoms
from cryomatch.kernels.rotate import rotate_volumes
from cryomatch.kernels.wedge import butterworth, rfft_indices, without_nyquist
from cryomatch.stages.simulate.particles import phantom_structures
from cryomatch.stages.simulate.subvolumes import place_atoms

SHAPE = (12, 14, 16)


def _spectra(rng, n, shape=SHAPE):
    v = rng.normal(size=(n,) + shape).astype(np.float32)
    return v, rfft_spectra(v)


@pytest.mark.parametrize("n_templates", [1, 3, FEW_TEMPLATES + 2])  # both code paths
def test_window_correlation_matches_direct_sums(rng, n_templates):
    v, a = _spectra(rng, 2)
    a = a * without_nyquist(SHAPE)
    vf = np.fft.irfftn(a, s=SHAPE, axes=(1, 2, 3))
    t, b = _spectra(rng, n_templates)
    coords = shift_grid((2, 3, 1))
    c = window_correlation(a, template_layout(b), SHAPE, coords)
    assert c.shape == (2, n_templates, 5, 7, 3)
    for s in range(2):
        for r in range(n_templates):
            for iz, dz in enumerate(coords[0]):
                for iy, dy in enumerate(coords[1]):
                    for ix, dx in enumerate(coords[2]):
                        rolled = np.roll(vf[s], (-int(dz), -int(dy), -int(dx)), axis=(0, 1, 2))
                        assert c[s, r, iz, iy, ix] == pytest.approx(np.sum(t[r] * rolled), abs=1e-3)


def test_fractional_shifts_interpolate_band_limited_correlation(rng):
    v, a = _spectra(rng, 1)
    a = a * without_nyquist(SHAPE)
    t, b = _spectra(rng, 1)
    d = np.array([0.3, -1.7, 2.25])
    kz, ky, kx = rfft_indices(SHAPE)
    k_dot_d = kz * d[0] / SHAPE[0] + ky * d[1] / SHAPE[1] + kx * d[2] / SHAPE[2]
    moved = np.fft.irfftn(a[0] * np.exp(2j * np.pi * k_dot_d), s=SHAPE, axes=(0, 1, 2))  # v(x + d)
    expected = np.sum(t[0] * moved)
    c = window_correlation(a, template_layout(b), SHAPE, [np.array([x]) for x in d])
    assert c[0, 0, 0, 0, 0] == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_paired_correlation_matches_window(rng):
    _, a = _spectra(rng, 2)
    a = a * without_nyquist(SHAPE)
    _, b = _spectra(rng, 6)
    layout = template_layout(b)
    full = window_correlation(a, layout, SHAPE, shift_grid((2, 2, 2), 0.5))
    grid = shift_grid((2, 2, 2), 0.5)
    picks = [np.array([1, 4, 6]), np.array([0, 3, 8]), np.array([2, 5, 7])]
    coords = [np.broadcast_to(grid[a][p], (2, 3, 3)) for a, p in enumerate(picks)]
    paired = paired_window_correlation(a, columns_of(layout), SHAPE, coords)  # column s*3 + k
    for s in range(2):
        for k in range(3):
            ref = full[s, 3 * s + k][np.ix_(*picks)]
            np.testing.assert_allclose(paired[s, k], ref, atol=1e-3 * np.abs(ref).max())


def test_wedge_keeps_the_sampled_region():
    shape = (16, 16, 16)
    mask = single_axis((-60, 60)).rfft_mask(None, shape)
    kz, ky, kx = (np.broadcast_to(k, mask.shape) for k in rfft_indices(shape))
    inside = np.abs(kz) < np.tan(np.deg2rad(60)) * np.abs(kx) - 1e-3
    outside = np.abs(kz) > np.tan(np.deg2rad(60)) * np.abs(kx) + 1e-3
    assert np.all(mask[inside] == 1) and np.all(mask[outside & (kx > 0)] == 0)
    assert np.all(mask[(kz == 0) & (kx == 0)] == 1)  # the ky axis and the origin
    full = single_axis((-60, 60)).create_mask(None, shape)
    np.testing.assert_array_equal(
        full, full[(-np.arange(16)) % 16][:, (-np.arange(16)) % 16][..., (-np.arange(16)) % 16]
    )
    both = dual_axis((-60, 60), (-60, 60)).rfft_mask(None, shape)
    assert np.all(both >= mask) and both.mean() > mask.mean()


def test_wedge_turns_with_the_subvolume():
    shape = (16, 16, 16)
    turn = Rotation.from_euler("z", 90, degrees=True)  # scipy's z is the array's x: z <-> y
    a = single_axis((-50, 50)).create_mask(turn, shape)
    b = single_axis((-50, 50)).create_mask(None, shape)
    differ = np.argwhere(a != np.swapaxes(b, 0, 1))
    assert np.all(differ[:, 1:] == 0)  # only on the axis of the tilt, a boundary (k.n = 0)


def test_butterworth_formula():
    w = butterworth((16, 16, 16), 0.25)
    assert w[0, 0, 0] == 1.0
    assert w[0, 0, 4] == pytest.approx(0.5)  # |f| = 4/16 = cutoff
    assert w[0, 0, 8] == pytest.approx(1 / (1 + 16))
    assert np.all(butterworth((16, 16, 16), None) == 1)


def test_peak_fits_recover_known_maxima():
    centre = np.array([0.3, -0.2, 0.45])
    grid = np.stack(np.meshgrid(*[[-1.0, 0.0, 1.0]] * 3, indexing="ij"), -1) * 0.5
    quadratic = 2.0 - np.sum((grid - centre * 0.5) ** 2 * np.array([1.0, 2.0, 0.5]), axis=-1)
    offset, value = stencil_maximum(quadratic[None], 0.5)
    np.testing.assert_allclose(offset[0], centre * 0.5, atol=1e-9)
    assert value[0] == pytest.approx(2.0)
    gaussian = 3.0 * np.exp(
        -np.sum((grid - centre * 0.5) ** 2 / np.array([1.0, 2.0, 0.5]), axis=-1)
    )
    offset, value = stencil_maximum(gaussian[None], 0.5, log=True)
    np.testing.assert_allclose(offset[0], centre * 0.5, atol=1e-9)
    assert value[0] == pytest.approx(3.0)
    z, y, x = np.meshgrid(*[np.arange(9.0)] * 3, indexing="ij")
    peak = np.array([4.3, 3.6, 5.2])
    gauss = np.exp(-((z - peak[0]) ** 2 + (y - peak[1]) ** 2 + (x - peak[2]) ** 2) / 18)
    pos, val = grid_peaks(gauss[None])
    np.testing.assert_allclose(pos[0], peak, atol=0.05)
    assert val[0] == pytest.approx(1.0, abs=1e-2)
    pos, val = grid_peaks(gauss[None], log=True)
    np.testing.assert_allclose(pos[0], peak, atol=1e-6)
    assert val[0] == pytest.approx(1.0, abs=1e-6)


def test_spline_rotation_matches_exact_phantom():
    atoms = phantom_structures(1, 32, 8.0, np.random.default_rng(3))[0]
    template = voxelize_atoms(atoms.coords, atoms.amplitudes, atoms.sigmas, 32, 8.0)
    quat = euler_zyx_to_rotation([10, -5, 7]).as_quat()
    moved = place_atoms(atoms.coords, quat, [0, 0, 0], 32, 8.0)
    exact = voxelize_atoms(moved, atoms.amplitudes, atoms.sigmas, 32, 8.0)
    turned = rotate_volumes(
        template, Rotation.from_quat(quat).as_matrix()[None], geometry.acryo_centre((32,) * 3)
    )[0]
    assert np.linalg.norm(turned - exact) / np.linalg.norm(exact) < 0.01


def test_rotation_grid_is_acryos():
    quats = normalize_rotations([(10, 5), (4, 2), (0, 0)])
    assert quats.shape == (5 * 5 * 1, 4)
    angles = np.array([(z, y, 0.0) for z in (-10, -5, 0, 5, 10) for y in (-4, -2, 0, 2, 4)])
    expected = Rotation.from_euler("zyx", angles[:, ::-1], degrees=True)  # x first, on (z, y, x)
    assert np.allclose(np.abs(np.sum(quats * expected.as_quat(), axis=1)), 1)
    assert len(normalize_rotations((10, 5))) == 125
    with pytest.warns(CryomatchWarning, match="identity"):
        normalize_rotations(Rotation.from_euler("z", [[5], [10]], degrees=True))


def test_subvolume_pose_round_trip_and_relion_meaning(rng):
    shape = (24, 24, 24)
    quats = Rotation.random(5, random_state=1).as_quat()
    shifts = rng.uniform(-3, 3, size=(5, 3))
    rot, tilt, psi, origin = geometry.subvolume_pose_to_relion(quats, shifts, shape)
    q2, s2 = geometry.relion_to_subvolume_pose(rot, tilt, psi, origin, shape)
    assert np.allclose(np.abs(np.sum(q2 * quats, axis=1)), 1)
    np.testing.assert_allclose(s2, shifts, atol=1e-9)
    # RELION: S(p) = V(A^T (p + origin)), p = (x, y, z) about shape // 2
    a = geometry.euler_to_matrix(rot, tilt, psi)
    for i in range(5):
        p = rng.normal(size=3) * 5  # a point of the template, (x, y, z) about the RELION centre
        moved_xyz = a[i] @ p - origin[i]
        r = Rotation.from_quat(quats[i]).as_matrix()
        c_a, c_r = geometry.acryo_centre(shape), geometry.relion_centre(shape)
        moved_zyx = r @ (p[::-1] + c_r - c_a) + c_a + shifts[i] - c_r
        np.testing.assert_allclose(moved_xyz, moved_zyx[::-1], atol=1e-9)


def test_change_rotation_centre_describes_the_same_motion(rng):
    r = Rotation.random(random_state=2).as_matrix()
    c1, c2, s1 = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3)
    s2 = geometry.change_rotation_centre(s1, r, c1, c2)
    x = rng.normal(size=3)
    np.testing.assert_allclose(r @ (x - c1) + c1 + s1, r @ (x - c2) + c2 + s2)
