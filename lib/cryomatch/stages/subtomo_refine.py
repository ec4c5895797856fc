"""Subtomogram averaging by iterated local alignment with gold-standard half sets.

``cryomatch subtomo-refine init`` splits the particles into two half sets once (the STAR's
rlnRandomSubset, else alternating rows) and writes iteration 0: ``it000/particles.star``,
``reference1.mrc`` / ``reference2.mrc`` (the initial reference low-passed to
``--initial-lowpass`` A) and ``state.json`` (the search of the next iteration).

``cryomatch subtomo-refine align --iteration N --chunk K`` aligns chunk K of the
particles, each to its own half set's reference of iteration N-1, about its pose of
iteration N-1 (the STAR's priors at N = 1; without priors, the first iteration searches
about the identity as ``subtomo align`` does) with :class:`~cryomatch.alignment.local.LocalZNCC`,
then sums each half set's particles, turned into the reference's frame, with missing-wedge
weights in Fourier space (:mod:`cryomatch.kernels.average3d`): ``itNNN/chunks/chunk_K.star``
and ``.npz``.

``cryomatch subtomo-refine merge --iteration N --chunks C`` sums the chunks into the two
half maps (point-group symmetry applied), their FSC under the mask (``fsc.csv`` in 1/A,
``fsc.png`` with every iteration's curve so far, the resolution at 0.143), the next
references (each half filtered by the FSC weights sqrt(2 FSC / (1 + FSC)) and cut at the
resolution), the full map ``average.mrc`` and its central sections per iteration
(``sections.png``), and ``state.json``: the resolution, how much the poses changed, the
next search (the step narrows to half the angle the resolution subtends across the
particle, ``0.5 * resolution / diameter`` radians, not below ``--min-step``; the range to
twice the new step, at most the old range) and whether the loop has converged (mean pose
change below ``--converge-angle`` degrees and ``--converge-shift`` voxels). Once an
iteration has converged the later ones copy it (no-ops), so raising ``maxit`` costs
nothing after convergence.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from .. import geometry, provenance
from ..alignment.local import to_prior_frame
from ..alignment.tilt import single_axis
from ..errors import CryomatchError
from ..io.atomic import Outputs, atomic_path
from ..io.figures import curves, draw_orthogonal_slices, new_figure, save_png
from ..io.files import read_csv, write_csv, write_json, write_npz
from ..io.mrc import pixel_size_from, read_volume, write_mrc
from ..io.star import read_star, write_star
from ..kernels import fsc as fsc_kernels
from ..kernels.average3d import symmetrize, wedge_weighted_sums, wiener_average
from ..kernels.volumes import soft_sphere
from ..progress import progress
from ..symmetry import point_group
from .subtomo import (
    TomogramSource,
    _optics,
    build_local_model,
    build_model,
    chunk_name,
    iter_chunks,
    open_source,
    pose_columns,
)
from .subtomo_priors import has_priors, output_columns, row_priors

HALF = "rlnRandomSubset"


def iteration_dir(out, iteration: int) -> Path:
    return Path(out) / f"it{iteration:03d}"


def read_state(out, iteration: int) -> dict:
    path = iteration_dir(out, iteration) / "state.json"
    if not path.is_file():
        raise CryomatchError("file does not exist (run the previous iteration first)", path)
    return json.loads(path.read_text())


def _particles(out, iteration: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    blocks = read_star(iteration_dir(out, iteration) / "particles.star")
    return blocks["particles"], blocks.get("optics")


# --- init ------------------------------------------------------------------------------
def refine_init(
    out,
    reference,
    subvolumes=None,
    star=None,
    tomograms=(),
    angpix=None,
    initial_lowpass: float = 40.0,
    angular_range: float = 10.0,
    angular_step: float = 5.0,
):
    """Iteration 0: half sets, the initial references and the first search (module doc)."""
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("subtomo-refine init", params)
    source = open_source(subvolumes, star, tomograms)
    try:
        what = subvolumes if subvolumes is not None else star
        angpix = pixel_size_from(angpix, *source.pixel_size(), what)
        table = source.table.copy()
        optics = source.optics
    finally:
        source.close()
    ref, _ = read_volume(reference)
    ref = np.asarray(ref, dtype=np.float32)
    if HALF in table:
        halves = pd.to_numeric(table[HALF], errors="coerce").to_numpy()
        if not np.isin(halves, (1, 2)).all() or len(np.unique(halves)) < 2:
            raise CryomatchError(f"{HALF} must be 1 or 2, with both present", what)
    else:
        if len(table) < 2:
            raise CryomatchError("two half sets need at least two particles", what)
        table[HALF] = 1 + np.arange(len(table)) % 2
    freq = np.fft.rfftfreq(ref.shape[-1], angpix)[: ref.shape[-1] // 2 + 1]
    lowpass = (freq <= 1.0 / initial_lowpass).astype(float)
    ref = fsc_kernels.shell_filter(ref, lowpass)
    priors = has_priors(table)
    print(
        f"{what}: {len(table)} particles, half sets of {int((table[HALF] == 1).sum())} and "
        f"{int((table[HALF] == 2).sum())}; "
        + (
            "their STAR poses are the priors"
            if priors
            else "no priors: iteration 1 searches about the identity"
        ),
        file=sys.stderr,
    )
    state = {
        "iteration": 0,
        "resolution": float(initial_lowpass),
        "range": float(angular_range),
        "step": float(angular_step),
        "cutoff": min(0.5, angpix / initial_lowpass),
        "converged": False,
        "angpix": angpix,
        "priors": priors,
    }
    folder = iteration_dir(out, 0)
    optics = optics if optics is not None else _optics(ref.shape, angpix)
    labels = provenance.mrc_labels(prov)
    with Outputs() as outputs:
        write_star(folder / "particles.star", {"optics": optics, "particles": table}, prov, outputs)
        for h in (1, 2):
            write_mrc(folder / f"reference{h}.mrc", ref, angpix, labels, outputs)
        write_json(folder / "state.json", state, outputs)
    return state


# --- align ----------------------------------------------------------------------------
def refine_align(
    out,
    iteration: int,
    chunk: int,
    subvolumes=None,
    star=None,
    tomograms=(),
    mask=None,
    max_shifts=(3.0, 3.0, 3.0),
    rotations=((10.0, 5.0), (10.0, 5.0), (10.0, 5.0)),
    tilt=(-60.0, 60.0),
    cone=None,
    inplane=None,
    chunk_size: int = 100,
    batch_size: int = 16,
    backend: str = "numpy",
):
    """Align chunk ``chunk`` of iteration ``iteration`` and sum its half sets (module doc)."""
    if iteration < 1:
        raise CryomatchError(f"iterations to align start at 1, got {iteration}")
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("subtomo-refine align", params)
    state = read_state(out, iteration - 1)
    table, optics = _particles(out, iteration - 1)
    n = len(table)
    n_chunks = max(1, math.ceil(n / chunk_size))
    if not 0 <= chunk < n_chunks:
        raise CryomatchError(f"chunk {chunk} does not exist: {n} particles make {n_chunks}")
    start, stop = chunk * chunk_size, min(n, (chunk + 1) * chunk_size)
    folder = iteration_dir(out, iteration) / "chunks"
    angpix = float(state["angpix"])
    refs = [read_volume(iteration_dir(out, iteration - 1) / f"reference{h}.mrc")[0] for h in (1, 2)]
    shape = refs[0].shape
    sums = {f"{k}{h}": 0 for k in ("num", "den") for h in (1, 2)}
    if state["converged"]:  # nothing left to do: pass the poses through
        rows = table.iloc[start:stop].reset_index(drop=True)
        _write_chunk(folder, chunk, optics, rows, sums, shape, angpix, True, prov)
        return rows
    mask_arr = read_volume(mask)[0] if mask else None
    source = open_source(subvolumes, star, tomograms)
    try:
        if len(source) != n:
            raise CryomatchError(
                f"the inputs hold {len(source)} particles, iteration {iteration - 1} {n}",
                subvolumes or star,
            )
        source.table = table
        source._angpix = angpix
        if isinstance(source, TomogramSource):
            source._positions = source.positions(angpix)
        local = iteration > 1 or state["priors"]
        models = {}
        for h in (1, 2):
            if local:
                search = {
                    "range": state["range"],
                    "step": state["step"],
                    "cone": cone,
                    "inplane": inplane,
                }
                models[h] = build_local_model(
                    refs[h - 1][None], mask_arr, search, state["cutoff"], tilt, True
                )
            else:
                models[h] = build_model(
                    refs[h - 1][None],
                    mask_arr,
                    "zncc",
                    rotations,
                    state["cutoff"],
                    tilt,
                    True,
                    False,
                )
        columns, sums = _align_chunk(
            source, models, start, stop, max_shifts, angpix, tilt, backend, batch_size
        )
    finally:
        source.close()
    rows = output_columns(
        table.iloc[start:stop].reset_index(drop=True),
        columns,
        source.box_in_subtomogram_frame,
        angpix,
    )
    change = _pose_change(table.iloc[start:stop], rows, angpix)
    rows["rlnCryomatchAngleChange"], rows["rlnCryomatchShiftChange"] = change
    _write_chunk(folder, chunk, optics, rows, sums, shape, angpix, False, prov)
    return rows


def _align_chunk(source, models, start, stop, max_shifts, angpix, tilt, backend, batch_size):
    """Poses of rows start .. stop (each half set against its model) and the half sets'
    wedge-weighted sums."""
    shape = models[1].input_shape
    tilt_model = single_axis(tuple(tilt)) if tilt is not None else single_axis(None)
    sums = {}
    out = {k: [] for k in ("labels", "quats", "shifts")}
    halves_all = source.table[HALF].to_numpy().astype(int)
    bar = progress(total=stop - start, desc="subtomo-refine", unit="subvol")
    for lo in range(start, stop, batch_size):
        hi = min(stop, lo + batch_size)
        volumes, offsets = source.read(lo, hi, shape)
        rows = source.table.iloc[lo:hi]
        halves = halves_all[lo:hi]
        quats, shifts = np.zeros((hi - lo, 4)), np.zeros((hi - lo, 3))
        box = np.tile([0.0, 0, 0, 1], (hi - lo, 1))
        for h in (1, 2):
            sel = np.flatnonzero(halves == h)
            if not len(sel):
                continue
            model = models[h]
            if hasattr(model, "align_priors"):
                pq, ps, bq, ref = row_priors(
                    rows.iloc[sel], offsets[sel], shape, source.box_in_subtomogram_frame
                )
                box[sel] = bq
                _, shifts[sel], quats[sel], _ = model.align_priors(
                    volumes[sel], max_shifts, pq, ps, bq, ref, backend
                )
            else:
                _, shifts[sel], quats[sel], _ = model.align_batch(
                    volumes[sel], max_shifts, backend=backend
                )
            turned = np.stack([to_prior_frame(volumes[i], quats[i], shifts[i]) for i in sel])
            orient = Rotation.from_quat(box[sel]) * Rotation.from_quat(quats[sel])
            wedges = np.stack([tilt_model.rfft_mask(r, shape) for r in orient])
            num, den = wedge_weighted_sums(turned, wedges)
            sums[f"num{h}"] = sums.get(f"num{h}", 0) + num
            sums[f"den{h}"] = sums.get(f"den{h}", 0) + den
        out["quats"].append(quats)
        out["shifts"].append(shifts - offsets)
        bar.update(hi - lo)
    bar.close()
    quats, shifts = np.concatenate(out["quats"]), np.concatenate(out["shifts"])
    columns = pose_columns(np.zeros(len(quats), dtype=np.int64), quats, shifts, shape, angpix)
    columns = columns.drop(columns=["rlnClassNumber"])
    for k in ("num1", "num2", "den1", "den2"):
        sums.setdefault(k, 0)
    return columns, sums


def _pose_change(before, after, angpix):
    """(angle in degrees, shift in voxels) between two tables' poses, per row."""

    def pose(t):
        a = geometry.euler_to_matrix(
            *(t[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
        )
        o = np.zeros((len(t), 3))
        if all(f"rlnOrigin{x}Angst" in t for x in "XYZ"):
            o = t[[f"rlnOrigin{x}Angst" for x in "XYZ"]].to_numpy(float) / angpix
        return a, o

    if not has_priors(before):
        return np.full(len(after), np.nan), np.full(len(after), np.nan)
    (a0, o0), (a1, o1) = pose(before), pose(after)
    return geometry.angle_between_rotations(a1, a0), np.linalg.norm(o1 - o0, axis=1)


def _write_chunk(folder, chunk, optics, rows, sums, shape, angpix, skipped, prov):
    name = chunk_name(chunk)
    arrays = {k: np.asarray(v) for k, v in sums.items()}
    with Outputs() as outputs:
        write_star(folder / f"{name}.star", {"optics": optics, "particles": rows}, prov, outputs)
        write_npz(
            folder / f"{name}.npz",
            outputs,
            angpix=angpix,
            skipped=skipped,
            shape=np.asarray(shape),
            **arrays,
        )


# --- merge ----------------------------------------------------------------------------
def refine_merge(
    out,
    iteration: int,
    n_chunks: int,
    mask=None,
    symmetry: str = "C1",
    wiener: float = 1.0,
    diameter=None,
    min_step: float = 1.0,
    converge_angle: float = 0.5,
    converge_shift: float = 0.2,
):
    """Half maps, FSC, next references and state of iteration ``iteration`` (module doc).
    ``diameter``: the particle's in A (default the mask's, else 0.8 of the box)."""
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("subtomo-refine merge", params)
    previous = read_state(out, iteration - 1)
    folder = iteration_dir(out, iteration)
    tables, sums, skipped, optics = [], {}, True, None
    for particles, chunk_optics, z in iter_chunks(folder / "chunks", n_chunks):
        tables.append(particles)
        optics = chunk_optics
        skipped = skipped and bool(z["skipped"])
        for key in ("num1", "num2", "den1", "den2"):
            sums[key] = sums.get(key, 0) + z[key]
    table = pd.concat(tables, ignore_index=True)
    if skipped:  # converged before: this iteration is a copy of the previous one
        return _copy_iteration(out, iteration, table, optics, prov)
    angpix = float(previous["angpix"])
    prev_ref = read_volume(iteration_dir(out, iteration - 1) / "reference1.mrc")[0]
    shape = prev_ref.shape
    mask_arr = read_volume(mask)[0] if mask else soft_sphere(shape, 0.4 * shape[0], 0.08 * shape[0])
    matrices = geometry.relion_to_zyx_matrix(point_group(symmetry))
    centre = geometry.relion_centre(shape)
    halves = [
        symmetrize(
            wiener_average(sums[f"num{h}"], sums[f"den{h}"], shape, wiener), matrices, centre
        )
        for h in (1, 2)
    ]
    freq, curve = fsc_kernels.fsc(halves[0] * mask_arr, halves[1] * mask_arr, angpix)
    resolution = fsc_kernels.resolution_at(freq, curve, 0.143)
    weights = fsc_kernels.fsc_weight(curve) * (freq <= 1.0 / resolution)
    refs = [fsc_kernels.shell_filter(h, weights) for h in halves]
    average = fsc_kernels.shell_filter((halves[0] + halves[1]) / 2, weights)
    if diameter is None:
        inside = np.flatnonzero(mask_arr[shape[0] // 2, shape[1] // 2] > 0.5)
        diameter = (
            (inside.max() - inside.min() + 1) * angpix if len(inside) else 0.8 * shape[0] * angpix
        )
    step = float(np.clip(0.5 * np.degrees(resolution / diameter), min_step, previous["step"]))
    angle, shift = (
        table[c].to_numpy(float) for c in ("rlnCryomatchAngleChange", "rlnCryomatchShiftChange")
    )
    mean_angle = float(np.nanmean(angle)) if np.isfinite(angle).any() else float("inf")
    mean_shift = float(np.nanmean(shift)) if np.isfinite(shift).any() else float("inf")
    converged = mean_angle < converge_angle and mean_shift < converge_shift
    state = {
        "iteration": iteration,
        "resolution": resolution,
        "range": float(min(previous["range"], max(2 * step, previous["step"]))),
        "step": step,
        "cutoff": float(min(0.5, angpix / resolution)) if math.isfinite(resolution) else 0.1,
        "converged": bool(converged),
        "angpix": angpix,
        "priors": True,
        "mean_angle_change": mean_angle,
        "mean_shift_change": mean_shift,
        "symmetry": symmetry,
        "n_particles": [int((table[HALF] == h).sum()) for h in (1, 2)],
    }
    print(
        f"iteration {iteration}: resolution {resolution:.1f} A (FSC 0.143); poses changed by "
        f"{mean_angle:.2f} deg and {mean_shift:.2f} voxels on average; next step {step:.2f} deg"
        f" within {state['range']:.2f}" + ("; converged" if converged else ""),
        file=sys.stderr,
    )
    fsc_table = pd.DataFrame(
        {"frequency": freq, "resolution": 1.0 / np.maximum(freq, 1e-12), "fsc": curve}
    )
    labels = provenance.mrc_labels(prov)
    with Outputs() as outputs:
        write_star(folder / "particles.star", {"optics": optics, "particles": table}, prov, outputs)
        for h in (1, 2):
            write_mrc(folder / f"half{h}.mrc", halves[h - 1], angpix, labels, outputs)
            write_mrc(folder / f"reference{h}.mrc", refs[h - 1], angpix, labels, outputs)
        write_mrc(folder / "average.mrc", average, angpix, labels, outputs)
        write_csv(folder / "fsc.csv", fsc_table, prov, outputs)
        write_json(folder / "state.json", state, outputs)
        _figures(out, iteration, fsc_table, average, outputs)
    return state


def _copy_iteration(out, iteration, table, optics, prov):
    src, dst = iteration_dir(out, iteration - 1), iteration_dir(out, iteration)
    state = {**read_state(out, iteration - 1), "iteration": iteration, "copied_from": iteration - 1}
    print(f"iteration {iteration}: converged at iteration {iteration - 1}; copied", file=sys.stderr)
    with Outputs() as outputs:
        write_star(dst / "particles.star", {"optics": optics, "particles": table}, prov, outputs)
        for name in (
            "half1.mrc",
            "half2.mrc",
            "reference1.mrc",
            "reference2.mrc",
            "average.mrc",
            "fsc.csv",
            "fsc.png",
            "sections.png",
        ):
            with atomic_path(dst / name, outputs) as tmp:
                shutil.copyfile(src / name, tmp)
        write_json(dst / "state.json", state, outputs)
    return state


def _figures(out, iteration, fsc_table, average, outputs):
    """fsc.png (every iteration's FSC so far) and sections.png (central sections of every
    iteration's average)."""
    folder = iteration_dir(out, iteration)
    ys, maps = {}, []
    for i in range(1, iteration):
        path = iteration_dir(out, i) / "fsc.csv"
        if path.is_file() and not read_state(out, i).get("copied_from"):
            ys[f"iteration {i}"] = read_csv(path)["fsc"].to_numpy()
            maps.append((i, read_volume(iteration_dir(out, i) / "average.mrc")[0]))
    ys[f"iteration {iteration}"] = fsc_table["fsc"].to_numpy()
    maps.append((iteration, average))
    fig = curves(
        fsc_table["frequency"].to_numpy(),
        ys,
        "spatial frequency (1/A)",
        "FSC (half sets, masked)",
        "FSC per iteration",
        hlines=(0.143,),
    )
    save_png(fig, folder / "fsc.png", outputs)
    fig = new_figure(7.5, 2.3 * len(maps) + 0.3)
    axes = fig.subplots(len(maps), 3, squeeze=False)
    for row, (i, volume) in zip(axes, maps, strict=True):
        draw_orthogonal_slices(row, volume)
        row[0].set_title(f"iteration {i}: xy", fontsize=8)
    save_png(fig, folder / "sections.png", outputs)


# --- command line -----------------------------------------------------------------------
def _sources(a) -> None:
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--subvolumes", help="MRC volume stack of subvolumes")
    src.add_argument("--star", help="STAR of positions (with --tomogram) or of subvolume files")
    a.add_argument("--tomogram", action="append", default=[], help="tomogram MRC (repeat)")


def add_arguments(p) -> None:
    from ..alignment.tilt import add_tilt_arguments

    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = sub.add_parser("init", help="half sets, initial references (iteration 0)")
    _sources(i)
    i.add_argument("--out", required=True, help="output folder")
    i.add_argument("--reference", required=True, help="initial reference MRC")
    i.add_argument("--angpix", type=float, help="pixel size (A)")
    i.add_argument("--initial-lowpass", type=float, default=40.0, help="A")
    i.add_argument("--range", type=float, default=10.0, help="first search range, degrees")
    i.add_argument("--step", type=float, default=5.0, help="first search step, degrees")
    a = sub.add_parser("align", help="align one chunk of one iteration")
    _sources(a)
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--iteration", type=int, required=True, help="iteration (from 1)")
    a.add_argument("--chunk", type=int, required=True, help="chunk of particles")
    a.add_argument("--chunk-size", type=int, default=100, help="particles per chunk")
    a.add_argument("--mask", help="mask MRC (reference shape)")
    a.add_argument(
        "--max-shifts",
        type=float,
        nargs=3,
        default=(3.0, 3.0, 3.0),
        metavar=("Z", "Y", "X"),
        help="shift search about the pose, voxels",
    )
    a.add_argument(
        "--rotations",
        type=float,
        nargs=6,
        default=(10.0, 5.0) * 3,
        help="without priors, iteration 1's grid: (max, step) about z, y, x",
    )
    add_tilt_arguments(a)
    a.add_argument("--cone", type=float, help="viewing directions within this many degrees")
    a.add_argument("--inplane", type=float, help="in-plane angles within this many degrees")
    a.add_argument("--batch-size", type=int, default=16, help="subvolumes read at a time")
    a.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend")
    m = sub.add_parser("merge", help="half maps, FSC and the next references")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--iteration", type=int, required=True, help="iteration (from 1)")
    m.add_argument("--chunks", type=int, required=True, help="number of chunks")
    m.add_argument("--mask", help="mask MRC for the FSC (default a soft sphere)")
    m.add_argument("--symmetry", default="C1", help="point group (Cn, Dn, T, O, I)")
    m.add_argument("--wiener", type=float, default=1.0, help="Wiener constant, particles")
    m.add_argument("--diameter", type=float, help="particle diameter, A (default: the mask's)")
    m.add_argument("--min-step", type=float, default=1.0, help="finest angular step, degrees")
    m.add_argument("--converge-angle", type=float, default=0.5, help="degrees")
    m.add_argument("--converge-shift", type=float, default=0.2, help="voxels")


def run(args) -> None:
    if args.action == "init":
        refine_init(
            args.out,
            args.reference,
            args.subvolumes,
            args.star,
            args.tomogram,
            args.angpix,
            args.initial_lowpass,
            args.range,
            args.step,
        )
    elif args.action == "align":
        r = args.rotations
        refine_align(
            args.out,
            args.iteration,
            args.chunk,
            args.subvolumes,
            args.star,
            args.tomogram,
            args.mask,
            tuple(args.max_shifts),
            [(r[0], r[1]), (r[2], r[3]), (r[4], r[5])],
            None if args.no_wedge else tuple(args.tilt),
            args.cone,
            args.inplane,
            args.chunk_size,
            args.batch_size,
            args.backend,
        )
    else:
        refine_merge(
            args.out,
            args.iteration,
            args.chunks,
            args.mask,
            args.symmetry,
            args.wiener,
            args.diameter,
            args.min_step,
            args.converge_angle,
            args.converge_shift,
        )
