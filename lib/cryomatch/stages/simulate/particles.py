"""Particle images of 3D structures at known poses, shifts and CTFs, with Gaussian noise.

The structures are seeded pseudo-atomic phantoms (``--phantom``: Gaussian blobs; the second
and later structures are conformational variants of the first, a domain swung about a
hinge) or MRC maps (``--map``). Each image is the projection of one structure at a uniform
random orientation, displaced by up to ``max_shift`` pixels, multiplied by its CTF (optics
groups with their own voltage, Cs and amplitude contrast; one with a phase plate), plus
white Gaussian noise at the given SNR: noise variance = mean signal variance over the box
(of the first 64 images) / SNR. The STAR rows carry the truth: rlnAngleRot/Tilt/Psi,
rlnOriginXAngst/YAngst and rlnClassNumber (the structure, 1-based).

Outputs in OUT: ``particles.mrcs``, ``particles.star`` (RELION 3.1) and, for phantoms,
``structures/structure_NN.mrc`` (the voxelized phantom at the particles' pixel size) and
``structures/projections.png`` (each structure summed along z, y and x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ... import geometry, provenance
from ...cli import positive_float, positive_int
from ...errors import CryomatchError, check_memory
from ...io.atomic import Outputs
from ...io.figures import image_montage, save_png
from ...io.mrc import StackWriter, read_volume, write_mrc
from ...io.particles import Particles, ctf_arguments, read_particles, write_particles
from ...kernels import ctf as ctf_kernel
from ...kernels.fourier import apply_ctf, rfft_frequencies
from ...kernels.phantom import PseudoAtoms, conformational_variant, random_structure
from ...kernels.projection import project_atoms, project_volume, spline_coefficients, voxelize_atoms
from ...progress import progress
from .common import add_image_arguments

PILOT = 64  # images whose mean signal variance sets the noise level
ROW_BYTES = 3 * 1024  # memory per particle: its table row and STAR line (measured ~2.3 KiB)

# Optics groups of the demo: (voltage kV, Cs mm, amplitude contrast, phase plate).
OPTICS_PRESETS = [
    (300.0, 2.7, 0.10, False),
    (200.0, 2.0, 0.07, False),
    (300.0, 0.01, 0.10, True),
]


@dataclass
class Structure:
    """One structure to project: pseudo-atoms (exact projections) or a map's spline."""

    name: str
    atoms: PseudoAtoms | None = None
    coefficients: np.ndarray | None = None

    def project(self, matrices, displacements_a, box, pixel_size):
        if self.atoms is not None:
            a = self.atoms
            return project_atoms(
                a.coords, a.amplitudes, a.sigmas, matrices, box, pixel_size, displacements_a
            )
        return project_volume(self.coefficients, matrices, displacements_a / pixel_size)


def phantom_structures(n: int, box: int, pixel_size: float, rng) -> list[PseudoAtoms]:
    """``n`` related phantoms sized for the box (about half of it wide), blobs ~1.6 px wide."""
    base = random_structure(
        rng, n_atoms=max(60, 3 * box), radius=0.38 * box * pixel_size, sigma=1.6 * pixel_size
    )
    return [base] + [conformational_variant(base, rng) for _ in range(n - 1)]


def _fit_box(volume: np.ndarray, box: int, path) -> np.ndarray:
    """Pad or crop a cubic map about its centre to ``box`` (pixel size unchanged)."""
    n = volume.shape[0]
    if len(set(volume.shape)) != 1:
        raise CryomatchError(f"the map is not cubic: {volume.shape}", path)
    if n == box:
        return volume
    out = np.zeros((box,) * 3, dtype=volume.dtype)
    lo_in, lo_out = max(0, n // 2 - box // 2), max(0, box // 2 - n // 2)
    m = min(n, box)
    out[lo_out : lo_out + m, lo_out : lo_out + m, lo_out : lo_out + m] = volume[
        lo_in : lo_in + m, lo_in : lo_in + m, lo_in : lo_in + m
    ]
    return out


def draw_parameters(
    n: int,
    n_structures: int,
    pixel_size: float,
    max_shift_px: float,
    n_optics_groups: int,
    defocus_range: tuple[float, float],
    rng: np.random.Generator,
    ctf_source: Particles | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-particle truth and CTF (RELION columns) and the optics table."""
    rotations = geometry.random_rotations(n, rng)
    rot, tilt, psi = geometry.rotation_to_euler(rotations)
    shift = rng.uniform(-max_shift_px, max_shift_px, size=(n, 2)) * pixel_size
    origin = geometry.origin_from_displacement(shift)
    table = pd.DataFrame(
        {
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            "rlnOriginXAngst": origin[:, 0],
            "rlnOriginYAngst": origin[:, 1],
            "rlnClassNumber": rng.integers(1, n_structures + 1, size=n),
        }
    )
    if ctf_source is not None:  # borrow real CTF values, row by row
        pick = rng.integers(0, len(ctf_source), size=n)
        src = ctf_source.table.iloc[pick].reset_index(drop=True)
        for column in (
            "rlnDefocusU",
            "rlnDefocusV",
            "rlnDefocusAngle",
            "rlnPhaseShift",
            "rlnCtfBfactor",
            "rlnOpticsGroup",
        ):
            table[column] = src[column].to_numpy()
        optics = ctf_source.optics.copy()
        optics["rlnImagePixelSize"] = pixel_size
    else:
        groups = rng.integers(1, n_optics_groups + 1, size=n)
        u = rng.uniform(*defocus_range, size=n)
        table["rlnDefocusU"] = u
        table["rlnDefocusV"] = u + rng.normal(0.0, 400.0, size=n)  # either sign of astigmatism
        table["rlnDefocusAngle"] = rng.uniform(0.0, 180.0, size=n)
        plate = np.array([OPTICS_PRESETS[(g - 1) % len(OPTICS_PRESETS)][3] for g in groups])
        table["rlnPhaseShift"] = np.where(plate, rng.uniform(20.0, 100.0, size=n), 0.0)
        table["rlnCtfBfactor"] = 0.0
        table["rlnOpticsGroup"] = groups
        optics = pd.DataFrame(
            [
                {
                    "rlnOpticsGroup": g,
                    "rlnOpticsGroupName": f"opticsGroup{g}",
                    "rlnVoltage": OPTICS_PRESETS[(g - 1) % len(OPTICS_PRESETS)][0],
                    "rlnSphericalAberration": OPTICS_PRESETS[(g - 1) % len(OPTICS_PRESETS)][1],
                    "rlnAmplitudeContrast": OPTICS_PRESETS[(g - 1) % len(OPTICS_PRESETS)][2],
                    "rlnImagePixelSize": pixel_size,
                }
                for g in range(1, n_optics_groups + 1)
            ]
        )
    optics["rlnImageDimensionality"] = 2
    return table, optics


def _with_box(optics: pd.DataFrame, box: int) -> pd.DataFrame:
    optics = optics.copy()
    optics["rlnImageSize"] = box
    return optics


def render(structures: list[Structure], table: pd.DataFrame, box: int, pixel_size: float):
    """Noise-free CTF-modulated images (n, box, box) for rows of a merged particle table."""
    images = np.empty((len(table), box, box), dtype=np.float32)
    matrices = geometry.euler_to_matrix(
        table["rlnAngleRot"].to_numpy(),
        table["rlnAngleTilt"].to_numpy(),
        table["rlnAnglePsi"].to_numpy(),
    ).reshape(-1, 3, 3)
    origin = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    displacement = geometry.displacement_from_origin(origin)
    classes = table["rlnClassNumber"].to_numpy()
    for k, structure in enumerate(structures, start=1):
        rows = np.flatnonzero(classes == k)
        if len(rows):
            images[rows] = structure.project(matrices[rows], displacement[rows], box, pixel_size)
    ky, kx = rfft_frequencies(box, pixel_size)
    return apply_ctf(images, ctf_kernel.ctf(kx, ky, *ctf_arguments(table)))


def simulate_particles(
    out: str | Path,
    n: int,
    snr: float,
    box: int,
    seed: int,
    pixel_size: float | None = None,
    maps: list[str] | None = None,
    n_structures: int = 2,
    max_shift: float = 3.0,
    n_optics_groups: int = 3,
    defocus_range: tuple[float, float] = (8000.0, 20000.0),
    ctf_star: str | None = None,
    batch_size: int = 256,
) -> Path:
    """Write a simulated particle set to ``out``; returns the STAR path (see module doc)."""
    out = Path(out)
    if n < 1:
        raise CryomatchError(f"the number of particles must be at least 1, got {n}")
    if not snr > 0:
        raise CryomatchError(f"the SNR must be positive, got {snr}")
    check_memory(
        n * ROW_BYTES + 4 * min(n, batch_size) * box * box * 4,
        f"simulating {n} particles",
        "lower --n (or demo.particles.n)",
    )
    params = {k: v for k, v in locals().items() if k not in ("out",)}
    prov = provenance.record("simulate particles", params)
    rng = np.random.default_rng([seed, 0])
    noise_rng = np.random.default_rng([seed, 1])
    with Outputs() as outputs:
        if maps:
            structures = []
            for path in maps:
                volume, voxel = read_volume(path)
                apix = pixel_size or voxel
                if apix is None:
                    raise CryomatchError(
                        "no pixel size: the header's is 0; give --pixel-size", path
                    )
                if pixel_size is None:
                    pixel_size = apix
                elif abs(apix - pixel_size) > 0.01 * pixel_size:
                    raise CryomatchError(
                        f"pixel size {apix:g} A differs from the first map's {pixel_size:g} A", path
                    )
                structures.append(
                    Structure(
                        Path(path).stem,
                        coefficients=spline_coefficients(_fit_box(volume, box, path)),
                    )
                )
            n_structures = len(structures)
        else:
            pixel_size = pixel_size or 3.0
            atoms = phantom_structures(n_structures, box, pixel_size, rng)
            structures = [Structure(f"structure_{k:02d}", atoms=a) for k, a in enumerate(atoms, 1)]
            views, titles = [], []
            for s in structures:
                a = s.atoms
                volume = voxelize_atoms(a.coords, a.amplitudes, a.sigmas, box, pixel_size)
                write_mrc(
                    out / "structures" / f"{s.name}.mrc",
                    volume,
                    pixel_size,
                    provenance.mrc_labels(prov),
                    outputs,
                )
                views += [volume.sum(axis=k) for k in (0, 1, 2)]
                titles += [f"{s.name} along {axis}" for axis in "zyx"]
            figure = image_montage(views, titles, ncols=3)
            save_png(figure, out / "structures" / "projections.png", outputs)
        ctf_source = read_particles(ctf_star, images=False) if ctf_star else None
        table, optics = draw_parameters(
            n, n_structures, pixel_size, max_shift, n_optics_groups, defocus_range, rng, ctf_source
        )
        optics = _with_box(optics, box)
        merged = table.merge(optics, on="rlnOpticsGroup", how="left")
        pilot = render(structures, merged.iloc[:PILOT], box, pixel_size)
        sigma = float(np.sqrt(pilot.var(axis=(1, 2)).mean() / snr))
        with StackWriter(
            out / "particles.mrcs", n, box, pixel_size, provenance.mrc_labels(prov), outputs
        ) as writer:
            for start in progress(
                range(0, n, batch_size),
                total=math.ceil(n / batch_size),
                desc="simulate",
                unit="batch",
            ):
                clean = render(structures, merged.iloc[start : start + batch_size], box, pixel_size)
                noise = noise_rng.standard_normal(clean.shape, dtype=np.float32) * sigma
                writer.write(clean + noise)
        merged["image_file"] = "particles.mrcs"
        merged["image_index"] = np.arange(n)
        particles = Particles(merged, optics, None)
        names = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
        write_particles(out / "particles.star", particles, prov, outputs, image_names=names)
    return out / "particles.star"


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--phantom", action="store_true", help="seeded pseudo-atomic phantoms")
    src.add_argument("--map", action="append", metavar="MAP", help="MRC map (repeat for several)")
    add_image_arguments(p)
    p.add_argument(
        "--pixel-size",
        type=positive_float,
        help="Angstrom per pixel (default: map header, 3.0 for phantoms)",
    )
    p.add_argument(
        "--n-structures", type=positive_int, default=2, help="phantom structures (default 2)"
    )
    p.add_argument(
        "--optics-groups", type=positive_int, default=3, help="number of optics groups (default 3)"
    )
    p.add_argument(
        "--defocus",
        type=float,
        nargs=2,
        default=(8000.0, 20000.0),
        metavar=("MIN", "MAX"),
        help="defocus U range in Angstrom",
    )
    p.add_argument("--ctf-star", help="borrow CTF and optics values from this STAR or .cs")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images rendered at a time")


def run(args) -> None:
    simulate_particles(
        args.out,
        args.n,
        args.snr,
        args.box,
        args.seed,
        args.pixel_size,
        args.map,
        args.n_structures,
        args.max_shift,
        args.optics_groups,
        tuple(args.defocus),
        args.ctf_star,
        args.batch_size,
    )
