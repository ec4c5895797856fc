"""Gather the likelihood jobs: a [structure, image] likelihood matrix, best poses, a figure.

Reads every ``OUT/templateN/..._stack_STACK.npy`` (N = 0.. in structure order, STACK from
the preprocessed stacks' names) and writes in ``OUT``:

* ``likelihood_matrix.npy``: integrated log-likelihood [structure, image] (images in stack
  order), and ``likelihood_matrix.csv`` (one row per image: its name, per structure the
  integrated and optimal-pose log-likelihoods and the best cross-correlation, and the best
  structure);
* ``best_poses.star``: RELION 3.1 (the preprocessed particles' optics and rows) with each
  image's most likely structure (rlnClassNumber, 1-based), its pose there (rlnAngleRot,
  rlnAngleTilt, rlnAnglePsi; rlnOriginXAngst/YAngst; refined poses when the jobs refined
  them), rlnLogLikeliContribution (its integrated log-likelihood) and
  rlnMaxValueProbDistribution (its posterior probability among the structures, equal
  priors);
* ``likelihood_differences.png``: per image log-likelihood differences between structures;
* ``displacements_set.npy``: the displacement grid (2, D), x and y in Angstrom (CryoLike's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from .. import geometry, provenance
from ..cli import nonnegative_float, positive_int
from ..errors import CryomatchError
from ..io.atomic import Outputs
from ..io.figures import new_figure, save_png
from ..io.files import write_csv, write_npy
from ..io.particles import Particles, read_particles, write_particles
from ..io.polar_files import read_templates
from ..kernels.likelihood import displacement_grid
from .likelihood import output_paths


def _stack_label(star: str | Path) -> str:
    stem = Path(star).stem
    return stem[len("stack_") :] if stem.startswith("stack_") else stem


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CryomatchError("likelihood output is missing (did its job run?)", path)
    return np.load(path)


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
    sets = [read_templates(t) for t in templates]
    names = [str(t.meta.get("name", Path(t.path).stem)) for t in sets]
    pixel = sets[0].pixel_size
    parts, per = [], {k: [] for k in ("ll", "llo", "cc", "rot", "tilt", "psi", "x", "y")}
    for star in stacks:
        particles = read_particles(star, images=False)
        parts.append(particles)
        label = _stack_label(star)
        rows = {k: [] for k in per}
        for i, tset in enumerate(sets):
            p = output_paths(out, i, label, refine=True)
            view = _load(p["template"]).astype(np.int64)
            if len(view) != len(particles) or view.max(initial=0) >= len(tset):
                raise CryomatchError(
                    f"holds {len(view)} images (views < {len(tset)}) but the stack has "
                    f"{len(particles)}",
                    p["template"],
                )
            rows["ll"].append(_load(p["ll_integrated"]))
            rows["llo"].append(_load(p["ll_optimal"]))
            rows["cc"].append(_load(p["cross_correlation"]))
            if p["refined"].is_file():
                refined = np.load(p["refined"])
                rot, tilt, psi, x, y = (refined[:, j] for j in range(5))
            else:
                rot, tilt = tset.meta["rot"][view], tset.meta["tilt"][view]
                psi = _load(p["inplane_rotation"])
                x, y = _load(p["displacement_x"]), _load(p["displacement_y"])
            for key, value in (("rot", rot), ("tilt", tilt), ("psi", psi), ("x", x), ("y", y)):
                rows[key].append(value)
        for k in per:
            per[k].append(np.stack(rows[k]))  # (structure, images of this stack)
    mats = {k: np.concatenate(v, axis=1) for k, v in per.items()}
    ll = mats["ll"]
    best = np.argmax(ll, axis=0)
    cols = np.arange(ll.shape[1])
    posterior = np.exp(ll[best, cols] - logsumexp(ll, axis=0))
    table = pd.concat([p.table for p in parts], ignore_index=True)
    optics = parts[0].optics
    image_names = [
        f"{i + 1:06d}@{Path(f).name}"
        for i, f in zip(table["image_index"], table["image_file"], strict=True)
    ]
    origin = geometry.origin_from_displacement(
        np.stack([mats["x"][best, cols], mats["y"][best, cols]], axis=1)
    )
    table = table.assign(
        rlnAngleRot=mats["rot"][best, cols],
        rlnAngleTilt=mats["tilt"][best, cols],
        rlnAnglePsi=mats["psi"][best, cols],
        rlnOriginXAngst=origin[:, 0],
        rlnOriginYAngst=origin[:, 1],
        rlnClassNumber=best + 1,
        rlnLogLikeliContribution=ll[best, cols],
        rlnMaxValueProbDistribution=posterior,
    )
    csv = pd.DataFrame({"image": image_names})
    for i, name in enumerate(names):
        csv[f"ll_integrated_{name}"] = ll[i]
        csv[f"ll_optimal_{name}"] = mats["llo"][i]
        csv[f"cross_correlation_{name}"] = mats["cc"][i]
    csv["best_structure"] = [names[b] for b in best]
    paths = {
        "matrix": out / "likelihood_matrix.npy",
        "csv": out / "likelihood_matrix.csv",
        "star": out / "best_poses.star",
        "png": out / "likelihood_differences.png",
        "displacements": out / "displacements_set.npy",
    }
    disp = displacement_grid(max_displacement_pixels, n_displacements_x, n_displacements_y) * pixel
    with Outputs() as outputs:
        write_npy(paths["matrix"], ll, outputs)
        write_csv(paths["csv"], csv, prov, outputs)
        write_particles(
            paths["star"], Particles(table, optics), prov, outputs, image_names=image_names
        )
        save_png(difference_figure(ll, names), paths["png"], outputs)
        write_npy(paths["displacements"], disp.T, outputs)
    return paths


def difference_figure(ll: np.ndarray, names: list[str]):
    """Per image: log L of each structure minus the first's (sorted), and their histogram."""
    fig = new_figure(9.0, 3.6)
    ax_sorted, ax_hist = fig.subplots(1, 2)
    if len(names) == 1:
        diff = ll[0] - np.median(ll[0])
        labels = [f"{names[0]} - median"]
        diffs = [diff]
    else:
        diffs = [ll[k] - ll[0] for k in range(1, len(names))]
        labels = [f"{names[k]} - {names[0]}" for k in range(1, len(names))]
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
    fig.suptitle(f"{ll.shape[1]} images, {len(names)} structures", fontsize=9)
    return fig


def add_arguments(p) -> None:
    p.add_argument("--results", required=True, help="the likelihood output folder (OUT)")
    p.add_argument("--templates", nargs="+", required=True, help="template sets in structure order")
    p.add_argument("--stacks", nargs="+", required=True, help="preprocessed stacks' STAR files")
    p.add_argument("--max-displacement-pixels", type=nonnegative_float, default=3.0)
    p.add_argument("--n-displacements-x", type=positive_int, default=7)
    p.add_argument("--n-displacements-y", type=positive_int, default=7)


def run(args) -> None:
    likelihood_gather(
        args.results,
        args.templates,
        args.stacks,
        args.max_displacement_pixels,
        args.n_displacements_x,
        args.n_displacements_y,
    )
