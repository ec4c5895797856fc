"""Ensemble reweighting: the structures' population weights from the likelihood matrix.

Reads ``likelihood_matrix.npy`` (integrated log-likelihood [structure, image], from
``cryomatch likelihood-gather``) and writes in ``OUT`` (see :mod:`cryomatch.kernels.reweight`
for the model: a mixture of the structures, Tang et al. 2023):

* ``ensemble_weights.csv``: per structure its name, the maximum-likelihood weight (EM),
  the posterior mean under a Dirichlet(alpha) prior and its equal-tailed credible interval
  (``interval`` level, from Gibbs samples), and the images it is the most probable
  structure for;
* ``ensemble_weights.png``: the weights with their intervals;
* ``structure_posterior.npy``: each image's posterior over structures [structure, image]
  float32 at the EM weights, and ``structure_posterior.csv`` (per image: its name, the most
  probable structure and its posterior; per structure columns when there are at most
  ``CSV_STRUCTURES``).

The provenance lines of the CSVs carry a summary: EM iterations and convergence, the
mixture log-likelihood and the Gibbs samples' effective sample sizes. A warning is logged
(and recorded) when EM stops before converging or the samples are few (effective sample
size under ``MIN_ESS``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import provenance
from ..errors import CryomatchError, CryomatchWarning
from ..io.atomic import Outputs
from ..io.figures import new_figure, save_png
from ..io.files import write_csv, write_npy
from ..io.polar_files import read_templates
from ..io.star import read_star
from ..kernels import reweight as kernel
from .templates import read_template_list

CSV_STRUCTURES = 64
MIN_ESS = 100.0


def effective_sample_size(samples: np.ndarray) -> np.ndarray:
    """Per column of (n, S) samples: n / (1 + 2 sum of autocorrelations), the sum stopped at
    the first negative one (Geyer's initial positive sequence, simplified)."""
    x = samples - samples.mean(axis=0)
    n = len(x)
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        var = np.dot(x[:, j], x[:, j]) / n
        if var <= 0:
            out[j] = n
            continue
        f = np.fft.rfft(x[:, j], 2 * n)
        acf = np.fft.irfft(f * np.conj(f))[:n] / (n * var)
        negative = np.flatnonzero(acf[1:] < 0)
        stop = negative[0] + 1 if len(negative) else n
        out[j] = n / (1.0 + 2.0 * np.sum(acf[1:stop]))
    return out


def structure_names(templates: list[str | Path] | None, n: int) -> list[str]:
    if not templates:
        return [f"structure_{k + 1}" for k in range(n)]
    if len(templates) != n:
        raise CryomatchError(f"{len(templates)} template sets named for a matrix of {n} structures")
    return [str(read_templates(t).meta.get("name", Path(t).stem)) for t in templates]


def image_names(star: str | Path | None, n: int) -> list[str]:
    if star is None:
        return [str(i + 1) for i in range(n)]
    blocks = read_star(star)
    table = blocks.get("particles")
    if not isinstance(table, pd.DataFrame) or "rlnImageName" not in table:
        raise CryomatchError("no data_particles block with rlnImageName", star)
    if len(table) != n:
        raise CryomatchError(f"lists {len(table)} images but the matrix has {n}", star)
    return table["rlnImageName"].astype(str).tolist()


def reweight(
    matrix: str | Path,
    out: str | Path,
    templates: list[str | Path] | None = None,
    star: str | Path | None = None,
    alpha: float = 1.0,
    n_samples: int = 2000,
    burn_in: int = 500,
    interval: float = 0.9,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the weights, their intervals and the per-image posteriors in ``out``."""
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("reweight", params)
    if not alpha > 0:
        raise CryomatchError(f"alpha (the Dirichlet concentration) must be positive, got {alpha}")
    if n_samples < 1 or burn_in < 0:
        raise CryomatchError(f"need n_samples >= 1 and burn_in >= 0, got {n_samples}, {burn_in}")
    if not 0 < interval < 1:
        raise CryomatchError(f"the credible interval level must be in (0, 1), got {interval}")
    matrix = Path(matrix)
    if not matrix.is_file():
        raise CryomatchError("file does not exist", matrix)
    try:
        ll = np.load(matrix).astype(np.float64)
    except (ValueError, OSError) as exc:
        raise CryomatchError(f"not a readable .npy ({exc})", matrix) from exc
    if ll.ndim != 2 or 0 in ll.shape:
        raise CryomatchError(f"not a [structure, image] matrix: shape {ll.shape}", matrix)
    if not np.all(np.isfinite(ll)):
        raise CryomatchError("the likelihood matrix holds values that are not finite", matrix)
    s, n = ll.shape
    names = structure_names(templates, s)
    images = image_names(star, n)
    em = kernel.em_weights(ll)
    gibbs = kernel.gibbs_weights(
        ll, np.random.default_rng(seed), alpha, n_samples, burn_in, start=em.weights
    )
    lower, upper = gibbs.interval(interval)
    ess = effective_sample_size(gibbs.samples) if s > 1 else np.full(1, float(n_samples))
    post = kernel.responsibilities(ll, em.weights)
    best = np.argmax(post, axis=0)
    notes = []
    if not em.converged:
        notes.append(f"EM stopped after {em.iterations} iterations before converging")
    if np.min(ess) < MIN_ESS:
        notes.append(
            f"the Gibbs samples' smallest effective sample size is {np.min(ess):.0f} "
            f"(< {MIN_ESS:.0f}): the intervals are rough; draw more samples"
        )
    for note in notes:
        warnings.warn(note, CryomatchWarning, stacklevel=2)
    prov["summary"] = {
        "structures": s,
        "images": n,
        "em_iterations": em.iterations,
        "em_converged": em.converged,
        "mixture_log_likelihood": em.log_likelihood,
        "effective_sample_size_min": float(np.min(ess)),
        "warnings": notes,
    }
    pct = f"{100 * interval:g}"
    weights = pd.DataFrame(
        {
            "structure": names,
            "weight": em.weights,
            "posterior_mean": gibbs.mean(),
            f"lower_{pct}": lower,
            f"upper_{pct}": upper,
            "effective_sample_size": ess,
            "images_most_probable": np.bincount(best, minlength=s),
        }
    )
    per_image = pd.DataFrame(
        {"image": images, "structure": [names[b] for b in best], "posterior": post[best, range(n)]}
    )
    if s <= CSV_STRUCTURES:
        for k, name in enumerate(names):
            per_image[f"posterior_{name}"] = post[k]
    out = Path(out)
    paths = {
        "weights": out / "ensemble_weights.csv",
        "png": out / "ensemble_weights.png",
        "posterior": out / "structure_posterior.npy",
        "posterior_csv": out / "structure_posterior.csv",
    }
    with Outputs() as outputs:
        write_csv(paths["weights"], weights, prov, outputs)
        write_csv(paths["posterior_csv"], per_image, prov, outputs)
        write_npy(paths["posterior"], post.astype(np.float32), outputs)
        save_png(weights_figure(weights, pct, n), paths["png"], outputs)
    for row in weights.head(CSV_STRUCTURES).itertuples(index=False):
        print(
            f"{row.structure}: weight {row.weight:.4f}, posterior mean {row.posterior_mean:.4f} "
            f"({pct}% interval {row[3]:.4f}-{row[4]:.4f})",
            file=sys.stderr,
        )
    return paths


def weights_figure(weights: pd.DataFrame, pct: str, n_images: int):
    """Weights (EM, and the posterior mean with its credible interval) per structure."""
    s = len(weights)
    fig = new_figure(min(12.0, 4.0 + 0.25 * s), 3.6)
    ax = fig.subplots()
    x = np.arange(s)
    mean = weights["posterior_mean"].to_numpy()
    bars = np.stack(
        [mean - weights[f"lower_{pct}"].to_numpy(), weights[f"upper_{pct}"].to_numpy() - mean]
    )
    ax.bar(x, weights["weight"], color="0.75", label="maximum likelihood (EM)")
    ax.errorbar(
        x, mean, yerr=np.maximum(bars, 0), fmt="o", ms=3, capsize=3, label=f"posterior, {pct}%"
    )
    if s <= 30:
        ax.set_xticks(x, weights["structure"], rotation=45, ha="right", fontsize=7)
    else:
        ax.set_xlabel("structure")
    ax.set_ylabel("population weight")
    ax.set_ylim(0, min(1.05, 1.1 * float(np.max(weights[f"upper_{pct}"])) + 0.05))
    ax.legend(fontsize=7)
    ax.set_title(f"{s} structures, {n_images} images", fontsize=9)
    return fig


def add_arguments(p) -> None:
    p.add_argument("--matrix", required=True, help="likelihood_matrix.npy [structure, image]")
    p.add_argument("--out", required=True, help="output folder")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--templates", nargs="*", help="template sets in structure order (names)")
    names.add_argument("--template-list", help="instead: template_file_list.npy")
    p.add_argument("--star", help="best_poses.star of the same images (image names)")
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet prior concentration")
    p.add_argument("--samples", type=int, default=2000, help="Gibbs samples kept")
    p.add_argument("--burn-in", type=int, default=500, help="Gibbs sweeps discarded first")
    p.add_argument("--interval", type=float, default=0.9, help="credible interval level")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler")


def run(args) -> None:
    reweight(
        args.matrix,
        args.out,
        read_template_list(args.template_list) if args.template_list else args.templates,
        args.star,
        args.alpha,
        args.samples,
        args.burn_in,
        args.interval,
        args.seed,
    )
