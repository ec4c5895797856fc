"""Subvolumes of seeded 3D phantoms at known rotations and shifts, with missing wedge and noise.

Templates are seeded pseudo-atomic phantoms, the second and later ones conformational
variants of the first. The first is drawn until it is clearly asymmetric under rotation:
turned about any of the three axes by 5 degrees (in a 48-voxel box; by 5 * 48 / box
degrees in general, the same motion in voxels), it correlates with itself by less than
0.995 (random blob clouds are often nearly cylindrical or globular at low resolution;
about such an axis no aligner can find the rotation, and alignment accuracy then says
more about the phantom than about the method). Each subvolume is one template (its label drawn
at random) rotated by angles drawn uniformly within ``+-max_angle`` degrees about each of
the z, y, x axes (the rotation ``Rz Ry Rx`` of acryo's grids) and shifted by up to
``max_shift`` voxels per axis, voxelized exactly from the moved atoms; then white Gaussian
noise is added and the missing wedge of a single-axis tilt series about y (``tilt`` range,
beam along z) is removed from signal and noise alike, the noise scaled so that
variance(signal) / variance(noise) = SNR after the wedge. As in a tomogram, the wedge
filter acts on a twice larger box that is then cropped (no wrap-around of its streaks).

Outputs in OUT: ``subvolumes.mrcs`` (volume stack), ``subvolumes.star`` (the truth, RELION
style: rlnImageName, rlnAngleRot/Tilt/Psi, rlnOriginX/Y/ZAngst, rlnClassNumber = label + 1;
see :func:`cryomatch.geometry.subvolume_pose_to_relion`), ``templates/template_NN.mrc`` and
``mask.mrc`` (a soft sphere). With ``--tomogram`` also ``tomogram.mrc``: the same particles
on a grid in one volume, two boxes apart (noise and wedge applied to the whole tomogram),
``particles.star`` (RELION 5 style, positions only: rlnTomoName and
rlnCenteredCoordinateX/Y/ZAngst, the particles' nominal centres) and ``truth.star`` (the
same rows with the true poses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from ... import geometry, provenance
from ...alignment.rotations import euler_zyx_to_rotation
from ...alignment.tilt import add_tilt_arguments, single_axis, tilt_from_arguments
from ...cli import nonnegative_float, positive_float, positive_int
from ...errors import CryomatchError
from ...io.atomic import Outputs
from ...io.mrc import write_mrc
from ...io.star import write_star
from ...io.volumes import VolumeStackWriter
from ...kernels.projection import voxelize_atoms
from ...kernels.rotate import affine_resample
from ...kernels.volumes import fourier_filter, fourier_resize, soft_sphere
from ...progress import progress
from ..subtomo import pose_columns
from .particles import phantom_structures


def rotational_contrast(atoms, box: int, pixel_size: float, angle: float = 5.0) -> float:
    """1 - the smallest correlation of a phantom with itself turned by ``angle`` degrees
    about the x, y or z axis (about its centre of mass)."""
    ref = voxelize_atoms(atoms.coords, atoms.amplitudes, atoms.sigmas, box, pixel_size).ravel()
    centre = atoms.coords.mean(axis=0)
    worst = 1.0
    for axis in np.eye(3):
        turn = Rotation.from_rotvec(np.deg2rad(angle) * axis)
        coords = turn.apply(atoms.coords - centre) + centre
        vol = voxelize_atoms(coords, atoms.amplitudes, atoms.sigmas, box, pixel_size).ravel()
        worst = min(worst, 1.0 - float(np.corrcoef(ref, vol)[0, 1]))
    return worst


def asymmetric_phantoms(n: int, box: int, pixel_size: float, rng, min_contrast: float = 0.005):
    """``n`` related phantoms (see :func:`phantom_structures`), the first one drawn until
    its :func:`rotational_contrast` reaches ``min_contrast``."""
    for _ in range(100):
        atoms = phantom_structures(n, box, pixel_size, rng)
        if rotational_contrast(atoms[0], box, pixel_size, 5.0 * 48 / box) >= min_contrast:
            return atoms
    raise CryomatchError("could not draw a phantom that is asymmetric under rotation")


def place_atoms(coords, quat, shift_zyx, box: int, pixel_size: float) -> np.ndarray:
    """Atom coordinates (x, y, z) in Angstrom about the box centre after moving them as
    ``p -> R (p - c) + c + shift`` in voxel (z, y, x) indices (acryo's centre c)."""
    rot = Rotation.from_quat(quat).as_matrix()
    p = coords[:, ::-1] / pixel_size + geometry.relion_centre((box,) * 3)
    c = geometry.acryo_centre((box,) * 3)
    moved = (p - c) @ rot.T + c + np.asarray(shift_zyx)
    return (moved - geometry.relion_centre((box,) * 3))[:, ::-1] * pixel_size


def draw_poses(n: int, n_templates: int, max_angle: float, max_shift: float, rng):
    """(labels (n,), quaternions (n, 4), shifts (n, 3) z, y, x voxels)."""
    labels = rng.integers(0, n_templates, size=n)
    angles = rng.uniform(-max_angle, max_angle, size=(n, 3))
    shifts = rng.uniform(-max_shift, max_shift, size=(n, 3))
    return labels, euler_zyx_to_rotation(angles).as_quat(), shifts


def map_template(path, box: int):
    """A real map (MRC) resampled to ``box`` by Fourier cropping, scaled to unit standard
    deviation: (volume, its voxel size in Angstrom)."""
    from ...io.mrc import read_volume

    data, voxel = read_volume(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise CryomatchError(f"the map must be a cubic 3D volume, got shape {data.shape}", path)
    if not voxel:
        raise CryomatchError("the map's header has no voxel size", path)
    resized = fourier_resize(np.asarray(data, dtype=np.float32), box)
    resized = (resized - resized.mean()) / resized.std()
    return resized.astype(np.float32), float(voxel) * data.shape[0] / box


def _moved_map(volume, quat, shift_zyx, size: int) -> np.ndarray:
    """The map moved as ``p -> R (p - c) + c + shift`` (acryo's centre c of the box),
    rendered in a box of ``size`` (>= the map's) with the map's centre at ``size // 2``."""
    box = volume.shape[0]
    pad = (size - box) // 2
    big = np.zeros((size,) * 3, dtype=np.float32)
    big[pad : pad + box, pad : pad + box, pad : pad + box] = volume
    rot = Rotation.from_quat(quat).as_matrix()
    c = geometry.acryo_centre((box,) * 3) + pad
    offset = c - rot.T @ (c + np.asarray(shift_zyx, dtype=np.float64))
    return affine_resample(big, rot.T, offset, 0.0)


def prior_table(truth, quats, shifts, shape, pixel_size, error, shift_error, rng):
    """The truth's rows with priors: each rotation turned by ``error`` degrees about a
    random axis, each shift moved by up to ``shift_error`` voxels per axis; half sets
    (rlnRandomSubset) alternate."""
    n = len(quats)
    axes = rng.standard_normal((n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    turn = Rotation.from_rotvec(np.deg2rad(error) * axes)
    q = (turn * Rotation.from_quat(quats)).as_quat()
    s = shifts + rng.uniform(-shift_error, shift_error, size=shifts.shape)
    table = pose_columns(np.zeros(n, dtype=np.int64), q, s, shape, pixel_size)
    table.insert(0, "rlnImageName", truth["rlnImageName"].to_numpy())
    table["rlnRandomSubset"] = 1 + np.arange(n) % 2
    table["rlnOpticsGroup"] = 1
    return table


def optics_table(box: int, pixel_size: float) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "rlnOpticsGroup": 1,
                "rlnOpticsGroupName": "opticsGroup1",
                "rlnImagePixelSize": pixel_size,
                "rlnImageSize": box,
                "rlnImageDimensionality": 3,
            }
        ]
    )


def simulate_subvolumes(
    out: str | Path,
    n: int,
    snr: float,
    box: int,
    seed: int,
    pixel_size: float = 8.0,
    n_templates: int = 1,
    max_angle: float = 10.0,
    max_shift: float = 3.0,
    tilt: tuple[float, float] | None = (-60.0, 60.0),
    tomogram: bool = False,
    batch_size: int = 8,
    map_path: str | Path | None = None,
    uniform: bool = False,
    prior_error: float | None = None,
    prior_shift_error: float = 1.0,
) -> Path:
    """Write a simulated subvolume set to ``out``; returns the truth STAR (module doc)."""
    out = Path(out)
    if n < 1:
        raise CryomatchError(f"the number of subvolumes must be at least 1, got {n}")
    if not snr > 0:
        raise CryomatchError(f"the SNR must be positive, got {snr}")
    if box < 16:
        raise CryomatchError(f"the box must be at least 16 voxels, got {box}")
    if n_templates < 1:
        raise CryomatchError(f"the number of templates must be at least 1, got {n_templates}")
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("simulate subvolumes", params)
    labels_mrc = provenance.mrc_labels(prov)
    rng = np.random.default_rng([seed, 0])
    noise_rng = np.random.default_rng([seed, 1])
    shape = (box,) * 3
    big = 2 * box  # rendered and filtered in a padded box, then cropped
    if map_path is not None:
        real_map, pixel_size = map_template(map_path, box)
        templates, n_templates = [real_map], 1
    else:
        atoms = asymmetric_phantoms(n_templates, box, pixel_size, rng)
        templates = [
            voxelize_atoms(a.coords, a.amplitudes, a.sigmas, box, pixel_size) for a in atoms
        ]
    labels, quats, shifts = draw_poses(n, n_templates, max_angle, max_shift, rng)
    if uniform:
        quats = geometry.random_rotations(n, rng).as_quat()
    crop = (slice(None),) + (slice(box // 2, box // 2 + box),) * 3
    wedge = single_axis(tilt).rfft_mask(None, (big,) * 3)
    # noise: white of variance sigma^2 keeps (kept fraction) * sigma^2 after the wedge
    hermitian = np.full(wedge.shape[-1], 2.0)
    hermitian[0] = hermitian[-1] = 1.0
    kept = float((wedge * hermitian).sum()) / big**3

    def clean(i, size=big):
        if map_path is not None:
            return _moved_map(templates[0], quats[i], shifts[i], size)
        a = atoms[labels[i]]
        c = place_atoms(a.coords, quats[i], shifts[i], box, pixel_size)
        return voxelize_atoms(c, a.amplitudes, a.sigmas, size, pixel_size)

    if map_path is not None:
        padded = _moved_map(templates[0], [0.0, 0, 0, 1], np.zeros(3), big)
    else:
        a0 = atoms[0]
        padded = voxelize_atoms(a0.coords, a0.amplitudes, a0.sigmas, big, pixel_size)
    signal_var = float(np.var(fourier_filter(padded[None], wedge)[crop]))
    sigma = np.sqrt(signal_var / snr / kept)

    table = pose_columns(labels, quats, shifts, shape, pixel_size)
    table.insert(0, "rlnImageName", [f"{i + 1:06d}@subvolumes.mrcs" for i in range(n)])
    table["rlnOpticsGroup"] = 1
    with Outputs() as outputs:
        for k, t in enumerate(templates, start=1):
            write_mrc(
                out / "templates" / f"template_{k:02d}.mrc", t, pixel_size, labels_mrc, outputs
            )
        write_mrc(
            out / "mask.mrc",
            soft_sphere(shape, 0.36 * box, 0.08 * box),
            pixel_size,
            labels_mrc,
            outputs,
        )
        with VolumeStackWriter(
            out / "subvolumes.mrcs", n, shape, pixel_size, labels_mrc, outputs
        ) as w:
            for lo in progress(range(0, n, batch_size), desc="simulate", unit="batch"):
                idx = range(lo, min(n, lo + batch_size))
                vol = np.stack([clean(i) for i in idx])
                vol += sigma * noise_rng.standard_normal(vol.shape, dtype=np.float32)
                w.write(fourier_filter(vol, wedge)[crop])
        blocks = {"optics": optics_table(box, pixel_size), "particles": table}
        write_star(out / "subvolumes.star", blocks, prov, outputs)
        if prior_error is not None:
            priors = prior_table(
                table, quats, shifts, shape, pixel_size, prior_error, prior_shift_error, rng
            )
            blocks = {"optics": optics_table(box, pixel_size), "particles": priors}
            write_star(out / "priors.star", blocks, prov, outputs)
        if tomogram:
            _write_tomogram(
                out,
                [clean(i, box) for i in range(n)],
                table,
                tilt,
                sigma,
                box,
                pixel_size,
                noise_rng,
                prov,
                outputs,
            )
    return out / "subvolumes.star"


def _write_tomogram(out, volumes, truth, tilt, sigma, box, pixel_size, rng, prov, outputs):
    """The particles on a grid two boxes apart (so that the wedge's streaks of one stay out
    of the others' boxes) in one tomogram two boxes thick."""
    n = len(volumes)
    nx = int(np.ceil(np.sqrt(n)))
    ny = int(np.ceil(n / nx))
    step = 2 * box
    shape = (2 * box, ny * step, nx * step)
    tomo = np.zeros(shape, dtype=np.float32)
    centres = np.zeros((n, 3), dtype=np.int64)
    for i, vol in enumerate(volumes):
        iy, ix = divmod(i, nx)
        corner = np.array([box // 2, box // 2 + iy * step, box // 2 + ix * step])
        centres[i] = corner + box // 2
        region = tuple(slice(c, c + box) for c in corner)
        tomo[region] += vol
    tomo += sigma * rng.standard_normal(shape, dtype=np.float32)
    tomo = fourier_filter(tomo, single_axis(tilt).rfft_mask(None, shape))
    write_mrc(out / "tomogram.mrc", tomo, pixel_size, provenance.mrc_labels(prov), outputs)
    centred = (centres - np.array(shape) // 2)[:, ::-1] * pixel_size  # x, y, z Angstrom
    particles = pd.DataFrame(
        {
            "rlnTomoName": "tomogram",
            "rlnCenteredCoordinateXAngst": centred[:, 0],
            "rlnCenteredCoordinateYAngst": centred[:, 1],
            "rlnCenteredCoordinateZAngst": centred[:, 2],
            "rlnOpticsGroup": 1,
        }
    )
    optics = optics_table(box, pixel_size)
    write_star(out / "particles.star", {"optics": optics, "particles": particles}, prov, outputs)
    truth_rows = pd.concat(
        [particles, truth.drop(columns=["rlnImageName", "rlnOpticsGroup"])], axis=1
    )
    write_star(out / "truth.star", {"optics": optics, "particles": truth_rows}, prov, outputs)


def read_simulated(folder):
    """A simulated set read back: (subvolumes (n, *shape), templates (T, *shape), mask,
    labels (n,) 0-based, quaternions (n, 4) and shifts (n, 3) in the alignment API's
    conventions (see :func:`geometry.relion_to_subvolume_pose`))."""
    from ...io.mrc import read_volume
    from ...io.star import read_star
    from ...io.volumes import VolumeStackReader

    folder = Path(folder)
    blocks = read_star(folder / "subvolumes.star")
    truth, pixel_size = blocks["particles"], float(blocks["optics"]["rlnImagePixelSize"].iloc[0])
    with VolumeStackReader(folder / "subvolumes.mrcs") as reader:
        volumes = reader.read(0, len(reader))
    origin = truth[[f"rlnOrigin{a}Angst" for a in "XYZ"]].to_numpy(float) / pixel_size
    angles = (truth[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    quats, shifts = geometry.relion_to_subvolume_pose(*angles, origin, volumes.shape[1:])
    paths = sorted((folder / "templates").glob("template_*.mrc"))
    templates = np.stack([read_volume(p)[0] for p in paths])
    mask = read_volume(folder / "mask.mrc")[0]
    labels = truth["rlnClassNumber"].to_numpy() - 1
    return volumes, templates, mask, labels, quats, shifts


def add_arguments(p) -> None:
    p.add_argument("--n", type=positive_int, required=True, help="number of subvolumes")
    p.add_argument(
        "--snr", type=positive_float, required=True, help="signal-to-noise variance ratio"
    )
    p.add_argument("--box", type=positive_int, required=True, help="subvolume size in voxels")
    p.add_argument("--seed", type=int, required=True, help="random seed")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pixel-size", type=positive_float, default=8.0, help="Angstrom per voxel")
    p.add_argument("--n-templates", type=positive_int, default=1, help="phantom templates")
    p.add_argument(
        "--max-angle", type=nonnegative_float, default=10.0, help="largest angle per axis, degrees"
    )
    p.add_argument(
        "--max-shift", type=nonnegative_float, default=3.0, help="largest shift per axis, voxels"
    )
    add_tilt_arguments(p)
    p.add_argument(
        "--tomogram",
        action="store_true",
        help="also write the particles into one tomogram with a RELION 5 STAR",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="subvolumes rendered at a time"
    )
    p.add_argument("--map", help="a map (MRC) to copy instead of phantoms (resampled to --box)")
    p.add_argument(
        "--uniform", action="store_true", help="rotations uniform on SO(3) (not +-max-angle)"
    )
    p.add_argument(
        "--prior-error",
        type=nonnegative_float,
        help="also write priors.star: the poses turned by this many degrees (random axes)",
    )
    p.add_argument(
        "--prior-shift-error",
        type=nonnegative_float,
        default=1.0,
        help="prior shift error, voxels per axis",
    )


def run(args) -> None:
    simulate_subvolumes(
        args.out,
        args.n,
        args.snr,
        args.box,
        args.seed,
        args.pixel_size,
        args.n_templates,
        args.max_angle,
        args.max_shift,
        tilt_from_arguments(args),
        args.tomogram,
        args.batch_size,
        args.map,
        args.uniform,
        args.prior_error,
        args.prior_shift_error,
    )
