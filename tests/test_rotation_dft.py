"""The angular DFTs of the polar search against numpy's FFTs."""

import numpy as np
import pytest

from cryomatch.kernels.rotation_dft import InverseRotationDFT, half_circle_matrix, slot_order


def _planes(spectra, dft):
    """Spectra (W/2 + 1, n) complex as the DFT's planes (Re, Im rows per slot)."""
    planes = np.empty((dft.rows, spectra.shape[1]), dtype=np.float32)
    for p, q in enumerate(dft.order):
        planes[2 * p], planes[2 * p + 1] = spectra[q].real, spectra[q].imag
    return planes


@pytest.mark.parametrize("w", [2, 4, 6, 8, 10, 128])
def test_inverse_dft_is_irfft(w):
    """Every slot order (radix-4 on the even part when 4 divides W, radix-2 otherwise)
    gives numpy's irfft, Im X_0 and Im X_{W/2} ignored as irfft does."""
    rng = np.random.default_rng(w)
    spectra = rng.standard_normal((w // 2 + 1, 9)) + 1j * rng.standard_normal((w // 2 + 1, 9))
    dft = InverseRotationDFT(w)
    assert sorted(dft.order) == list(range(w // 2 + 1))
    expected = np.fft.irfft(spectra, n=w, axis=0)
    np.testing.assert_allclose(dft(_planes(spectra, dft)), expected, atol=2e-6)


@pytest.mark.parametrize("w, q_max", [(128, 16), (128, 3), (8, 3), (10, 4)])
def test_low_part_is_the_low_spectra_alone(w, q_max):
    rng = np.random.default_rng(q_max)
    spectra = rng.standard_normal((w // 2 + 1, 5)) + 1j * rng.standard_normal((w // 2 + 1, 5))
    dft = InverseRotationDFT(w)
    runs, matrix, qs = dft.low_part(q_max)
    assert sorted(qs) == list(range(min(q_max, w // 2 + 1)))
    planes = _planes(spectra, dft)
    low = np.concatenate([planes[run] for run in runs])
    kept = spectra.copy()
    kept[q_max:] = 0
    np.testing.assert_allclose(matrix @ low, np.fft.irfft(kept, n=w, axis=0), atol=2e-6)


def test_slot_order_puts_even_q_first():
    order = slot_order(16)
    assert list(order) == [0, 4, 8, 2, 6, 1, 3, 5, 7]
    assert list(slot_order(6)) == [0, 2, 1, 3]


def test_half_circle_matrix_is_the_fft_of_hermitian_values():
    """Values with F(theta + pi) = conj F(theta) given on the first half circle: the
    matrix gives their full-circle FFT's q = 0..W/2."""
    w = 16
    rng = np.random.default_rng(0)
    half = rng.standard_normal(w // 2) + 1j * rng.standard_normal(w // 2)
    full = np.concatenate([half, np.conj(half)])
    y = np.stack([half.real, half.imag], axis=-1).reshape(-1)
    got = (y @ half_circle_matrix(w, np.float64)).reshape(-1, 2)
    np.testing.assert_allclose(got[:, 0] + 1j * got[:, 1], np.fft.fft(full)[: w // 2 + 1])
