"""Polar grid, exact polar Fourier transforms, the non-uniform FFT, templates."""

import numpy as np
import pytest

from cryomatch import geometry
from cryomatch.kernels.nufft import nufft3d2
from cryomatch.kernels.phantom import random_structure
from cryomatch.kernels.polar import angular_spectra, rotational_correlation
from cryomatch.kernels.polar_fourier import finufft_available, polar_grid, polar_transform
from cryomatch.kernels.projection import (
    project_atoms,
    project_volume,
    spline_coefficients,
    voxelize_atoms,
)
from cryomatch.kernels.templates import (
    atom_templates,
    map_templates,
    view_matrices,
    viewing_directions,
)

METHODS = ["dft"] + (["finufft"] if finufft_available() else [])


def _brute(images, grid):
    kx, ky = grid.points()
    c = np.arange(grid.box) - grid.box // 2
    ey = np.exp(-2j * np.pi * ky[..., None] * c)
    ex = np.exp(-2j * np.pi * kx[..., None] * c)
    return np.einsum("nyx,rwy,rwx->nrw", images.astype(np.float64), ey, ex)


def test_grid_quadrature_integrates_polynomials_on_the_disc():
    grid = polar_grid(32, resolution_factor=0.8)
    assert grid.n_shells == 1 + int(np.ceil(0.8 * 32)) and grid.n_inplanes == 64
    area = grid.weights.sum() * grid.n_inplanes
    np.testing.assert_allclose(area, np.pi * 0.4**2, rtol=1e-12)
    r2 = np.sum(grid.weights * grid.radii**6) * grid.n_inplanes  # integral of r^6 over the disc
    np.testing.assert_allclose(r2, 2 * np.pi * 0.4**8 / 8, rtol=1e-12)
    assert polar_grid(64).n_shells == 65 and polar_grid(64).n_inplanes == 128


@pytest.mark.parametrize("method", METHODS)
def test_polar_transform_is_exact(rng, method):
    grid = polar_grid(15, n_inplanes=12)  # odd box too
    images = rng.normal(size=(3, 15, 15)).astype(np.float32)
    got = polar_transform(images, grid, method)
    want = _brute(images, grid)
    assert got.dtype == np.complex64
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def test_parseval_and_hermitian_symmetry():
    grid = polar_grid(64)
    yy, xx = np.mgrid[-32:32, -32:32]
    image = np.exp(-(xx**2 + (yy - 3) ** 2) / (2 * 3.0**2))[None].astype(np.float32)
    values = polar_transform(image, grid, "dft")
    np.testing.assert_allclose(
        np.sum(grid.weights[:, None] * np.abs(values[0]) ** 2), np.sum(image**2), rtol=1e-5
    )
    half = grid.n_inplanes // 2
    np.testing.assert_allclose(values[..., half:], np.conj(values[..., :half]))


@pytest.mark.parametrize("method", ["numpy"] + (["finufft"] if finufft_available() else []))
def test_nufft_matches_direct_dft(rng, method):
    n = 10
    volume = rng.normal(size=(n, n, n))
    k = rng.uniform(-0.5, 0.5, size=(3, 300))
    x = np.arange(n) - n // 2
    want = np.einsum(
        "zyx,pz,py,px->p", volume, *(np.exp(-2j * np.pi * np.outer(k[i], x)) for i in range(3))
    )
    got = nufft3d2(volume, *k, eps=1e-6, method=method)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def test_viewing_directions_cover_the_sphere_with_weights():
    rot, tilt, weights = viewing_directions(0.3)
    assert len(rot) == len(tilt) == len(weights) and weights.sum() == pytest.approx(1.0)
    dirs = geometry.viewing_direction(rot, tilt)
    # quadrature integrates z^2 over the sphere: mean 1/3
    assert np.sum(weights * dirs[:, 2] ** 2) == pytest.approx(1 / 3, abs=1e-6)
    # every direction on the sphere lies within about the spacing of a view
    probe = geometry.viewing_direction(
        *np.random.default_rng(0).uniform([0, 0], [360, 180], (500, 2)).T
    )
    nearest = np.degrees(np.arccos(np.clip(probe @ dirs.T, -1, 1))).min(axis=1)
    assert nearest.max() < np.degrees(0.3)


@pytest.fixture(scope="module")
def phantom():
    rng = np.random.default_rng(3)
    box, apix = 32, 3.0
    atoms = random_structure(rng, 90, 0.28 * box * apix, 1.6 * apix)
    return atoms, box, apix


def test_templates_equal_transforms_of_real_space_projections(phantom):
    """Issue: a template equals the FT of a direct real-space projection to 1e-3."""
    atoms, box, apix = phantom
    grid = polar_grid(box)
    rot, tilt = np.array([0.0, 40.0, 123.0, 300.0]), np.array([0.0, 70.0, 150.0, 95.0])
    mats = view_matrices(rot, tilt)
    volume = voxelize_atoms(atoms.coords, atoms.amplitudes, atoms.sigmas, box, apix)
    from_map = map_templates(volume, grid, mats)
    from_atoms = atom_templates(
        atoms.coords / apix, atoms.amplitudes, atoms.sigmas / apix, grid, mats
    )
    spline = polar_transform(project_volume(spline_coefficients(volume), mats), grid, "dft")
    exact = polar_transform(
        project_atoms(atoms.coords, atoms.amplitudes, atoms.sigmas, mats, box, apix), grid, "dft"
    )
    for got, want in [(from_map, spline), (from_atoms, exact), (from_map, exact)]:
        err = np.linalg.norm(got - want, axis=(1, 2)) / np.linalg.norm(want, axis=(1, 2))
        assert err.max() < 1e-3


@pytest.mark.parametrize("psi", [0.0, 45.0, 200.0, 331.875])
def test_psi_from_polar_turn_matches_a_projection_at_psi(phantom, psi):
    atoms, box, apix = phantom
    grid = polar_grid(box)
    image = project_atoms(
        atoms.coords,
        atoms.amplitudes,
        atoms.sigmas,
        geometry.euler_to_matrix(30.0, 60.0, psi)[None],
        box,
        apix,
    )
    values = polar_transform(image, grid, "dft")
    template = atom_templates(
        atoms.coords / apix,
        atoms.amplitudes,
        atoms.sigmas / apix,
        grid,
        view_matrices([30.0], [60.0]),
    )
    cc = rotational_correlation(
        angular_spectra(values), angular_spectra(template), grid.weights, grid.n_inplanes
    )
    turn = int(np.argmax(cc[0, 0]))
    step = 360.0 / grid.n_inplanes
    got = geometry.psi_from_polar_turn(turn, grid.n_inplanes)
    assert abs((got - psi + 180) % 360 - 180) <= step / 2
    assert geometry.polar_turn_from_psi(got, grid.n_inplanes) == pytest.approx(turn)


@pytest.mark.skipif(not finufft_available(), reason="finufft is not installed")
def test_atom_templates_finufft_matches_direct_sum(phantom):
    atoms, box, apix = phantom
    grid = polar_grid(box)
    mats = view_matrices([10.0, 200.0], [80.0, 30.0])
    sigmas = np.where(np.arange(len(atoms.sigmas)) % 2, 1.5, 2.0)  # two widths
    a = atom_templates(atoms.coords / apix, atoms.amplitudes, sigmas, grid, mats, method="finufft")
    b = atom_templates(atoms.coords / apix, atoms.amplitudes, sigmas, grid, mats, method="direct")
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
