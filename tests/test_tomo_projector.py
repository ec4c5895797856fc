"""The parallel-beam projector: exact adjoint, agreement with closed-form projections, WBP
and SIRT reconstructions, leave-one-out reprojections."""

import numpy as np
import pytest

from cryomatch.kernels.ellipsoids import project, random_phantom, voxelize
from cryomatch.kernels.tiltalign import loo_reprojections
from cryomatch.kernels.tomography import ParallelBeamProjector, angular_weights, sirt, wbp


@pytest.mark.parametrize("nx, nz", [(32, 32), (33, 20), (40, 56)])
def test_back_projection_is_the_exact_adjoint(rng, nx, nz):
    angles = np.sort(rng.uniform(-80, 80, 17))
    proj = ParallelBeamProjector(angles, nx, nz, dtype=np.float64)
    v = rng.normal(size=(nz, 9, nx))
    p = rng.normal(size=(len(angles), 9, nx))
    lhs = np.vdot(proj.forward(v), p)
    rhs = np.vdot(v, proj.back(p))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_forward_projection_matches_closed_form_phantom():
    rng = np.random.default_rng(1)
    n = 40
    phantom = random_phantom(rng, n)
    angles = np.linspace(-60, 60, 21)
    exact = project(phantom, angles, (n, n))
    sampled = ParallelBeamProjector(angles, n).forward(voxelize(phantom, (n, n, n)))
    assert np.corrcoef(exact.ravel(), sampled.ravel())[0, 1] > 0.999
    assert np.abs(exact - sampled).max() < 0.05 * exact.max()


def test_wbp_recovers_a_blob_with_full_angular_range():
    n = 48
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    blob = np.exp(-((x - 5.0) ** 2 + y**2 + (z + 7.0) ** 2) / (2 * 3.0**2)).astype(np.float32)
    proj = ParallelBeamProjector(np.arange(-89, 90, 1.0), n)
    rec = wbp(proj, proj.forward(blob))
    assert np.unravel_index(rec.argmax(), rec.shape) == (n // 2 - 7, n // 2, n // 2 + 5)
    assert rec.max() == pytest.approx(1.0, abs=0.05)
    assert np.abs(rec - blob).max() < 0.06


def test_sirt_fits_the_data():
    n = 32
    rng = np.random.default_rng(2)
    proj = ParallelBeamProjector(np.linspace(-60, 60, 31), n)
    stack = proj.forward(voxelize(random_phantom(rng, n), (n, n, n)))
    residuals = [np.linalg.norm(proj.forward(sirt(proj, stack, k)) - stack) for k in (2, 10, 40)]
    assert residuals[0] > residuals[1] > residuals[2]
    assert residuals[2] < 0.05 * np.linalg.norm(stack)


def test_angular_weights_cover_the_range_in_any_order():
    angles = np.array([0.0, 3.0, -3.0, 6.0, -6.0])  # dose-symmetric order
    w = angular_weights(angles)
    np.testing.assert_allclose(w, np.deg2rad([3, 3, 3, 3, 3]))


def test_leave_one_out_reprojection_equals_reconstruction_without_the_image():
    rng = np.random.default_rng(3)
    n, angles = 24, np.linspace(-60, 60, 13)
    proj = ParallelBeamProjector(angles, n)
    stack = rng.normal(size=(13, 5, n)).astype(np.float32)
    loo = loo_reprojections(proj, stack)
    i = 4
    without = stack.copy()
    without[i] = 0  # the image's share of the weighted back-projection removed
    direct = proj.forward(wbp(proj, without))[i]
    np.testing.assert_allclose(loo[i], direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())


@pytest.mark.gpu
def test_cupy_projector_matches_numpy():
    import cupy

    rng = np.random.default_rng(4)
    angles = np.linspace(-60, 60, 11)
    v = rng.normal(size=(16, 8, 16)).astype(np.float32)
    cpu = ParallelBeamProjector(angles, 16)
    gpu = ParallelBeamProjector(angles, 16, xp=cupy)
    np.testing.assert_allclose(
        cupy.asnumpy(gpu.forward(cupy.asarray(v))), cpu.forward(v), rtol=1e-4, atol=1e-4
    )
    stack = cpu.forward(v)
    np.testing.assert_allclose(
        cupy.asnumpy(wbp(gpu, cupy.asarray(stack))), wbp(cpu, stack), rtol=1e-3, atol=1e-3
    )
