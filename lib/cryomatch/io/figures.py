"""PNG figures for the report: montages of images, orthogonal slices of volumes.

Uses matplotlib's object API with the Agg canvas (no global pyplot state, no display).
"""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomic import Outputs, atomic_path


def new_figure(width: float = 6.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike, outputs: Outputs | None = None, dpi: int = 100):
    with atomic_path(path, outputs) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})


def image_montage(images, titles=None, ncols: int | None = None, panel: float = 1.4) -> Figure:
    """A grid of grey-scale images (n, y, x), each scaled to its own range."""
    images = np.asarray(images)
    n = max(1, len(images))
    ncols = ncols or min(n, 8)
    nrows = math.ceil(n / ncols)
    fig = new_figure(panel * ncols, panel * nrows + 0.2)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(images[i], cmap="gray", origin="lower")
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=7)
    return fig


def orthogonal_slices(volume, title: str | None = None) -> Figure:
    """Central z, y and x slices of a (z, y, x) volume."""
    fig = new_figure(7.5, 2.8)
    draw_orthogonal_slices(fig.subplots(1, 3), volume)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def draw_orthogonal_slices(axes, volume) -> None:
    """Central xy, xz and yz slices of a (z, y, x) volume into three axes."""
    volume = np.asarray(volume)
    cz, cy, cx = (s // 2 for s in volume.shape)
    planes = [
        ("xy (z centre)", volume[cz]),
        ("xz (y centre)", volume[:, cy]),
        ("yz (x centre)", volume[:, :, cx]),
    ]
    for ax, (name, plane) in zip(axes, planes, strict=True):
        ax.imshow(plane, cmap="gray", origin="lower")
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()


def curves(x, ys: dict, xlabel: str, ylabel: str, title: str | None = None, hlines=()) -> Figure:
    """Line plot of several named curves over one x axis, with optional horizontal lines."""
    fig = new_figure(6.0, 3.6)
    ax = fig.subplots()
    for name, y in ys.items():
        ax.plot(x, y, label=str(name), linewidth=1.2)
    for level in hlines:
        ax.axhline(level, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if 0 < len(ys) <= 12:
        ax.legend(fontsize=7, ncols=2)
    return fig
