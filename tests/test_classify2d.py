"""The classify2d stage: outputs per iteration, determinism, continuation, CTF, centring,
reseeding and bad input (small simulated data; the accuracy figures are in
test_classify2d_accuracy.py)."""

from __future__ import annotations

import hashlib

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryomatch.cli import main
from cryomatch.errors import CryomatchError
from cryomatch.io.files import read_csv
from cryomatch.io.particles import ImageReader, read_particles
from cryomatch.kernels import align2d
from cryomatch.stages.classify2d import (
    Settings,
    classify2d,
    iteration_dir,
    random_halves,
)
from cryomatch.stages.simulate.views import simulate_views
from metrics2d import adjusted_rand_index

SETTINGS = Settings(ou=18, xr=2, yr=2)
FILES = [
    "convergence.json",
    "class_averages.mrcs",
    "references.mrcs",
    "particles.star",
    "frc.csv",
    "frc.csv.provenance.json",
    "classes.csv",
    "classes.csv.provenance.json",
    "class_averages.png",
    "frc.png",
]


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """240 images of 3 views of the domain phantom, 48 px, 3 A/px, SNR 0.3 (truth in STAR)."""
    out = tmp_path_factory.mktemp("views")
    return simulate_views(
        out, n=240, n_views=3, snr=0.3, box=48, seed=3, pixel_size=3.0, max_shift=2.0
    )


@pytest.fixture(scope="module")
def run(views, tmp_path_factory):
    out = tmp_path_factory.mktemp("classify")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in views.parent.iterdir()}
    classify2d(views, out, classes=3, maxit=5, settings=SETTINGS)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in views.parent.iterdir()}
    return out, before, after


def _star(out, it):
    return starfile.read(iteration_dir(out, it) / "particles.star")["particles"]


def test_outputs_of_every_iteration(run, views):
    out, _, _ = run
    truth = starfile.read(views)["particles"]
    for it in range(6):
        folder = iteration_dir(out, it)
        assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
        averages = mrcfile.read(folder / "class_averages.mrcs")
        assert averages.shape == (3, 48, 48) and np.isfinite(averages).all()
        classes = read_csv(folder / "classes.csv")
        assert classes["particles"].sum() == 240 and len(classes) == 3
    table = _star(out, 5)
    assert set(table["rlnClassNumber"]) <= {1, 2, 3}
    assert table["rlnAnglePsi"].between(-180, 180).all()
    assert set(table["rlnIsFlip"]) <= {0, 1}
    assert table["rlnParticleFigureOfMerit"].between(0, 1).all()
    assert list(table["rlnAngleRot"]) == list(truth["rlnAngleRot"])  # other columns kept
    # the STAR's image names resolve, and give back the input images
    particles = read_particles(iteration_dir(out, 5) / "particles.star", require_ctf=False)
    with ImageReader(particles) as reader:
        np.testing.assert_array_equal(
            reader.read(0, 5), mrcfile.read(views.parent / "particles.mrcs")[:5]
        )


def test_classes_found(run, views):
    out, _, _ = run
    truth = starfile.read(views)["particles"]["rlnClassNumber"]
    assert adjusted_rand_index(truth, _star(out, 5)["rlnClassNumber"]) > 0.95


def test_frc_in_inverse_angstrom(run):
    out, _, _ = run
    frc = read_csv(iteration_dir(out, 5) / "frc.csv")
    assert list(frc.columns[:3]) == ["shell", "frequency_inv_angstrom", "resolution_angstrom"]
    np.testing.assert_allclose(frc["frequency_inv_angstrom"].iloc[-1], 0.5 / 3.0, rtol=1e-5)
    np.testing.assert_allclose(
        frc["frequency_inv_angstrom"] * frc["resolution_angstrom"], 1, rtol=1e-5
    )
    curves = frc[[f"class_{c:03d}" for c in (1, 2, 3)]].to_numpy()
    assert np.all(curves[:3] > 0.8)  # 80 images a class at SNR 0.3: low frequencies agree
    assert abs(curves[-8:].mean()) < 0.2  # noise near Nyquist


def test_inputs_unchanged(run):
    _, before, after = run
    assert before == after


def test_averages_are_centred(run):
    out, _, _ = run
    averages = mrcfile.read(iteration_dir(out, 5) / "class_averages.mrcs")
    centre = align2d.centre_of_mass(align2d.lowpass(averages, 0.15), SETTINGS.ou)
    assert np.abs(centre).max() < 0.5


def test_one_iteration_at_a_time_gives_the_same(run, views, tmp_path):
    out, _, _ = run
    for it in range(3):  # as Snakemake runs them: one job per iteration
        classify2d(views if it == 0 else None, tmp_path, classes=3, iteration=it, settings=SETTINGS)
    for it in range(3):
        a, b = iteration_dir(out, it), iteration_dir(tmp_path, it)
        np.testing.assert_array_equal(
            mrcfile.read(a / "class_averages.mrcs"), mrcfile.read(b / "class_averages.mrcs")
        )
        pd.testing.assert_frame_equal(_star(out, it), _star(tmp_path, it))
    # raising maxit: iteration 6 continues from iteration 5 of the first run
    classify2d(None, out, classes=3, iteration=6, settings=SETTINGS)
    assert (iteration_dir(out, 6) / "particles.star").is_file()


def test_given_references_and_continue(views, tmp_path):
    refs = tmp_path / "refs.mrcs"
    with mrcfile.new(refs) as m:
        m.set_data(mrcfile.read(views.parent / "views.mrcs"))
    classify2d(views, tmp_path / "a", references=refs, maxit=1, settings=SETTINGS)
    table = _star(tmp_path / "a", 1)
    truth = starfile.read(views)["particles"]
    assert np.mean(table["rlnClassNumber"] == truth["rlnClassNumber"]) > 0.97
    np.testing.assert_array_equal(
        mrcfile.read(iteration_dir(tmp_path / "a", 0) / "class_averages.mrcs"), mrcfile.read(refs)
    )
    # a new run continuing from that STAR starts from its parameters
    star = iteration_dir(tmp_path / "a", 1) / "particles.star"
    classify2d(
        star, tmp_path / "b", references=refs, iteration=0, settings=SETTINGS, continue_params=True
    )
    start = _star(tmp_path / "b", 0)
    np.testing.assert_allclose(start["rlnOriginXAngst"], table["rlnOriginXAngst"], atol=1e-5)
    np.testing.assert_allclose(start["rlnAnglePsi"], table["rlnAnglePsi"], atol=1e-5)


def test_random_halves():
    rng = np.random.default_rng(0)
    classes = np.repeat([0, 1, 2], [10, 7, 0])
    halves = random_halves(classes, 3, rng)
    assert np.bincount(halves[classes == 0]).tolist() == [5, 5]
    assert np.bincount(halves[classes == 1]).tolist() == [3, 4]
    assert not np.array_equal(halves[:10], np.arange(10) % 2)  # not index parity
    np.testing.assert_array_equal(halves, random_halves(classes, 3, np.random.default_rng(0)))


def test_tiny_classes_are_reseeded_deterministically(views, tmp_path):
    settings = Settings(ou=18, xr=2, yr=2, min_class_size=60)
    for name in ("a", "b"):
        classify2d(views, tmp_path / name, classes=5, maxit=1, settings=settings)
    classes = read_csv(iteration_dir(tmp_path / "a", 1) / "classes.csv")
    assert classes["reseeded"].any()  # 5 classes of 3 views: some fall under 60
    np.testing.assert_array_equal(
        mrcfile.read(iteration_dir(tmp_path / "a", 1) / "references.mrcs"),
        mrcfile.read(iteration_dir(tmp_path / "b", 1) / "references.mrcs"),
    )


def test_ctf_wiener_averages(tmp_path):
    star = simulate_views(
        tmp_path / "data",
        n=160,
        n_views=2,
        snr=2.0,
        box=48,
        seed=4,
        pixel_size=3.0,
        max_shift=1.0,
        ctf=True,
        defocus_range=(8000, 20000),
    )
    truth = mrcfile.read(tmp_path / "data" / "views.mrcs")
    scores = {}
    for ctf in (False, True):
        settings = Settings(ou=18, xr=1, yr=1, CTF=ctf, snr=2.0)
        out = tmp_path / f"ctf{ctf}"
        last = classify2d(star, out, classes=2, maxit=4, settings=settings)
        averages = mrcfile.read(last / "class_averages.mrcs")
        radii = align2d.ring_radii(1, 18, 1)
        w = align2d.ring_points(18)
        refs = align2d.prepare_references(truth, radii, w, 2, 2, 1)
        found = align2d.search(align2d.image_spectra(averages, np.zeros((2, 2)), radii, w), refs)
        assert sorted(found.reference) == [0, 1]
        scores[ctf] = found.score.min()
    assert scores[True] > 0.9 and scores[True] > scores[False] + 0.1


# --- bad input ----------------------------------------------------------------------------
def _expect_error(match, tmp_path, *args, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(CryomatchError, match=match):
        classify2d(*args, out=out, **kwargs)
    assert not any(p.is_file() for p in out.rglob("*"))  # no partial output


def test_references_of_another_box(views, tmp_path):
    refs = tmp_path / "refs.mrcs"
    with mrcfile.new(refs) as m:
        m.set_data(np.zeros((3, 32, 32), np.float32))
    _expect_error(
        r"refs\.mrcs: the references are 32 x 32 pixels but the particles are 48",
        tmp_path,
        views,
        references=refs,
        iteration=0,
        settings=SETTINGS,
    )


@pytest.mark.parametrize(
    "settings, match",
    [
        (Settings(ou=30), r"ou=30 reaches beyond the 48-pixel box"),
        (Settings(ou=20, xr=5, yr=1), r"xr=5, yr=1 pushes rings of radius ou=20 outside"),
        (Settings(ou=-1, xr=2, yr=2), r"pushes rings of radius ou=22 outside"),
        (Settings(ir=0), r"1 <= ir <= ou"),
    ],
)
def test_bad_rings_and_search_range(views, tmp_path, settings, match):
    _expect_error(match, tmp_path, views, classes=3, iteration=0, settings=settings)


def test_shifts_pushing_rings_outside(views, tmp_path):
    table = starfile.read(views)
    table["particles"].loc[7, "rlnOriginXAngst"] = 8.0 * 3.0  # 8 px: 18 + 8 > 23
    star = views.parent / "shifted.star"
    starfile.write(table, star)
    try:
        _expect_error(
            r"shifted\.star: row 8: the shift \(8\.00, .*\) px pushes rings of radius "
            r"ou=18 outside",
            tmp_path,
            star,
            classes=3,
            iteration=0,
            settings=SETTINGS,
            continue_params=True,
        )
    finally:
        star.unlink()


def test_mask_of_another_box(views, tmp_path):
    mask = tmp_path / "mask.mrc"
    with mrcfile.new(mask) as m:
        m.set_data(np.ones((40, 40), np.float32))
    _expect_error(
        r"mask\.mrc: the mask must be one 48 x 48 image",
        tmp_path,
        views,
        classes=3,
        iteration=0,
        settings=SETTINGS,
        mask=mask,
    )


def test_ctf_without_ctf_columns(views, tmp_path):
    _expect_error(
        r"missing required column\(s\) rlnDefocusU",
        tmp_path,
        views,
        classes=3,
        iteration=0,
        settings=Settings(ou=18, xr=2, yr=2, CTF=True),
    )


def test_command_line_error(views, tmp_path, capsys):
    code = main(
        [
            "classify2d",
            "--particles",
            str(views),
            "--out",
            str(tmp_path),
            "--classes",
            "3",
            "--maxit",
            "0",
            "--ou",
            "40",
        ]
    )
    assert code == 2
    assert "cryomatch: error: ou=40 reaches beyond the 48-pixel box" in capsys.readouterr().err
