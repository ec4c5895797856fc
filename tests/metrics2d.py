"""Scoring 2D classification results against simulated truth (used by the classify2d tests)."""

from __future__ import annotations

from math import comb
from pathlib import Path

import mrcfile
import numpy as np
import starfile
from scipy.special import erf

from cryomatch import geometry
from cryomatch.kernels.align2d import from_reference_frame
from cryomatch.stages.simulate.views import simulate_views


def adjusted_rand_index(a, b) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    pairs = sum(comb(int(x), 2) for x in table.ravel())
    rows = sum(comb(int(x), 2) for x in table.sum(1))
    cols = sum(comb(int(x), 2) for x in table.sum(0))
    expected = rows * cols / comb(len(a), 2)
    return (pairs - expected) / (0.5 * (rows + cols) - expected)


def pose_errors(truth, estimate, pixel_size):
    """Per image: angle error (degrees), shift error (pixels, image frame), mirror right, and
    whether its class is the majority class of its true view.

    An average is its view turned, mirrored and shifted by some G, the same for all of its
    members: ``image = view o T_true = avg o T_est`` with ``avg = view o G``, so
    ``G = T_true o T_est^-1`` per image. G is taken per class by consensus (majority mirror,
    circular mean angle, median shift) and each image is scored against ``G o T_est``.
    """

    def params(table):
        origin = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pixel_size
        return (table["rlnAnglePsi"].to_numpy(), table["rlnIsFlip"].to_numpy() > 0.5, origin)

    t_true, t_est = params(truth), params(estimate)
    view, cls = truth["rlnClassNumber"].to_numpy(), estimate["rlnClassNumber"].to_numpy()
    g = geometry.compose_inplane(*geometry.invert_inplane(*t_est), *t_true)
    angle = np.full(len(cls), np.nan)
    shift = np.full(len(cls), np.nan)
    mirror_ok = np.zeros(len(cls), bool)
    correct = np.zeros(len(cls), bool)
    for c in np.unique(cls):
        members = cls == c
        values, counts = np.unique(view[members], return_counts=True)
        correct |= members & (view == values[np.argmax(counts)])
        m = np.median(g[1][members]) > 0.5
        same = members & (g[1] == m)
        psi = np.rad2deg(np.angle(np.exp(1j * np.deg2rad(g[0][same])).mean()))
        origin = np.median(g[2][same], axis=0)
        pred = geometry.compose_inplane(
            t_est[0][members], t_est[1][members], t_est[2][members], psi, m, origin
        )
        angle[members] = np.abs(geometry.wrap_degrees(pred[0] - t_true[0][members]))
        shift[members] = np.linalg.norm(pred[2] - t_true[2][members], axis=1)
        mirror_ok[members] = pred[1] == t_true[1][members]
    return angle, shift, mirror_ok, correct


def cramer_rao(views, noise_sigma):
    """Cramer-Rao bounds (standard deviations) for the in-plane angle (degrees) and the shift
    per axis (pixels) of one image of each view (V, box, box) in white noise: the inverse of
    the Fisher information ``J^T J / sigma^2`` for (angle, x, y) jointly, J the derivatives of
    the noise-free image (spectral x and y derivatives; angle: -y d/dx + x d/dy)."""
    views = np.asarray(views, dtype=np.float64)
    box = views.shape[-1]
    k = np.fft.fftfreq(box) * 2 * np.pi
    spectrum = np.fft.fft2(views)
    dx = np.fft.ifft2(spectrum * 1j * k[None, None, :]).real
    dy = np.fft.ifft2(spectrum * 1j * k[None, :, None]).real
    g = np.arange(box) - box // 2
    y, x = np.meshgrid(g, g, indexing="ij")
    dtheta = -y * dx + x * dy
    angle, shift = [], []
    for j in zip(dtheta, dx, dy, strict=True):
        jac = np.stack([d.ravel() for d in j], axis=1)
        bound = np.linalg.inv(jac.T @ jac / noise_sigma**2)
        angle.append(np.rad2deg(np.sqrt(bound[0, 0])))
        shift.append(np.sqrt(0.5 * (bound[1, 1] + bound[2, 2])))
    return np.array(angle), np.array(shift)


def disc_variance(images, radius: float):
    """Variance (n,) of each image (n, box, box) over the disc of ``radius`` pixels about the
    box centre: the signal of an SNR defined over the particle."""
    images = np.asarray(images, dtype=np.float64)
    box = images.shape[-1]
    g = np.arange(box) - box // 2
    disc = g[:, None] ** 2 + g[None, :] ** 2 <= radius * radius
    return images[:, disc].var(axis=1)


def efficient_fractions(bound_angle, bound_shift, angle_limit: float, shift_limit: float):
    """Fractions of images whose angle error is within ``angle_limit`` degrees and whose
    shift error is within ``shift_limit`` pixels for an efficient estimator (errors Gaussian
    at the Cramer-Rao bound: the angle's standard deviation, the shift's per axis), per
    image from the bounds of its view (n,)."""
    angle = erf(angle_limit / (np.sqrt(2.0) * np.asarray(bound_angle)))
    shift = 1.0 - np.exp(-(shift_limit**2) / (2.0 * np.asarray(bound_shift) ** 2))
    return float(np.mean(angle)), float(np.mean(shift))


def simulate_at_disc_snr(folder, snr_disc, n, ou, map_path, seed):
    """Images of 5 views of a map (64 px, random in-plane angle, mirror, +-3 px shifts)
    whose SNR is ``snr_disc`` with the signal variance over the disc of radius ``ou``; returns
    (star, views, noise sigma, the SNR measured from the noise actually added)."""
    kwargs = dict(n_views=5, box=64, seed=seed, map_path=str(map_path), max_shift=3.0)
    probe = simulate_views(Path(folder) / "probe", n=1, snr=1.0, **kwargs)  # the same views
    views = mrcfile.read(probe.parent / "views.mrcs").astype(np.float64)
    factor = disc_variance(views, ou).mean() / views.var(axis=(1, 2)).mean()
    star = simulate_views(Path(folder) / "data", n=n, snr=snr_disc / factor, **kwargs)
    table = starfile.read(star)
    truth, pixel_size = table["particles"], float(table["optics"]["rlnImagePixelSize"].iloc[0])
    clean = from_reference_frame(
        views[truth["rlnClassNumber"].to_numpy() - 1],
        truth["rlnAnglePsi"].to_numpy(),
        truth["rlnIsFlip"].to_numpy(bool),
        truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pixel_size,
    )
    sigma = float(np.std(mrcfile.read(star.parent / "particles.mrcs") - clean))
    return star, views, sigma, disc_variance(views, ou).mean() / sigma**2
