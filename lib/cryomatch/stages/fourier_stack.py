"""Fourier stack: a preprocessed particle stack on the polar Fourier grid.

Reads ``stack_NNNNNN.star`` (with its ``.mrcs``) as written by ``cryomatch preprocess`` and
writes ``OUT/particles_fourier_stack_NNNNNN.npy`` (complex64 [image, shell, in-plane
angle]: the exact transform of each mean-removed image, see
:mod:`cryomatch.kernels.polar_fourier`) and ``.npz`` (CTF parameters, pixel size, grid,
image statistics and prior shifts; see :mod:`cryomatch.io.polar_files`). CTF columns are
required; constant (e.g. all-zero) images are an error naming them. Memory stays bounded
by ``batch_size`` images.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .. import geometry, provenance
from ..backend import get_xp, to_numpy
from ..cli import positive_float, positive_int
from ..errors import CryomatchError
from ..io.atomic import Outputs
from ..io.particles import ImageReader, flat_images_error, read_particles
from ..io.polar_files import CTF_FIELDS, ArrayWriter, grid_fields, write_meta
from ..kernels.polar_fourier import dft_matrices, polar_grid, polar_transform
from ..progress import progress


def fourier_stack_name(star: str | Path) -> str:
    """'particles_fourier_stack_NNNNNN' for 'stack_NNNNNN.star' (else from the file stem)."""
    stem = Path(star).stem
    match = re.fullmatch(r"stack_(\d+)", stem)
    return f"particles_fourier_stack_{match.group(1) if match else stem}"


def fourier_stack(
    star: str | Path,
    out: str | Path,
    resolution_factor: float = 1.0,
    n_inplanes: int | None = None,
    method: str = "auto",
    batch_size: int = 256,
    backend: str = "numpy",
) -> Path:
    """Write the polar Fourier stack of the particles in ``star`` to ``out``; returns the .npy."""
    params = {k: v for k, v in locals().items() if k not in ("star", "out")}
    prov = provenance.record("fourier-stack", params)
    xp = get_xp(backend)
    particles = read_particles(star, require_ctf=True)
    table = particles.table
    npy = Path(out) / f"{fourier_stack_name(star)}.npy"
    with ImageReader(particles) as reader, Outputs() as outputs:
        box = reader.check()
        pixel = particles.pixel_size()
        grid = polar_grid(box, resolution_factor, n_inplanes)
        if method not in ("auto", "dft", "finufft"):
            raise CryomatchError(f"unknown polar transform method {method!r} (auto, dft, finufft)")
        matrices = (
            dft_matrices(grid) if method == "dft" or (method == "auto" and xp is not np) else None
        )
        n = len(particles)
        means, sums = np.empty(n), np.empty(n)
        with ArrayWriter(npy, (n, grid.n_shells, grid.n_inplanes), outputs) as writer:
            bar = progress(total=n, desc="fourier-stack", unit="img")
            for start in range(0, n, batch_size):
                images = reader.read(start, min(n, start + batch_size)).astype(np.float64)
                flat = np.ptp(images.reshape(len(images), -1), axis=1) == 0
                if flat.any():
                    raise flat_images_error(particles, start + np.flatnonzero(flat), "image")
                mean = images.mean(axis=(1, 2))
                images -= mean[:, None, None]
                means[start : start + len(images)] = mean
                sums[start : start + len(images)] = np.sum(images * images, axis=(1, 2))
                batch = xp.asarray(images.astype(np.float32))
                chosen = "dft" if matrices is not None else method
                writer.array[start : start + len(images)] = to_numpy(
                    polar_transform(batch, grid, chosen, matrices)
                )
                bar.update(len(images))
            bar.close()
        origin = (
            table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=np.float64)
            if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(table)
            else np.zeros((n, 2))
        )
        meta = {
            **grid_fields(grid, resolution_factor),
            "pixel_size": pixel,
            **{k: table[c].to_numpy(dtype=np.float64) for k, c in CTF_FIELDS.items()},
            "optics_group": table["rlnOpticsGroup"].to_numpy(dtype=np.int64),
            "image_mean": means,
            "image_ss": sums,
            "prior_displacement": geometry.displacement_from_origin(origin) / pixel,
            "image_names": np.array(
                [
                    f"{i + 1:06d}@{Path(f).name}"
                    for i, f in zip(table["image_index"], table["image_file"], strict=True)
                ]
            ),
        }
        write_meta(npy, meta, prov, outputs)
    return npy


def add_arguments(p) -> None:
    p.add_argument("--star", required=True, help="a preprocessed stack's STAR (stack_NNNNNN.star)")
    p.add_argument("--out", required=True, help="output folder (e.g. results/particles/fft)")
    p.add_argument(
        "--resolution-factor",
        type=positive_float,
        default=1.0,
        help="largest polar radius as a multiple of Nyquist",
    )
    p.add_argument("--n-inplanes", type=positive_int, help="in-plane angles (default 2 x box)")
    p.add_argument(
        "--method",
        default="auto",
        choices=["auto", "dft", "finufft"],
        help="exact transform: direct DFT (matrix products) or finufft",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=256, help="images transformed at a time"
    )
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])


def run(args) -> None:
    fourier_stack(
        args.star,
        args.out,
        args.resolution_factor,
        args.n_inplanes,
        args.method,
        args.batch_size,
        args.backend,
    )
