"""Preprocess particles: Fourier-crop, normalize the background, invert, split into stacks.

Reads a RELION STAR (3.0/3.1/5) or cryoSPARC .cs file, and writes
``OUT/particles/stack_NNNNNN.mrcs`` with ``stack_size`` images each, a RELION 3.1 STAR per
stack (``stack_NNNNNN.star``: optics groups, CTF, poses), ``particles.star`` over all
stacks and ``preview.png`` (the first 16 images). Per batch of images: optional Fourier
cropping to a box or pixel size, RELION-style normalization (background outside a circle
of ``bg_radius`` pixels, default 37.5% of the box, to mean 0 and standard deviation 1,
after removing a plane when ``ramp``; images whose background has no variance, such as
constant or all-zero images, are an error naming them), optional contrast inversion.
Memory stays bounded by ``batch_size``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import provenance
from ..cli import positive_float, positive_int
from ..errors import CryomatchError
from ..io.atomic import Outputs
from ..io.figures import image_montage, save_png
from ..io.mrc import StackWriter
from ..io.particles import ImageReader, flat_images_error, read_particles, write_particles
from ..kernels.fourier import fourier_crop
from ..kernels.normalize import normalize_background
from ..progress import progress

PREVIEW = 16  # images shown in particles/preview.png


def stack_name(i: int) -> str:
    return f"stack_{i:06d}"


def output_box(in_box: int, in_pixel: float, box: int | None, pixel_size: float | None) -> int:
    """Box after Fourier cropping: ``box``, or the even box nearest ``pixel_size``."""
    if box is not None and pixel_size is not None:
        raise CryomatchError("give a target box or a target pixel size, not both")
    if box is not None:
        out = int(box)
    elif pixel_size is not None:
        out = 2 * max(1, round(in_box * in_pixel / pixel_size / 2))
    else:
        return in_box
    if out < 8:
        raise CryomatchError(f"the target box {out} is too small (at least 8 pixels)")
    return out


def preprocess(
    star: str | Path,
    out: str | Path,
    box: int | None = None,
    pixel_size: float | None = None,
    stack_size: int = 1000,
    invert: bool = False,
    bg_radius: float | None = None,
    ramp: bool = True,
    angpix: float | None = None,
    batch_size: int = 512,
    drop_duplicates: bool = False,
) -> list[Path]:
    """Preprocess the particles of ``star`` into ``out/particles``; returns the stack paths."""
    if stack_size < 1:
        raise CryomatchError(f"stack_size must be at least 1, got {stack_size}")
    params = {k: v for k, v in locals().items() if k not in ("star", "out")}
    prov = provenance.record("preprocess", params)
    duplicates = "drop" if drop_duplicates else "error"
    particles = read_particles(star, pixel_size=angpix, duplicates=duplicates)
    folder = Path(out) / "particles"
    with ImageReader(particles) as reader, Outputs() as outputs:
        in_box = reader.check()
        in_pixel = particles.pixel_size()
        new_box = output_box(in_box, in_pixel, box, pixel_size)
        new_pixel = in_pixel * in_box / new_box
        radius = 0.375 * new_box if bg_radius is None else float(bg_radius)
        if not 0 < radius < new_box / 2 * math.sqrt(2) - 1:
            raise CryomatchError(f"bg_radius {radius} leaves no background in a {new_box} box")
        table = particles.table
        table["rlnImagePixelSize"] = new_pixel
        table["rlnImageSize"] = new_box
        particles.optics["rlnImagePixelSize"] = new_pixel
        particles.optics["rlnImageSize"] = new_box
        particles.optics["rlnImageDimensionality"] = 2
        n = len(particles)
        n_stacks = math.ceil(n / stack_size)
        labels = provenance.mrc_labels(prov)
        all_names, paths, preview = [], [], None
        bar = progress(total=n, desc="preprocess", unit="img")
        for s in range(n_stacks):
            lo, hi = s * stack_size, min(n, (s + 1) * stack_size)
            path = folder / f"{stack_name(s)}.mrcs"
            with StackWriter(path, hi - lo, new_box, new_pixel, labels, outputs) as writer:
                for start in range(lo, hi, batch_size):
                    images = reader.read(start, min(hi, start + batch_size))
                    images, flat = normalize_background(
                        fourier_crop(images, new_box), radius, ramp, return_flat=True
                    )
                    if flat.any():
                        raise flat_images_error(particles, start + np.flatnonzero(flat))
                    images = -images if invert else images
                    writer.write(images)
                    if preview is None:
                        preview = images[:PREVIEW]
                    bar.update(len(images))
            names = [f"{i + 1:06d}@{path.name}" for i in range(hi - lo)]
            write_particles(
                folder / f"{stack_name(s)}.star",
                particles.subset(np.arange(lo, hi)),
                prov,
                outputs,
                image_names=names,
            )
            all_names += names
            paths.append(path)
        bar.close()
        write_particles(folder / "particles.star", particles, prov, outputs, image_names=all_names)
        titles = [f"{i + 1}" for i in range(len(preview))]
        save_png(image_montage(preview, titles), folder / "preview.png", outputs)
    return paths


def add_arguments(p) -> None:
    p.add_argument("--star", required=True, help="particles: RELION STAR or cryoSPARC .cs")
    p.add_argument("--out", required=True, help="output folder (stacks go to OUT/particles)")
    p.add_argument("--box", type=positive_int, help="Fourier-crop to this box (pixels)")
    p.add_argument(
        "--pixel-size", type=positive_float, help="Fourier-crop to about this pixel size (A)"
    )
    p.add_argument("--stack-size", type=positive_int, default=1000, help="images per output stack")
    p.add_argument("--invert", action="store_true", help="invert contrast (dark -> white)")
    p.add_argument(
        "--bg-radius", type=positive_float, help="background circle radius, output pixels"
    )
    p.add_argument(
        "--no-ramp",
        dest="ramp",
        action="store_false",
        help="subtract the background mean only, not a fitted plane",
    )
    p.add_argument(
        "--angpix", type=positive_float, help="input pixel size (A) when the metadata lacks it"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=512, help="images processed at a time"
    )
    p.add_argument(
        "--drop-duplicates",
        action="store_true",
        help="drop rows that repeat an earlier row's image (with a warning), not an error",
    )


def run(args) -> None:
    preprocess(
        args.star,
        args.out,
        args.box,
        args.pixel_size,
        args.stack_size,
        args.invert,
        args.bg_radius,
        args.ramp,
        args.angpix,
        args.batch_size,
        args.drop_duplicates,
    )
