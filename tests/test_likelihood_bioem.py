"""The integrated log-likelihood against the exact Gaussian log-likelihood (issue point 3)."""

import numpy as np
import pytest

from cryomatch import geometry
from cryomatch.kernels import ctf as ctf_kernel
from cryomatch.kernels import likelihood as lk
from cryomatch.kernels.fourier import apply_ctf, rfft_frequencies
from cryomatch.kernels.phantom import random_structure
from cryomatch.kernels.polar_fourier import polar_grid, polar_transform
from cryomatch.kernels.projection import project_atoms
from cryomatch.kernels.templates import atom_templates, view_matrices, viewing_directions


def simulate_gaussian(rng, n=48, box=32, apix=4.0):
    """Images y = a (CTF * projection) + b + sigma noise with per-image a, b, sigma and
    CTF; returns images, the exact Gaussian log-likelihood, CTF parameters, atoms."""
    atoms = random_structure(rng, 90, 0.28 * box * apix, 1.6 * apix)
    rot, tilt, psi = geometry.rotation_to_euler(geometry.random_rotations(n, rng))
    shift = rng.uniform(-1.5, 1.5, size=(n, 2)) * apix
    clean = project_atoms(
        atoms.coords,
        atoms.amplitudes,
        atoms.sigmas,
        geometry.euler_to_matrix(rot, tilt, psi),
        box,
        apix,
        shift,
    )
    du = rng.uniform(8000, 20000, n)
    params = dict(
        defocus_u=du,
        defocus_v=du + rng.normal(0, 500, n),
        defocus_angle=rng.uniform(0, 180, n),
        voltage=np.full(n, 300.0),
        cs=np.full(n, 2.7),
        amplitude_contrast=np.full(n, 0.1),
    )
    ky, kx = rfft_frequencies(box, apix)
    signal = apply_ctf(clean, ctf_kernel.ctf(kx, ky, *params.values())).astype(np.float64)
    signal /= signal.std(axis=(1, 2)).mean()
    a = rng.uniform(0.3, 0.6, n)  # SNR a^2 / sigma^2 about 0.1-0.5
    b = rng.normal(0, 2, n)
    sigma = rng.uniform(0.7, 1.4, n)
    noise = rng.standard_normal(signal.shape)
    images = a[:, None, None] * signal + b[:, None, None] + sigma[:, None, None] * noise
    npix = box * box
    exact = -npix / 2 * np.log(2 * np.pi * sigma**2) - np.sum(noise**2, axis=(1, 2)) / 2
    return images, exact, params, atoms, (rot, tilt, psi, shift / apix)


def integrated(images, params, atoms, box=32, apix=4.0, viewing_distance=0.35):
    grid = polar_grid(box)
    centred = images - images.mean(axis=(1, 2), keepdims=True)
    values = polar_transform(centred.astype(np.float32), grid, "dft")
    kx, ky = grid.points()
    ctf = ctf_kernel.ctf(kx / apix, ky / apix, *params.values()).astype(np.float32)
    ctf0 = ctf_kernel.ctf(np.zeros(1), np.zeros(1), *params.values())[:, 0]
    rot, tilt, w = viewing_directions(viewing_distance)
    templates = atom_templates(
        atoms.coords / apix, atoms.amplitudes, atoms.sigmas / apix, grid, view_matrices(rot, tilt)
    )
    dc = np.sum(atoms.amplitudes * (2 * np.pi * (atoms.sigmas / apix) ** 2) ** 1.5)
    bank = lk.prepare_templates(templates, grid, w, dc)
    disp = lk.displacement_grid(1.5, 3, 3)
    batch = lk.prepare_images(values, ctf, np.sum(centred**2, axis=(1, 2)), ctf0, grid, bank, disp)
    return lk.search(batch, bank)


def test_integrated_log_likelihood_tracks_the_exact_gaussian_one():
    rng = np.random.default_rng(2024)
    images, exact, params, atoms, _ = simulate_gaussian(rng)
    res = integrated(images, params, atoms)
    slope = np.polyfit(exact, res.ll_integrated, 1)[0]
    assert slope == pytest.approx(1.0, abs=0.05)
    # it differs between images (CryoLike wrote one constant for all), and so does log L at
    # the optimal pose; both sit within a few hundred nats of the exact value
    assert np.std(res.ll_integrated) > 50 and np.std(res.ll_optimal) > 50
    assert np.all(res.ll_integrated <= res.ll_optimal + 1e-6)  # the prior spreads over poses
    assert np.corrcoef(res.ll_integrated, res.ll_optimal)[0, 1] > 0.99


def test_bioem_formula_matches_numerical_integration():
    """log L for one pose against a numerical integral over scale, offset and sigma."""
    from scipy.integrate import simpson

    rng = np.random.default_rng(5)
    n = 40
    c = rng.normal(size=n)
    y = 0.7 * c + 0.3 + rng.normal(size=n)
    yc, cc = y - y.mean(), c - c.mean()
    syy, scc, syc = yc @ yc, cc @ cc, yc @ cc
    got = float(lk.bioem_log_likelihood(np.array(syc / np.sqrt(syy * scc)), scc, syy, n))
    # scale a >= 0 (the signal's sign is known), offset b and sigma (prior 1/sigma) over
    # their bulk; sum (y - a c - b)^2 expanded as a quadratic in a and b
    a = np.linspace(0, 3, 241)[:, None, None]
    b = np.linspace(-3, 3, 241)[None, :, None]
    sig = np.geomspace(0.3, 3.0, 241)[None, None, :]
    q = (
        y @ y
        - 2 * a * (y @ c)
        - 2 * b * y.sum()
        + a * a * (c @ c)
        + 2 * a * b * c.sum()
        + n * b * b
    )
    log_f = -n / 2 * np.log(2 * np.pi * sig**2) - q / (2 * sig**2) - np.log(sig)
    top = log_f.max()
    val = simpson(simpson(simpson(np.exp(log_f - top), x=sig[0, 0]), x=b[0, :, 0]), x=a[:, 0, 0])
    assert got == pytest.approx(np.log(val) + top, abs=0.02)
