"""The rotational cross-correlation engine against a direct sum over angles."""

import numpy as np
import pytest

from cryomatch.kernels.polar import angular_spectra, rotational_correlation


def _direct(a, b, w):
    n_angles = a.shape[-1]
    out = np.zeros((len(a), len(b), n_angles))
    for k in range(n_angles):  # reference turned by +k steps: b(l - k)
        out[:, :, k] = np.einsum("r,mrl,srl->ms", w, a, np.roll(b, k, axis=-1).conj()).real
    return out


def test_real_rings_match_direct_sum(rng):
    a, b = rng.normal(size=(3, 5, 16)), rng.normal(size=(4, 5, 16))
    w = rng.uniform(size=5)
    cc = rotational_correlation(angular_spectra(a), angular_spectra(b), w, 16)
    np.testing.assert_allclose(cc, _direct(a, b, w), atol=1e-12)


def test_hermitian_polar_fourier_values_match_direct_sum(rng):
    def hermitian(n):  # F(r, theta + pi) = conj F(r, theta), as for real images
        half = rng.normal(size=(n, 5, 8)) + 1j * rng.normal(size=(n, 5, 8))
        return np.concatenate([half, half.conj()], axis=-1)

    a, b, w = hermitian(3), hermitian(2), rng.uniform(size=5)
    cc = rotational_correlation(angular_spectra(a), angular_spectra(b), w, 16)
    np.testing.assert_allclose(cc, _direct(a, b, w), atol=1e-12)


def test_peak_recovers_known_rotation(rng):
    b = rng.normal(size=(1, 6, 32))
    a = np.roll(b, 5, axis=-1)  # image = reference turned by 5 steps
    cc = rotational_correlation(angular_spectra(a), angular_spectra(b), np.ones(6), 32)
    assert int(np.argmax(cc[0, 0])) == 5
    assert cc[0, 0, 5] == pytest.approx(np.sum(b * b))


@pytest.mark.parametrize("n_angles", [16, 18])
def test_hermitian_spectra_match_full_fft(rng, n_angles):
    from cryomatch.kernels.polar import hermitian_angular_spectra

    half = rng.normal(size=(3, 5, n_angles // 2)) + 1j * rng.normal(size=(3, 5, n_angles // 2))
    full = np.concatenate([half, half.conj()], axis=-1)
    want = angular_spectra(full)
    np.testing.assert_allclose(hermitian_angular_spectra(half, n_angles), want, atol=1e-12)
    first = hermitian_angular_spectra(np.moveaxis(half, -1, 0), n_angles, axis=0)
    np.testing.assert_allclose(np.moveaxis(first, 0, -1), want, atol=1e-12)
