"""Ensemble reweighting: population weights of structures from a likelihood matrix.

Images y_i, structures x_m and their integrated likelihoods L_mi = p(y_i | x_m) (the
likelihood stage's [structure, image] matrix of log L). The images are a mixture with
population weights w on the simplex, p(y_i | w) = sum_m w_m L_mi (Tang et al. 2023,
J. Phys. Chem. B 127:5410). Everything is computed in log space: log-likelihood differences
between structures are tens to hundreds.

* :func:`em_weights`: the maximum-likelihood weights by expectation-maximization
  (responsibilities r_mi = w_m L_mi / sum_k w_k L_ki, then w_m = mean_i r_mi); the
  log-likelihood is concave in w, so EM climbs to the global maximum.
* :func:`gibbs_weights`: samples of the posterior of w under a Dirichlet(alpha) prior, by
  Gibbs sampling with latent assignments (z_i ~ Categorical(r_.i), w ~ Dirichlet(alpha +
  counts of z)).
* :func:`responsibilities`: each image's posterior over structures for given weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

IMAGE_BLOCK = 65536  # images per block of the per-image arrays (S x block float64)


def _check(ll) -> np.ndarray:
    ll = np.asarray(ll, dtype=np.float64)
    if ll.ndim != 2 or ll.shape[0] < 1 or ll.shape[1] < 1:
        raise ValueError(f"the likelihood matrix must be [structure, image], got {ll.shape}")
    if not np.all(np.isfinite(ll)):
        raise ValueError("the likelihood matrix holds values that are not finite")
    return ll


def responsibilities(ll: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Posterior over structures of each image (S, N) for population ``weights`` (S,)."""
    with np.errstate(divide="ignore"):
        log_post = np.log(np.asarray(weights, dtype=np.float64))[:, None] + ll
    return np.exp(log_post - logsumexp(log_post, axis=0, keepdims=True))


def mixture_log_likelihood(ll: np.ndarray, weights: np.ndarray) -> float:
    """sum_i log sum_m w_m L_mi."""
    with np.errstate(divide="ignore"):
        log_w = np.log(np.asarray(weights, dtype=np.float64))
    return float(np.sum(logsumexp(log_w[:, None] + ll, axis=0)))


@dataclass
class EMResult:
    weights: np.ndarray  # (S,) on the simplex
    log_likelihood: float  # sum_i log p(y_i | w)
    iterations: int
    converged: bool


def em_weights(ll, tol: float = 1e-10, max_iter: int = 10000) -> EMResult:
    """Maximum-likelihood population weights by EM from uniform weights; stops when no
    weight moves by more than ``tol`` in an iteration (or after ``max_iter``)."""
    ll = _check(ll)
    s, n = ll.shape
    # images' likelihoods relative to their best structure: exp() stays in range
    lik = np.exp(ll - ll.max(axis=0, keepdims=True))
    weights = np.full(s, 1.0 / s)
    converged = s == 1
    iterations = 0
    while not converged and iterations < max_iter:
        total = weights @ lik  # (N,) sum_m w_m L_mi (relative)
        new = weights * (lik @ (1.0 / total)) / n
        new /= new.sum()
        iterations += 1
        converged = bool(np.max(np.abs(new - weights)) <= tol)
        weights = new
    return EMResult(weights, mixture_log_likelihood(ll, weights), iterations, converged)


@dataclass
class GibbsResult:
    samples: np.ndarray  # (n_samples, S) weights after burn-in
    alpha: float

    def mean(self) -> np.ndarray:
        return self.samples.mean(axis=0)

    def interval(self, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """Equal-tailed credible interval (lower, upper) per structure at ``level``."""
        tail = (1.0 - level) / 2.0
        return tuple(np.quantile(self.samples, [tail, 1.0 - tail], axis=0))


def gibbs_weights(
    ll,
    rng: np.random.Generator,
    alpha: float = 1.0,
    n_samples: int = 2000,
    burn_in: int = 500,
    start: np.ndarray | None = None,
) -> GibbsResult:
    """Posterior samples of the population weights under a symmetric Dirichlet(``alpha``)
    prior: Gibbs sampling of the images' assignments and the weights, from ``start`` (e.g.
    the EM weights; default uniform), ``burn_in`` sweeps discarded."""
    ll = _check(ll)
    if not alpha > 0:
        raise ValueError(f"the Dirichlet concentration must be positive, got {alpha}")
    s, n = ll.shape
    if s == 1:  # the simplex is one point
        return GibbsResult(np.ones((n_samples, 1)), float(alpha))
    lik = np.exp(ll - ll.max(axis=0, keepdims=True))  # (S, N), relative to each image's best
    weights = np.full(s, 1.0 / s) if start is None else np.asarray(start, dtype=np.float64)
    weights = np.maximum(weights, 1e-12)
    weights /= weights.sum()
    samples = np.empty((n_samples, s))
    for sweep in range(burn_in + n_samples):
        counts = np.zeros(s)
        for lo in range(0, n, IMAGE_BLOCK):
            post = weights[:, None] * lik[:, lo : lo + IMAGE_BLOCK]
            cumulative = np.cumsum(post, axis=0)
            u = rng.random(post.shape[1]) * cumulative[-1]
            z = np.minimum((cumulative < u).sum(axis=0), s - 1)
            counts += np.bincount(z, minlength=s)
        weights = rng.dirichlet(alpha + counts)
        if sweep >= burn_in:
            samples[sweep - burn_in] = weights
    return GibbsResult(samples, float(alpha))
