"""Benchmark of the likelihood search (issue 3, point 7): pose evaluations per CPU-second.

Setting (CryoLike's): 64 px images, 65 shells x 128 in-plane rotations, 49 displacements
(7 x 7 over +-3 px), one thread. Images are simulated from EMD-1832 (64^3, 5.7 A/px) at
SNR 0.1 with the CTFs of a real 6-optics-group STAR file; templates every
``--viewing-distance`` radians. A pose evaluation is one (image, view, displacement,
rotation). Printed:

* pose evaluations per CPU-second of the search (images prepared + searched, the fastest of
  three runs; the template set's one-time preparation reported apart) and the ratio to
  CryoLike's 28.4 million (measured side by side on this machine kind, issue 15);
* the effective FLOP rate (the dense formulation's 8 R (W/2+1) flops per image x view x
  displacement, over the time) and the executed one (the compressed products), as
  fractions of numpy's complex64 matrix product measured in this run;
* equal accuracy: the same search exact (no compression, no pruning) on a subset, and the
  pose errors against the simulated truth;
* refinement below the grid of every image's best pose: CPU-ms per image, view and shift
  errors against the truth before and after;
* the worst case for pruning: pure-noise images;
* peak memory (tracemalloc) of the likelihood stage for n and 2n images, s and 2s views.

Usage: ``python bench/likelihood.py [--images 256] [--viewing-distance 0.3]`` (real data
from ../shared/data/real). Timings are CPU time of this process (``time.process_time``);
absolute figures vary with the machine's load, ratios within one run much less.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread, before numpy loads its BLAS

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402

from cryomatch import geometry  # noqa: E402
from cryomatch.io.mrc import read_images, read_volume  # noqa: E402
from cryomatch.io.particles import CTF_COLUMNS as REQUIRED_CTF  # noqa: E402
from cryomatch.io.particles import read_particles  # noqa: E402
from cryomatch.kernels import ctf as ctf_kernel  # noqa: E402
from cryomatch.kernels import likelihood as lk  # noqa: E402
from cryomatch.kernels.polar_fourier import polar_grid, polar_transform  # noqa: E402
from cryomatch.kernels.refine import refine_poses  # noqa: E402
from cryomatch.kernels.slicing import FourierSlicer  # noqa: E402
from cryomatch.kernels.templates import map_templates, view_matrices, viewing_directions  # noqa: E402
from cryomatch.stages.simulate.particles import simulate_particles  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
CRYOLIKE = 28.4e6  # pose evaluations per CPU-second, 64 px, 65 x 128, 49 displacements
CTF_COLUMNS = (*REQUIRED_CTF, "rlnPhaseShift", "rlnCtfBfactor")


def matmul_rate(repeats: int = 5) -> float:
    """numpy complex64 matrix product GFLOP/s (one thread), shapes like the search's."""
    rng = np.random.default_rng(0)
    best = 0.0
    for m, k, n in [(3136, 65, 64), (1024, 1024, 1024)]:
        a = (rng.normal(size=(m, k)) + 1j * rng.normal(size=(m, k))).astype(np.complex64)
        b = (rng.normal(size=(k, n)) + 1j * rng.normal(size=(k, n))).astype(np.complex64)
        a @ b
        for _ in range(repeats):
            t0 = time.process_time()
            a @ b
            best = max(best, 8.0 * m * k * n / max(time.process_time() - t0, 1e-9) / 1e9)
    return best


def simulate(folder: Path, n: int, seed: int = 1):
    star = simulate_particles(
        folder,
        n=n,
        snr=0.1,
        box=64,
        seed=seed,
        maps=[str(REAL / "maps" / "emd_1832.map")],
        max_shift=3.0,
        ctf_star=str(REAL / "particles" / "metadata_only" / "relion31.6opticsgroups.star"),
    )
    particles = read_particles(star)
    images = read_images(folder / "particles.mrcs").astype(np.float64)
    return particles.table, images


class Setting(NamedTuple):
    """The bench's setting: simulated particles, EMD-1832, its views and displacements."""

    table: object  # the particles' STAR table (truth and CTFs)
    images: np.ndarray  # (n, 64, 64)
    volume: np.ndarray
    grid: object  # the polar grid at 64 px
    pixel: float  # A
    rot: np.ndarray  # the views' Euler angles (deg)
    tilt: np.ndarray
    weights: np.ndarray  # the views' weights
    templates: np.ndarray  # (S, R, W) the views' polar transforms
    disp: np.ndarray  # (49, 2) displacements (px)


def setting(folder: Path, n_images: int, viewing_distance: float) -> Setting:
    """The setting for n_images particles simulated into ``folder``, views every
    ``viewing_distance`` radians, 7 x 7 displacements over +-3 px."""
    table, images = simulate(folder, n_images)
    volume, _ = read_volume(REAL / "maps" / "emd_1832.map")
    grid, pixel = polar_grid(64), 5.7
    rot, tilt, weights = viewing_directions(viewing_distance)
    templates = map_templates(volume, grid, view_matrices(rot, tilt))
    disp = lk.displacement_grid(3.0, 7, 7)
    return Setting(table, images, volume, grid, pixel, rot, tilt, weights, templates, disp)


def noise_like(images) -> np.ndarray:
    """Pure-noise images (pruning's worst case), the same in every run."""
    return np.random.default_rng(3).normal(size=images.shape)


def polar_inputs(table, images, grid, pixel):
    centred = images - images.mean(axis=(1, 2), keepdims=True)
    values = polar_transform(centred.astype(np.float32), grid, "dft")
    kx, ky = grid.points()
    params = [table[c].to_numpy() for c in CTF_COLUMNS]
    ctf = ctf_kernel.ctf(kx / pixel, ky / pixel, *params).astype(np.float32)
    ctf0 = ctf_kernel.ctf(np.zeros(1), np.zeros(1), *params)[:, 0]
    return values, ctf, np.sum(centred**2, axis=(1, 2)), ctf0


def run_search(values, ctf, syy, ctf0, grid, bank, disp, batch=32, **kwargs):
    """(results per image, CPU seconds, evaluated fraction)."""
    keys = ("rho", "template", "displacement", "rotation", "ll_optimal", "ll_integrated")
    out = {k: [] for k in keys}
    evaluated = 0
    t0 = time.process_time()
    for lo in range(0, len(values), batch):
        sl = slice(lo, lo + batch)
        images = lk.prepare_images(values[sl], ctf[sl], syy[sl], ctf0[sl], grid, bank, disp)
        res = lk.search(images, bank, **kwargs)
        evaluated += res.n_evaluated
        for k in keys:
            out[k].append(getattr(res, k))
    seconds = time.process_time() - t0
    return (
        {k: np.concatenate(v) for k, v in out.items()},
        seconds,
        evaluated / (len(values) * bank.n_templates * len(disp)),
    )


def pose_errors(table, res, rot, tilt, disp, n_inplanes, pixel):
    a_t = geometry.euler_to_matrix(
        *(table[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    )
    psi = geometry.psi_from_polar_turn(res["rotation"], n_inplanes)
    a_e = geometry.euler_to_matrix(rot[res["template"]], tilt[res["template"]], psi)
    view = geometry.angle_between_directions(
        geometry.viewing_direction(table["rlnAngleRot"], table["rlnAngleTilt"]),
        geometry.viewing_direction(rot[res["template"]], tilt[res["template"]]),
    )
    twist = np.abs(geometry.inplane_angle_between(a_e, a_t))
    true_disp = (
        geometry.displacement_from_origin(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
        / pixel
    )
    shift = np.hypot(*(disp[res["displacement"]] - true_disp).T)
    return view, twist, shift


def translation_rank(grid, disp, tolerance: float = 1e-3) -> int:
    """Numerical rank of the translation kernel exp(2 pi i k.d), quadrature-weighted over the
    polar grid's points k, for the displacements d: the number of terms a factorization of
    the displacements (Rangan, Spivak, Anden, Barnett 2020, Inverse Problems 36:024001)
    needs at this relative accuracy."""
    kx, ky = grid.points()
    w = np.sqrt(np.repeat(grid.weights[:, None], grid.n_inplanes, axis=1)).ravel()
    kernel = np.exp(
        2j * np.pi * (kx.ravel()[:, None] * disp[:, 0] + ky.ravel()[:, None] * disp[:, 1])
    )
    s = np.linalg.svd(kernel * w[:, None], compute_uv=False)
    return int(np.sum(s > tolerance * s[0]))


def peak_memory(folder: Path, n_images: int, viewing_distance: float, memory_mb: float) -> float:
    """Peak traced memory (MB) of the likelihood stage on n images (pure noise)."""
    from cryomatch.io.polar_files import write_set
    from cryomatch.stages.likelihood import likelihood
    from cryomatch.stages.templates import make_templates

    grid, pixel = polar_grid(64), 5.7
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(n_images, 64, 64)).astype(np.float32)
    values = polar_transform(noise - noise.mean(axis=(1, 2), keepdims=True), grid, "dft")
    base = {**grid.as_dict(), "resolution_factor": 1.0, "pixel_size": pixel}
    meta = {
        **base,
        "defocus_u": np.full(n_images, 15000.0),
        "defocus_v": np.full(n_images, 14500.0),
        "defocus_angle": np.full(n_images, 30.0),
        "voltage": np.full(n_images, 300.0),
        "spherical_aberration": np.full(n_images, 2.7),
        "amplitude_contrast": np.full(n_images, 0.1),
        "phase_shift": np.zeros(n_images),
        "ctf_bfactor": np.zeros(n_images),
        "image_mean": np.zeros(n_images),
        "image_ss": np.sum(noise.astype(np.float64) ** 2, axis=(1, 2)),
        "prior_displacement": np.zeros((n_images, 2)),
    }
    fft = folder / f"particles_fourier_stack_{n_images:06d}.npy"
    write_set(fft, values, meta, {})
    temps, rot, tilt, weights, dc, _ = make_templates(
        REAL / "maps" / "emd_1832.map", grid, pixel, viewing_distance
    )
    tfile = folder / f"templates_fourier_vd{viewing_distance}.npy"
    write_set(
        tfile,
        temps,
        {**base, "rot": rot, "tilt": tilt, "view_weights": weights, "dc": np.full(len(rot), dc)},
        {},
    )
    tracemalloc.start()
    likelihood(fft, tfile, folder / "out", 0, memory_mb=memory_mb)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--viewing-distance", type=float, default=0.3, help="radians (0.3: 250 views, 0.15: 782)"
    )
    parser.add_argument("--exact-subset", type=int, default=16, help="images searched exactly too")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    gflops = matmul_rate()
    print(f"numpy complex64 matmul, one thread: {gflops:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table, images, volume, grid, pixel, rot, tilt, weights, templates, disp = setting(
            tmp / "sim", args.images, args.viewing_distance
        )
        values, ctf, syy, ctf0 = polar_inputs(table, images, grid, pixel)
        t0 = time.process_time()
        bank = lk.prepare_templates(templates, grid, weights, float(volume.sum()))
        bank_seconds = time.process_time() - t0
        n, s, d, w = len(values), bank.n_templates, len(disp), grid.n_inplanes
        poses = n * s * d * w
        print(
            f"\n{n} images x {s} views x {d} displacements x {w} rotations = "
            f"{poses / 1e9:.2f} G poses; {grid.n_shells} shells; compression ranks mean "
            f"{np.mean(bank.ranks):.1f} of {grid.n_shells}, energy left out {bank.error:.1e}; "
            f"template set prepared in {bank_seconds:.2f} CPU-s (once per job)"
        )
        print(
            f"translation kernel over the {d} displacements: numerical rank "
            f"{translation_rank(grid, disp)} of {d} at 1e-3 (a factorization of the "
            "displacements cannot make them cost fewer products at this spacing)"
        )
        # the fastest of three runs, as timeit does (the machine may be shared)
        runs = [run_search(values, ctf, syy, ctf0, grid, bank, disp) for _ in range(3)]
        res, seconds, evaluated = min(runs, key=lambda run: run[1])
        print(f"search runs: {', '.join(f'{run[1]:.2f}' for run in runs)} CPU-s (the fastest used)")
        # the reference again, right after: the larger of the two (the machine may be shared)
        after = matmul_rate()
        if after > gflops:
            print(f"numpy complex64 matmul again after the search: {after:.1f} GFLOP/s (used)")
            gflops = after
        rate = poses / seconds
        with_bank = poses / (seconds + bank_seconds)
        dense_flops = 8.0 * grid.n_shells * (w // 2 + 1) * n * s * d
        executed = 8.0 * sum(bank.ranks) * n * s * d
        print(
            f"search: {seconds:.2f} CPU-s -> {rate / 1e6:.1f} M pose evaluations per CPU-second, "
            f"{rate / CRYOLIKE:.1f}x CryoLike's 28.4 M (with the template set's preparation: "
            f"{with_bank / 1e6:.1f} M, {with_bank / CRYOLIKE:.1f}x); "
            f"{evaluated:.1%} of (image, view, displacement) went through the inverse FFT"
        )
        print(
            f"effective FLOP rate {dense_flops / seconds / 1e9:.1f} GFLOP/s = "
            f"{dense_flops / seconds / 1e9 / gflops:.2f} x numpy's matmul; executed (compressed) "
            f"{executed / seconds / 1e9:.1f} GFLOP/s = {executed / seconds / 1e9 / gflops:.2f} x"
        )
        # equal accuracy: exact search of a subset (no compression, no pruning)
        k = min(args.exact_subset, n)
        exact_bank = lk.prepare_templates(
            templates, grid, weights, float(volume.sum()), tolerance=0.0
        )
        exact, exact_seconds, _ = run_search(
            values[:k], ctf[:k], syy[:k], ctf0[:k], grid, exact_bank, disp, prune=False
        )

        def diff(key):
            return np.abs(exact[key] - res[key][:k]).max()

        same = np.mean(
            (exact["template"] == res["template"][:k])
            & (exact["displacement"] == res["displacement"][:k])
            & (exact["rotation"] == res["rotation"][:k])
        )
        print(
            f"equal accuracy on {k} images against the exact search (no compression, no pruning, "
            f"{k * s * d * w / exact_seconds / 1e6:.1f} M/CPU-s): same best pose {same:.0%}; "
            f"max |d rho| {diff('rho'):.1e}, max |d log L optimal| {diff('ll_optimal'):.1e}, "
            f"max |d log L integrated| {diff('ll_integrated'):.1e}"
        )
        view, twist, shift = pose_errors(table, res, rot, tilt, disp, w, pixel)
        print(
            f"against the truth: view error median {np.median(view):.2f} deg (views every "
            f"{np.degrees(args.viewing_distance):.1f}); in-plane within one step "
            f"{np.mean(twist <= 360 / w):.1%}; "
            f"shift within 1 px {np.mean(shift <= 1.0):.1%}"
        )
        # refinement below the grid of every image's best pose (issue 15 point 4)
        t0 = time.process_time()
        slicer = FourierSlicer.from_map(volume)
        start = geometry.euler_to_matrix(
            rot[res["template"]],
            tilt[res["template"]],
            geometry.psi_from_polar_turn(res["rotation"], w),
        ).reshape(-1, 3, 3)
        refined = [
            refine_poses(
                values[b],
                ctf[b],
                syy[b],
                ctf0[b],
                grid,
                slicer.central_slices,
                float(volume.sum()),
                start[b],
                disp[res["displacement"][b]],
                np.degrees(args.viewing_distance),
                1.0,
            )
            for b in (slice(lo, lo + 64) for lo in range(0, n, 64))
        ]
        refine_seconds = time.process_time() - t0
        matrices, shifts = (np.concatenate([r[i] for r in refined]) for i in (0, 1))
        r_rot, r_tilt, _ = geometry.matrix_to_euler(matrices)
        r_view = geometry.angle_between_directions(
            geometry.viewing_direction(table["rlnAngleRot"], table["rlnAngleTilt"]),
            geometry.viewing_direction(r_rot, r_tilt),
        )
        true_disp = (
            geometry.displacement_from_origin(
                table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
            )
            / pixel
        )
        print(
            f"refinement below the grid: {1e3 * refine_seconds / n:.1f} CPU-ms per image "
            f"(map transform included); view error median {np.median(r_view):.2f} deg, "
            f"shift error median {np.median(np.hypot(*(shifts - true_disp).T)):.2f} px "
            f"(grid: {np.median(view):.2f} deg, {np.median(shift):.2f} px)"
        )
        # worst case for pruning: no signal at all
        nvalues, _, nsyy, _ = polar_inputs(table, noise_like(images), grid, pixel)
        m = min(64, n)
        noise_runs = [
            run_search(nvalues[:m], ctf[:m], nsyy[:m], ctf0[:m], grid, bank, disp) for _ in range(3)
        ]
        _, noise_seconds, noise_eval = min(noise_runs, key=lambda run: run[1])
        noise_rate = m * s * d * w / noise_seconds
        print(
            f"pure-noise images (pruning's worst case), {m} images, runs "
            f"{', '.join(f'{run[1]:.2f}' for run in noise_runs)} CPU-s: "
            f"{noise_rate / 1e6:.1f} M/CPU-s = {noise_rate / CRYOLIKE:.1f}x CryoLike; "
            f"{noise_eval:.0%} evaluated"
        )
        if not args.skip_memory:
            mem = tmp / "memory"
            mem.mkdir()
            small = peak_memory(mem, 64, 0.3, 200)
            more_images = peak_memory(mem, 128, 0.3, 200)
            more_views = peak_memory(mem, 64, 0.21, 200)
            print(
                f"peak traced memory of the likelihood stage (memory_mb 200): 64 images "
                f"{small:.0f} MB, 128 images {more_images:.0f} MB, 64 images with twice the "
                f"views {more_views:.0f} MB"
            )


if __name__ == "__main__":
    main()
