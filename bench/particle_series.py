"""Particle-series benchmark: Fourier insertion (tilt images per second) and the local
refinement (seconds per particle) on the WarpTools test data (40 particles x 37 tilts of
32 px), with numpy's float32 matrix product in the same run as a reference for the
machine's speed.

    python bench/particle_series.py [--real ../shared/data/real] [--particles 4]

Prints times and ratios; absolute times vary with load (other jobs on the machine): the
ratios measured in one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from reference_rate import matmul_gflops

from cryomatch.io.particle_series import read_particle_series
from cryomatch.stages import particle_series as ps

SET = (
    "tomo/cryoet_warptools_tomodrgn/"
    "warptools_test_4-tomos_10-ptcls_box-32_angpix-12_optimisation_set.star"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--real", default=str(here.parent / "shared" / "data" / "real"))
    parser.add_argument("--particles", type=int, default=4, help="particles to refine")
    args = parser.parse_args()
    gflops = matmul_gflops()
    series = read_particle_series(Path(args.real) / SET)
    t = time.perf_counter()
    grid, acc, _ = ps.reconstruct_series(series, series.poses, 2, "trilinear", 0.1, True, 8, np)
    insert = time.perf_counter() - t
    rate = len(series.tilts) / insert
    print(
        f"reconstruction of {series.n_particles} particles ({len(series.tilts)} tilt images of "
        f"{series.box} px, pad 2): {insert:.1f} s, {rate:.0f} images/s; "
        f"numpy float32 matmul {gflops:.1f} GFLOP/s; images/s per GFLOP/s {rate / gflops:.2f}"
    )
    rotations, shifts = ps.rotation_ball(6.0, 2.0), ps.shift_grid(2.0, 1.0)
    band = (1 / 300.0, 1 / 45.0)
    t = time.perf_counter()
    for p in range(args.particles):
        spectrum = ps.leave_one_out_spectrum(
            series, p, acc, grid, series.poses, 0.1, "trilinear", True, np, "halves"
        )
        ps.refine_particle(
            series, p, spectrum, grid, band, rotations, shifts, True, np, series.poses
        )
    per = (time.perf_counter() - t) / args.particles
    print(
        f"refinement, coarse pass ({len(rotations)} rotations x {len(shifts)} shifts, "
        f"{len(series.tilts) / series.n_particles:.0f} tilts): {per:.2f} s/particle; "
        f"particles/s per GFLOP/s {1 / per / gflops:.4f}"
    )


if __name__ == "__main__":
    main()
