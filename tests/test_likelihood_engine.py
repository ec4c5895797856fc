"""The likelihood search engine against a direct sum over every pose."""

import numpy as np
import pytest
from scipy.special import logsumexp

from cryomatch.kernels import likelihood as lk
from cryomatch.kernels.polar_fourier import polar_grid


def _direct(values, ctf, syy, ctf0, grid, templates, dc, weights, disp, centres=None):
    """rho (M, S, D, W) and log L per pose by explicit loops over rotations."""
    m, s, d, w = len(values), len(templates), len(disp), grid.n_inplanes
    n = grid.box**2
    wr = grid.weights[:, None]
    rho = np.zeros((m, s, d, w))
    ll = np.zeros((m, s, d, w))
    centres = np.zeros((m, 2)) if centres is None else centres
    for i in range(m):
        for j in range(s):
            for k in range(w):
                t = np.roll(templates[j], k, axis=-1)  # template turned by +k steps
                scc = np.sum(wr * ctf[i] ** 2 * np.abs(t) ** 2) - (ctf0[i] * dc[j]) ** 2 / n
                for e in range(d):
                    y = ctf[i] * values[i] * lk.shift_phases(grid, disp[e] + centres[i])
                    cc = np.sum(wr * y * np.conj(t)).real
                    rho[i, j, e, k] = cc / np.sqrt(syy[i] * scc)
                    ll[i, j, e, k] = lk.bioem_log_likelihood(
                        np.array(rho[i, j, e, k]), scc, syy[i], n
                    )
    prior = np.log(weights / weights.sum())[None, :, None, None] - np.log(d * w)
    return rho, ll, logsumexp(ll + prior, axis=(1, 2, 3))


def _problem(rng, m=3, s=7, box=12, signal=3.0):
    grid = polar_grid(box, n_inplanes=16)
    r, w = grid.n_shells, grid.n_inplanes

    def hermitian(n):
        half = rng.normal(size=(n, r, w // 2)) + 1j * rng.normal(size=(n, r, w // 2))
        return np.concatenate([half, half.conj()], axis=-1)

    templates = hermitian(s) * np.exp(-4 * grid.radii)[None, :, None]
    values = hermitian(m) + signal * np.roll(templates[:m], 3, axis=-1)  # images resemble templates
    ctf = np.cos(7 * grid.radii[:, None] + 0.3 * np.cos(2 * grid.angles))[None] * np.ones((m, 1, 1))
    ctf = ctf + 0.05 * np.arange(m)[:, None, None]
    syy = np.sum(grid.weights[:, None] * np.abs(values) ** 2, axis=(1, 2)) * 1.3
    return (
        grid,
        templates,
        values,
        ctf,
        syy,
        np.full(m, 0.1),
        rng.uniform(1, 3, s),
        rng.uniform(0.5, 2, s),
    )


@pytest.mark.parametrize("tolerance", [0.0, 1e-5])
@pytest.mark.parametrize("prune", [False, True])
def test_search_matches_direct_sum(rng, tolerance, prune):
    grid, templates, values, ctf, syy, ctf0, dc, weights = _problem(rng)
    disp = lk.displacement_grid(1.0, 3, 2)
    centres = rng.uniform(-1, 1, size=(len(values), 2))
    rho, ll, integrated = _direct(
        values, ctf, syy, ctf0, grid, templates, dc, weights, disp, centres
    )
    bank = lk.prepare_templates(templates.astype(np.complex64), grid, weights, dc, tolerance)
    batch = lk.prepare_images(
        values.astype(np.complex64), ctf, syy, ctf0, grid, bank, disp, centres
    )
    full = np.zeros(rho.shape, dtype=np.float32) if not prune else None
    res = lk.search(batch, bank, template_block=3, prune=prune, full_output=full)
    flat = rho.reshape(len(rho), -1)
    best = flat.argmax(axis=1)
    s, d, k = np.unravel_index(best, rho.shape[1:])
    np.testing.assert_array_equal(res.template, s)
    np.testing.assert_array_equal(res.displacement, d)
    np.testing.assert_array_equal(res.rotation, k)
    np.testing.assert_allclose(res.rho, flat.max(axis=1), atol=2e-5)
    np.testing.assert_allclose(
        res.ll_optimal, ll.reshape(len(ll), -1)[np.arange(len(ll)), best], atol=2e-2
    )
    np.testing.assert_allclose(res.ll_integrated, integrated, atol=2e-2)
    if full is not None:
        np.testing.assert_allclose(full, rho, atol=2e-5)


def test_templates_streamed_in_chunks_give_the_same_result(rng):
    grid, templates, values, ctf, syy, ctf0, dc, weights = _problem(rng, s=11)
    disp = lk.displacement_grid(1.0, 3, 3)
    results = []
    for max_bytes in (1e9, 1.0):  # all coefficients in memory; recomputed per chunk of 3 views
        bank = lk.prepare_templates(
            templates, grid, weights, dc, 1e-5, max_bytes=max_bytes, chunk=4, min_chunk=3
        )
        assert (bank.cache is None) == (max_bytes == 1.0)
        batch = lk.prepare_images(values.astype(np.complex64), ctf, syy, ctf0, grid, bank, disp)
        results.append(lk.search(batch, bank, template_block=2))
    a, b = results
    np.testing.assert_array_equal(a.template, b.template)
    np.testing.assert_allclose(a.rho, b.rho, atol=1e-6)
    np.testing.assert_allclose(a.ll_integrated, b.ll_integrated, atol=1e-3)


def test_compression_error_is_reported_and_small(rng):
    grid, templates, *_ = _problem(rng, s=20)
    templates = templates * np.exp(-30 * grid.radii)[None, :, None]  # little power at high k
    exact = lk.prepare_templates(templates, grid, np.ones(20), np.ones(20), tolerance=0.0)
    loose = lk.prepare_templates(templates, grid, np.ones(20), np.ones(20), tolerance=1e-2)
    assert exact.error == 0.0 and all(r <= min(20, grid.n_shells) for r in exact.ranks)
    assert 0 < loose.error <= 1e-2
    assert sum(loose.ranks) < sum(exact.ranks)


def test_displacement_grid_matches_cryolike_layout():
    grid = lk.displacement_grid(2.0, 3, 2)
    np.testing.assert_allclose(grid, [[-2, -2], [0, -2], [2, -2], [-2, 2], [0, 2], [2, 2]])
    np.testing.assert_array_equal(lk.displacement_grid(5.0, 1, 1), [[0, 0]])


def test_seeding_displacements_on_a_7x7_grid():
    disp = lk.displacement_grid(3.0, 7, 7)
    batch = lk.ImageBatch([], [], np.zeros(1), np.zeros(1), 1, len(disp), disp)
    coarse = disp[batch.coarse()]
    assert len(coarse) == 9 and set(np.unique(coarse)) == {-2.0, 0.0, 2.0}
    near = batch.neighbours(9)
    assert near.shape == (49, 9) and np.array_equal(near[:, 0], np.arange(49))
    centre = np.flatnonzero((disp == 0).all(axis=1))[0]
    assert np.abs(disp[near[centre]]).max() == 1.0  # the 3 x 3 block around (0, 0)
    corner = np.hypot(*(disp[near[0]] - disp[0]).T)
    assert corner.max() <= np.sqrt(8) + 1e-9  # a corner's nearest stay near it


@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_search_on_a_7x7_grid_matches_the_exact_one(seed):
    """The seeding's coarse and neighbouring displacements only start the pruning: the
    result is the exact search's (best pose, rho, integrated log L), with particles away
    from the centre (at odd steps too, which the coarse displacements miss)."""
    rng = np.random.default_rng(seed)
    grid, templates, values, ctf, syy, ctf0, dc, weights = _problem(
        rng, m=6, s=24, box=16, signal=10.0
    )
    disp = lk.displacement_grid(3.0, 7, 7)
    where = rng.choice(np.flatnonzero(np.hypot(*disp.T) >= 2.5), size=len(values))
    values = values * lk.shift_phases(grid, -disp[where])  # particle i moved to disp[where[i]]
    exact_bank = lk.prepare_templates(templates, grid, weights, dc, 0.0)
    results = []
    for prune in (False, True):
        batch = lk.prepare_images(
            values.astype(np.complex64), ctf, syy, ctf0, grid, exact_bank, disp
        )
        results.append(lk.search(batch, exact_bank, template_block=5, prune=prune))
    exact, pruned = results
    assert pruned.n_evaluated < exact.n_evaluated
    np.testing.assert_array_equal(pruned.template, exact.template)
    np.testing.assert_array_equal(pruned.displacement, exact.displacement)
    assert np.hypot(*disp[exact.displacement].T).min() > 1.0  # none found at the centre
    np.testing.assert_array_equal(pruned.rotation, exact.rotation)
    np.testing.assert_allclose(pruned.rho, exact.rho, atol=1e-6)
    np.testing.assert_allclose(pruned.ll_integrated, exact.ll_integrated, atol=1e-3)
