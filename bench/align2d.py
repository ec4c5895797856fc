"""Benchmark of the 2D multi-reference alignment search (issue 4 point 6, issue 12 point 6).

Images of 64 px aligned to S references over the full circle (W angles per ring), both
mirrors and the +-3 px grid of step 1 (D = 49 shifts), on one thread, as
``classify2d.align`` runs them. Timed: the ring spectra of the images (about each image's
current centre rounded to whole pixels, moved by indexing: rings, folded spectra: "prep"),
the search (coarse pass, exact re-scoring, sub-pixel refinement on the grid) and the final
refinement of each match on the exact image (:func:`align2d.refine_poses`: B-spline rings
about the match against its own reference on the stage's fine grid, a second pass for the
images the first moved by more than ``align2d.SECOND_PASS`` fine steps: "refine"). Printed:
images aligned per second per reference, and FLOP rates against numpy's complex64 matrix
product measured in the same run, of the search (prep and search, as issue 4 defined it)
and, in the "+refinement" columns, with the final refinement's time added.

Two kinds of images, one row each:

* noise: pure-noise images and references, the worst case for the refinement: nothing
  matches, so the first refinement pass moves many images far and they get a second pass
  (the "2nd pass %" column);
* particles: references made of Gaussian blobs inside the disc, images made from them
  (random angle, mirror, shifts up to 2 px) plus white noise at SNR 1 over the disc, the
  search started up to 1 px from the true centre, as in a classification iteration
  ("right %": images matched to their own reference and mirror).

FLOP counts:

* effective: the arithmetic of the dense formulation the issue asks for (shared notes,
  sections 1 and 2): per (image, reference, shift) and per mirror one complex product per
  angular frequency summed over the R rings, ``8 R (W/2 + 1)`` flops, the mirrored
  references counted as further references (SPARX checks the mirror with one more
  product). Only these products are counted: not the inverse transforms, the re-scoring of
  the best candidates, the refinement or the image preparation, whose time is included.
* executed: the flops of the matrix products the coarse pass actually runs. Thanks to the
  mirror-free products (both mirrors from the same four real products), the half-circle
  inverse DFTs and the rings' bands (each ring at its own length, the coarse pass on the
  frequencies up to ``pi r``: :func:`align2d.ring_layout`) it is below the effective count;
  the exact re-scoring (a few candidates per image) is not counted.

The references' preparation (once per iteration, shared by all images; both grids) is
timed apart. Timings are CPU time of this process, best of several interleaved repeats, so
that other load on the machine hurts both sides alike; the ratios are what to read.

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
from cryomatch.stages.classify2d import FINE_RANGE as FINE  # noqa: E402
from cryomatch.stages.classify2d import FINE_STEP as STEP  # noqa: E402


def cpu_time(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def executed_flops(refs) -> float:
    """Flops of the coarse pass's matrix products per (image, reference-shift set)."""
    u = refs.blocks[0][0]  # (Q', K', b): the coarse pass's columns
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
    n = 1024
    a = (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))).astype(np.complex64)

    print(
        f"box {box}, rings {n_rings} (ir 1 .. ou {ou:g}), {n_angles} points per ring, "
        f"shifts +-{xr:g} step 1, both mirrors, {args.images} images, one thread"
    )
    print(
        f"{'images':>9} {'refs':>5} {'img/s/ref':>10} {'eff GFLOP/s':>12} "
        f"{'matmul GFLOP/s':>15} {'fraction':>9} {'executed':>9} {'ring prep %':>12} "
        f"{'+refinement':>12} {'img/s/ref':>11} {'2nd pass %':>11} {'right %':>8} "
        f"{'ref prep ms':>12}"
    )
    for n_refs in args.refs:
        for kind in ("noise", "particles"):
            row = run(kind, n_refs, args, box, xr, radii, n_angles, a, rng)
            print(f"{kind:>9} {n_refs:>5} " + row)


def particles(n_refs, n_images, box, radius, snr, rng):
    """References (S, box, box): sums of 12 Gaussian blobs (sigma 1.5-4 px) inside a disc of
    ``radius``; images: references turned, mirrored and moved by up to 2 px per axis
    (:func:`align2d.from_reference_frame`) plus white noise at ``snr`` (signal variance
    over the disc of ``radius`` / noise variance). Returns them, start origins off by up
    to 1 px and the true (class, mirror)."""
    grid = np.arange(box) - box // 2
    y, x = np.meshgrid(grid, grid, indexing="ij")
    refs = np.zeros((n_refs, box, box))
    for s in range(n_refs):
        for _ in range(12):
            r, phi = radius * 0.7 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            sigma = rng.uniform(1.5, 4.0)
            cx, cy = r * np.cos(phi), r * np.sin(phi)
            refs[s] += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    refs = refs.astype(np.float32)
    cls, mirror = rng.integers(0, n_refs, n_images), rng.random(n_images) < 0.5
    origin = rng.uniform(-2, 2, size=(n_images, 2))
    images = align2d.from_reference_frame(
        refs[cls], rng.uniform(-180, 180, n_images), mirror, origin
    )
    disc = x * x + y * y <= radius * radius
    noise = np.sqrt(images[:, disc].var(axis=1).mean() / snr)
    images += rng.normal(scale=noise, size=images.shape).astype(np.float32)
    return refs, images, origin + rng.uniform(-1, 1, size=(n_images, 2)), (cls, mirror)


def run(kind, n_refs, args, box, xr, radii, n_angles, a, rng) -> str:
    """Times one (image kind, reference count); returns the table row's figures."""
    n_rings, ou = len(radii), radii[-1]
    if kind == "noise":  # pure noise: the worst case for the final refinement
        references = rng.normal(size=(n_refs, box, box)).astype(np.float32)
        images = rng.normal(size=(args.images, box, box)).astype(np.float32)
        origins = rng.uniform(-1, 1, size=(args.images, 2))
        truth = None
    else:
        references, images, origins, truth = particles(n_refs, args.images, box, ou, 1.0, rng)

    def refs_prep():
        return align2d.prepare_references(references, radii, n_angles, xr, xr, 1.0)

    def fine_prep():
        return align2d.prepare_references(references, radii, n_angles, FINE, FINE, STEP, order=3)

    centres = align2d.whole_pixel_centres(origins, xr)  # as classify2d searches

    def prep():
        return align2d.image_spectra(images, centres, radii, n_angles)

    refs, fine, spectra = refs_prep(), fine_prep(), prep()
    found = align2d.search(spectra, refs)
    start = found.to_params(centres)[1]

    def refine(passes=2):
        pose = (images, start, found.reference, found.mirror, fine, radii, xr)
        return align2d.refine_poses(*pose, passes=passes)

    moved = np.linalg.norm(refine(passes=1)[1] - start, axis=1)
    second = moved > align2d.SECOND_PASS * fine.step  # images that get a second pass
    right = "-"
    if truth is not None:
        right = f"{100 * np.mean((found.reference == truth[0]) & (found.mirror == truth[1])):.0f}"
    steps = {
        "matmul": lambda: a @ a,
        "prep": prep,
        "search": lambda: align2d.search(spectra, refs),
        "refine": refine,
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
    peak = 8.0 * a.shape[0] ** 3 / best["matmul"]
    poses = args.images * refs.n_sets * 2  # (image, reference, shift, mirror)
    effective = 8.0 * n_rings * (n_angles // 2 + 1) * poses / search
    executed = executed_flops(refs) * args.images * refs.n_sets / search
    return (
        f"{args.images * n_refs / search:>10.0f} {effective / 1e9:>12.1f} "
        f"{peak / 1e9:>15.1f} {effective / peak:>9.2f} {executed / peak:>9.2f} "
        f"{100 * best['prep'] / search:>12.0f} {effective * search / total / peak:>12.2f} "
        f"{args.images * n_refs / total:>11.0f} {100 * second.mean():>11.0f} {right:>8} "
        f"{1e3 * best['refs']:>12.0f}"
    )


if __name__ == "__main__":
    main()
