"""Angle and shift accuracy of 2D classification against the Cramer-Rao bound (issue 4,
point 5), at any SNR and outer ring radius.

The setup of ``tests/test_classify2d_accuracy.py`` (views of EMD-1832 at 64 px, turned,
mirrored and shifted by up to 3 px, white noise at ``--snr`` as the signal variance over the
box): classes seeded from the data for ``--maxit`` iterations, or, with
``--true-references``, one alignment against the noise-free views themselves (which
separates the aligner's own error from that of the class averages). Printed: the test's
report (ARI, fractions within 2 degrees and 0.5 px, 68th percentiles, Cramer-Rao bounds),
and the variance of the views over a disc of radius ``ou`` against that over the box (the
factor between an SNR defined over the particle and cryomatch's).

    python bench/align2d_accuracy.py [--snr 0.113] [--ou 24] [--n 2000] [--true-references]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
import starfile

from cryomatch.stages.classify2d import Settings, classify2d, iteration_dir
from cryomatch.stages.simulate.views import simulate_views

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from metrics2d import adjusted_rand_index, cramer_rao, pose_errors  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, default=0.113)
    parser.add_argument("--ou", type=int, default=24)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--maxit", type=int, default=10)
    parser.add_argument("--true-references", action="store_true")
    args = parser.parse_args()
    settings = Settings(ou=args.ou, xr=3, yr=3, ts=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        star = simulate_views(
            tmp / "data",
            n=args.n,
            n_views=5,
            snr=args.snr,
            box=64,
            seed=11,
            map_path=str(REAL / "maps" / "emd_1832.map"),
            max_shift=3.0,
        )
        views_path = tmp / "data" / "views.mrcs"
        if args.true_references:
            maxit = 1
            classify2d(star, tmp / "out", references=str(views_path), maxit=1, settings=settings)
        else:
            maxit = args.maxit
            classify2d(star, tmp / "out", classes=5, maxit=maxit, settings=settings)
        truth = starfile.read(star)["particles"]
        estimate = starfile.read(iteration_dir(tmp / "out", maxit) / "particles.star")
        angle, shift, mirror_ok, correct = pose_errors(truth, estimate["particles"], 5.7)
        views = mrcfile.read(views_path).astype(np.float64)
    sigma = np.sqrt(views.var(axis=(1, 2)).mean() / args.snr)  # the simulator's noise level
    bound_angle, bound_shift = cramer_rao(views, sigma)
    yy, xx = np.mgrid[:64, :64] - 32
    disc = xx**2 + yy**2 <= args.ou**2
    disc_factor = np.mean([v[disc].var() for v in views]) / views.var(axis=(1, 2)).mean()
    ari = adjusted_rand_index(truth["rlnClassNumber"], estimate["particles"]["rlnClassNumber"])
    print(
        f"SNR {args.snr} (box), ou {args.ou}, "
        f"{'true references' if args.true_references else f'{maxit} iterations'}: "
        f"ARI {ari:.4f}; correctly classed {correct.mean():.4f}; "
        f"mirror right {mirror_ok[correct].mean():.4f}; "
        f"angle < 2 deg {np.mean(angle[correct] < 2):.4f}; "
        f"shift < 0.5 px {np.mean(shift[correct] < 0.5):.4f}; "
        f"both {np.mean((angle[correct] < 2) & (shift[correct] < 0.5)):.4f}"
    )
    print(
        f"angle 68% {np.quantile(angle[correct], 0.68):.3f} deg against the Cramer-Rao bound "
        f"{bound_angle.mean():.3f}; shift 68% / 1.51 {np.quantile(shift[correct], 0.68) / 1.51:.3f}"
        f" px against {bound_shift.mean():.3f} per axis"
    )
    print(
        f"signal variance over the disc of radius {args.ou} / over the box: {disc_factor:.2f} "
        f"(an SNR defined over that disc is this much higher than cryomatch's)"
    )


if __name__ == "__main__":
    main()
