"""RELION-style background normalization of particle images."""

from __future__ import annotations

from ..backend import array_module

FLAT = 1e-6  # background std below this share of its largest |value|: no variance to scale by


def background_mask(box: int, radius: float, xp):
    """True outside a circle of ``radius`` pixels about the box centre (box // 2)."""
    grid = xp.arange(box) - box // 2
    return (grid[:, None] ** 2 + grid[None, :] ** 2) > radius * radius


def _fit_background(images, radius: float, ramp: bool):
    """Background fit: (coef (n, 3) offset and x, y slopes, residual std (n,), flat (n,)),
    flat where the residual std is 0 or rounding error (below FLAT x the largest value)."""
    xp = array_module(images)
    n, box, _ = images.shape
    mask = background_mask(box, radius, xp)
    bg = images[:, mask].astype(xp.float64)  # (n, m)
    if ramp:
        grid = xp.arange(box, dtype=xp.float64) - box // 2
        yy, xx = xp.meshgrid(grid, grid, indexing="ij")
        design = xp.stack([xp.ones(int(mask.sum())), xx[mask], yy[mask]], axis=1)  # (m, 3)
        coef = bg @ xp.linalg.pinv(design).T  # (n, 3): offset, x slope, y slope
        residual = bg - coef @ design.T
    else:
        coef = bg.mean(axis=1, keepdims=True) * xp.array([[1.0, 0.0, 0.0]])
        residual = bg - coef[:, :1]
    std = xp.sqrt(xp.mean(residual * residual, axis=1))
    flat = std <= FLAT * xp.abs(bg).max(axis=1)
    return coef, std, flat


def normalize_background(images, radius: float, ramp: bool = True, return_flat: bool = False):
    """Subtract the background (its mean, or a least-squares plane when ``ramp``) and divide
    by the background's standard deviation; background = pixels outside ``radius``.

    images (n, box, box) float32. Returns a new float32 array; with ``return_flat`` also
    (n,) bool: the images whose background has no variance (e.g. constant or all-zero
    images), which cannot be normalized: they are only shifted, not scaled.
    """
    xp = array_module(images)
    box = images.shape[-1]
    coef, std, flat = _fit_background(images, radius, ramp)
    std = xp.where(flat, 1.0, std)
    coef = coef.astype(xp.float32)
    g = xp.arange(box, dtype=xp.float32) - box // 2
    out = images - coef[:, 0, None, None]
    out -= coef[:, 1, None, None] * g[None, None, :] + coef[:, 2, None, None] * g[None, :, None]
    out /= std.astype(xp.float32)[:, None, None]
    return (out, flat) if return_flat else out
