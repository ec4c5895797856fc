"""Fourier shell correlation (cryomatch.kernels.fsc) on known answers."""

import numpy as np
import pytest

from cryomatch.kernels import fsc


def test_identical_maps_correlate_fully_and_resolution_is_nyquist():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((32, 32, 32))
    freq, curve = fsc.fsc(v, v, pixel_size=2.0)
    np.testing.assert_allclose(curve[1:], 1.0, atol=1e-12)
    assert freq[-1] == pytest.approx(1 / 4.0)
    assert fsc.resolution_at(freq, curve) == pytest.approx(4.0)


@pytest.mark.parametrize("seed", [1, 2])
def test_halves_with_equal_signal_and_noise_power_give_one_half(seed):
    # white signal s and independent white noise n in each half: FSC = s / (s + n)
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((48, 48, 48))
    half1 = signal + rng.standard_normal(signal.shape)
    half2 = signal + rng.standard_normal(signal.shape)
    _, curve = fsc.fsc(half1, half2)
    assert np.abs(curve[4:] - 0.5).max() < 0.12
    assert abs(curve[4:].mean() - 0.5) < 0.01
    _, unrelated = fsc.fsc(half1, rng.standard_normal(signal.shape))
    assert np.abs(unrelated[4:]).max() < 0.15


def test_resolution_interpolates_the_first_crossing():
    freq = np.arange(11) / 20.0  # box 20, 1 A/px
    curve = np.array([1, 1, 0.9, 0.5, 0.3, 0.1, 0.2, 0.05, 0, 0, 0])
    # crosses 0.143 between shells 4 (0.3) and 5 (0.1): 4 + 0.157/0.2 shells
    expected = 1 / ((4 + (0.3 - 0.143) / 0.2) / 20)
    assert fsc.resolution_at(freq, curve, 0.143) == pytest.approx(expected)
    assert fsc.resolution_at(freq, curve, 0.5) == pytest.approx(20 / 3)


def test_shell_filter_keeps_low_shells_and_zeroes_high_ones():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((24, 24, 24)).astype(np.float32)
    per_shell = np.zeros(13)
    per_shell[:6] = 1.0
    low = fsc.shell_filter(v, per_shell)
    assert low.dtype == np.float32
    _, curve = fsc.fsc(low, v)
    spectrum = np.abs(np.fft.rfftn(low)) ** 2
    shells = fsc.shell_index(v.shape)
    assert spectrum[shells >= 6].max() < 1e-6 * spectrum.max()
    np.testing.assert_allclose(curve[1:6], 1.0, atol=1e-5)
    np.testing.assert_allclose(fsc.fsc_weight([1.0, 0.5, 0.0, -0.2]), [1, np.sqrt(2 / 3), 0, 0])
