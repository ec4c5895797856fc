"""The particle simulator: truth in the STAR reproduces the images; seeded; map input."""

import filecmp

import numpy as np
import pytest

from cryomatch.io.mrc import read_images, read_volume
from cryomatch.io.particles import read_particles
from cryomatch.kernels.projection import spline_coefficients
from cryomatch.stages.simulate.particles import Structure, render, simulate_particles


def _residuals(star):
    """Images minus a re-rendering from the STAR's truth and the written structure maps."""
    p = read_particles(star)
    images = read_images(star.parent / "particles.mrcs")
    structures = [
        Structure(f.stem, coefficients=spline_coefficients(read_volume(f)[0]))
        for f in sorted((star.parent / "structures").glob("*.mrc"))
    ]
    clean = render(structures, p.table, images.shape[-1], p.pixel_size())
    return images - clean, clean, p


def test_truth_in_star_reproduces_images(demo_particles):
    residual, clean, p = _residuals(demo_particles)
    sigma2 = clean.var(axis=(1, 2))[:64].mean() / 0.5  # SNR 0.5 over the first 64 images
    assert residual.var() / sigma2 == pytest.approx(1.0, abs=0.05)
    assert abs(residual.mean()) < 0.02 * np.sqrt(sigma2)
    corr = np.corrcoef(residual.ravel(), clean.ravel())[0, 1]
    assert abs(corr) < 0.02  # the rest is noise, unrelated to the signal
    assert set(p.table["rlnClassNumber"]) == {1, 2}
    assert p.optics["rlnVoltage"].nunique() > 1 and p.optics["rlnSphericalAberration"].nunique() > 1
    assert (p.table["rlnPhaseShift"] > 0).any() and (
        p.table["rlnDefocusV"] > p.table["rlnDefocusU"]
    ).any()


def test_wrong_truth_would_not_reproduce_images(demo_particles, tmp_path):
    """The check above can fail: a wrong in-plane angle leaves signal in the residual."""
    import shutil

    from cryomatch.io.particles import write_particles

    for f in ("particles.mrcs",):
        shutil.copy(demo_particles.parent / f, tmp_path / f)
    shutil.copytree(demo_particles.parent / "structures", tmp_path / "structures")
    p = read_particles(demo_particles)
    p.table["rlnAnglePsi"] += 45.0
    write_particles(
        tmp_path / "particles.star",
        p,
        image_names=[f"{i + 1:06d}@particles.mrcs" for i in range(len(p))],
    )
    residual, clean, _ = _residuals(tmp_path / "particles.star")
    assert residual.var() / (clean.var(axis=(1, 2))[:64].mean() / 0.5) > 1.1  # right: 1 +- 0.05


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = simulate_particles(tmp_path / "a", n=12, snr=0.2, box=24, seed=3, batch_size=5)
    b = simulate_particles(tmp_path / "b", n=12, snr=0.2, box=24, seed=3, batch_size=7)
    c = simulate_particles(tmp_path / "c", n=12, snr=0.2, box=24, seed=4)
    assert filecmp.cmp(a.parent / "particles.mrcs", b.parent / "particles.mrcs", shallow=False)
    assert not filecmp.cmp(a.parent / "particles.mrcs", c.parent / "particles.mrcs", shallow=False)
    assert a.read_text().split("\n", 3)[3] == b.read_text().split("\n", 3)[3]  # past provenance


def test_from_real_map_with_real_ctf_values(tmp_path, real_data):
    star = simulate_particles(
        tmp_path,
        n=6,
        snr=1.0,
        box=64,
        seed=1,
        maps=[str(real_data / "maps/emd_1832.map")],
        ctf_star=str(real_data / "particles/relion31/relion31.star"),
    )
    p = read_particles(star)
    assert p.pixel_size() == pytest.approx(5.7)  # the map's
    assert (p.table["rlnSphericalAberration"] == 0.01).all()  # relion31.star's optics
    real = read_particles(real_data / "particles/relion31/relion31.star")
    assert set(p.table["rlnDefocusU"]) <= set(real.table["rlnDefocusU"])
    assert read_images(star.parent / "particles.mrcs").shape == (6, 64, 64)
    assert not (tmp_path / "structures").exists()  # maps are inputs, not copied
