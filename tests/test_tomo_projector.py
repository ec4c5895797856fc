"""The parallel-beam projector: exact adjoint, agreement with closed-form projections, WBP
and SIRT reconstructions, leave-one-out reprojections."""

import numpy as np
import pytest

from cryomatch.kernels import tomography
from cryomatch.kernels.ellipsoids import project, random_phantom, voxelize
from cryomatch.kernels.tiltalign import loo_reprojections
from cryomatch.kernels.tomography import SIRT, ParallelBeamProjector, angular_weights, sirt, wbp


@pytest.mark.parametrize("nx, nz, ny", [(32, 32, 9), (33, 20, 9), (40, 56, 9), (24, 20, 75)])
def test_back_projection_is_the_exact_adjoint(rng, nx, nz, ny):
    angles = np.sort(rng.uniform(-80, 80, 17))
    proj = ParallelBeamProjector(angles, nx, nz, dtype=np.float64)
    v = rng.normal(size=(nz, ny, nx))
    p = rng.normal(size=(len(angles), ny, nx))
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


def test_blocked_products_equal_one_product(rng):
    """ny above the block size (and not a multiple of it): the same as one sparse product."""
    angles = np.linspace(-70, 70, 11)
    proj = ParallelBeamProjector(angles, 20, 16, dtype=np.float64)
    ny = 2 * tomography.BLOCK + 5
    v = rng.normal(size=(16, ny, 20))
    np.testing.assert_allclose(
        proj.forward(v), proj.from_sinograms(proj.a @ proj.to_slices(v)), rtol=1e-12
    )
    p = rng.normal(size=(11, ny, 20))
    np.testing.assert_allclose(
        proj.back(p), proj.from_slices(proj.at @ proj.to_sinograms(p)), rtol=1e-12
    )


def test_warm_sirt_continues_where_it_stopped():
    n = 24
    rng = np.random.default_rng(5)
    proj = ParallelBeamProjector(np.linspace(-60, 60, 21), n, dtype=np.float64)
    stack = proj.forward(voxelize(random_phantom(rng, n), (n, n, n)).astype(np.float64))
    solver = SIRT(proj)
    solver.run(stack, 4)
    solver.run(stack, 3)
    np.testing.assert_allclose(solver.volume(), sirt(proj, stack, 7), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(solver.projections(), proj.forward(solver.volume()), rtol=1e-9)
    assert solver.iterations == 7


def test_leaky_sirt_reaches_its_regularized_fixed_point():
    """x = (1 - leak) x + C A^T R (b - A x) converges to (leak I + C A^T R A) x = C A^T R b:
    the fit stops short of the data by an amount set by the leak."""
    n = 16
    rng = np.random.default_rng(6)
    proj = ParallelBeamProjector(np.linspace(-60, 60, 13), n, dtype=np.float64)
    stack = proj.forward(voxelize(random_phantom(rng, n), (n, 3, n)).astype(np.float64))
    residual = {}
    for leak in (0.0, 0.2):
        solver = SIRT(proj, leak=leak)
        solver.run(stack, 300)
        x = solver.volume()
        solver.run(stack, 1)
        step = np.abs(solver.volume() - x).max() / np.abs(x).max()
        residual[leak] = np.linalg.norm(solver.projections() - stack) / np.linalg.norm(stack)
        if leak:
            assert step < 1e-8  # at its fixed point
    assert residual[0.2] > 3 * residual[0.0]


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
