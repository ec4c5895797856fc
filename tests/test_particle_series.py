"""Particle series: Fourier insertion kernels, the readers, reconstruction on simulated and
real data (WarpTools vs RELION, cryoDRGN-ET's per-tilt STAR), bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from cryomatch import geometry
from cryomatch.errors import CryomatchError, CryomatchWarning
from cryomatch.io.mrc import read_volume
from cryomatch.io.particle_series import read_particle_series
from cryomatch.kernels import backprojection as bp
from cryomatch.kernels.fsc import fsc
from cryomatch.kernels.projection import project_volume, spline_coefficients
from cryomatch.stages import particle_series as ps
from particle_series_sim import OPTIMISATION_SET, RELION_MAP, TOMOGRAMS, simulate

CRYODRGN = "tomo/cryoet_sta_cryodrgn/sta_testing_bin8.star"


def _cube_and_beads(box: int, rng) -> np.ndarray:
    """A sharp-edged off-centre cube plus Gaussian beads: nothing our simulator shaped."""
    vol = np.zeros((box,) * 3, dtype=np.float32)
    c = box // 2
    vol[c - 4 : c + 2, c - 3 : c + 4, c - 4 : c + 1] = 1.0
    z, y, x = np.meshgrid(*(np.arange(box),) * 3, indexing="ij")
    for centre in rng.uniform(c - 5, c + 5, size=(4, 3)):
        r2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
        vol += np.exp(-r2 / 2.0).astype(np.float32)
    return vol


# --- kernels -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gridding", ["trilinear", "nearest"])
def test_projections_at_random_poses_reconstruct_the_map(seed, gridding):
    rng = np.random.default_rng(seed)
    box, pad = 20, 2
    truth = _cube_and_beads(box, rng)
    matrices = geometry.random_rotations(300, rng).as_matrix()
    images = project_volume(spline_coefficients(truth), matrices)
    size = box * pad
    ky, kx, flat = bp.slice_grid(size, size // 2 - 1)
    data, weight = np.zeros(size**3, complex), np.zeros(size**3)
    spectra = bp.centred_fft2(images, size).reshape(len(images), -1)[:, flat]
    bp.insert_slices(data, weight, spectra, np.ones(spectra.shape), matrices, ky, kx, gridding)
    vol = bp.reconstruct(data, weight, box, 0.0, size // 2 - 1, gridding)
    _, curve = fsc(vol, truth)
    # projections by spline interpolation in real space vs slices inserted in Fourier space
    assert curve[1 : box // 4 + 1].min() > (0.99 if gridding == "trilinear" else 0.97)
    assert curve[1 : int(0.8 * box // 2)].min() > 0.9
    scale = float(np.sum(vol * truth) / np.sum(truth * truth))
    assert scale == pytest.approx(1.0, abs=0.05)  # the normalisation keeps the density scale


def test_extracted_slices_are_the_image_transforms():
    rng = np.random.default_rng(3)
    box, pad = 24, 2
    truth = _cube_and_beads(box, rng)
    matrices = geometry.random_rotations(5, rng).as_matrix() @ np.diag([1.0, 1.0, -1.0])
    images = project_volume(spline_coefficients(truth), matrices)
    ky, kx, flat = bp.slice_grid(box, box // 2 - 2)
    expected = bp.centred_fft2(images, box).reshape(5, -1)[:, flat]
    spectrum = bp.reference_spectrum(truth, pad)
    got = bp.extract_slices(spectrum, matrices, ky * pad, kx * pad)
    rel = np.abs(got - expected).sum(axis=1) / np.abs(expected).sum(axis=1)
    assert rel.max() < 0.05


def test_dose_and_bfactor_weights():
    k = np.array([0.0, 0.05, 0.1, 0.2])
    w = bp.dose_weights(k, np.array([0.0, 20.0, 60.0]))
    np.testing.assert_allclose(w[0], 1.0)
    assert np.all(np.diff(w[1]) < 0) and np.all(w[2] < w[1] + 1e-12)
    # Grant and Grigorieff: critical exposure at 0.1/A is 0.245 * 0.1^-1.665 + 2.81
    ne = 0.245 * 0.1**-1.665 + 2.81
    assert w[1, 2] == pytest.approx(np.exp(-20 / (2 * ne)))
    b = bp.bfactor_weights(k, np.array([100.0]))
    assert b[0, 3] == pytest.approx(np.exp(-100 * 0.04 / 4))


def test_search_grids():
    rots = ps.rotation_ball(6.0, 2.0)
    np.testing.assert_allclose(rots[0], np.eye(3))
    angles = geometry.angle_between_rotations(rots, np.eye(3))
    assert angles.max() <= 6.0 + 1e-6 and len(rots) == 123
    shifts = ps.shift_grid(2.0, 1.0)
    assert len(shifts) == 33 and np.linalg.norm(shifts, axis=1).max() <= 2.0


# --- simulated series ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_simulated_series_reconstructs_the_map(real_data, tmp_path, seed):
    truth, _ = read_volume(real_data / RELION_MAP)
    sim = simulate(tmp_path / "sim", real_data, truth, 12.0, 8, np.random.default_rng(seed))
    summary = ps.particle_series_reconstruct(
        sim["optimisation_set"], tmp_path / "out", reference=str(real_data / RELION_MAP)
    )
    got = summary["reference_unmasked"]
    assert got["fsc_at_half_nyquist"] > 0.97
    assert got["resolution_fsc_0.5_A"] < 27.0  # Nyquist is 24 A
    table = pd.read_csv(tmp_path / "out" / "fsc_reference.csv")
    assert table["fsc_unmasked"].iloc[1:13].min() > 0.93  # 8 particles leave small gaps
    average, _ = read_volume(tmp_path / "out" / "average.mrc")
    # the mirror matters: a z-mirrored truth correlates far less
    _, mirrored = fsc(average, truth[::-1].copy())
    assert mirrored[4:9].mean() < 0.8 * table["fsc_unmasked"].iloc[4:9].mean()


# --- real data --------------------------------------------------------------------------------
def test_warptools_reader(real_data):
    s = read_particle_series(real_data / OPTIMISATION_SET)
    assert (s.n_particles, s.box, s.pixel_size, s.premultiplied) == (40, 32, 12.0, True)
    table = starfile.read(real_data / OPTIMISATION_SET.replace("_optimisation_set", ""))[
        "particles"
    ]
    visible = sum(sum(json.loads(v)) for v in table["rlnTomoVisibleFrames"])
    assert len(s.tilts) == visible == 1430  # hidden tilts (rlnTomoVisibleFrames 0) left out
    assert np.isfinite(s.tilts["exposure"]).all()
    r = s.matrices
    np.testing.assert_allclose(
        r @ np.swapaxes(r, 1, 2), np.broadcast_to(np.eye(3), r.shape), atol=1e-5
    )
    np.testing.assert_allclose(np.linalg.det(r), -1.0, atol=1e-5)  # M A diag(1, 1, -1)


def test_warptools_average_agrees_with_relion(real_data, tmp_path):
    summary = ps.particle_series_reconstruct(
        real_data / OPTIMISATION_SET, tmp_path, reference=str(real_data / RELION_MAP)
    )
    # RELION's map is masked/tapered towards the box edge: compare inside a soft sphere
    masked = summary["reference_masked"]
    assert masked["half_nyquist_A"] == pytest.approx(48.0)
    assert masked["fsc_at_half_nyquist"] >= 0.6  # measured 0.708
    assert masked["resolution_fsc_0.5_A"] < 36.0  # measured 30.5 A
    assert summary["reference_unmasked"]["fsc_at_half_nyquist"] > 0.4  # measured 0.499
    for name in ("average.mrc", "half1.mrc", "half2.mrc", "fsc.png", "fsc_halves.csv"):
        assert (tmp_path / name).is_file()


def test_warptools_without_the_mirror_disagrees(real_data, tmp_path, monkeypatch):
    from cryomatch.io import particle_series as io_ps

    monkeypatch.setattr(io_ps, "Z_MIRROR", np.eye(3))
    summary = ps.particle_series_reconstruct(
        real_data / OPTIMISATION_SET, tmp_path, reference=str(real_data / RELION_MAP)
    )
    assert summary["reference_masked"]["fsc_at_half_nyquist"] < 0.2


def _cryodrgn_tilt_fsc(real_data, out, angpix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryomatchWarning)  # the stack's header is broken
        summary = ps.particle_series_reconstruct(
            real_data / CRYODRGN, out, angpix=angpix, split="tilts"
        )
    assert summary["halves_split_by"] == "tilts"
    return pd.read_csv(out / "fsc_halves.csv")["fsc"].to_numpy()


def test_cryodrgn_series_reads_and_reconstructs(real_data, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryomatchWarning)  # the stack's header is broken
        s = read_particle_series(real_data / CRYODRGN)
    assert (s.n_particles, len(s.tilts), s.box) == (6, 219, 64)
    assert s.pixel_size == pytest.approx(1.96)  # detector pixel / magnification
    assert (s.tilts["bfactor"] >= 0).all() and s.tilts["bfactor"].max() == 507.0
    assert s.layout == "relion3" and not s.premultiplied
    # each tilt's matrix is its row's own pose
    row = starfile.read(real_data / CRYODRGN).iloc[40]
    a = geometry.euler_to_matrix(row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"])
    np.testing.assert_allclose(s.matrices[40], a, atol=1e-9)
    # odd/even tilts share the particles but not the noise: their FSC shows the signal
    curve = _cryodrgn_tilt_fsc(real_data, tmp_path, 14.56)
    assert curve[1:3].min() > 0.9  # measured 0.984, 0.969
    assert curve[5:11].mean() > 0.45  # measured 0.552


@pytest.mark.slow
def test_cryodrgn_bin8_pixel_size_fits_better_than_the_stars(real_data, tmp_path):
    # the bin-8 pixel (8 x 1.82 A, the stack's name) with the CTF gives a more consistent
    # average than the STAR's 1.96 A (detector pixel / magnification)
    scores = {
        angpix: _cryodrgn_tilt_fsc(real_data, tmp_path / str(angpix), angpix)[5:11].mean()
        for angpix in (1.96, 14.56)
    }
    assert scores[14.56] > scores[1.96] + 0.08  # measured 0.552 vs 0.407 (shells 5-10)


# --- bad input ------------------------------------------------------------------------------
def test_particles_star_without_tomograms_is_an_error(real_data):
    particles = real_data / OPTIMISATION_SET.replace("_optimisation_set", "")
    with pytest.raises(CryomatchError, match="tomograms STAR") as info:
        read_particle_series(particles)
    assert Path(info.value.path).resolve() == particles.resolve()


def test_unknown_tomogram_and_bad_visible_frames(real_data, tmp_path):
    src = real_data / OPTIMISATION_SET.replace("_optimisation_set", "")
    blocks = starfile.read(src, always_dict=True)
    stacks = real_data / "tomo/cryoet_warptools_tomodrgn"
    blocks["particles"]["rlnImageName"] = [
        str(stacks / n) for n in blocks["particles"]["rlnImageName"]
    ]
    bad = {k: (v.copy() if isinstance(v, pd.DataFrame) else v) for k, v in blocks.items()}
    bad["particles"].loc[3, "rlnTomoName"] = "nowhere.tomostar"
    path = tmp_path / "bad_tomo.star"
    starfile.write(bad, path)
    with pytest.raises(CryomatchError, match="nowhere.tomostar"):
        read_particle_series(path, real_data / TOMOGRAMS)
    bad = {k: (v.copy() if isinstance(v, pd.DataFrame) else v) for k, v in blocks.items()}
    bad["particles"].loc[0, "rlnTomoVisibleFrames"] = json.dumps([1] * 5)
    path = tmp_path / "bad_frames.star"
    starfile.write(bad, path)
    with pytest.raises(CryomatchError, match="rlnTomoVisibleFrames has 5 entries") as info:
        read_particle_series(path, real_data / TOMOGRAMS)
    assert info.value.path == str(path)


def test_missing_stack_is_an_error_and_writes_nothing(real_data, tmp_path):
    src = real_data / "tomo/cryoet_sta_cryodrgn"
    star = tmp_path / "series.star"
    shutil.copy(src / "sta_testing_bin8.star", star)  # its stack is not beside the copy
    out = tmp_path / "out"
    with pytest.raises(CryomatchError, match="does not exist"):
        ps.particle_series_reconstruct(star, out)
    assert not out.exists() or not any(out.iterdir())


# --- workflow -------------------------------------------------------------------------------
@pytest.mark.slow
def test_workflow_reconstructs_the_warptools_series(real_data, tmp_path):
    from workflow_helpers import snakemake, write_config

    config = {
        "stages": ["particle_series"],
        "particle_series": {
            "star": str(real_data / OPTIMISATION_SET),
            "reference": str(real_data / RELION_MAP),
        },
    }
    configfile = write_config(tmp_path, config)
    snakemake(tmp_path, configfile=configfile)
    out = tmp_path / "results" / "particle_series" / "reconstruct"
    table = pd.read_csv(out / "fsc_reference.csv")
    assert table["fsc_masked"].iloc[8] > 0.6  # shell 8 of 32: half Nyquist
    assert (tmp_path / "results" / "logs" / "particle_series_reconstruct.log").is_file()


def test_workflow_stage_without_a_star_is_an_error(tmp_path):
    from workflow_helpers import snakemake, write_config

    configfile = write_config(tmp_path, {"stages": ["particle_series"]})
    out = snakemake(tmp_path, "-n", configfile=configfile, check=False)
    assert out.returncode != 0
    assert "particle_series.star is required" in out.stdout + out.stderr


@pytest.mark.slow
def test_refinement_recovers_perturbed_poses_and_origins(real_data, tmp_path):
    truth, _ = read_volume(real_data / RELION_MAP)
    rng = np.random.default_rng(2)
    sim = simulate(
        tmp_path / "sim",
        real_data,
        truth,
        12.0,
        12,
        rng,
        snr=0.5,
        pose_error=4.0,
        origin_error=12.0,
    )
    summary = ps.particle_series_refine(
        sim["optimisation_set"],
        tmp_path / "out",
        reference=str(real_data / RELION_MAP),
        lowpass=24.0,
        max_angle=5.0,
        angle_step=2.5,
    )
    table = starfile.read(tmp_path / "out" / "particles_refined.star")["particles"]
    refined = geometry.euler_to_matrix(
        *(table[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    )
    error = geometry.angle_between_rotations(refined, sim["true"])
    assert np.median(error) < 2.0 and error.max() < 3.5  # from 4 deg
    origins = table[[f"rlnOrigin{a}Angst" for a in "XYZ"]].to_numpy()
    residual = np.linalg.norm(origins, axis=1)  # the images are centred: truth is 0
    # from 12 A (1 px): measured median 8.8 A (references from the 5 other particles of a
    # half; the posterior mean shrinks weakly determined shifts)
    assert np.median(residual) < 10.0 and np.sum(residual < 11.0) >= 8
    after = summary["reference_masked"]["fsc_at_half_nyquist"]
    assert after > summary["reference_masked_before"]["fsc_at_half_nyquist"] + 0.01  # 0.877->0.899
    assert summary["refinement_improved_halves"]
    changes = pd.read_csv(tmp_path / "out" / "pose_changes.csv")
    assert len(changes) == 12
    # the refined STAR (angles, origins) reads back into the same average
    ps.particle_series_reconstruct(
        tmp_path / "out" / "optimisation_set_refined.star", tmp_path / "rt"
    )
    again, _ = read_volume(tmp_path / "rt" / "average.mrc")
    refined_average, _ = read_volume(tmp_path / "out" / "average.mrc")
    np.testing.assert_allclose(again, refined_average, atol=1e-5 * np.abs(refined_average).max())


@pytest.mark.gpu
def test_cupy_reconstruction_matches_numpy(real_data, tmp_path):
    ps.particle_series_reconstruct(real_data / OPTIMISATION_SET, tmp_path / "cpu")
    ps.particle_series_reconstruct(real_data / OPTIMISATION_SET, tmp_path / "gpu", backend="cupy")
    cpu, _ = read_volume(tmp_path / "cpu" / "average.mrc")
    gpu, _ = read_volume(tmp_path / "gpu" / "average.mrc")
    np.testing.assert_allclose(gpu, cpu, atol=1e-5 * np.abs(cpu).max())


def test_refining_halves_of_one_particle_is_an_error(real_data, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryomatchWarning)  # the stack's header is broken
        with pytest.raises(CryomatchError, match="1 and 5 particles") as info:
            ps.particle_series_refine(real_data / CRYODRGN, tmp_path / "out", angpix=14.56)
    assert info.value.path == str(real_data / CRYODRGN)
    assert not (tmp_path / "out").exists()
