"""The same known answers on the GPU (cupy): skipped without cupy and a CUDA device."""

import numpy as np
import pytest

from cryomatch.kernels import likelihood as lk
from test_likelihood_engine import _direct, _problem

pytestmark = pytest.mark.gpu


def test_search_on_cupy_matches_direct_sum(rng):
    import cupy

    grid, templates, values, ctf, syy, ctf0, dc, weights = _problem(rng)
    disp = lk.displacement_grid(1.0, 3, 2)
    rho, ll, integrated = _direct(values, ctf, syy, ctf0, grid, templates, dc, weights, disp)
    bank = lk.prepare_templates(templates.astype(np.complex64), grid, weights, dc, 1e-5, xp=cupy)
    batch = lk.prepare_images(
        cupy.asarray(values.astype(np.complex64)), cupy.asarray(ctf), syy, ctf0, grid, bank, disp
    )
    res = lk.search(batch, bank, template_block=3)
    best = rho.reshape(len(rho), -1).argmax(axis=1)
    s, d, k = np.unravel_index(best, rho.shape[1:])
    np.testing.assert_array_equal(res.template, s)
    np.testing.assert_array_equal(res.displacement, d)
    np.testing.assert_array_equal(res.rotation, k)
    np.testing.assert_allclose(res.ll_integrated, integrated, atol=2e-2)


def test_stage_on_cupy_matches_numpy(tmp_path):
    from cryomatch.stages.fourier_stack import fourier_stack
    from cryomatch.stages.likelihood import likelihood
    from cryomatch.stages.preprocess import preprocess
    from cryomatch.stages.simulate.particles import simulate_particles
    from cryomatch.stages.templates import templates

    star = simulate_particles(
        tmp_path / "sim", n=8, snr=1.0, box=32, seed=3, pixel_size=4.0, n_structures=1
    )
    preprocess(star, tmp_path, stack_size=8)
    fft = fourier_stack(
        tmp_path / "particles" / "stack_000000.star", tmp_path / "fft", backend="cupy"
    )
    temp = templates(
        tmp_path / "sim" / "structures" / "structure_01.mrc",
        fft,
        tmp_path / "t",
        viewing_distance=0.5,
    )
    gpu = likelihood(fft, temp, tmp_path / "gpu", backend="cupy")
    cpu = likelihood(fft, temp, tmp_path / "cpu", backend="numpy")
    for key in ("template", "displacement_x", "inplane_rotation"):
        np.testing.assert_allclose(np.load(gpu[key]), np.load(cpu[key]))
    np.testing.assert_allclose(
        np.load(gpu["ll_integrated"]), np.load(cpu["ll_integrated"]), atol=0.05
    )
