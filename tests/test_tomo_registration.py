"""Batched registration kernels and stack transforms against known shifts and rotations."""

import numpy as np
import pytest

from cryomatch.kernels.ellipsoids import project, random_phantom
from cryomatch.kernels.fourier import shift_images
from cryomatch.kernels.registration import lsq_translation, register_translation
from cryomatch.kernels.tiltalign import common_line_shifts, rotate_stack, shift_stack


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    phantom = random_phantom(rng, 64)
    return project(phantom, np.linspace(-40, 40, 6), (64, 64)).astype(np.float64)


@pytest.mark.parametrize("whiten", [0.0, 1.0])
def test_upsampled_correlation_recovers_subpixel_shifts(images, whiten):
    truth = np.array([[0.3, -1.7], [4.25, 2.5], [-6.6, 0.05], [0, 0], [1.5, -7.3], [-2.2, 3.1]])
    moved = shift_images(images, -truth)  # content moved by -truth: +truth brings it back
    found = register_translation(images, moved, upsample_factor=20, whiten=whiten)
    np.testing.assert_allclose(found, truth, atol=0.02)


def test_pyramid_least_squares_recovers_large_shifts(images):
    truth = np.array([[9.3, -11.2], [0.4, 0.6], [-14.5, 3.3], [2.0, -0.2], [6.1, 6.1], [-3, 12]])
    moved = shift_stack(images, -truth)
    np.testing.assert_allclose(lsq_translation(images, moved), truth, atol=0.02)


def test_common_line_subdivision_search():
    x = np.arange(64)
    ref = np.exp(-((x - 30) ** 2) / 20) + 0.5 * np.exp(-((x - 40) ** 2) / 8)
    truth = np.array([0.0, 1.3, -2.7, 5.05, -0.49])
    lines = shift_images(np.tile(ref, (5, 1, 1)), np.stack([-truth, 0 * truth], 1))[:, 0]
    np.testing.assert_allclose(common_line_shifts(lines, ref, 0.05, 8), truth, atol=1 / 64)


def test_quarter_turns_are_exact_and_agree_with_spline_turns(images):
    stack = images[:2].astype(np.float32)
    for k in (1, 2, 3):
        exact = rotate_stack(stack, 90.0 * k)
        spline = rotate_stack(stack, 90.0 * k + 1e-7)  # the interpolating path
        np.testing.assert_allclose(exact, spline, atol=1e-3 * np.abs(stack).max())
    # n // 2 is the centre: for even sizes a quarter turn loses one edge row (edge-filled)
    back = rotate_stack(rotate_stack(stack, 90), -90)
    np.testing.assert_array_equal(back[:, 1:, 1:], stack[:, 1:, 1:])
    wide = np.zeros((1, 20, 31), dtype=np.float32)
    assert rotate_stack(wide, 90).shape == (1, 31, 20)


def test_turned_phantom_matches_projection_about_turned_axis():
    rng = np.random.default_rng(6)
    phantom = random_phantom(rng, 48)
    angles = np.array([-30.0, 20.0])
    raw = project(phantom, angles, (48, 48), tilt_axis=7.0)
    ideal = project(phantom, angles, (48, 48))
    assert np.abs(rotate_stack(raw, 7.0) - ideal).max() < 0.02 * ideal.max()


def test_shift_stack_round_trip_keeps_edges(images):
    shifts = np.array([[3.3, -2.1]] * 6)
    back = shift_stack(shift_stack(images, shifts), -shifts)
    inner = np.s_[:, 8:-8, 8:-8]
    np.testing.assert_allclose(back[inner], images[inner], atol=2e-3 * images.max())
