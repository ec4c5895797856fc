"""Issue 4, point 5: classification and alignment accuracy on images of a real map.

2000 images at 64 px from 5 distinct projections of EMD-1832 (5.7 A/px), each turned by a
random angle, mirrored with probability 1/2 and shifted by up to 3 px per axis, plus white
noise; references seeded from a random partition; maxit iterations.

At the issue's SNR of 0.05 (signal variance over the box, as every cryomatch simulator
defines it) the in-plane angle and the shift of a single image cannot be known to 2 degrees
and 0.5 px for 95% of the images: the Cramer-Rao bound of this map's views is about 1.4
degrees and 0.25 px per axis (standard deviations, computed here from the noise-free views),
so at best about 85% of the angles fall within 2 degrees and 87% of the shifts within 0.5 px.
That test checks the class, mirror and adjusted Rand index figures, and that the angle and
shift errors come within 50% of the bound (measured: about 33% and 13% above it). The
second test raises the SNR to 0.3, where the bound allows the issue's figures, and checks
them as written.
"""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile

from cryomatch.stages.classify2d import Settings, classify2d
from cryomatch.stages.simulate.views import simulate_views
from metrics2d import (
    adjusted_rand_index,
    cramer_rao,
    efficient_fractions,
    pose_errors,
    simulate_at_disc_snr,
)

MAXIT = 10
SETTINGS = Settings(ou=24, xr=3, yr=3, ts=1)  # rings cover the particle, +-3 px search


def _run(real_data, tmp_path, snr):
    data = tmp_path / "data"
    star = simulate_views(
        data,
        n=2000,
        n_views=5,
        snr=snr,
        box=64,
        seed=11,
        map_path=str(real_data / "maps" / "emd_1832.map"),
        max_shift=3.0,
    )
    last = classify2d(star, tmp_path / "out", classes=5, maxit=MAXIT, settings=SETTINGS)
    truth = starfile.read(star)["particles"]
    estimate = starfile.read(last / "particles.star")["particles"]
    angle, shift, mirror_ok, correct = pose_errors(truth, estimate, 5.7)
    ari = adjusted_rand_index(truth["rlnClassNumber"], estimate["rlnClassNumber"])
    views = mrcfile.read(data / "views.mrcs")
    sigma = np.sqrt(views.var(axis=(1, 2)).mean() / snr)  # the simulator's noise level
    bound_angle, bound_shift = cramer_rao(views, sigma)
    report = {
        "ARI": round(ari, 4),
        "correctly classed": round(correct.mean(), 4),
        "mirror right": round(mirror_ok[correct].mean(), 4),
        "angle < 2 deg": round(np.mean(angle[correct] < 2), 4),
        "shift < 0.5 px": round(np.mean(shift[correct] < 0.5), 4),
        "both": round(np.mean((angle[correct] < 2) & (shift[correct] < 0.5)), 4),
        "angle 68% (deg)": round(np.quantile(angle[correct], 0.68), 3),
        "CRB angle (deg)": round(bound_angle.mean(), 3),
        "shift 68% / 1.51 (px)": round(np.quantile(shift[correct], 0.68) / 1.51, 3),
        "CRB shift per axis (px)": round(bound_shift.mean(), 3),
    }
    print(f"SNR {snr}: {report}")
    return ari, correct, mirror_ok, angle, shift, bound_angle, bound_shift


@pytest.mark.slow
def test_accuracy_at_snr_005(real_data, tmp_path):
    ari, correct, mirror_ok, angle, shift, bound_angle, bound_shift = _run(
        real_data, tmp_path, 0.05
    )
    assert ari >= 0.95
    assert mirror_ok[correct].mean() >= 0.98
    # a Gaussian error of standard deviation s lies within s with probability 0.68; a 2D one
    # of s per axis within 1.51 s (chi with 2 degrees of freedom)
    assert np.quantile(angle[correct], 0.68) <= 1.5 * bound_angle.mean()
    assert np.quantile(shift[correct], 0.68) <= 1.5 * 1.51 * bound_shift.mean()


@pytest.mark.slow
def test_accuracy_figures_where_the_noise_allows(real_data, tmp_path):
    ari, correct, mirror_ok, angle, shift, *_ = _run(real_data, tmp_path, 0.3)
    assert ari >= 0.95
    assert mirror_ok[correct].mean() >= 0.98
    assert np.mean((angle[correct] < 2) & (shift[correct] < 0.5)) >= 0.95


# --- issue 12, point 3: against the efficient estimator, SNR over the particle disc -------
@pytest.mark.slow
@pytest.mark.parametrize("snr, seed", [(0.3, 12), (0.3, 11), (1.0, 12)])
def test_accuracy_against_the_efficient_estimator(real_data, tmp_path, snr, seed):
    ou = 24
    star, views, sigma, measured = simulate_at_disc_snr(
        tmp_path, snr, 1000, ou, real_data / "maps" / "emd_1832.map", seed
    )
    assert measured == pytest.approx(snr, rel=0.05)  # the disc definition holds
    out = tmp_path / "out"
    last = classify2d(star, out, classes=5, maxit=0, settings=Settings(ou=ou, xr=3, yr=3))
    truth = starfile.read(star)["particles"]
    estimate = starfile.read(last / "particles.star")["particles"]
    angle, shift, mirror_ok, correct = pose_errors(truth, estimate, 5.7)
    ari = adjusted_rand_index(truth["rlnClassNumber"], estimate["rlnClassNumber"])
    bound_angle, bound_shift = cramer_rao(views, sigma)
    view = truth["rlnClassNumber"].to_numpy()[correct] - 1
    allowed = efficient_fractions(bound_angle[view], bound_shift[view], 2.0, 0.5)
    found = (np.mean(angle[correct] < 2.0), np.mean(shift[correct] < 0.5))
    print(
        f"SNR {snr} over the disc of radius {ou} (measured {measured:.3f}), seed {seed}, "
        f"{last.name}: "
        f"ARI {ari:.4f}, correctly classed {correct.mean():.4f}, mirror right "
        f"{mirror_ok[correct].mean():.4f}; angle < 2 deg {found[0]:.4f} (efficient "
        f"{allowed[0]:.4f}, ratio {found[0] / allowed[0]:.3f}); shift < 0.5 px {found[1]:.4f} "
        f"(efficient {allowed[1]:.4f}, ratio {found[1] / allowed[1]:.3f}); Cramer-Rao angle "
        f"{bound_angle.mean():.3f} deg, shift {bound_shift.mean():.3f} px per axis"
    )
    assert found[0] >= 0.9 * allowed[0] and found[1] >= 0.9 * allowed[1]
    if snr >= 1.0:
        assert ari >= 0.95
