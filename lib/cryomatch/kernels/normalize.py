"""RELION-style background normalization of particle images."""

from __future__ import annotations

from ..backend import array_module


def background_mask(box: int, radius: float, xp):
    """True outside a circle of ``radius`` pixels about the box centre (box // 2)."""
    grid = xp.arange(box) - box // 2
    return (grid[:, None] ** 2 + grid[None, :] ** 2) > radius * radius


def normalize_background(images, radius: float, ramp: bool = True):
    """Subtract the background (its mean, or a least-squares plane when ``ramp``) and divide
    by the background's standard deviation; background = pixels outside ``radius``.

    images (n, box, box) float32. Returns a new float32 array.
    """
    xp = array_module(images)
    n, box, _ = images.shape
    mask = background_mask(box, radius, xp)
    bg = images[:, mask].astype(xp.float64)  # (n, m)
    if ramp:
        grid = xp.arange(box, dtype=xp.float64) - box // 2
        yy, xx = xp.meshgrid(grid, grid, indexing="ij")
        design = xp.stack([xp.ones(int(mask.sum())), xx[mask], yy[mask]], axis=1)  # (m, 3)
        coef = xp.linalg.lstsq(design, bg.T, rcond=None)[0]  # (3, n)
        plane = coef[0][:, None, None] + coef[1][:, None, None] * xx + coef[2][:, None, None] * yy
        residual = bg - (design @ coef).T
        std = residual.std(axis=1)
        out = images - plane
    else:
        std = bg.std(axis=1)
        out = images - bg.mean(axis=1)[:, None, None]
    std = xp.where(std > 0, std, 1.0)
    return (out / std[:, None, None]).astype(xp.float32)
