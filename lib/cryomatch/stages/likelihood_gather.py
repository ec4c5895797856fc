"""Gather the likelihood jobs: a [structure, image] likelihood matrix, best poses, a figure.

Reads every ``OUT/templateN/..._stack_STACK.npy`` (N = 0.. in structure order, STACK from
the preprocessed stacks' names), one template at a time (memory: a few arrays per image,
not per structure and image, so thousands of structures gather), and writes in ``OUT``:

* ``likelihood_matrix.npy``: integrated log-likelihood [structure, image] float64 (images in
  stack order), written row by row into a memory map; ``likelihood_matrix.csv`` (one row per
  image: its name, the best structure and its posterior; per structure the integrated and
  optimal-pose log-likelihoods and the best cross-correlation when there are at most
  ``CSV_STRUCTURES`` structures);
* ``best_poses.star``: RELION 3.1 (the preprocessed particles' optics and rows) with
  rlnImageName relative to the STAR's own folder, each image's most likely structure
  (rlnClassNumber, 1-based), its pose there (rlnAngleRot, rlnAngleTilt, rlnAnglePsi;
  rlnOriginXAngst/YAngst; refined poses when the jobs refined them),
  rlnLogLikeliContribution (its integrated log-likelihood), rlnMaxValueProbDistribution (as
  in RELION: the largest posterior probability over the hidden variables, here of the best
  structure with its best grid pose: P(structure | image) x P(pose | image, structure), the
  pose prior being the view weight over displacements x rotations) and
  rlnCryomatchStructurePosterior (P(structure | image), equal priors on the structures;
  ``cryomatch reweight`` gives it with the estimated populations);
* ``likelihood_differences.png``: per image log-likelihood differences between structures;
* ``displacements_set.npy``: the displacement grid (2, D), x and y in Angstrom (CryoLike's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .. import geometry, provenance
from ..cli import nonnegative_float, positive_int
from ..errors import CryomatchError
from ..io.atomic import Outputs
from ..io.figures import new_figure, save_png
from ..io.files import write_csv, write_npy
from ..io.particles import Particles, read_particles, write_particles
from ..io.polar_files import ArrayWriter, read_templates
from ..kernels.likelihood import displacement_grid
from ..progress import progress
from ..symmetry import to_asymmetric_unit
from .likelihood import output_paths
from .templates import read_template_list

CSV_STRUCTURES = 64  # per-structure CSV columns up to this many structures
FIGURE_STRUCTURES = 8  # differences drawn for at most this many structures after the first
POSE_KEYS = ("rot", "tilt", "psi", "x", "y")


def _stack_label(star: str | Path) -> str:
    stem = Path(star).stem
    return stem[len("stack_") :] if stem.startswith("stack_") else stem


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CryomatchError("likelihood output is missing (did its job run?)", path)
    return np.load(path)


def _pose_count(path: Path) -> int:
    """Displacements x rotations the job searched (from its provenance summary)."""
    if not path.is_file():
        raise CryomatchError("likelihood output is missing (did its job run?)", path)
    try:
        summary = json.loads(path.read_text())["summary"]
        return int(summary["displacements"]) * int(summary["rotations"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CryomatchError(f"no readable job summary ({exc})", path) from exc


def read_structure_results(out: Path, i: int, tset, labels, sizes) -> dict[str, np.ndarray]:
    """One structure's per-image results over all stacks: ll, llo, cc, its best pose
    (rot, tilt, psi degrees; x, y Angstrom) and log P(best grid pose | image, structure)."""
    rows = {k: [] for k in ("ll", "llo", "cc", "lpose", *POSE_KEYS)}
    log_view = np.log(tset.meta["view_weights"] / np.sum(tset.meta["view_weights"]))
    for label, size in zip(labels, sizes, strict=True):
        p = output_paths(out, i, label, refine=True)
        view = _load(p["template"]).astype(np.int64)
        if len(view) != size or view.max(initial=0) >= len(tset):
            raise CryomatchError(
                f"holds {len(view)} images (views < {len(tset)}) but the stack has {size}",
                p["template"],
            )
        ll, llo = _load(p["ll_integrated"]), _load(p["ll_optimal"])
        rows["ll"].append(ll)
        rows["llo"].append(llo)
        rows["cc"].append(_load(p["cross_correlation"]))
        rows["lpose"].append(llo + log_view[view] - np.log(_pose_count(p["provenance"])) - ll)
        if p["refined"].is_file():
            refined = np.load(p["refined"])
            pose = [refined[:, j] for j in range(5)]
        else:
            pose = [
                tset.meta["rot"][view],
                tset.meta["tilt"][view],
                _load(p["inplane_rotation"]),
                _load(p["displacement_x"]),
                _load(p["displacement_y"]),
            ]
        for key, value in zip(POSE_KEYS, pose, strict=True):
            rows[key].append(value)
    out = {k: np.concatenate(v).astype(np.float64) for k, v in rows.items()}
    symbol = str(tset.meta.get("symmetry", "C1"))
    if symbol != "C1":  # refined poses may leave the asymmetric unit: back into it
        inside = to_asymmetric_unit(
            geometry.euler_to_matrix(out["rot"], out["tilt"], out["psi"]), symbol
        )
        out["rot"], out["tilt"], out["psi"] = geometry.matrix_to_euler(inside)
    return out


def likelihood_gather(
    results: str | Path,
    templates: list[str | Path],
    stacks: list[str | Path],
    max_displacement_pixels: float = 3.0,
    n_displacements_x: int = 7,
    n_displacements_y: int = 7,
) -> dict[str, Path]:
    """Write the gathered outputs in ``results`` (see the module docstring)."""
    if not templates:
        raise CryomatchError("the structure list is empty")
    if not stacks:
        raise CryomatchError("no particle stacks to gather")
    params = {k: v for k, v in locals().items() if k != "results"}
    prov = provenance.record("likelihood-gather", params)
    out = Path(results)
    parts = [read_particles(star) for star in stacks]
    labels = [_stack_label(star) for star in stacks]
    sizes = [len(p) for p in parts]
    n, s = sum(sizes), len(templates)
    keep_columns = s <= CSV_STRUCTURES
    names, columns = [], {}
    best = {k: np.full(n, -np.inf if k == "ll" else 0.0) for k in ("ll", "lpose", *POSE_KEYS)}
    best_structure = np.zeros(n, dtype=np.int64)
    log_total = np.full(n, -np.inf)  # log sum over structures of L (equal priors)
    paths = {
        "matrix": out / "likelihood_matrix.npy",
        "csv": out / "likelihood_matrix.csv",
        "star": out / "best_poses.star",
        "png": out / "likelihood_differences.png",
        "displacements": out / "displacements_set.npy",
    }
    with Outputs() as outputs:
        with ArrayWriter(paths["matrix"], (s, n), outputs, np.float64) as matrix:
            for i, template in enumerate(progress(templates, desc="gather", unit="structure")):
                tset = read_templates(template)
                if i == 0:
                    pixel = tset.pixel_size
                names.append(str(tset.meta.get("name", Path(tset.path).stem)))
                res = read_structure_results(out, i, tset, labels, sizes)
                matrix.array[i] = res["ll"]
                if keep_columns:
                    for key, label in (("ll", "ll_integrated"), ("llo", "ll_optimal")):
                        columns[f"{label}_{names[-1]}"] = res[key]
                    columns[f"cross_correlation_{names[-1]}"] = res["cc"]
                better = res["ll"] > best["ll"]
                for key in best:
                    best[key][better] = res[key][better]
                best_structure[better] = i
                log_total = np.logaddexp(log_total, res["ll"])
            figure = difference_figure(matrix.array, names)
        posterior = np.exp(best["ll"] - log_total)
        table = pd.concat([p.table for p in parts], ignore_index=True)
        image_names = [
            f"{i + 1:06d}@{os.path.relpath(f, out.resolve())}"
            for i, f in zip(table["image_index"], table["image_file"], strict=True)
        ]
        origin = geometry.origin_from_displacement(np.stack([best["x"], best["y"]], axis=1))
        table = table.assign(
            rlnAngleRot=best["rot"],
            rlnAngleTilt=best["tilt"],
            rlnAnglePsi=best["psi"],
            rlnOriginXAngst=origin[:, 0],
            rlnOriginYAngst=origin[:, 1],
            rlnClassNumber=best_structure + 1,
            rlnLogLikeliContribution=best["ll"],
            rlnMaxValueProbDistribution=posterior * np.exp(np.minimum(best["lpose"], 0.0)),
            rlnCryomatchStructurePosterior=posterior,
        )
        csv = pd.DataFrame(
            {
                "image": image_names,
                "best_structure": [names[b] for b in best_structure],
                "posterior": posterior,
                **columns,
            }
        )
        disp = displacement_grid(max_displacement_pixels, n_displacements_x, n_displacements_y)
        write_csv(paths["csv"], csv, prov, outputs)
        write_particles(
            paths["star"], Particles(table, parts[0].optics), prov, outputs, image_names=image_names
        )
        save_png(figure, paths["png"], outputs)
        write_npy(paths["displacements"], (disp * pixel).T, outputs)
    return paths


def difference_figure(ll: np.ndarray, names: list[str]):
    """Per image: log L of each structure minus the first's (sorted), and their histogram
    (at most ``FIGURE_STRUCTURES`` structures after the first)."""
    fig = new_figure(9.0, 3.6)
    ax_sorted, ax_hist = fig.subplots(1, 2)
    first = np.asarray(ll[0])
    if len(names) == 1:
        diffs = [first - np.median(first)]
        labels = [f"{names[0]} - median"]
    else:
        shown = range(1, min(len(names), FIGURE_STRUCTURES + 1))
        diffs = [np.asarray(ll[k]) - first for k in shown]
        labels = [f"{names[k]} - {names[0]}" for k in shown]
    for diff, label in zip(diffs, labels, strict=True):
        ax_sorted.plot(np.sort(diff), ".", ms=3, label=label)
        ax_hist.hist(diff, bins=40, alpha=0.6, label=label)
    ax_sorted.axhline(0.0, color="0.5", lw=0.8)
    ax_sorted.set_xlabel("image (sorted)")
    ax_sorted.set_ylabel("log-likelihood difference")
    ax_hist.axvline(0.0, color="0.5", lw=0.8)
    ax_hist.set_xlabel("log-likelihood difference")
    ax_hist.set_ylabel("images")
    ax_sorted.legend(fontsize=7)
    more = len(names) - 1 - len(diffs) if len(names) > 1 else 0
    fig.suptitle(
        f"{ll.shape[1]} images, {len(names)} structures"
        + (f" ({more} more not drawn)" if more > 0 else ""),
        fontsize=9,
    )
    return fig


def add_arguments(p) -> None:
    p.add_argument("--results", required=True, help="the likelihood output folder (OUT)")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--templates", nargs="+", help="template sets in structure order")
    names.add_argument(
        "--template-list", help="instead: template_file_list.npy (the sets in structure order)"
    )
    p.add_argument("--stacks", nargs="+", required=True, help="preprocessed stacks' STAR files")
    p.add_argument("--max-displacement-pixels", type=nonnegative_float, default=3.0)
    p.add_argument("--n-displacements-x", type=positive_int, default=7)
    p.add_argument("--n-displacements-y", type=positive_int, default=7)


def run(args) -> None:
    likelihood_gather(
        args.results,
        read_template_list(args.template_list) if args.template_list else args.templates,
        args.stacks,
        args.max_displacement_pixels,
        args.n_displacements_x,
        args.n_displacements_y,
    )
