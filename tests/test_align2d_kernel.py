"""The polar-ring alignment kernel: exact pieces against direct sums, conventions against
RELION projections, and known-answer alignments."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.fft import irfft

from cryomatch import geometry
from cryomatch.kernels import align2d
from cryomatch.kernels.fourier import shift_images
from cryomatch.kernels.phantom import random_structure
from cryomatch.kernels.projection import (
    project_atoms,
    project_volume,
    spline_coefficients,
    voxelize_atoms,
)

R, W = 6, 32


def _direct(a, b, w):
    """NCC over all W turns of b, by a direct sum: out[m, s, k] (b turned by +k steps)."""

    def prep(x):
        x = x - (x.mean(-1) @ w)[:, None, None]
        return x / np.sqrt(((x**2).mean(-1) @ w) * W)[:, None, None]

    a, b = prep(a), prep(b)
    return np.stack(
        [np.einsum("r,mrl,srl->ms", w, a, np.roll(b, k, axis=-1)) for k in range(W)], axis=-1
    )


@pytest.fixture
def rings(rng):
    a = rng.normal(size=(3, R, W)).astype(np.float32)
    b = rng.normal(size=(4, R, W)).astype(np.float32)
    w = align2d.ring_weights(np.arange(1, R + 1))
    mirrored = b[:, :, (W // 2 - np.arange(W)) % W]  # x -> -x: theta -> pi - theta
    return a, b, w, _direct(a, b, w), _direct(a, mirrored, w)


def _references(spectra, w, fold):
    return align2d.references_from_spectra(
        spectra, w, len(spectra), np.zeros((1, 2)), (1, 1), 1.0, fold, block=3
    )


@pytest.mark.parametrize("fold", [1, 2, 4])
def test_folded_mirror_free_scores_equal_direct_sums(rings, fold):
    a, b, w, direct, direct_mirror = rings
    refs = _references(align2d.normalized_spectra(b, w), w, fold)
    coarse = align2d._coarse_scores(
        align2d.fold_spectra(align2d.normalized_spectra(a, w), fold), refs
    )
    np.testing.assert_allclose(coarse[0], direct[:, :, ::fold].max(-1), atol=1e-6)
    np.testing.assert_allclose(coarse[1], direct_mirror[:, :, ::fold].max(-1), atol=1e-6)


def test_exact_products_and_refined_peak(rings):
    a, b, w, direct, direct_mirror = rings
    spec_a, spec_b = align2d.normalized_spectra(a, w), align2d.normalized_spectra(b, w)
    refs = _references(spec_b, w, 1)
    n_index = np.array([[0, 3], [1, 2], [2, 0]])
    mirror = np.array([[False, True], [True, False], [False, False]])
    values = align2d.FoldedSpectra.from_spectra(spec_a, refs.fold).values
    c = align2d._exact_products(values, refs, n_index, mirror)
    expected = np.where(
        mirror[..., None],
        direct_mirror[np.arange(3)[:, None], n_index],
        direct[np.arange(3)[:, None], n_index],
    )
    np.testing.assert_allclose(irfft(c, n=W, axis=-1), expected, atol=1e-6)
    _, value = align2d._refine_angle(c.reshape(6, -1), W)
    assert np.all(value >= expected.reshape(6, -1).max(-1) - 1e-6)  # at least the best sample


def test_refined_angle_of_a_smooth_peak():
    """cc(theta) = sum_q a_q cos(q (theta - theta0)), a_q > 0: the maximum is at theta0."""
    n_angles, theta0 = 128, np.array([0.3, 2.0001, 4.71, 6.2])
    q = np.arange(n_angles // 2 + 1)
    a = np.where(q <= 12, np.exp(-0.5 * (q / 6.0) ** 2), 0.0)
    # (1/W) sum g_q Re(C_q e^{iq theta}) with C_q = W a_q e^{-i q theta0} / g_q
    g = np.where((q == 0) | (q == n_angles // 2), 1.0, 2.0)
    c = (n_angles * a / g)[None] * np.exp(-1j * q[None] * theta0[:, None])
    theta, value = align2d._refine_angle(c.astype(np.complex64), n_angles)
    np.testing.assert_allclose(theta, theta0, atol=2e-3)
    np.testing.assert_allclose(value, a.sum(), rtol=1e-4)


def test_normalized_spectra_have_zero_mean_and_unit_norm(rng):
    x = rng.normal(2.0, 3.0, size=(5, R, W)).astype(np.float32)
    w = align2d.ring_weights(np.arange(1, R + 1))
    s = align2d.normalized_spectra(x, w)
    back = irfft(s, n=W, axis=-1)
    np.testing.assert_allclose((back.mean(-1) @ w), 0, atol=1e-6)
    np.testing.assert_allclose(((back**2).sum(-1) @ w), 1, atol=1e-5)


def test_ring_sampler_is_exact_for_linear_images():
    box, radii = 32, np.array([1.0, 4.5, 10.0, 15.0])
    grid = np.arange(box) - box // 2
    image = (2.0 * grid[None, :] - 0.5 * grid[:, None]).astype(np.float32)  # 2x - y/2
    rings = align2d.sample_rings(image[None], align2d.ring_sampler(box, radii, W), len(radii))
    theta = 2 * np.pi * np.arange(W) / W
    expected = radii[:, None] * (2.0 * np.cos(theta) - 0.5 * np.sin(theta))
    np.testing.assert_allclose(rings[0], expected, atol=1e-4)


def test_fourier_shift_matches_the_foundation(rng):
    images = rng.normal(size=(4, 24, 24)).astype(np.float32)
    shifts = rng.normal(size=(4, 2)) * 3
    np.testing.assert_allclose(
        align2d.fourier_shift(images, shifts), shift_images(images, shifts), atol=1e-5
    )


def _band_limited(box, shift=(0.0, 0.0)):
    """A smooth periodic image (a few low-frequency waves), moved by ``shift`` (x, y) px, and
    the function itself (x, y measured from the box centre)."""
    waves = [(1, 2, 0.3), (3, -1, 1.1), (-4, 5, 2.0), (6, 3, -0.4)]

    def f(x, y):
        x, y = x - shift[0], y - shift[1]
        return sum(np.cos(2 * np.pi * (a * x + b * y) / box + p) for a, b, p in waves)

    g = np.arange(box, dtype=np.float64) - box // 2
    return f(g[None, :], g[:, None]).astype(np.float32), f


def test_spline_rings_interpolate_far_better_than_bilinear():
    box, radii = 32, np.array([3.0, 7.5, 12.0])
    image, f = _band_limited(box)
    theta = 2 * np.pi * np.arange(W) / W
    exact = f(radii[:, None] * np.cos(theta), radii[:, None] * np.sin(theta))
    linear = align2d.sample_rings(image[None], align2d.ring_sampler(box, radii, W), 3)[0]
    coefficients = align2d.fourier_shift(image[None], np.zeros((1, 2)), prefilter=True)
    spline = align2d.sample_rings(coefficients, align2d.ring_sampler(box, radii, W, 3), 3)[0]
    assert np.abs(spline - exact).max() < 0.02 < 0.2 < np.abs(linear - exact).max()


def test_prefiltered_fourier_shift_is_the_spline_of_the_moved_image(rng):
    images = rng.normal(size=(3, 24, 24)).astype(np.float32)
    shifts = rng.normal(size=(3, 2)) * 2
    moved = shift_images(images, shifts).astype(np.float64)
    k = np.fft.fftfreq(24)
    gain = 2 / 3 + np.cos(2 * np.pi * k) / 3
    expected = np.fft.ifft2(np.fft.fft2(moved) / (gain[:, None] * gain[None, :])).real
    np.testing.assert_allclose(
        align2d.fourier_shift(images, shifts, prefilter=True), expected, atol=2e-4
    )


def test_whole_pixel_origins_by_indexing_equal_the_fourier_shift(rng):
    """Whole-pixel origins move the images by indexing (the search's centres): the same
    spectra as the exact Fourier shift; origins whose rings would wrap take the shift."""
    box, radii = 40, align2d.ring_radii(1, 16, 1)
    w = align2d.ring_points(16)
    images = rng.normal(size=(40, box, box)).astype(np.float32)
    whole = align2d.whole_pixel_centres(rng.uniform(-3.6, 3.6, size=(40, 2)), room=3)
    assert np.abs(whole).max() <= 3 and np.all(whole == np.rint(whole))
    by_index = align2d.image_spectra(images, whole, radii, w).values
    by_shift = align2d.image_spectra(images, whole + 1e-9, radii, w).values
    np.testing.assert_allclose(by_index, by_shift, atol=2e-5)
    tr = align2d._cached_transform(box, tuple(radii), w, align2d.coarse_fold(w))
    assert align2d._whole_pixels(whole, tr.pixels, box)
    assert not align2d._whole_pixels(whole * 2, tr.pixels, box)  # would wrap: Fourier shift


@pytest.mark.parametrize("order, tolerance", [(3, 3e-4), (1, 0.01)])
def test_rings_at_their_own_lengths_keep_the_band(order, tolerance):
    """Each ring sampled at SPARX's length (at least W / fold): for a smooth image the
    spectra equal those of rings of W points, in the columns of ring_layout. B-spline rings
    to 1e-4; bilinear ones alias their pixel-grid residue (about 2 pi r turns round a ring of
    radius r) into the band of the rings of 64 points (r <= 10 here), about 1%."""
    box, radii, w = 48, align2d.ring_radii(1, 20, 1), align2d.ring_points(20)
    fold = align2d.coarse_fold(w)
    lengths = align2d.ring_lengths(radii, w, fold)
    assert lengths[0] == w // fold and lengths[-1] == w and np.all(np.diff(lengths) >= 0)
    image = (_band_limited(box)[0] * align2d.disc_mask(box, 21))[None]
    values = align2d.image_spectra(image, np.zeros((1, 2)), radii, w, order=order).values[0]
    if order == 3:  # the spline coefficients the rings interpolate
        image = align2d.fourier_shift(image, np.zeros((1, 2)), prefilter=True)
    sampler = align2d.ring_sampler(box, radii, w, order)
    rings = align2d.sample_rings(image, sampler, len(radii))
    spectra = align2d.normalized_spectra(rings, align2d.ring_weights(radii))
    full = align2d.FoldedSpectra.from_spectra(spectra, fold).values[0]  # (Q', fold R)
    term, ring, coarse = align2d.ring_layout(radii, w, fold)
    assert len(term) == values.shape[-1] < fold * len(radii) and coarse.sum() <= len(term)
    expected = full[:, term * len(radii) + ring]
    np.testing.assert_allclose(values, expected, atol=tolerance * np.abs(expected).max())


def test_refine_poses_of_matches(rng):
    """Band-limited images turned, mirrored and moved off-grid: from matches up to half a
    pixel off, the refinement finds the poses to the interpolation's precision."""
    box, n = 48, 40
    views = np.stack([_band_limited(box, (s, -s))[0] for s in (0.0, 1.7)])
    views *= align2d.disc_mask(box, 20)
    ref = rng.integers(0, 2, n)
    psi = rng.uniform(-180, 180, n)
    mirror = rng.random(n) < 0.5
    origin = rng.uniform(-2, 2, size=(n, 2))
    images = align2d.from_reference_frame(views[ref], psi, mirror, origin)
    radii = align2d.ring_radii(1, 18, 1)
    fine = align2d.prepare_references(views, radii, align2d.ring_points(18), 1, 1, 0.5, order=3)
    start = origin + rng.uniform(-0.5, 0.5, size=(n, 2))
    est_psi, est_origin, score, refined = align2d.refine_poses(
        images, start, ref, mirror, fine, radii, room=5
    )
    assert refined.all() and np.all(score > 0.99)
    assert np.abs(geometry.wrap_degrees(est_psi - psi)).max() < 0.2
    assert np.linalg.norm(est_origin - origin, axis=1).max() < 0.05
    # an image whose rings would leave it is left as it is
    far = start.copy()
    far[0] = [6.0, 0.0]
    _, kept, _, refined = align2d.refine_poses(images, far, ref, mirror, fine, radii, room=5)
    assert not refined[0] and np.array_equal(kept[0], far[0]) and refined[1:].all()


def test_phase_centre_of_gravity():
    box = 48
    g = np.arange(box) - box // 2
    y, x = np.meshgrid(g, g, indexing="ij")
    blob = np.exp(-((x - 3.0) ** 2 + (y + 2.0) ** 2) / 10.0)
    np.testing.assert_allclose(align2d.phase_centre_of_gravity(blob[None])[0], [3, -2], atol=0.05)
    # SPARX's known flaw: inverted contrast moves it by half the box
    flipped = align2d.phase_centre_of_gravity(-blob[None])[0]
    np.testing.assert_allclose(np.abs(flipped - [3, -2]), [box / 2, box / 2], atol=0.05)


def test_shift_grid():
    grid, nx, ny = align2d.shift_grid(2, 1, 1)
    assert (nx, ny) == (5, 3) and len(grid) == 15
    np.testing.assert_allclose(grid[0], [-2, -1])
    np.testing.assert_allclose(grid[1], [-1, -1])  # x fastest
    assert len(align2d.shift_grid(0, 0, 1)[0]) == 1


def test_resample_linear_and_cubic(rng):
    images = rng.normal(size=(6, 20, 20)).astype(np.float32)
    angles = rng.uniform(0, 2 * np.pi, 6)
    a = np.stack([[[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]] for t in angles])
    b = rng.normal(size=(6, 2))
    g = np.arange(20) - 10
    sy, sx = np.meshgrid(g, g, indexing="ij")
    linear, cubic = (
        align2d.resample_images(images, a, b, 1),
        align2d.resample_images(images, a, b, 3),
    )
    for i in range(6):
        x = a[i, 0, 0] * sx + a[i, 0, 1] * sy + b[i, 0] + 10
        y = a[i, 1, 0] * sx + a[i, 1, 1] * sy + b[i, 1] + 10
        inside = (x >= 0) & (x <= 19) & (y >= 0) & (y <= 19)
        ref1 = ndimage.map_coordinates(images[i], [y, x], order=1)
        np.testing.assert_allclose(linear[i][inside], ref1[inside], atol=1e-5)
        ref3 = ndimage.map_coordinates(np.pad(images[i], 4), [y + 4, x + 4], order=3, mode="mirror")
        np.testing.assert_allclose(cubic[i], ref3, atol=1e-4)


def test_in_plane_transform_matches_relion_projection(rng):
    """image(r) = ref(L (r + origin)): turning a projection by psi and moving it by the
    displacement -origin must equal projecting at (rot, tilt, psi) with that displacement."""
    box = 48
    atoms = random_structure(rng, n_atoms=120, radius=28.0, sigma=5.0)
    rot, tilt = 30.0, 70.0
    psi = np.array([25.0, -140.0, 90.0])
    displacement = np.array([[1.5, -2.0], [0.0, 2.5], [-1.2, 0.7]])  # pixels
    view = project_atoms(
        atoms.coords,
        atoms.amplitudes,
        atoms.sigmas,
        geometry.euler_to_matrix(rot, tilt, 0.0)[None],
        box,
        2.0,
    )
    truth = project_atoms(
        atoms.coords,
        atoms.amplitudes,
        atoms.sigmas,
        geometry.euler_to_matrix(rot, tilt, psi),
        box,
        2.0,
        displacement * 2.0,
    )
    made = align2d.from_reference_frame(
        np.repeat(view, 3, 0),
        psi,
        np.zeros(3, bool),
        geometry.origin_from_displacement(displacement),
    )
    scale = np.abs(truth).max()
    np.testing.assert_allclose(made, truth, atol=0.01 * scale)
    back = align2d.to_reference_frame(
        truth, psi, np.zeros(3, bool), geometry.origin_from_displacement(displacement), order=3
    )
    inner = np.hypot(*np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2)) < 18
    np.testing.assert_allclose(back[:, inner], np.repeat(view, 3, 0)[:, inner], atol=0.01 * scale)


def test_project_volume_agrees_on_psi(rng):
    """The same convention through the map projector (spline interpolation of a volume)."""
    box = 32
    atoms = random_structure(rng, n_atoms=60, radius=18.0, sigma=4.0)
    coeffs = spline_coefficients(
        voxelize_atoms(atoms.coords, atoms.amplitudes, atoms.sigmas, box, 2.0)
    )
    view = project_volume(coeffs, geometry.euler_to_matrix(10.0, 50.0, 0.0)[None])
    truth = project_volume(coeffs, geometry.euler_to_matrix(10.0, 50.0, 60.0)[None])
    made = align2d.from_reference_frame(view, [60.0], [False], np.zeros((1, 2)))
    np.testing.assert_allclose(made, truth, atol=0.02 * np.abs(truth).max())


@pytest.fixture(scope="module")
def views():
    """Three distinct, asymmetric 48-pixel references: a few Gaussian blobs each."""
    rng = np.random.default_rng(5)
    g = np.arange(48) - 24
    y, x = np.meshgrid(g, g, indexing="ij")
    out = np.zeros((3, 48, 48), np.float32)
    for k in range(3):
        for _ in range(6):
            cx, cy = rng.uniform(-11, 11, 2)
            s2 = 2 * rng.uniform(1.5, 3.5) ** 2
            out[k] += rng.uniform(0.5, 1.5) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / s2)
    return out


@pytest.mark.parametrize("offset_scale", [0.0, 1.4])
def test_search_recovers_known_transforms(views, rng, offset_scale):
    """Noise-free images of the views, turned, mirrored and shifted: the search about each
    image's current shift finds reference, mirror, angle and the remaining shift (kept
    within 2 px of the current one, inside the +-3 px grid)."""
    n = 80
    ref = rng.integers(0, 3, n)
    psi = rng.uniform(-180, 180, n)
    mirror = rng.random(n) < 0.5
    current = rng.uniform(-2, 2, size=(n, 2))  # the images' current origins
    origin = current + rng.uniform(-offset_scale, offset_scale, size=(n, 2))
    images = align2d.from_reference_frame(views[ref], psi, mirror, origin)
    radii = align2d.ring_radii(1, 16, 1)
    n_angles = align2d.ring_points(16)
    refs = align2d.prepare_references(views, radii, n_angles, 3, 3, 1)
    result = align2d.search(align2d.image_spectra(images, current, radii, n_angles), refs)
    est_psi, est_origin, est_mirror = result.to_params(current)
    angle_error = np.abs(geometry.wrap_degrees(est_psi - psi))
    shift_error = np.linalg.norm(est_origin - origin, axis=1)
    assert np.all(result.reference == ref)
    assert np.all(est_mirror == mirror)
    assert np.all(result.score > 0.98)
    if offset_scale == 0:  # on a grid point: only interpolation errors remain
        assert angle_error.max() < 0.3 and shift_error.max() < 0.05
    else:
        assert angle_error.max() < 1.2 and angle_error.mean() < 0.35
        assert shift_error.max() < 0.3 and shift_error.mean() < 0.1


def test_centre_of_mass_ignores_contrast_and_lowpass():
    box = 48
    g = np.arange(box) - box // 2
    y, x = np.meshgrid(g, g, indexing="ij")
    blob = np.exp(-((x - 3.2) ** 2 + (y + 1.5) ** 2) / 18.0) + 0.6 * np.exp(
        -((x - 6.2) ** 2 + (y - 1.5) ** 2) / 8.0
    )
    expected = align2d.centre_of_mass(blob[None], 20)[0]
    for image in (blob, -blob, 3 - blob, align2d.lowpass(blob[None], 0.08)[0]):
        np.testing.assert_allclose(align2d.centre_of_mass(image[None], 20)[0], expected, atol=0.2)
    assert expected[0] > 3  # pulled towards the heavier lobe


def test_fourier_ring_correlation(rng):
    a = rng.normal(size=(4, 64, 64))
    frc = align2d.fourier_ring_correlation(a, a)
    np.testing.assert_allclose(frc[:, 1:], 1.0, atol=1e-12)
    noise = align2d.fourier_ring_correlation(a, rng.normal(size=(4, 64, 64)))
    # independent noise: mean 0, about 1/sqrt(2 pi k) spread at shell k
    shells = np.arange(noise.shape[1])
    assert np.all(np.abs(noise[:, 8:]) < 5 / np.sqrt(2 * np.pi * shells[8:]))
    assert abs(noise[:, 8:].mean()) < 0.03
    signal = rng.normal(size=(4, 64, 64))
    half = align2d.fourier_ring_correlation(signal + a, signal + rng.normal(size=(4, 64, 64)))
    assert abs(half[:, 8:].mean() - 0.5) < 0.05  # equal signal and noise power: FRC 1/2


@pytest.mark.gpu
def test_search_on_the_gpu_matches_numpy(views, rng):
    import cupy

    n = 40
    psi = rng.uniform(-180, 180, n)
    mirror = rng.random(n) < 0.5
    origin = rng.uniform(-1.5, 1.5, size=(n, 2))
    images = align2d.from_reference_frame(views[rng.integers(0, 3, n)], psi, mirror, origin)
    radii = align2d.ring_radii(1, 16, 1)
    w = align2d.ring_points(16)
    zero = np.zeros((n, 2))
    cpu = align2d.search(
        align2d.image_spectra(images, zero, radii, w),
        align2d.prepare_references(views, radii, w, 2, 2, 1),
    )
    gpu = align2d.search(
        align2d.image_spectra(cupy.asarray(images), zero, radii, w),
        align2d.prepare_references(cupy.asarray(views), radii, w, 2, 2, 1),
    )
    np.testing.assert_array_equal(gpu.reference, cpu.reference)
    np.testing.assert_array_equal(gpu.mirror, cpu.mirror)
    np.testing.assert_allclose(gpu.angle, cpu.angle, atol=0.05)
    np.testing.assert_allclose(gpu.shift, cpu.shift, atol=0.01)
    # and the final refinement of those matches
    start = cpu.to_params(zero)[1]
    fine = [
        align2d.prepare_references(v, radii, w, 1, 1, 0.5, order=3)
        for v in (views, cupy.asarray(views))
    ]
    args = (start, cpu.reference, cpu.mirror)
    cpu_psi, cpu_origin, _, _ = align2d.refine_poses(images, *args, fine[0], radii, 3)
    gpu_psi, gpu_origin, _, _ = align2d.refine_poses(cupy.asarray(images), *args, fine[1], radii, 3)
    np.testing.assert_allclose(geometry.wrap_degrees(gpu_psi - cpu_psi), 0, atol=0.05)
    np.testing.assert_allclose(gpu_origin, cpu_origin, atol=0.01)
