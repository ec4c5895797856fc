"""The subtomogram averaging loop: wedge-weighted averaging and symmetry (known answers),
the loop's outputs, half sets, step narrowing and convergence, and (slow) the issue's
accuracy figures on a real map at orientations all over SO(3)."""

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryomatch import geometry
from cryomatch.alignment.local import to_prior_frame
from cryomatch.alignment.tilt import single_axis
from cryomatch.errors import CryomatchError
from cryomatch.io.files import read_csv
from cryomatch.io.mrc import read_volume
from cryomatch.io.star import read_star
from cryomatch.kernels import fsc as fsc_kernels
from cryomatch.kernels.average3d import symmetrize, wedge_weighted_sums, wiener_average
from cryomatch.kernels.volumes import fourier_filter
from cryomatch.stages.simulate.subvolumes import _moved_map, read_simulated, simulate_subvolumes
from cryomatch.stages.subtomo import subtomo_align
from cryomatch.stages.subtomo_refine import refine_align, refine_init, refine_merge
from cryomatch.symmetry import point_group

BOX = 32


def _blob(rng, box=BOX):
    """A sharp-edged asymmetric object: three boxes of different sizes."""
    v = np.zeros((box,) * 3, dtype=np.float32)
    for _ in range(3):
        lo = rng.integers(8, box // 2, 3)
        size = rng.integers(3, 7, 3)
        v[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] += rng.uniform(0.5, 1.5)
    return v


def _pose_average(volumes, quats, shifts, tilt=(-60, 60)):
    turned = np.stack(
        [to_prior_frame(v, q, s) for v, q, s in zip(volumes, quats, shifts, strict=True)]
    )
    model = single_axis(tilt)
    wedges = np.stack([model.rfft_mask(Rotation.from_quat(q), volumes.shape[1:]) for q in quats])
    num, den = wedge_weighted_sums(turned, wedges)
    return wiener_average(num, den, volumes.shape[1:], 0.05)


def test_wedge_weighted_average_fills_the_wedge(rng):
    """Noise-free copies of a sharp-edged object at random orientations, each missing its
    wedge: the wedge-weighted average recovers the object far better than the plain mean
    of the turned-back copies (which keeps the wedges' attenuation)."""
    truth = _blob(rng)
    quats = Rotation.random(16, random_state=3).as_quat()
    shifts = rng.uniform(-1.5, 1.5, (16, 3))
    wedge = single_axis((-60, 60)).rfft_mask(None, (2 * BOX,) * 3)
    crop = (slice(BOX // 2, BOX // 2 + BOX),) * 3
    volumes = np.stack(
        [
            fourier_filter(_moved_map(truth, q, s, 2 * BOX)[None], wedge)[0][crop]
            for q, s in zip(quats, shifts, strict=True)
        ]
    )
    average = _pose_average(volumes, quats, shifts)
    plain = np.mean(
        [to_prior_frame(v, q, s) for v, q, s in zip(volumes, quats, shifts, strict=True)], axis=0
    )
    err = [np.linalg.norm(m - truth) / np.linalg.norm(truth) for m in (average, plain)]
    print(f"relative error: wedge-weighted {err[0]:.3f}, plain mean {err[1]:.3f}")
    assert err[0] < 0.15
    assert err[1] > 2 * err[0]


def test_symmetrize_c4_and_fsc_units(rng):
    v = _blob(rng)
    matrices = geometry.relion_to_zyx_matrix(point_group("C4"))
    centre = geometry.relion_centre(v.shape)
    sym = symmetrize(v, matrices, centre)
    turned = symmetrize(sym, matrices[1:2], centre)  # one quarter turn about z
    inner = (slice(4, -4),) * 3
    np.testing.assert_allclose(turned[inner], sym[inner], atol=0.02 * float(sym.max()))
    assert np.corrcoef(v.ravel(), sym.ravel())[0, 1] < 0.9  # v itself is not C4


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    sim = tmp_path_factory.mktemp("loop_sim")
    simulate_subvolumes(
        sim, n=12, snr=1.0, box=BOX, seed=4, max_shift=1.5, uniform=True, prior_error=3.0
    )
    out = tmp_path_factory.mktemp("loop")
    refine_init(
        out,
        sim / "templates" / "template_01.mrc",
        star=sim / "priors.star",
        initial_lowpass=30.0,
        angular_range=4.0,
        angular_step=4.0,
    )
    states = []
    for it in (1, 2):
        for chunk in (0, 1):
            refine_align(
                out,
                it,
                chunk,
                star=sim / "priors.star",
                mask=sim / "mask.mrc",
                max_shifts=(2, 2, 2),
                chunk_size=6,
            )
        states.append(
            refine_merge(
                out,
                it,
                2,
                mask=sim / "mask.mrc",
                converge_angle=2.0,
                converge_shift=0.5,
                min_step=1.0,
            )
        )
    return sim, out, states


def test_loop_outputs(loop):
    sim, out, states = loop
    apix = float(read_star(sim / "priors.star")["optics"]["rlnImagePixelSize"].iloc[0])
    fsc = read_csv(out / "it001" / "fsc.csv")
    assert fsc["frequency"].iloc[-1] == pytest.approx(1 / (2 * apix))  # 1/A up to Nyquist
    assert np.isfinite(states[0]["resolution"]) and states[0]["resolution"] < 60
    for name in (
        "half1.mrc",
        "half2.mrc",
        "reference1.mrc",
        "average.mrc",
        "fsc.png",
        "sections.png",
        "particles.star",
    ):
        assert (out / "it002" / name).is_file()
    # half sets split once, kept: the priors' rlnRandomSubset all the way through
    halves = read_star(sim / "priors.star")["particles"]["rlnRandomSubset"].to_numpy()
    for it in ("it000", "it001", "it002"):
        t = read_star(out / it / "particles.star")["particles"]
        np.testing.assert_array_equal(t["rlnRandomSubset"].to_numpy(), halves)
    assert states[0]["n_particles"] == [6, 6]
    # the step narrows with the resolution (never widens), the range follows
    assert states[0]["step"] <= 4.0 and states[1]["step"] <= states[0]["step"]
    assert states[0]["range"] <= 4.0
    # poses closer to the truth than the priors
    truth = read_star(sim / "subvolumes.star")["particles"]
    priors = read_star(sim / "priors.star")["particles"]
    final = read_star(out / "it002" / "particles.star")["particles"]
    a = [
        geometry.euler_to_matrix(t.rlnAngleRot, t.rlnAngleTilt, t.rlnAnglePsi)
        for t in (truth, priors, final)
    ]
    assert geometry.angle_between_rotations(a[2], a[0]).mean() < 3.0
    assert np.allclose(geometry.angle_between_rotations(a[1], a[0]), 3.0, atol=1e-3)


def test_loop_converged_iterations_are_copies(loop):
    sim, out, states = loop
    assert not states[0]["converged"] and states[1]["converged"]  # thresholds above
    for chunk in (0, 1):
        refine_align(out, 3, chunk, star=sim / "priors.star", mask=sim / "mask.mrc", chunk_size=6)
    state = refine_merge(out, 3, 2, mask=sim / "mask.mrc")
    assert state["copied_from"] == 2 and state["resolution"] == states[1]["resolution"]
    np.testing.assert_array_equal(
        read_volume(out / "it003" / "average.mrc")[0], read_volume(out / "it002" / "average.mrc")[0]
    )


def test_loop_bad_input(loop, tmp_path):
    sim, out, _ = loop
    with pytest.raises(CryomatchError, match="previous iteration"):
        refine_align(out, 9, 0, star=sim / "priors.star")
    with pytest.raises(CryomatchError, match="chunk 5 does not exist"):
        refine_align(out, 1, 5, star=sim / "priors.star", chunk_size=6)


# --- the accuracy figures (slow) --------------------------------------------------
def _real_so3(out, real_data, seed):
    simulate_subvolumes(
        out,
        n=32,
        snr=0.1,
        box=BOX,
        seed=seed,
        max_shift=2.0,
        map_path=real_data / "maps" / "emd_1832.map",
        uniform=True,
        prior_error=10.0,
        prior_shift_error=1.0,
    )
    return out


@pytest.fixture(scope="module")
def real_so3(tmp_path_factory, real_data):
    return _real_so3(tmp_path_factory.mktemp("real_so3"), real_data, 2026)


def _errors(table, truth, apix):
    a = [
        geometry.euler_to_matrix(t.rlnAngleRot, t.rlnAngleTilt, t.rlnAnglePsi)
        for t in (table, truth)
    ]
    o = [t[[f"rlnOrigin{x}Angst" for x in "XYZ"]].to_numpy(float) for t in (table, truth)]
    return geometry.angle_between_rotations(*a), np.linalg.norm(o[0] - o[1], axis=1) / apix


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2026, 7])
def test_every_particle_within_tolerance(real_so3, real_data, tmp_path, seed):
    """Copies of EMD-1832 at uniform orientations, priors 10 degrees off, SNR 0.1, wedge
    +-60: a search about the priors and one finer about its result put every particle
    within 1.5 degrees and 0.5 voxel."""
    if seed != 2026:
        real_so3 = _real_so3(tmp_path / "sim", real_data, seed)
    template, mask = real_so3 / "templates" / "template_01.mrc", real_so3 / "mask.mrc"
    subtomo_align(
        tmp_path / "p1",
        [template],
        star=real_so3 / "priors.star",
        mask=mask,
        max_shifts=(3, 3, 3),
        prior_search={"range": 12.0, "step": 4.0},
    )
    # the first pass's STAR names the stack relative to its own folder: point it back
    t = read_star(tmp_path / "p1" / "subtomo.star")
    t["particles"]["rlnImageName"] = [
        f"{k}@{real_so3 / p}" for k, p in t["particles"]["rlnImageName"].str.split("@")
    ]
    from cryomatch.io.star import write_star

    write_star(tmp_path / "p1.star", t)
    table = subtomo_align(
        tmp_path / "p2",
        [template],
        star=tmp_path / "p1.star",
        mask=mask,
        max_shifts=(1, 1, 1),
        prior_search={"range": 3.0, "step": 1.5},
    )
    blocks = read_star(real_so3 / "subvolumes.star")
    apix = float(blocks["optics"]["rlnImagePixelSize"].iloc[0])
    rot, shift = _errors(table, blocks["particles"], apix)
    print(
        f"about 10-degree priors: rotation {rot.mean():.2f} mean, {rot.max():.2f} max deg; "
        f"shift {shift.mean():.2f} mean, {shift.max():.2f} max voxel"
    )
    assert rot.max() <= 1.5
    assert shift.max() <= 0.5


@pytest.mark.slow
def test_loop_resolution_near_true_poses(real_so3, tmp_path):
    """After the loop, the half-set FSC resolution is within 10% of the one the same
    averaging gives with the true poses."""
    out = tmp_path / "loop"
    refine_init(
        out,
        real_so3 / "templates" / "template_01.mrc",
        star=real_so3 / "priors.star",
        initial_lowpass=40.0,
        angular_range=12.0,
        angular_step=4.0,
    )
    mask = real_so3 / "mask.mrc"
    for it in (1, 2):
        refine_align(
            out,
            it,
            0,
            star=real_so3 / "priors.star",
            mask=mask,
            chunk_size=32,
            max_shifts=(3, 3, 3),
        )
        state = refine_merge(out, it, 1, mask=mask, wiener=1.0)
    volumes, _, mask_arr, _, quats, shifts = read_simulated(real_so3)
    halves = read_star(real_so3 / "priors.star")["particles"]["rlnRandomSubset"].to_numpy()
    maps = []
    for h in (1, 2):
        sel = halves == h
        turned = np.stack(
            [to_prior_frame(volumes[i], quats[i], shifts[i]) for i in np.flatnonzero(sel)]
        )
        model = single_axis((-60, 60))
        wedges = np.stack(
            [model.rfft_mask(Rotation.from_quat(q), volumes.shape[1:]) for q in quats[sel]]
        )
        maps.append(wiener_average(*wedge_weighted_sums(turned, wedges), volumes.shape[1:], 1.0))
    apix = json.loads((out / "it000" / "state.json").read_text())["angpix"]
    freq, curve = fsc_kernels.fsc(maps[0] * mask_arr, maps[1] * mask_arr, apix)
    true_res = fsc_kernels.resolution_at(freq, curve, 0.143)
    print(f"loop {state['resolution']:.1f} A, true poses {true_res:.1f} A")
    assert abs(state["resolution"] - true_res) <= 0.1 * true_res


def test_loop_without_priors_searches_about_the_identity(tmp_path):
    """A bare volume stack has no priors: iteration 1 searches the (max, step) grid about
    the identity, as ``subtomo align`` does, and iteration 2 goes on about its poses."""
    sim = tmp_path / "sim"
    simulate_subvolumes(sim, n=8, snr=2.0, box=24, seed=3, max_angle=2.0, max_shift=1.0)
    out = tmp_path / "loop"
    stack = sim / "subvolumes.mrcs"
    state = refine_init(
        out,
        sim / "templates" / "template_01.mrc",
        subvolumes=stack,
        angpix=8.0,
        initial_lowpass=30.0,
        angular_range=4.0,
        angular_step=2.0,
    )
    assert not state["priors"]
    for it in (1, 2):
        refine_align(
            out, it, 0, subvolumes=stack, chunk_size=8, rotations=[(2, 2)] * 3, max_shifts=(2, 2, 2)
        )
        state = refine_merge(out, it, 1)
    table = read_star(out / "it002" / "particles.star")["particles"]
    truth = read_star(sim / "subvolumes.star")["particles"]
    rot, shift = _errors(table, truth, 8.0)
    assert rot.mean() < 2.0 and shift.mean() < 0.3
    assert np.isfinite(state["mean_angle_change"])
