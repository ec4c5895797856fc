"""Particle images of a few distinct views of one structure, turned in plane, mirrored and
shifted, with optional CTF and Gaussian noise: known answers for 2D classification.

The structure is an MRC map (``--map``) or a seeded phantom of a few pseudo-atomic domains
of different sizes and densities (``--phantom``), whose views differ clearly.
``--views`` projection directions are picked far apart (the farthest of 512 random
directions, greedily, so that no two views look alike); each image is one view with a
uniform in-plane angle, a mirror (x -> -x) with probability one half (``--no-mirror``: never)
and a shift up to ``max_shift`` pixels per axis, resampled with cubic splines so that
``image(r) = view(L (r + origin))`` (:mod:`cryomatch.geometry`). With ``--ctf`` the images are
multiplied by a RELION CTF (defocus drawn from ``--defocus``, 300 kV, Cs 2.7 mm, 10%
amplitude contrast); noise variance = mean signal variance over the box / SNR. The STAR rows
carry the truth: rlnClassNumber (the view, 1-based), rlnAngleRot/Tilt (its direction),
rlnAnglePsi, rlnOriginXAngst/YAngst and rlnIsFlip (the mirror).

Outputs in OUT: ``particles.mrcs``, ``particles.star`` (RELION 3.1) and ``views.mrcs``
(the noise-free, centred, unturned views, one per class).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ... import geometry, provenance
from ...cli import positive_float, positive_int
from ...errors import CryomatchError, check_memory
from ...io.atomic import Outputs
from ...io.mrc import StackWriter, read_volume, write_mrc
from ...io.particles import Particles, write_particles
from ...kernels import ctf as ctf_kernel
from ...kernels.align2d import from_reference_frame
from ...kernels.fourier import apply_ctf, rfft_frequencies
from ...kernels.phantom import PseudoAtoms
from ...kernels.projection import spline_coefficients
from ...progress import progress
from .common import add_image_arguments
from .particles import ROW_BYTES, Structure, _fit_box

OPTICS = {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}


def distinct_views(n_views: int, rng: np.random.Generator, pool: int = 512):
    """(rot, tilt) in degrees of ``n_views`` directions spread apart: greedy farthest points
    among ``pool`` random directions (a direction and its opposite count as the same view,
    their projections being mirror images)."""
    rot, tilt, _ = geometry.rotation_to_euler(geometry.random_rotations(pool, rng))
    directions = geometry.viewing_direction(rot, tilt)
    chosen = [0]
    distance = np.full(pool, np.inf)
    for _ in range(n_views - 1):
        last = directions[chosen[-1]]
        angle = geometry.angle_between_directions(directions, last)
        distance = np.minimum(distance, np.minimum(angle, 180.0 - angle))
        chosen.append(int(np.argmax(distance)))
    return rot[chosen], tilt[chosen]


def domain_phantom(
    rng: np.random.Generator,
    box: int,
    pixel_size: float,
    n_domains: int = 5,
    atoms_per_domain: int = 40,
) -> PseudoAtoms:
    """Pseudo-atoms in ``n_domains`` clusters (Angstrom): centres spread within 0.22 box,
    cluster radii 0.04..0.09 box, densities 0.5..1.5, atoms 1.5 pixels wide."""
    extent = box * pixel_size
    centres = [np.zeros(3)]
    while len(centres) < n_domains:  # centres at least 0.12 box apart
        c = rng.uniform(-1, 1, 3) * 0.22 * extent
        if (
            np.linalg.norm(c) <= 0.22 * extent
            and min(np.linalg.norm(c - p) for p in centres) > 0.12 * extent
        ):
            centres.append(c)
    spread = rng.uniform(0.04, 0.09, n_domains) * extent
    density = rng.uniform(0.5, 1.5, n_domains)
    coords = np.concatenate(
        [
            c + rng.normal(size=(atoms_per_domain, 3)) * s
            for c, s in zip(centres, spread, strict=True)
        ]
    )
    amplitudes = np.repeat(density, atoms_per_domain)
    coords -= np.average(coords, axis=0, weights=amplitudes)
    return PseudoAtoms(coords, amplitudes, np.full(len(coords), 1.5 * pixel_size))


def _load_structure(map_path, box, pixel_size, rng):
    if map_path is None:
        pixel_size = pixel_size or 3.0
        return Structure("phantom", atoms=domain_phantom(rng, box, pixel_size)), pixel_size
    volume, voxel = read_volume(map_path)
    pixel_size = pixel_size or voxel
    if pixel_size is None:
        raise CryomatchError("no pixel size: the header's is 0; give --pixel-size", map_path)
    coefficients = spline_coefficients(_fit_box(volume, box, map_path))
    return Structure(Path(map_path).stem, coefficients=coefficients), pixel_size


def simulate_views(
    out: str | Path,
    n: int,
    n_views: int,
    snr: float,
    box: int,
    seed: int,
    map_path: str | None = None,
    pixel_size: float | None = None,
    max_shift: float = 3.0,
    mirror: bool = True,
    ctf: bool = False,
    defocus_range: tuple[float, float] = (10000.0, 25000.0),
    batch_size: int = 256,
) -> Path:
    """Write images of ``n_views`` views to ``out``; returns the STAR path (module doc)."""
    out = Path(out)
    if n < 1 or n_views < 1:
        raise CryomatchError(f"need at least one image and one view, got {n} and {n_views}")
    if not snr > 0:
        raise CryomatchError(f"the SNR must be positive, got {snr}")
    check_memory(
        n * ROW_BYTES + (n_views + 4 * min(n, batch_size)) * box * box * 4,
        f"simulating {n} images",
        "lower --n (or demo.views.n)",
    )
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("simulate views", params)
    rng = np.random.default_rng([seed, 2])
    noise_rng = np.random.default_rng([seed, 3])
    structure, pixel_size = _load_structure(map_path, box, pixel_size, rng)
    rot, tilt = distinct_views(n_views, rng)
    views = structure.project(
        geometry.euler_to_matrix(rot, tilt, 0.0).reshape(-1, 3, 3),
        np.zeros((n_views, 2)),
        box,
        pixel_size,
    )
    view = rng.integers(0, n_views, size=n)
    displacement = rng.uniform(-max_shift, max_shift, size=(n, 2))
    table = pd.DataFrame(
        {
            "rlnAngleRot": rot[view],
            "rlnAngleTilt": tilt[view],
            "rlnAnglePsi": rng.uniform(-180.0, 180.0, size=n),
            "rlnOriginXAngst": geometry.origin_from_displacement(displacement[:, 0]) * pixel_size,
            "rlnOriginYAngst": geometry.origin_from_displacement(displacement[:, 1]) * pixel_size,
            "rlnIsFlip": (rng.random(n) < 0.5).astype(int) if mirror else np.zeros(n, dtype=int),
            "rlnClassNumber": view + 1,
            "rlnOpticsGroup": 1,
        }
    )
    if ctf:
        u = rng.uniform(*defocus_range, size=n)
        table["rlnDefocusU"] = u
        table["rlnDefocusV"] = u + rng.normal(0.0, 300.0, size=n)
        table["rlnDefocusAngle"] = rng.uniform(0.0, 180.0, size=n)
        table["rlnPhaseShift"] = 0.0
        table["rlnCtfBfactor"] = 0.0
    optics = pd.DataFrame(
        [
            {
                "rlnOpticsGroup": 1,
                "rlnOpticsGroupName": "opticsGroup1",
                **OPTICS,
                "rlnImagePixelSize": pixel_size,
                "rlnImageSize": box,
                "rlnImageDimensionality": 2,
            }
        ]
    )
    labels = provenance.mrc_labels(prov)
    with Outputs() as outputs:
        write_mrc(out / "views.mrcs", views, pixel_size, labels, outputs)
        sigma = None
        with StackWriter(out / "particles.mrcs", n, box, pixel_size, labels, outputs) as writer:
            for start in progress(
                range(0, n, batch_size),
                total=math.ceil(n / batch_size),
                desc="simulate views",
                unit="batch",
            ):
                rows = table.iloc[start : start + batch_size]
                origin = rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pixel_size
                clean = from_reference_frame(
                    views[view[start : start + batch_size]],
                    rows["rlnAnglePsi"].to_numpy(),
                    rows["rlnIsFlip"].to_numpy(bool),
                    origin,
                )
                if ctf:
                    clean = apply_ctf(clean, _ctf(rows, box, pixel_size))
                if sigma is None:
                    sigma = float(np.sqrt(clean.var(axis=(1, 2)).mean() / snr))
                noise = noise_rng.standard_normal(clean.shape, dtype=np.float32) * sigma
                writer.write(clean + noise)
        merged = table.merge(optics, on="rlnOpticsGroup", how="left")
        merged["image_file"] = "particles.mrcs"
        merged["image_index"] = np.arange(n)
        names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
        write_particles(
            out / "particles.star",
            Particles(merged, optics, None),
            prov,
            outputs,
            image_names=names,
        )
    return out / "particles.star"


def _ctf(rows: pd.DataFrame, box: int, pixel_size: float):
    ky, kx = rfft_frequencies(box, pixel_size)
    return ctf_kernel.ctf(
        kx,
        ky,
        rows["rlnDefocusU"].to_numpy(),
        rows["rlnDefocusV"].to_numpy(),
        rows["rlnDefocusAngle"].to_numpy(),
        OPTICS["rlnVoltage"],
        OPTICS["rlnSphericalAberration"],
        OPTICS["rlnAmplitudeContrast"],
    )


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--phantom", action="store_true", help="a seeded pseudo-atomic phantom")
    src.add_argument("--map", help="MRC map to project")
    add_image_arguments(p)
    p.add_argument("--views", type=positive_int, required=True, help="number of distinct views")
    p.add_argument(
        "--pixel-size",
        type=positive_float,
        help="Angstrom per pixel (default: the map header's, 3.0 for the phantom)",
    )
    p.add_argument("--no-mirror", dest="mirror", action="store_false", help="no mirrored images")
    p.add_argument("--ctf", action="store_true", help="multiply the images by a CTF")
    p.add_argument(
        "--defocus",
        type=float,
        nargs=2,
        default=(10000.0, 25000.0),
        metavar=("MIN", "MAX"),
        help="defocus U range in Angstrom (with --ctf)",
    )
    p.add_argument("--batch-size", type=positive_int, default=256, help="images rendered at a time")


def run(args) -> None:
    simulate_views(
        args.out,
        args.n,
        args.views,
        args.snr,
        args.box,
        args.seed,
        args.map,
        args.pixel_size,
        args.max_shift,
        args.mirror,
        args.ctf,
        tuple(args.defocus),
        args.batch_size,
    )
