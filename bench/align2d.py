"""Benchmark of the 2D multi-reference alignment search (issue 4, point 6).

Images of 64 px aligned to S references over the full circle (W angles per ring), both
mirrors and the +-3 px grid of step 1 (49 shifts), on one thread. Prints images aligned per
second per reference, and the effective FLOP rate against numpy's complex64 matrix product
measured in the same run:

    effective flops = 8 R (W/2 + 1) per (image, reference, shift, mirror),

the flops of the plain formulation (one complex product per angular frequency, summed over
R rings; shared notes section 1). Timings are the best of several interleaved repeats, so
that other load on the machine hurts both sides alike.

    python bench/align2d.py [--refs 5 20 50] [--images 512] [--repeats 5]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread: set before numpy loads its BLAS

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from cryomatch.kernels import align2d  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--shift", type=float, default=3.0, help="xr = yr (pixels)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    box, xr = args.box, args.shift
    ou = align2d.max_ring_radius(box) - xr  # largest ring radius the search allows
    radii = align2d.ring_radii(1, ou, 1)
    n_angles = align2d.ring_points(ou)
    n_rings = len(radii)
    sampler = align2d.ring_sampler(box, radii, n_angles)
    images = rng.normal(size=(args.images, box, box)).astype(np.float32)
    origins = rng.uniform(-1, 1, size=(args.images, 2))
    n = 1024
    a = (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))).astype(np.complex64)

    print(
        f"box {box}, rings {n_rings} (ir 1 .. ou {ou:g}), {n_angles} points per ring, "
        f"shifts +-{xr:g} step 1, both mirrors, {args.images} images, one thread"
    )
    print(
        f"{'refs':>5} {'img/s/ref':>10} {'eff GFLOP/s':>12} {'matmul GFLOP/s':>15} "
        f"{'fraction':>9} {'ring prep %':>12}"
    )
    for n_refs in args.refs:
        references = rng.normal(size=(n_refs, box, box)).astype(np.float32)
        refs = align2d.prepare_references(references, radii, n_angles, xr, xr, 1.0, sampler=sampler)
        spectra = align2d.image_spectra(images, origins, radii, n_angles, sampler)
        steps = {
            "matmul": lambda: a @ a,
            "prep": lambda: align2d.image_spectra(images, origins, radii, n_angles, sampler),
            "search": lambda spectra=spectra, refs=refs: align2d.search(spectra, refs),
        }
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(args.repeats):  # interleaved, best of each
            for name, fn in steps.items():
                best[name] = min(best[name], best_time(fn, 1))
        t_matmul, t_prep, t_search = (best[k] for k in steps)
        total = t_prep + t_search
        peak = 8.0 * n**3 / t_matmul
        effective = 8.0 * n_rings * (n_angles // 2 + 1) * args.images * refs.n_sets * 2 / total
        print(
            f"{n_refs:>5} {args.images * n_refs / total:>10.0f} {effective / 1e9:>12.1f} "
            f"{peak / 1e9:>15.1f} {effective / peak:>9.2f} {100 * t_prep / total:>12.0f}"
        )


if __name__ == "__main__":
    main()
