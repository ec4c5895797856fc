"""Benchmark of the 2D multi-reference alignment search (issue 4 point 6, issue 12 point 6).

Images of 64 px aligned to S references over the full circle (W angles per ring), both
mirrors and the +-3 px grid of step 1 (D = 49 shifts), on one thread. Timed: the ring
spectra of the images (shift to the current centre, rings, folded spectra: "prep"), the
search (coarse pass, exact re-scoring, sub-pixel refinement on the grid) and the final
refinement of each match on the exact image (:func:`align2d.refine_poses`: B-spline rings
about the match against its own reference, a second pass for the images the first moved
by more than a quarter step: "refine"; pure-noise images, the worst case). Printed: images
aligned per second per reference, and FLOP rates against numpy's complex64 matrix product
measured in the same run, of the search (prep and search, as issue 4 defined it) and, in
the last columns, with the final refinement's time added:

* effective: the arithmetic of the dense formulation the issue asks for (shared notes,
  sections 1 and 2): per (image, reference, shift) and per mirror one complex product per
  angular frequency summed over the R rings, ``8 R (W/2 + 1)`` flops, the mirrored
  references counted as further references (SPARX checks the mirror with one more
  product). Only these products are counted: not the inverse transforms, the re-scoring of
  the best candidates, the refinement or the image preparation, whose time is included.
* executed: the flops of the matrix products the coarse pass actually runs. Thanks to the
  mirror-free products (both mirrors from the same four real products) and the
  half-circle inverse DFTs it is below the effective count; the exact re-scoring (a few
  candidates per image) is not counted.

The references' preparation (once per iteration, shared by all images) is timed apart.
Timings are CPU time of this process, best of several interleaved repeats, so that other
load on the machine hurts both sides alike; the ratios are what to read.

    python bench/align2d.py [--refs 5 10 20 50] [--images 512] [--repeats 5]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread: set before numpy loads its BLAS

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from cryomatch.kernels import align2d  # noqa: E402


def cpu_time(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def executed_flops(refs) -> float:
    """Flops of the coarse pass's matrix products per (image, reference-shift set)."""
    u = refs.blocks[0][0]  # (Q', K, b)
    products = 2 * 2 * 2 * u.shape[0] * u.shape[1]  # [X; Y] @ [U, V] per folded frequency
    inverse = 2 * sum(d.size for d in refs.dft)  # the fused half-circle inverse DFTs
    return float(products + inverse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=int, nargs="+", default=[5, 10, 20, 50])
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
        f"{'fraction':>9} {'executed':>9} {'ring prep %':>12} {'+refinement':>12} "
        f"{'img/s/ref':>11} {'ref prep ms':>12}"
    )
    for n_refs in args.refs:
        references = rng.normal(size=(n_refs, box, box)).astype(np.float32)

        def refs_prep(references=references):
            return align2d.prepare_references(references, radii, n_angles, xr, xr, 1.0)

        def fine_prep(references=references):
            return align2d.prepare_references(references, radii, n_angles, 1, 1, 0.5, order=3)

        def refine(found, fine):
            origin = found.to_params(origins)[1]
            return align2d.refine_poses(
                images, origin, found.reference, found.mirror, fine, radii, xr
            )

        refs, fine = refs_prep(), fine_prep()
        spectra = align2d.image_spectra(images, origins, radii, n_angles)
        found = align2d.search(spectra, refs)
        steps = {
            "matmul": lambda: a @ a,
            "prep": lambda: align2d.image_spectra(images, origins, radii, n_angles),
            "search": lambda spectra=spectra, refs=refs: align2d.search(spectra, refs),
            "refine": lambda found=found, fine=fine: refine(found, fine),
            "refs": lambda: (refs_prep(), fine_prep()),
        }
        for fn in steps.values():  # warm up
            fn()
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(args.repeats):  # interleaved, best of each
            for name, fn in steps.items():
                best[name] = min(best[name], cpu_time(fn))
        search = best["prep"] + best["search"]  # issue 4's definition: the search alone
        total = search + best["refine"]
        peak = 8.0 * n**3 / best["matmul"]
        poses = args.images * refs.n_sets * 2  # (image, reference, shift, mirror)
        effective = 8.0 * n_rings * (n_angles // 2 + 1) * poses / search
        executed = executed_flops(refs) * args.images * refs.n_sets / search
        print(
            f"{n_refs:>5} {args.images * n_refs / search:>10.0f} {effective / 1e9:>12.1f} "
            f"{peak / 1e9:>15.1f} {effective / peak:>9.2f} {executed / peak:>9.2f} "
            f"{100 * best['prep'] / search:>12.0f} {effective * search / total / peak:>12.2f} "
            f"{args.images * n_refs / total:>11.0f} {1e3 * best['refs']:>12.0f}"
        )


if __name__ == "__main__":
    main()
