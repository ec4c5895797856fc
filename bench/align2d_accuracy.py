"""Angle and shift accuracy of 2D classification against the Cramer-Rao bound (issue 4,
point 5), at any SNR and outer ring radius.

The setup of ``tests/test_classify2d_accuracy.py`` (views of EMD-1832 at 64 px, turned,
mirrored and shifted by up to 3 px, white noise at ``--snr`` as the signal variance over the
box, or with ``--disc`` over the disc of radius ``ou``, issue 12's definition): classes
seeded from the data for up to ``--maxit`` iterations (automatic stop), or, with
``--true-references``, one alignment against the noise-free views themselves (which
separates the aligner's own error from that of the class averages). Printed: the test's
report (ARI, fractions within 2 degrees and 0.5 px against those of an efficient estimator
at the Cramer-Rao bound, 68th percentiles, the bounds) and the SNR over the disc.

    python bench/align2d_accuracy.py [--snr 0.113] [--disc] [--ou 24] [--n 2000] \
        [--true-references]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import mrcfile
import numpy as np
import starfile

from cryomatch.stages.classify2d import Settings, classify2d
from cryomatch.stages.simulate.views import simulate_views

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from metrics2d import (  # noqa: E402
    adjusted_rand_index,
    cramer_rao,
    disc_variance,
    efficient_fractions,
    pose_errors,
    simulate_at_disc_snr,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, default=0.113)
    parser.add_argument("--disc", action="store_true", help="the SNR is over the ou disc")
    parser.add_argument("--ou", type=int, default=24)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--maxit", type=int, default=10)
    parser.add_argument("--true-references", action="store_true")
    args = parser.parse_args()
    settings = Settings(ou=args.ou, xr=3, yr=3, ts=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.disc:
            star, views, sigma, measured = simulate_at_disc_snr(
                tmp, args.snr, args.n, args.ou, REAL / "maps" / "emd_1832.map", 11
            )
        else:
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
            views = mrcfile.read(star.parent / "views.mrcs").astype(np.float64)
            sigma = np.sqrt(views.var(axis=(1, 2)).mean() / args.snr)  # the simulator's noise
            measured = disc_variance(views, args.ou).mean() / sigma**2
        views_path = star.parent / "views.mrcs"
        if args.true_references:
            last = classify2d(star, tmp / "out", references=views_path, maxit=1, settings=settings)
        else:
            last = classify2d(star, tmp / "out", classes=5, maxit=args.maxit, settings=settings)
        truth = starfile.read(star)["particles"]
        estimate = starfile.read(last / "particles.star")
        angle, shift, mirror_ok, correct = pose_errors(truth, estimate["particles"], 5.7)
    bound_angle, bound_shift = cramer_rao(views, sigma)
    view = truth["rlnClassNumber"].to_numpy()[correct] - 1
    allowed = efficient_fractions(bound_angle[view], bound_shift[view], 2.0, 0.5)
    ari = adjusted_rand_index(truth["rlnClassNumber"], estimate["particles"]["rlnClassNumber"])
    print(
        f"SNR {args.snr} ({'disc' if args.disc else 'box'}; over the disc of radius {args.ou}: "
        f"{measured:.3f}), {'true references' if args.true_references else last.name}: "
        f"ARI {ari:.4f}; correctly classed {correct.mean():.4f}; "
        f"mirror right {mirror_ok[correct].mean():.4f}; "
        f"angle < 2 deg {np.mean(angle[correct] < 2):.4f} (efficient {allowed[0]:.4f}); "
        f"shift < 0.5 px {np.mean(shift[correct] < 0.5):.4f} (efficient {allowed[1]:.4f}); "
        f"both {np.mean((angle[correct] < 2) & (shift[correct] < 0.5)):.4f}"
    )
    print(
        f"angle 68% {np.quantile(angle[correct], 0.68):.3f} deg against the Cramer-Rao bound "
        f"{bound_angle.mean():.3f}; shift 68% / 1.51 {np.quantile(shift[correct], 0.68) / 1.51:.3f}"
        f" px against {bound_shift.mean():.3f} per axis"
    )


if __name__ == "__main__":
    main()
