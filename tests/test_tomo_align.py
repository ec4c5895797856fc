"""Known-answer tests of tilt-series alignment: a phantom of ellipsoids and beads projected
at -60..60 degrees with known subpixel shifts up to 8 pixels; errors are compared after
removing the unobservable components (mean and cos/sin across the axis, mean along it)."""

import numpy as np
import pytest

from cryomatch.errors import CryomatchError
from cryomatch.geometry import remove_unobservable
from cryomatch.kernels import tiltalign, tiltaxis
from cryomatch.kernels.ellipsoids import project, random_phantom
from cryomatch.stages.tomo.align import align_stack

ANGLES = np.arange(-60, 61, 2.0)


def simulate(size=64, noise=0.0, seed=100, max_shift=8.0, tilt_axis=0.0, angles=ANGLES):
    rng = np.random.default_rng(seed)
    phantom = random_phantom(rng, size)
    truth = rng.uniform(-max_shift, max_shift, size=(len(angles), 2))
    clean = project(phantom, angles, (size, size), truth, tilt_axis)
    stack = clean + rng.normal(size=clean.shape).astype(np.float32) * noise * clean.std()
    return stack, truth


def error(shifts, truth, angles=ANGLES):
    """RMS error (x across, y along) after removing the unobservable components."""
    r = remove_unobservable(np.asarray(shifts) - truth, angles)
    return np.sqrt((r**2).mean(axis=0))


@pytest.fixture(scope="module")
def clean64():
    return simulate(noise=0.0)


@pytest.fixture(scope="module")
def noisy64():
    return simulate(noise=0.15, seed=101)


def test_own_method_noise_free(clean64):
    stack, truth = clean64
    result = align_stack(stack, "reprojection", angles=ANGLES, show_progressbar=False)
    assert error(result.shifts, truth).max() <= 0.1
    assert result.record and result.record[-1][1] < 0.05  # converged


def test_own_method_at_noise_015(noisy64):
    stack, truth = noisy64
    result = align_stack(stack, "reprojection", angles=ANGLES, show_progressbar=False)
    assert error(result.shifts, truth).max() <= 0.3


@pytest.mark.parametrize(
    "method, bound", [("COM", 0.1), ("COM-CL", 0.1), ("StackReg", 0.2), ("PC", 0.6)]
)
def test_etspy_methods_noise_free(clean64, method, bound):
    stack, truth = clean64
    result = align_stack(stack, method, angles=ANGLES, show_progressbar=False)
    assert error(result.shifts, truth).max() <= bound


def test_com_applies_along_axis_shifts_first_and_works_on_small_images():
    # etspy computes the centres of mass on the stack before its along-axis shifts (7 px
    # errors with jitter along the axis) and fails below ~100 px: 40 px, jitter 8 px
    stack, truth = simulate(size=40, seed=7, max_shift=5.0)
    result = align_stack(stack, "COM", angles=ANGLES, p=8, nslices=10, show_progressbar=False)
    assert error(result.shifts, truth).max() <= 0.1


def test_com_cl_uses_the_reference_image_not_its_index(clean64):
    stack, truth = clean64
    for ref in (5, 30, 55):
        result = align_stack(
            stack,
            "COM-CL",
            angles=ANGLES,
            com_ref_index=ref,
            cl_ref_index=ref,
            show_progressbar=False,
        )
        assert error(result.shifts, truth).max() <= 0.1
        # the reference image itself is not moved across the axis
        assert abs(result.shifts[ref, 0]) < 1e-9


def test_start_defaults_to_the_tilt_nearest_zero(clean64):
    stack, truth = clean64
    order = np.r_[10:61, 0:10]  # a series starting at -40 degrees
    angles = ANGLES[order]
    assert tiltalign.default_start(angles) == 20
    result = align_stack(stack[order][:51], "StackReg", angles=angles[:51], show_progressbar=False)
    assert np.abs(result.shifts[20]).max() == 0.0  # chained methods keep the start fixed


def test_tilt_axis_angle_and_offset():
    stack, truth = simulate(seed=102, max_shift=6.0, tilt_axis=3.0)
    aligned = tiltalign.shift_stack(tiltalign.rotate_stack(stack, 0.0), truth)
    assert tiltaxis.tilt_axis_angle(aligned) == pytest.approx(3.0, abs=0.2)
    exact = tiltalign.shift_stack(tiltalign.rotate_stack(stack, 3.0), truth)
    assert tiltaxis.tilt_axis_offset(exact, ANGLES) == pytest.approx(0.0, abs=0.05)
    moved = tiltalign.shift_stack(exact, np.tile([2.5, 0.0], (len(ANGLES), 1)))
    assert tiltaxis.tilt_axis_offset(moved, ANGLES) == pytest.approx(2.5, abs=0.1)


def test_chained_pc_breaks_at_low_snr_where_ours_does_not():
    stack, truth = simulate(noise=1.0, seed=103)
    ours = align_stack(stack, "reprojection", angles=ANGLES, show_progressbar=False)
    pc = align_stack(stack, "PC", angles=ANGLES, show_progressbar=False)
    assert error(ours.shifts, truth).max() <= 0.3
    assert error(pc.shifts, truth).max() > 2.0


def test_bad_arguments(clean64):
    stack, _ = clean64
    with pytest.raises(CryomatchError, match="unknown alignment method"):
        align_stack(stack, "SIFT", angles=ANGLES)
    with pytest.raises(CryomatchError, match="needs the tilt angles"):
        align_stack(stack, "COM")
    with pytest.raises(CryomatchError, match="60 tilt angles for 61 images"):
        align_stack(stack, "PC", angles=ANGLES[:-1])
    with pytest.raises(CryomatchError, match="at least 2 images"):
        align_stack(stack[:1], "PC")
    with pytest.raises(CryomatchError, match="cl_resolution"):
        align_stack(stack, "COM-CL", cl_resolution=0.7, show_progressbar=False)


@pytest.mark.parametrize("noise, bound", [(0.0, 0.1), (0.15, 0.3)])
def test_own_method_128px(noise, bound):
    stack, truth = simulate(size=128, noise=noise, seed=104)
    result = align_stack(stack, "reprojection", angles=ANGLES, show_progressbar=False)
    assert error(result.shifts, truth).max() <= bound
