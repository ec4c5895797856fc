"""Likelihood: one Fourier stack against one template set (one job per (i_template, stack)).

For every image: the best normalized cross-correlation over all template views x
displacements x in-plane rotations and its pose, the log-likelihood there, and the
integrated log-likelihood over all poses (BioEM), with each image's own CTF (every optics
group, astigmatism, phase shift, B-factor); see :mod:`cryomatch.kernels.likelihood`.
Displacements: CryoLike's grid (``max_displacement_pixels``, ``n_displacements_x``,
``n_displacements_y``), about the image centre or, with ``use_prior_shifts``, about each
image's shift from its STAR file. Outputs in CryoLike's layout under ``OUT/templateN``
(N = ``i_template``), for stack ``STACK``:

* ``cross_correlation/cross_correlation_stack_STACK.npy``: best rho per image;
* ``optimal_pose/optimal_template_stack_STACK.npy``: the view index (row of the template
  set's rot/tilt), ``optimal_displacement_{x,y}_stack_STACK.npy``: where the particle sits
  from the box centre (Angstrom; RELION's origin is minus this),
  ``optimal_inplane_rotation_stack_STACK.npy``: RELION psi in degrees;
* ``log_likelihood/log_likelihood_{integrated,optimal}_stack_STACK.npy``;
* with ``full_cross_correlation``: ``cross_correlation/cross_correlation_pose_stack_STACK.npy``
  (float32 [image, view, displacement, rotation], rotation j = psi 360 j / W degrees);
* with ``refine``: ``optimal_pose/refined_pose_stack_STACK.npy`` (image x [rot, tilt, psi,
  x, y, rho], degrees and Angstrom), see :mod:`cryomatch.kernels.refine`;
* ``provenance_stack_STACK.json``.

Memory: images go in batches sized to ``memory_mb``; the template set is read from its
memory map in chunks, compressed, and its coefficients kept when they fit a quarter of the
budget, else recomputed per chunk of views: peak memory follows the budget, not the number
of images or views.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import numpy as np

from .. import geometry, provenance
from ..backend import get_xp
from ..cli import nonnegative_float, positive_float, positive_int
from ..errors import CryomatchError
from ..io.atomic import Outputs
from ..io.files import write_json, write_npy
from ..io.polar_files import CTF_FIELDS, ArrayWriter, read_fourier_stack, read_templates
from ..io.structures import read_frames, read_map, read_model
from ..kernels import ctf as ctf_kernel
from ..kernels import likelihood as lk
from ..kernels.refine import refine_poses
from ..kernels.slicing import FourierSlicer
from ..progress import progress


def stack_label(fourier_npy: str | Path) -> str:
    """'NNNNNN' of 'particles_fourier_stack_NNNNNN.npy' (else the file stem)."""
    stem = Path(fourier_npy).stem
    match = re.fullmatch(r"particles_fourier_stack_(.+)", stem)
    return match.group(1) if match else stem


def output_paths(
    out: str | Path, i_template: int, stack: str, full: bool = False, refine: bool = False
) -> dict[str, Path]:
    """The files one job writes (see the module docstring), by key."""
    base = Path(out) / f"template{i_template}"
    paths = {
        "cross_correlation": base / "cross_correlation" / f"cross_correlation_stack_{stack}.npy",
        "template": base / "optimal_pose" / f"optimal_template_stack_{stack}.npy",
        "displacement_x": base / "optimal_pose" / f"optimal_displacement_x_stack_{stack}.npy",
        "displacement_y": base / "optimal_pose" / f"optimal_displacement_y_stack_{stack}.npy",
        "inplane_rotation": base / "optimal_pose" / f"optimal_inplane_rotation_stack_{stack}.npy",
        "ll_integrated": base / "log_likelihood" / f"log_likelihood_integrated_stack_{stack}.npy",
        "ll_optimal": base / "log_likelihood" / f"log_likelihood_optimal_stack_{stack}.npy",
        "provenance": base / f"provenance_stack_{stack}.json",
    }
    if full:
        paths["full"] = base / "cross_correlation" / f"cross_correlation_pose_stack_{stack}.npy"
    if refine:
        paths["refined"] = base / "optimal_pose" / f"refined_pose_stack_{stack}.npy"
    return paths


def polar_ctf(stack, rows: slice, xp=np):
    """CTFs of the stack's images ``rows`` on its polar grid (M, R, W) float32, and at 0 (M,)."""
    kx, ky = stack.grid.points()
    params = [np.asarray(stack.meta[k][rows], dtype=np.float64) for k in CTF_FIELDS]
    values = ctf_kernel.ctf(
        xp.asarray(kx / stack.pixel_size), xp.asarray(ky / stack.pixel_size), *params
    )
    at_zero = ctf_kernel.ctf(np.zeros(1), np.zeros(1), *params)[:, 0]
    return values.astype(xp.float32), at_zero


def check_compatible(stack, templates) -> None:
    """Same polar grid and pixel size (within 1%) for images and templates."""
    if not stack.grid.same_as(templates.grid):
        raise CryomatchError(
            f"the templates' polar grid ({templates.grid.box} px, {templates.grid.n_shells} "
            f"shells x {templates.grid.n_inplanes} angles) differs from the particles' "
            f"({stack.grid.box} px, "
            f"{stack.grid.n_shells} x {stack.grid.n_inplanes}); remake the templates",
            templates.path,
        )
    if abs(templates.pixel_size - stack.pixel_size) > 0.01 * stack.pixel_size:
        raise CryomatchError(
            f"the templates' pixel size {templates.pixel_size:g} A differs from the particles' "
            f"{stack.pixel_size:g} A by more than 1%",
            templates.path,
        )


BATCH_IMAGES = 32  # larger batches gain nothing: the products of a block then leave the caches


def block_bytes_for(memory_mb: float) -> float:
    """Bytes of the spectra planes the search holds at once: an eighth of ``memory_mb``, at
    most 8 MB (they should stay in the caches)."""
    return min(8e6, memory_mb * 2**20 / 8)


def batch_size_for(memory_mb: float, bank, n_displacements: int) -> int:
    """Images per batch so that the per-batch arrays fit half of ``memory_mb`` with the
    search's spectra planes (:func:`block_bytes_for`; the template coefficients take at most
    a quarter): per image, S_cc and its companions for one chunk of views (5 x W x chunk
    float32), the compressed images (D x sum 2 H_q float32) and the planes of at least
    one view and displacement (2 (W/2 + 1) float32)."""
    w, q = bank.n_inplanes, bank.n_inplanes // 2 + 1
    per_image = 5 * 4 * w * bank.chunk_size + 8 * n_displacements * sum(bank.ranks) + 8 * q
    budget = memory_mb * 2**20 / 2 - block_bytes_for(memory_mb)
    return max(1, min(BATCH_IMAGES, int(budget // per_image)))


def likelihood(
    fourier_stack: str | Path,
    templates_npy: str | Path,
    out: str | Path,
    i_template: int = 0,
    max_displacement_pixels: float = 3.0,
    n_displacements_x: int = 7,
    n_displacements_y: int = 7,
    use_prior_shifts: bool = False,
    full_cross_correlation: bool = False,
    refine: bool = False,
    compression_tolerance: float = 3e-5,
    ll_tolerance: float = 1e-4,
    memory_mb: float = 1000.0,
    backend: str = "numpy",
    atom_selection: str = "all",
    atom_sigma: float = 1.0,
) -> dict[str, Path]:
    """Run one (template set, stack) job; returns the output paths by key."""
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("likelihood", params)
    xp = get_xp(backend)
    if max_displacement_pixels < 0:
        raise CryomatchError(f"max_displacement_pixels must be >= 0, got {max_displacement_pixels}")
    stack = read_fourier_stack(fourier_stack)
    temps = read_templates(templates_npy)
    check_compatible(stack, temps)
    label = stack_label(fourier_stack)
    paths = output_paths(out, i_template, label, full_cross_correlation, refine)
    grid, pixel = stack.grid, stack.pixel_size
    disp = lk.displacement_grid(max_displacement_pixels, n_displacements_x, n_displacements_y)
    bank = lk.prepare_templates(
        temps.values,
        grid,
        temps.meta["view_weights"],
        temps.meta["dc"],
        compression_tolerance,
        xp,
        max_bytes=memory_mb * 2**20 / 4,
    )
    n, s, d, w = len(stack), bank.n_templates, len(disp), grid.n_inplanes
    batch = batch_size_for(memory_mb, bank, d)
    prior = np.asarray(stack.meta["prior_displacement"], dtype=np.float64)
    keys = ["rho", "template", "displacement", "rotation", "ll_optimal", "ll_integrated"]
    res = {
        k: np.empty(
            n, dtype=np.int64 if k in ("template", "displacement", "rotation") else np.float64
        )
        for k in keys
    }
    n_eval = 0
    with Outputs() as outputs, contextlib.ExitStack() as writers:
        full = None
        if full_cross_correlation:
            full = writers.enter_context(
                ArrayWriter(paths["full"], (n, s, d, w), outputs, np.float32)
            )
        bar = progress(total=n, desc=f"likelihood template{i_template} stack {label}", unit="img")
        for start in range(0, n, batch):
            rows = slice(start, min(n, start + batch))
            ctf, ctf0 = polar_ctf(stack, rows, xp)
            images = lk.prepare_images(
                xp.asarray(np.asarray(stack.values[rows])),
                ctf,
                stack.meta["image_ss"][rows],
                ctf0,
                grid,
                bank,
                disp,
                prior[rows] if use_prior_shifts else None,
            )
            target = None
            if full is not None:
                target = np.empty((rows.stop - rows.start, s, d, w), dtype=np.float32)
            found = lk.search(
                images,
                bank,
                ll_tolerance=ll_tolerance,
                full_output=target,
                block_bytes=block_bytes_for(memory_mb),
            )
            if full is not None:  # rotation axis in psi order: psi_j = 360 j / W <-> turn -j
                full.array[rows] = target[..., (-np.arange(w)) % w]
            for k in keys:
                res[k][rows] = getattr(found, k)
            n_eval += found.n_evaluated
            bar.update(rows.stop - rows.start)
        bar.close()
        centre = prior if use_prior_shifts else np.zeros((n, 2))
        position = (disp[res["displacement"]] + centre) * pixel  # Angstrom from the box centre
        write_npy(paths["cross_correlation"], res["rho"], outputs)
        write_npy(paths["template"], res["template"], outputs)
        write_npy(paths["displacement_x"], position[:, 0], outputs)
        write_npy(paths["displacement_y"], position[:, 1], outputs)
        write_npy(
            paths["inplane_rotation"], geometry.psi_from_polar_turn(res["rotation"], w), outputs
        )
        write_npy(paths["ll_integrated"], res["ll_integrated"], outputs)
        write_npy(paths["ll_optimal"], res["ll_optimal"], outputs)
        refine_seconds = refine_cpu = 0.0
        if refine:
            clock, cpu = time.perf_counter(), time.process_time()
            refined = refine_stack(stack, temps, res, disp, centre, atom_selection, atom_sigma)
            refine_seconds = time.perf_counter() - clock
            refine_cpu = time.process_time() - cpu
            write_npy(paths["refined"], refined, outputs)
        prov["summary"] = {
            "images": n,
            "views": s,
            "displacements": d,
            "rotations": w,
            "compression_ranks": bank.ranks,
            "compression_error": bank.error,
            "evaluated_fraction": n_eval / max(1, n * s * d),
            "refine_seconds_per_image": refine_seconds / max(1, n),
            "refine_cpu_seconds_per_image": refine_cpu / max(1, n),
        }
        write_json(paths["provenance"], prov, outputs)
    return paths


REFINE_BATCH = 64  # images refined together (about 0.2 MB each at 64 px, + the scoring's)


def structure_slicer(temps, grid, pixel: float, atom_selection="all", atom_sigma=1.0):
    """The template set's structure (re-read from its source, scaled as its templates) as a
    :class:`~cryomatch.kernels.slicing.FourierSlicer`."""
    kind, source = str(temps.meta["kind"]), str(temps.meta["source"])
    scale = float(temps.meta["scale"])
    if kind == "map":
        volume, _ = read_map(source)
        return FourierSlicer.from_map(np.asarray(volume * scale, dtype=np.float32))
    if "frame" in temps.meta:  # a frame of an ensemble
        topology = str(temps.meta["topology"])
        trajectory = None if source == topology else source
        _, atoms = next(
            read_frames(
                topology,
                trajectory,
                [int(temps.meta["frame"])],
                str(temps.meta["atom_filter"]) or None,
                atom_selection,
                atom_sigma,
            )
        )
    else:
        atoms = read_model(source, atom_selection, atom_sigma)
    sigmas = atoms.sigmas / pixel  # as the templates' (stages.templates)
    strengths = atoms.amplitudes * pixel**3 * scale * (2 * np.pi * sigmas**2) ** 1.5
    return FourierSlicer.from_atoms(atoms.coords / pixel, strengths, sigmas, grid.box)


def refine_stack(stack, temps, res: dict, disp, centre, atom_selection="all", atom_sigma=1.0):
    """Refined poses (n, 6): rot, tilt, psi (degrees), x, y (Angstrom), rho; see
    :mod:`cryomatch.kernels.refine` (the structure from :func:`structure_slicer`)."""
    pixel, grid = stack.pixel_size, stack.grid
    slicer = structure_slicer(temps, grid, pixel, atom_selection, atom_sigma)
    dc = float(temps.meta["dc"][0])
    angle_step = np.degrees(float(temps.meta.get("viewing_distance", 0.1)))
    grid_step = np.max(
        np.ptp(disp, axis=0)
        / np.maximum(1, np.array([len(np.unique(disp[:, 0])), len(np.unique(disp[:, 1]))]) - 1)
    )
    shift_step = float(grid_step) if grid_step > 0 else 1.0
    n = len(stack)
    out = np.empty((n, 6))
    bar = progress(total=n, desc="refine", unit="img")
    for lo in range(0, n, REFINE_BATCH):
        rows = slice(lo, min(n, lo + REFINE_BATCH))
        views = res["template"][rows]
        psi = geometry.psi_from_polar_turn(res["rotation"][rows], grid.n_inplanes)
        start = geometry.euler_to_matrix(
            np.asarray(temps.meta["rot"])[views], np.asarray(temps.meta["tilt"])[views], psi
        ).reshape(-1, 3, 3)
        ctf, ctf0 = polar_ctf(stack, rows)
        matrices, shifts, rho = refine_poses(
            np.asarray(stack.values[rows]),
            ctf,
            np.asarray(stack.meta["image_ss"][rows], dtype=np.float64),
            ctf0,
            grid,
            slicer.central_slices,
            dc,
            start,
            disp[res["displacement"][rows]] + centre[rows],
            angle_step,
            shift_step,
        )
        rot, tilt, psi = geometry.matrix_to_euler(matrices)
        out[rows] = np.column_stack([rot, tilt, psi, shifts * pixel, rho])
        bar.update(rows.stop - rows.start)
    bar.close()
    return out


def add_arguments(p) -> None:
    p.add_argument("--fourier-stack", required=True, help="particles_fourier_stack_NNNNNN.npy")
    p.add_argument(
        "--templates", nargs="+", required=True, help="templates_fourier_NAME.npy (one or more)"
    )
    p.add_argument("--out", required=True, help="output folder (e.g. results/likelihood)")
    p.add_argument(
        "--i-template",
        type=int,
        nargs="+",
        default=[0],
        help="N of OUT/templateN, one per template set",
    )
    p.add_argument("--max-displacement-pixels", type=nonnegative_float, default=3.0)
    p.add_argument("--n-displacements-x", type=positive_int, default=7)
    p.add_argument("--n-displacements-y", type=positive_int, default=7)
    p.add_argument(
        "--use-prior-shifts",
        action="store_true",
        help="centre the displacement grid on each image's STAR shift",
    )
    p.add_argument(
        "--full-cross-correlation",
        action="store_true",
        help="also write every cross-correlation [image, view, displacement, rotation]",
    )
    p.add_argument(
        "--refine", action="store_true", help="refine each best pose below the grid spacing"
    )
    p.add_argument(
        "--compression-tolerance",
        type=float,
        default=3e-5,
        help="relative template energy the per-q SVD may leave out (0: none)",
    )
    p.add_argument(
        "--ll-tolerance",
        type=float,
        default=1e-4,
        help="share of the integrated likelihood pruning may leave out",
    )
    p.add_argument(
        "--memory-mb", type=positive_float, default=1000.0, help="memory budget of the batches"
    )
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument(
        "--atoms", default="all", choices=["all", "ca"], help="atomic models (refinement)"
    )
    p.add_argument(
        "--atom-sigma", type=positive_float, default=1.0, help="atom width (A), refinement"
    )


def run(args) -> None:
    """One job per template set given, in order (an ensemble's frames go in groups)."""
    if len(args.templates) != len(args.i_template):
        raise CryomatchError(
            f"{len(args.templates)} template sets but {len(args.i_template)} --i-template values"
        )
    for templates_npy, i_template in zip(args.templates, args.i_template, strict=True):
        likelihood(
            args.fourier_stack,
            templates_npy,
            args.out,
            i_template,
            args.max_displacement_pixels,
            args.n_displacements_x,
            args.n_displacements_y,
            args.use_prior_shifts,
            args.full_cross_correlation,
            args.refine,
            args.compression_tolerance,
            args.ll_tolerance,
            args.memory_mb,
            args.backend,
            args.atoms,
            args.atom_sigma,
        )
