"""RELION's CTF: wavelength, zeros, astigmatism axis, phase shift, batching."""

import numpy as np
import pytest

from cryomatch.kernels.ctf import ctf, electron_wavelength


def test_wavelengths():
    assert electron_wavelength(300) == pytest.approx(0.019687, abs=1e-6)
    assert electron_wavelength(200) == pytest.approx(0.025079, abs=1e-6)


def test_zero_frequency_is_amplitude_contrast():
    assert ctf(np.array(0.0), np.array(0.0), 15000, 14000, 30, 300, 2.7, 0.07) == pytest.approx(
        0.07
    )


def test_first_zero_without_cs():
    lam, dz, q0 = electron_wavelength(300), 20000.0, 0.1
    k0 = np.sqrt((np.pi - np.arcsin(q0)) / (np.pi * lam * dz))
    assert abs(ctf(np.array(k0), np.array(0.0), dz, dz, 0, 300, 0.0, q0)) < 1e-9


@pytest.mark.parametrize("u, v", [(20000, 15000), (15000, 20000)])
def test_astigmatism_axis_follows_defocus_angle(u, v):
    """Along the azimuth rlnDefocusAngle the defocus is U, 90 degrees away it is V, whatever
    the sign of U - V (CryoLike's |U - V| turns the axis by 90 degrees when V > U)."""
    angle = 25.0
    k = np.linspace(0.0, 0.2, 50)
    for az, dz in ((angle, u), (angle + 90.0, v)):
        kx, ky = k * np.cos(np.deg2rad(az)), k * np.sin(np.deg2rad(az))
        expected = ctf(k, 0 * k, dz, dz, 0.0, 300, 2.7, 0.1)
        np.testing.assert_allclose(ctf(kx, ky, u, v, angle, 300, 2.7, 0.1), expected, atol=1e-12)


def test_phase_shift_of_90_degrees_turns_sin_into_cos():
    k = np.linspace(0, 0.2, 20)
    lam = electron_wavelength(300)
    chi = np.pi * lam * 10000.0 * k**2
    np.testing.assert_allclose(
        ctf(k, 0 * k, 1e4, 1e4, 0, 300, 0.0, 0.0, phase_shift=90.0), np.cos(chi), atol=1e-12
    )


def test_bfactor_envelope():
    k = np.array([0.1])
    plain = ctf(k, 0 * k, 1e4, 1e4, 0, 300, 2.7, 0.1)
    damped = ctf(k, 0 * k, 1e4, 1e4, 0, 300, 2.7, 0.1, bfactor=100.0)
    assert damped / plain == pytest.approx(np.exp(-100.0 * 0.01 / 4))


def test_batched_parameters_give_one_ctf_per_particle():
    ky, kx = np.meshgrid(np.linspace(-0.1, 0.1, 5), np.linspace(0, 0.1, 4), indexing="ij")
    u = np.array([10000.0, 20000.0])
    out = ctf(kx, ky, u, u - 500, [10.0, 80.0], [300.0, 200.0], 2.7, 0.1)
    assert out.shape == (2, 5, 4)
    np.testing.assert_allclose(out[1], ctf(kx, ky, 20000.0, 19500.0, 80.0, 200.0, 2.7, 0.1))
