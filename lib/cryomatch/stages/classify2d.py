"""Multi-reference 2D alignment and classification, iteration by iteration (SPARX
sxmref_ali2d: Penczek, Radermacher and Frank 1992, Ultramicroscopy 40:33).

Iteration 0 makes the initial references: the ``--references`` stack, or ``--classes K``
averages of a random partition of the images (seeded by ``rand_seed``). Each iteration
n >= 1 reads ``iter{n-1}/particles.star``, ``references.mrcs`` and ``convergence.json`` and

1. aligns every image to every reference over the full circle, both mirrors and the
   ``+-xr, +-yr`` grid of step ``ts`` about the image's current shift
   (:mod:`cryomatch.kernels.align2d`; an image whose shift leaves the searchable range is
   re-centred: searched about the nearest centre its rings allow), assigns it to the best
   reference, and refines its pose on the exact image against that reference only;
2. averages each class from its aligned images (Wiener filter with ``snr`` when ``CTF``),
   and two half averages from a random split of its members, for the FRC;
3. centres each average (``center``: -1 its members' mean shift, 1 the centre of mass of
   its squared, low-passed contrast, 2 the phase centre of gravity) and composes the
   centring shift into its members' origins, never clipped (a STAR origin always aligns
   the image to its class average; those now out of range are counted);
4. reseeds empty and tiny classes (fewer than ``min_class_size`` members) and, while the
   largest class holds 1.5 times the mean class size, the smaller of the closest pair of
   duplicate classes (two averages that differ, after alignment, little more than a
   class's two half averages do): from a random subset (``rand_seed``) of the
   worse-fitting half of the largest class, splitting it;
5. low-passes each centred average where its FRC falls below 0.5: the next references;
6. stops as SPARX does when no image changed class, no class was reseeded and the
   criterion (the squared references inside the mask) stopped improving; after that an
   iteration copies the converged one (``maxit`` 0: up to 10 iterations).

Outputs in ``OUT/classify2d/iterNNN/``: ``class_averages.mrcs``, ``references.mrcs``,
``classes.csv`` (members, FRC resolution, centring shift, reseeding, criterion, and the
images that changed class, were re-centred or are out of range, per class),
``convergence.json``, ``frc.csv`` (FRC per class against spatial frequency in 1/A),
``particles.star`` (RELION: rlnClassNumber, rlnAnglePsi, rlnOriginXAngst/YAngst, rlnIsFlip,
and rlnParticleFigureOfMerit, the peak normalized cross-correlation) and
``class_averages.png``. Input files are only read; the log has a line per iteration.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import geometry, provenance
from ..backend import get_xp
from ..errors import CryomatchError
from ..io.atomic import Outputs
from ..io.figures import curves, image_montage, save_png
from ..io.files import write_csv, write_json
from ..io.mrc import read_images, write_mrc
from ..io.particles import ImageReader, Particles, read_particles, write_particles
from ..kernels import align2d
from ..kernels import ctf as ctf_kernel
from ..kernels.fourier import apply_ctf, rfft_frequencies
from ..progress import progress

FRC_THRESHOLD = 0.5  # the references are low-passed where the half-set FRC falls below this
DEFAULT_MAXIT = 10  # maxit 0: up to this many iterations, with the automatic stop (SPARX)
CRITERION_TOLERANCE = 1e-5  # relative rise of the criterion that still counts as improving
FINE_RANGE, FINE_STEP = 1.0, 0.5  # shift grid (pixels) of the final refinement about each match
CENTRING = {
    -1: "mean of the members' shifts",
    0: "none",
    1: "centre of mass of the squared contrast",
    2: "phase centre of gravity",
}


@dataclass
class Settings:
    """SPARX's parameters (sxmref_ali2d names and defaults, except xr = yr = 1)."""

    ir: float = 1.0  # inner ring radius, pixels
    ou: float = -1.0  # outer ring radius, pixels; -1: box/2 - 2
    rs: float = 1.0  # ring step, pixels
    xr: float = 1.0  # translation search range in x, pixels (0: rotation only)
    yr: float = 1.0  # ... in y
    ts: float = 1.0  # translation step, pixels
    center: int = 1  # -1 members' mean shift, 0 none, 1 centre of mass, 2 phase centre of gravity
    CTF: bool = False  # noqa: N815 (SPARX's name): phase-flip for alignment, Wiener averages
    snr: float = 1.0  # signal-to-noise ratio of the Wiener filter (with CTF)
    rand_seed: int = 1000  # seed of every random choice
    min_class_size: int = 0  # reseed smaller classes; 0: max(4, 20% of images / classes)

    def radius(self, box: int) -> float:
        return box // 2 - 2 if self.ou == -1 else self.ou


def check_settings(s: Settings, box: int) -> None:
    """Bad parameters: one clear error each."""
    limit = align2d.max_ring_radius(box)
    ou = s.radius(box)
    if not (s.rs > 0 and s.ts > 0 and s.snr > 0):
        raise CryomatchError(f"rs, ts and snr must be positive (got {s.rs}, {s.ts}, {s.snr})")
    if s.xr < 0 or s.yr < 0:
        raise CryomatchError(f"xr and yr must not be negative (got {s.xr}, {s.yr})")
    if not 1 <= s.ir <= ou:
        raise CryomatchError(f"the rings must satisfy 1 <= ir <= ou (got ir={s.ir:g}, ou={ou:g})")
    if ou > limit:
        raise CryomatchError(
            f"ou={ou:g} reaches beyond the {box}-pixel box (largest ring radius {limit})"
        )
    if ou + max(s.xr, s.yr) > limit:
        raise CryomatchError(
            f"the shift search xr={s.xr:g}, yr={s.yr:g} pushes rings of radius ou={ou:g} "
            f"outside the {box}-pixel box: needs ou + max(xr, yr) <= {limit}"
        )
    if s.center not in CENTRING:
        raise CryomatchError(f"center must be one of {sorted(CENTRING)}, got {s.center}")


# --- parameters in and out of STAR tables ---------------------------------------------------
def read_params(particles: Particles, use_table: bool):
    """(psi, origin in pixels (n, 2), mirror, class) from the table, or zeros."""
    table, n = particles.table, len(particles)
    if not use_table:
        return np.zeros(n), np.zeros((n, 2)), np.zeros(n, bool), np.zeros(n, np.int64)
    pixel = particles.pixel_size()

    def column(name, default=0.0):
        return table[name].to_numpy(np.float64) if name in table else np.full(n, default)

    origin = np.stack([column("rlnOriginXAngst"), column("rlnOriginYAngst")], -1) / pixel
    return (
        column("rlnAnglePsi"),
        origin,
        column("rlnIsFlip") > 0.5,
        column("rlnClassNumber").astype(np.int64),
    )


def check_shifts(origin, ou: float, box: int, path) -> None:
    """Each image's rings of radius ``ou`` about its centre ``-origin`` must fit the box."""
    room = align2d.max_ring_radius(box) - ou
    bad = np.flatnonzero(np.abs(origin).max(axis=1) > room + 1e-6)
    if len(bad):
        i = int(bad[0])
        raise CryomatchError(
            f"row {i + 1}: the shift ({origin[i, 0]:.2f}, {origin[i, 1]:.2f}) px pushes rings of "
            f"radius ou={ou:g} outside the {box}-pixel image (at most {room:g} px per axis)",
            path,
        )


def params_table(particles: Particles, classes, psi, origin, mirror, score=None):
    """The particle table with the alignment columns replaced (origins in Angstrom)."""
    table = particles.table.copy()
    pixel = particles.pixel_size()
    table["rlnClassNumber"] = np.asarray(classes, dtype=np.int64)
    table["rlnAnglePsi"] = np.round(geometry.wrap_degrees(psi), 6)
    table["rlnOriginXAngst"] = np.round(origin[:, 0] * pixel, 6)
    table["rlnOriginYAngst"] = np.round(origin[:, 1] * pixel, 6)
    table["rlnIsFlip"] = np.asarray(mirror, dtype=np.int64)
    if score is not None:
        table["rlnParticleFigureOfMerit"] = np.round(score, 6)
    return Particles(table, particles.optics, particles.source)


def image_names(particles: Particles, folder: Path) -> list[str]:
    """rlnImageName entries relative to ``folder`` (so results stay relocatable)."""
    table = particles.table
    rel = {f: os.path.relpath(f, folder) for f in table["image_file"].unique()}
    return [
        f"{i + 1:06d}@{rel[f]}"
        for i, f in zip(table["image_index"], table["image_file"], strict=True)
    ]


# --- images --------------------------------------------------------------------------------
def normalize(images, inside):
    """Zero mean and unit standard deviation over the pixels where ``inside`` is True."""
    values = images[:, inside]
    std = values.std(axis=1)
    return (
        (images - values.mean(axis=1)[:, None, None]) / np.where(std > 0, std, 1.0)[:, None, None]
    ).astype(np.float32)


def ctf_values(table: pd.DataFrame, box: int, pixel: float, defocus_angle=None):
    """Per-image CTFs on the rfft grid (n, box, box//2+1)."""
    ky, kx = rfft_frequencies(box, pixel)
    angle = table["rlnDefocusAngle"].to_numpy() if defocus_angle is None else defocus_angle
    return ctf_kernel.ctf(
        kx,
        ky,
        table["rlnDefocusU"].to_numpy(),
        table["rlnDefocusV"].to_numpy(),
        angle,
        table["rlnVoltage"].to_numpy(),
        table["rlnSphericalAberration"].to_numpy(),
        table["rlnAmplitudeContrast"].to_numpy(),
        table["rlnPhaseShift"].to_numpy(),
        table["rlnCtfBfactor"].to_numpy(),
    )


class Sums:
    """Per-(class, half) sums of aligned images (or Wiener numerators and denominators)."""

    def __init__(self, n_classes: int, box: int, ctf: bool):
        self.k, self.box, self.ctf = n_classes, box, ctf
        shape = (2 * n_classes, box * (box // 2 + 1)) if ctf else (2 * n_classes, box * box)
        self.num = np.zeros(shape, dtype=np.complex128 if ctf else np.float64)
        self.den = np.zeros(shape if ctf else (2 * n_classes,), dtype=np.float64)

    def add(self, aligned, slot, ctf2=None):
        """Add images (n, box, box) to slots (n,) = 2 class + half, as one matrix product."""
        onehot = np.zeros((2 * self.k, len(slot)))
        onehot[slot, np.arange(len(slot))] = 1.0
        if self.ctf:
            self.num += onehot @ np.fft.rfft2(aligned).reshape(len(slot), -1)
            self.den += onehot @ ctf2.reshape(len(slot), -1)
        else:
            self.num += onehot @ aligned.reshape(len(slot), -1)
            self.den += onehot.sum(axis=1)

    def averages(self, snr: float):
        """(full (K, box, box), halves (2, K, box, box)) averages."""
        k, box = self.k, self.box
        num, den = self.num.reshape(k, 2, -1), self.den.reshape(k, 2, -1)
        pairs = [(num[:, 0], den[:, 0]), (num[:, 1], den[:, 1]), (num.sum(1), den.sum(1))]
        out = []
        for n_, d_ in pairs:
            if self.ctf:
                spectrum = (n_ / (d_ + 1.0 / snr)).reshape(k, box, box // 2 + 1)
                out.append(np.fft.irfft2(spectrum, s=(box, box)))
            else:
                out.append((n_ / np.maximum(d_, 1.0)).reshape(k, box, box))
        return out[2].astype(np.float32), np.stack(out[:2]).astype(np.float32)


class ImageSource:
    """Batches of normalized images (phase-flipped for alignment when CTF is on); ``inside``
    (box, box) bool: the normalization region, ``mask`` (box, box): the references' mask."""

    def __init__(self, particles: Particles, settings: Settings, batch_size: int):
        self.particles, self.settings, self.batch_size = particles, settings, batch_size
        self.inside = self.mask = None
        self.reader = ImageReader(particles)
        self.box = self.reader.check()
        self.pixel = particles.pixel_size()

    def subset(self, rows) -> ImageSource:
        out = ImageSource(self.particles.subset(rows), self.settings, self.batch_size)
        out.inside, out.mask = self.inside, self.mask
        return out

    def batches(self, desc: str):
        n = len(self.particles)
        for lo in progress(
            range(0, n, self.batch_size),
            total=math.ceil(n / self.batch_size),
            desc=desc,
            unit="batch",
        ):
            hi = min(n, lo + self.batch_size)
            yield lo, hi, normalize(self.reader.read(lo, hi), self.inside)

    def for_alignment(self, images, lo, hi):
        if not self.settings.CTF:
            return images
        rows = self.particles.table.iloc[lo:hi]
        return apply_ctf(images, np.sign(ctf_values(rows, self.box, self.pixel)))

    def close(self):
        self.reader.close()


# --- one iteration ---------------------------------------------------------------------------
def shift_room(settings: Settings, box: int) -> float:
    """Largest |origin| per axis (pixels) whose rings of radius ``ou`` stay inside the image."""
    return align2d.max_ring_radius(box) - settings.radius(box)


def out_of_range(origin, settings: Settings, box: int):
    """(n,) bool: origins whose rings about ``-origin`` would leave the image."""
    return np.abs(origin).max(axis=1) > shift_room(settings, box) + 1e-6


def align(source: ImageSource, references, origin, settings: Settings, backend: str = "numpy"):
    """Pass 1: (class 0-based, psi, origin, mirror, score, re-centred) of every image.

    Each image is searched about its current centre ``-origin`` rounded to whole pixels
    (:func:`align2d.whole_pixel_centres`), and its match refined on the exact image
    (:func:`align2d.refine_poses`); an image whose origin leaves the searchable range (its
    rings would leave it) is re-centred first: searched about the nearest centre its rings
    allow, and its parameters come from its own best match there (SPARX resets such an
    image to zero). The origins returned are the composed shifts, never clipped."""
    xp = get_xp(backend)
    box = source.box
    ou = settings.radius(box)
    radii = align2d.ring_radii(settings.ir, ou, settings.rs)
    n_angles = align2d.ring_points(ou)
    refs = align2d.prepare_references(
        xp.asarray(references), radii, n_angles, settings.xr, settings.yr, settings.ts
    )
    fine = align2d.prepare_references(
        xp.asarray(references),
        radii,
        n_angles,
        min(settings.xr, FINE_RANGE),
        min(settings.yr, FINE_RANGE),
        FINE_STEP,
        order=3,
    )
    room = shift_room(settings, box)
    recentred = out_of_range(origin, settings, box)
    start = np.clip(origin, -room, room)
    n = len(source.particles)
    cls, score = np.zeros(n, np.int64), np.zeros(n)
    psi, new_origin, mirror = np.zeros(n), np.zeros((n, 2)), np.zeros(n, bool)
    centre = align2d.whole_pixel_centres(start, room)  # searched about whole pixels
    for lo, hi, images in source.batches("align"):
        images = xp.asarray(source.for_alignment(images, lo, hi))
        spectra = align2d.image_spectra(images, centre[lo:hi], radii, n_angles)
        result = align2d.search(spectra, refs)
        cls[lo:hi], score[lo:hi] = result.reference, result.score
        psi[lo:hi], new_origin[lo:hi], mirror[lo:hi] = result.to_params(centre[lo:hi])
        # the final refinement on the exact images, against their own reference only
        fine_psi, new_origin[lo:hi], fine_score, refined = align2d.refine_poses(
            images, new_origin[lo:hi], cls[lo:hi], mirror[lo:hi], fine, radii, room
        )
        psi[lo:hi] = np.where(refined, fine_psi, psi[lo:hi])
        score[lo:hi] = np.where(refined, fine_score, score[lo:hi])
    return cls, psi, new_origin, mirror, score, recentred


def random_halves(classes, n_classes: int, rng: np.random.Generator):
    """Half (0 or 1) of each image: each class's members in random order, split in two."""
    half = np.zeros(len(classes), np.int64)
    for c in range(n_classes):  # one shuffle per class, not per image
        members = rng.permutation(np.flatnonzero(classes == c))
        half[members[len(members) // 2 :]] = 1
    return half


def average(source: ImageSource, classes, psi, origin, mirror, n_classes, rng):
    """Pass 2: class averages (K, box, box), half averages (2, K, box, box), counts (K,)."""
    box, settings = source.box, source.settings
    half = random_halves(classes, n_classes, rng)
    sums = Sums(n_classes, box, settings.CTF)
    for lo, hi, images in source.batches("average"):
        table = source.particles.table.iloc[lo:hi]
        ctf2 = None
        if settings.CTF:
            images = apply_ctf(images, ctf_values(table, box, source.pixel))
            angle = geometry.defocus_angle_in_reference_frame(
                table["rlnDefocusAngle"].to_numpy(), psi[lo:hi], mirror[lo:hi]
            )
            ctf2 = ctf_values(table, box, source.pixel, angle) ** 2
        aligned = align2d.to_reference_frame(images, psi[lo:hi], mirror[lo:hi], origin[lo:hi])
        sums.add(aligned, 2 * classes[lo:hi] + half[lo:hi], ctf2)
    full, halves = sums.averages(settings.snr)
    return full, halves, np.bincount(classes, minlength=n_classes)


def lowpass_cutoffs(frc, counts, min_size):
    """Per class: the frequency (cycles/pixel) where its FRC first falls below 0.5."""
    n_shells = frc.shape[1]
    cut = np.full(len(frc), np.nan)
    for c in range(len(frc)):  # per class
        if counts[c] < max(min_size, 2):
            continue
        below = np.flatnonzero(frc[c, 1:] < FRC_THRESHOLD)
        shell = below[0] + 1 if len(below) else n_shells - 1
        cut[c] = shell / (2.0 * (n_shells - 1))
    fallback = np.nanmedian(cut) if np.isfinite(cut).any() else 0.25
    return np.clip(np.where(np.isfinite(cut), cut, fallback), 0.05, 0.5)


def min_size(settings: Settings, n_images: int, n_classes: int) -> int:
    """Classes with fewer members are reseeded: ``min_class_size``, or by default
    max(4, 20% of the mean class size), at most half the mean class size (at least 1), so
    that a small set (fewer than 8 images a class) reseeds only its empty classes."""
    if settings.min_class_size > 0:
        return settings.min_class_size
    usual = max(4, math.ceil(0.2 * n_images / n_classes))
    return max(1, min(usual, n_images // (2 * n_classes)))


@dataclass
class Result:
    averages: np.ndarray
    references: np.ndarray
    frc: np.ndarray
    counts: np.ndarray
    centre_shift: np.ndarray  # (K, 2) pixels
    cutoff: np.ndarray
    reseeded: np.ndarray
    classes: np.ndarray  # 0-based
    psi: np.ndarray
    origin: np.ndarray
    mirror: np.ndarray
    score: np.ndarray | None
    criterion: np.ndarray  # (K,) sum of the squared reference inside the mask
    flags: dict = field(default_factory=dict)  # per image bool arrays, counted per class


def centre_shifts(settings: Settings, references, classes, psi, origin, mirror, counts):
    """Centring shift c (K, 2) in pixels of each average (``ref_new(s) = ref_old(s + c)``):
    -1 the mean over its members of ``L origin`` (where each image's centre lands in the
    average, SPARX's average-shift centring), 1 the centre of mass of its squared contrast,
    2 its phase centre of gravity (SPARX's center 1; it moves by half the box when the
    contrast is inverted), 0 none."""
    k = len(references)
    if settings.center == 0:
        return np.zeros((k, 2))
    if settings.center == -1:
        landed = np.einsum("nij,nj->ni", geometry.image_to_reference_matrix(psi, mirror), origin)
        sums = np.stack([np.bincount(classes, landed[:, a], minlength=k) for a in (0, 1)], -1)
        shift = sums / np.maximum(counts, 1)[:, None]
    elif settings.center == 1:
        shift = align2d.centre_of_mass(references, settings.radius(references.shape[-1]))
    else:
        shift = align2d.phase_centre_of_gravity(references)
    return np.where(counts[:, None] > 0, shift, 0.0)


def finish(source: ImageSource, classes, psi, origin, mirror, score, n_classes, iteration):
    """Averages, FRC, centring, reseeding and the next references (steps 2-5)."""
    settings, box = source.settings, source.box
    rng = np.random.default_rng([settings.rand_seed, iteration])
    averages, halves, counts = average(source, classes, psi, origin, mirror, n_classes, rng)
    frc = align2d.fourier_ring_correlation(halves[0], halves[1])
    size = min_size(settings, len(classes), n_classes)
    cutoff = lowpass_cutoffs(frc, counts, size)
    references = align2d.lowpass(averages, cutoff)
    shift = centre_shifts(settings, references, classes, psi, origin, mirror, counts)
    if np.any(shift):
        averages = align2d.fourier_shift(averages, -shift)
        references = align2d.fourier_shift(references, -shift)
        origin = geometry.recentre_origin(psi, origin, mirror, shift[classes])
    criterion = (references[:, source.inside] ** 2).sum(axis=1)
    reseeded = np.zeros(n_classes, bool)
    small = np.flatnonzero(counts < size)
    if iteration > 0 and counts.max() >= 1.5 * len(classes) / n_classes:
        twins = duplicates(
            references,
            align2d.lowpass(halves.reshape(-1, box, box), np.tile(cutoff, 2)).reshape(halves.shape),
            counts,
            settings,
            box,
        )
        small = np.union1d(small, twins)
    if len(small) and iteration > 0:
        references, reseeded = reseed(
            source, references, small, classes, psi, origin, mirror, score, counts, cutoff, rng
        )
    return Result(
        averages,
        (references * source.mask).astype(np.float32),
        frc,
        counts,
        shift,
        cutoff,
        reseeded,
        classes,
        psi,
        origin,
        mirror,
        score,
        criterion,
        {"out_of_range": out_of_range(origin, settings, box)},
    )


DUPLICATE_RATIO = 3.0  # classes closer than this many times their half-set distance are one


def duplicates(references, halves, counts, settings: Settings, box: int):
    """The smaller class of the closest pair of duplicate classes (at most one), as an array.

    Two averages are duplicates when, after alignment, ``1 - NCC`` between them is less than
    ``DUPLICATE_RATIO`` times the larger ``1 - NCC`` between either class's two half
    averages: they differ little more than a class differs from itself (a view split in
    two, while another class holds two views)."""
    live = np.flatnonzero(counts >= 2)
    if len(live) < 2:
        return np.zeros(0, np.int64)
    ou = settings.radius(box)
    inside = align2d.disc_mask(box, ou) > 0.5
    a, b = (h[:, inside] - h[:, inside].mean(1, keepdims=True) for h in halves)
    self_distance = 1.0 - (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-30)
    radii = align2d.ring_radii(settings.ir, ou, settings.rs)
    n_angles = align2d.ring_points(ou)
    sub = references[live]
    refs = align2d.prepare_references(sub, radii, n_angles, settings.xr, settings.yr, settings.ts)
    spectra = align2d.image_spectra(sub, np.zeros((len(live), 2)), radii, n_angles)
    nearest = align2d.search(spectra, refs, exclude=np.arange(len(live)))
    ci, cj = live, live[nearest.reference]
    ratio = (1.0 - nearest.score) / np.maximum(self_distance[ci], self_distance[cj])
    i = int(np.argmin(ratio))
    if ratio[i] >= DUPLICATE_RATIO:
        return np.zeros(0, np.int64)
    pair = sorted([(counts[ci[i]], ci[i]), (counts[cj[i]], cj[i])])
    return np.array([pair[0][1]], dtype=np.int64)


def reseed(source, references, small, classes, psi, origin, mirror, score, counts, cutoff, rng):
    """New references for the classes in ``small``: averages of random subsets of the
    worse-fitting half of the largest classes (splitting them), deterministic from the rng.
    Only classes of two or more members outside ``small`` donate; without any (a small set)
    nothing is reseeded, with a warning. Returns (references, reseeded (K,) bool)."""
    references = references.copy()
    reseeded = np.zeros(len(references), bool)
    donors = [
        c for c in np.argsort(-counts, kind="stable") if c not in set(small) and counts[c] > 1
    ]
    if not donors:
        print(
            f"warning: classes {(np.asarray(small) + 1).tolist()} are too small but no class "
            "has members to spare: not reseeded",
            file=sys.stderr,
        )
        return references, reseeded
    for i, c in enumerate(small):
        donor = donors[i % len(donors)]
        members = np.flatnonzero(classes == donor)
        worse = members[np.argsort(score[members], kind="stable")[: max(1, len(members) // 2)]]
        pick = np.sort(rng.choice(worse, size=max(1, len(worse) // 2), replace=False))
        subset = source.subset(pick)
        try:
            avg, _, _ = average(
                subset, np.zeros(len(pick), np.int64), psi[pick], origin[pick], mirror[pick], 1, rng
            )
        finally:
            subset.close()
        references[c] = align2d.lowpass(avg, cutoff[donor])[0]
        reseeded[c] = True
    return references, reseeded


# --- outputs --------------------------------------------------------------------------------
OUTPUT_FILES = (
    "class_averages.mrcs",
    "references.mrcs",
    "particles.star",
    "frc.csv",
    "classes.csv",
    "convergence.json",
    "class_averages.png",
    "frc.png",
)


FLAGS = {  # per-image events counted per class in classes.csv and in convergence.json
    "changed_class": "images that joined the class this iteration",
    "recentred": "images re-centred: their search started out of range",
    "out_of_range": "images whose shift now leaves the searchable range",
}


def per_class(result: Result, name: str) -> np.ndarray:
    """Members (K,) of each class for which the image flag ``name`` is set (0 if unset)."""
    flag = result.flags.get(name, np.zeros(len(result.classes), bool))
    keep = flag & (result.classes >= 0)
    return np.bincount(result.classes[keep], minlength=len(result.counts))


def iteration_dir(out, iteration: int) -> Path:
    return Path(out) / "classify2d" / f"iter{iteration:03d}"


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CryomatchError(f"cannot read the previous iteration's state: {error}", path) from None


def write_iteration(folder: Path, particles: Particles, result: Result, prov, outputs):
    pixel, box = particles.pixel_size(), result.averages.shape[-1]
    labels = provenance.mrc_labels(prov)
    counts = " ".join(str(int(c)) for c in result.counts)
    labels = labels[:9] + [f"members per class: {counts}"[:80]]
    write_mrc(folder / "class_averages.mrcs", result.averages, pixel, labels, outputs)
    write_mrc(folder / "references.mrcs", result.references, pixel, labels, outputs)
    table = params_table(
        particles, result.classes + 1, result.psi, result.origin, result.mirror, result.score
    )
    write_particles(
        folder / "particles.star",
        table,
        prov,
        outputs,
        image_names=image_names(particles, folder.resolve()),
    )
    shells = np.arange(1, result.frc.shape[1])  # shell 0 (the mean) is normalized away
    freq = shells / (box * pixel)
    frc = pd.DataFrame(
        {"shell": shells, "frequency_inv_angstrom": freq, "resolution_angstrom": 1.0 / freq}
    )
    for c in range(len(result.frc)):
        frc[f"class_{c + 1:03d}"] = np.where(result.counts[c] >= 2, result.frc[c, 1:], np.nan)
    write_csv(folder / "frc.csv", frc, prov, outputs)
    figure = curves(
        freq,
        {c: frc[c] for c in frc.columns if c.startswith("class_")},
        "spatial frequency (1/A)",
        "FRC between random half-sets",
        hlines=(0.5, 0.143),
    )
    save_png(figure, folder / "frc.png", outputs)
    n = max(1, int(result.counts.sum()))
    classes = pd.DataFrame(
        {
            "class": np.arange(1, len(result.counts) + 1),
            "particles": result.counts,
            "fraction": result.counts / n,
            "lowpass_angstrom": pixel / result.cutoff,
            "centre_shift_x_angstrom": result.centre_shift[:, 0] * pixel,
            "centre_shift_y_angstrom": result.centre_shift[:, 1] * pixel,
            "reseeded": result.reseeded,
            "criterion": result.criterion,
            **{name: per_class(result, name) for name in FLAGS},
        }
    )
    write_csv(folder / "classes.csv", classes, prov, outputs)
    titles = [f"{c + 1}: {int(m)}" for c, m in enumerate(result.counts)]
    save_png(image_montage(result.averages, titles), folder / "class_averages.png", outputs)


# --- the stage --------------------------------------------------------------------------------
def _inside(mask_path, settings: Settings, box: int):
    """Pixels for image normalization and the references' mask (a file, or a soft disc)."""
    if mask_path is None:
        mask = align2d.disc_mask(box, settings.radius(box))
    else:
        mask = read_images(mask_path)
        if mask.shape[1:] != (box, box) or len(mask) != 1:
            raise CryomatchError(
                f"the mask must be one {box} x {box} image, found {mask.shape[0]} of "
                f"{mask.shape[2]} x {mask.shape[1]}",
                mask_path,
            )
        mask = mask[0]
        if not np.isfinite(mask).all() or mask.max() <= 0:
            raise CryomatchError("the mask must be finite with some positive pixels", mask_path)
        mask = np.clip(mask / mask.max(), 0.0, 1.0)
    return mask > 0.5, mask


def read_references(path, box: int) -> np.ndarray:
    """A reference stack, which must have the particles' box size."""
    refs = read_images(path)
    if refs.shape[1:] != (box, box):
        raise CryomatchError(
            f"the references are {refs.shape[2]} x {refs.shape[1]} pixels but the particles "
            f"are {box} x {box}",
            path,
        )
    return refs


def _initial(source: ImageSource, settings, references_path, n_classes, continue_params) -> Result:
    """Iteration 0: the given references, or averages of a random partition."""
    particles, box = source.particles, source.box
    psi, origin, mirror, _ = read_params(particles, continue_params)
    check_shifts(origin, settings.radius(box), box, particles.source)
    n = len(particles)
    if references_path is not None:
        refs = read_references(references_path, box)
        k = len(refs)
        return Result(
            refs,
            refs * source.mask,
            np.full((k, box // 2 + 1), np.nan),
            np.zeros(k, np.int64),
            np.zeros((k, 2)),
            np.full(k, 0.5),
            np.zeros(k, bool),
            np.full(n, -1),
            psi,
            origin,
            mirror,
            None,
            (refs[:, source.inside].astype(np.float64) ** 2).sum(axis=1),
        )
    if not 1 <= n_classes <= n:
        raise CryomatchError(f"cannot seed {n_classes} classes from {n} images")
    rng = np.random.default_rng([settings.rand_seed, 0])
    classes = rng.permutation(np.arange(n) % n_classes)
    result = finish(source, classes, psi, origin, mirror, np.zeros(n), n_classes, 0)
    result.score = None
    return result


def iterations(maxit: int) -> int:
    """The last iteration a run may reach: ``maxit``, or for 0 SPARX's 10."""
    return maxit if maxit > 0 else DEFAULT_MAXIT


def classify2d(
    particles: str | Path | None,
    out: str | Path,
    references: str | Path | None = None,
    classes: int | None = None,
    maxit: int = 0,
    iteration: int | None = None,
    settings: Settings | None = None,
    mask: str | Path | None = None,
    continue_params: bool = False,
    batch_size: int = 256,
    backend: str = "numpy",
) -> Path:
    """Run iteration ``iteration`` (reading the previous one's outputs), or iterations
    0, 1, ... until the automatic stop (:func:`convergence`) or ``maxit`` (0: up to 10)
    when None; the search runs on ``backend`` (numpy or cupy). Returns the last
    iteration's folder (after the stop, an iteration copies the converged one)."""
    settings = settings or Settings()
    if maxit < 0 or (iteration is not None and iteration < 0):
        raise CryomatchError("maxit and iteration must not be negative")
    todo = range(iterations(maxit) + 1) if iteration is None else [iteration]
    if todo[0] == 0 and particles is None:
        raise CryomatchError("iteration 0 needs the particles (--particles)")
    if todo[0] == 0 and (references is None) == (classes is None):
        raise CryomatchError("iteration 0 needs initial references or a number of classes")
    folder = None
    for it in todo:
        folder = _run_iteration(
            particles,
            out,
            references,
            classes,
            it,
            settings,
            mask,
            continue_params,
            batch_size,
            backend,
        )
        if iteration is None and read_json(folder / "convergence.json")["converged"]:
            break
    return folder


def convergence(previous: dict | None, iteration: int, result: Result, changed: int) -> dict:
    """SPARX's automatic stop: converged when no image changed class, no class was reseeded
    and the criterion (the sum over classes of the squared reference inside the mask) did
    not improve on the previous iteration (rose by less than ``CRITERION_TOLERANCE``)."""
    criterion = float(result.criterion.sum())
    before = None if previous is None else previous["criterion"]
    improved = before is None or criterion > before * (1 + CRITERION_TOLERANCE)
    flags = {name: int(per_class(result, name).sum()) for name in FLAGS if name != "changed_class"}
    converged = iteration > 0 and changed == 0 and not result.reseeded.any() and not improved
    return {
        "iteration": iteration,
        "criterion": criterion,
        "previous_criterion": before,
        "changed_class": changed,
        "reseeded": int(result.reseeded.sum()),
        **flags,
        "converged": converged,
        "converged_at": iteration if converged else None,
    }


def _copy_converged(previous: Path, folder: Path, state: dict, outputs) -> None:
    """An iteration after the stop: the converged iteration's outputs, copied."""
    for name in OUTPUT_FILES:
        if name != "convergence.json":
            with outputs.path(folder / name) as tmp:
                shutil.copyfile(previous / name, tmp)
    write_json(folder / "convergence.json", {**state, "iteration": int(folder.name[4:])}, outputs)


def _run_iteration(
    particles,
    out,
    references,
    classes,
    iteration,
    settings,
    mask_path,
    continue_params,
    batch_size,
    backend,
) -> Path:
    params = {
        "iteration": iteration,
        "references": references,
        "classes": classes,
        "mask": mask_path,
        "continue": continue_params,
        **asdict(settings),
    }
    prov = provenance.record("classify2d", params)
    folder = iteration_dir(out, iteration)
    last = iteration_dir(out, iteration - 1)
    state_file = last / "convergence.json"  # absent in runs of older versions: not converged
    previous = read_json(state_file) if iteration > 0 and state_file.exists() else None
    if previous is not None and previous["converged"]:
        with Outputs() as outputs:
            _copy_converged(last, folder, previous, outputs)
        print(
            f"iteration {iteration}: converged at iteration {previous['converged_at']}; "
            "its outputs copied",
            file=sys.stderr,
        )
        return folder
    star = particles if iteration == 0 else last / "particles.star"
    data = read_particles(star, require_ctf=settings.CTF)
    source = ImageSource(data, settings, batch_size)
    try:
        box = source.box
        check_settings(settings, box)
        source.inside, source.mask = _inside(mask_path, settings, box)
        with Outputs() as outputs:
            if iteration == 0:
                result = _initial(source, settings, references, classes, continue_params)
                changed = 0
            else:
                refs = read_references(last / "references.mrcs", box)
                psi, origin, mirror, before = read_params(data, True)
                cls, psi, origin, mirror, score, recentred = align(
                    source, refs, origin, settings, backend
                )
                result = finish(source, cls, psi, origin, mirror, score, len(refs), iteration)
                result.flags["recentred"] = recentred
                result.flags["changed_class"] = cls + 1 != before
                changed = int(np.sum(cls + 1 != before))
            state = convergence(previous, iteration, result, changed)
            _log_iteration(state, result)
            write_iteration(folder, data, result, prov, outputs)
            write_json(folder / "convergence.json", state, outputs)
    finally:
        source.close()
    return folder


def _log_iteration(state: dict, result: Result) -> None:
    n = len(result.classes)
    before = state["previous_criterion"]
    lines = [
        f"iteration {state['iteration']}: criterion {state['criterion']:.6g}"
        + ("" if before is None else f" (previous {before:.6g})")
        + (
            ""
            if state["iteration"] == 0
            else f"; {state['changed_class']} of {n} images changed class"
        )
        + "; members "
        f"{result.counts.tolist()}; reseeded {(np.flatnonzero(result.reseeded) + 1).tolist()}"
    ]
    if result.score is not None:
        lines.append(f"  mean peak NCC {np.mean(result.score):.4f}")
    if state.get("recentred"):
        lines.append(
            f"  warning: {state['recentred']} images started outside the searchable range and "
            "were re-centred (searched about the nearest centre their rings allow)"
        )
    if state.get("out_of_range"):
        lines.append(
            f"  warning: {state['out_of_range']} images' shifts now leave the searchable range "
            "(centring moved them); the next iteration re-centres them"
        )
    if state["converged"]:
        lines.append(f"  converged at iteration {state['iteration']}")
    print("\n".join(lines), file=sys.stderr)


def add_arguments(p) -> None:
    p.add_argument(
        "--particles",
        help="particles (RELION STAR or cryoSPARC .cs), needed for iteration 0; "
        "iteration n reads OUT/classify2d/iter{n-1}",
    )
    p.add_argument("--out", required=True, help="output folder (results go to OUT/classify2d)")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--references", help="initial references (MRC stack)")
    init.add_argument("--classes", type=int, help="seed this many classes from random subsets")
    p.add_argument(
        "--maxit",
        type=int,
        default=0,
        help="most iterations, each run stops early when converged; 0: up to 10",
    )
    p.add_argument(
        "--iteration",
        type=int,
        help="run this iteration only (0: initial references), reading the "
        "previous one's outputs; default: 0..maxit",
    )
    d = Settings()
    p.add_argument("--ir", type=float, default=d.ir, help="inner ring radius (pixels)")
    p.add_argument("--ou", type=float, default=d.ou, help="outer ring radius; -1: box/2 - 2")
    p.add_argument("--rs", type=float, default=d.rs, help="ring step (pixels)")
    p.add_argument(
        "--xr", type=float, default=d.xr, help="x search range (pixels, 0: rotation only)"
    )
    p.add_argument("--yr", type=float, default=d.yr, help="y search range (pixels)")
    p.add_argument("--ts", type=float, default=d.ts, help="translation step (pixels)")
    p.add_argument(
        "--center",
        type=int,
        default=d.center,
        choices=sorted(CENTRING),
        help="centring of the averages: -1 members' mean shift, 0 none, 1 centre of mass "
        "(sign-blind), 2 phase centre of gravity (SPARX's 1)",
    )
    p.add_argument(
        "--CTF",
        action="store_true",
        help="phase-flip images for alignment, Wiener-filter the averages",
    )
    p.add_argument("--snr", type=float, default=d.snr, help="SNR of the Wiener filter (--CTF)")
    p.add_argument(
        "--rand_seed",
        "--rand-seed",
        dest="rand_seed",
        type=int,
        default=d.rand_seed,
        help="seed of every random choice",
    )
    p.add_argument(
        "--min-class-size",
        type=int,
        default=d.min_class_size,
        help="reseed smaller classes; 0: max(4, 20%% of the mean class size), at most half of it",
    )
    p.add_argument("--mask", help="2D mask (MRC) for normalization and the references")
    p.add_argument(
        "--continue",
        dest="continue_params",
        action="store_true",
        help="start from the particles' rlnAnglePsi, origins and rlnIsFlip",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images held at a time")
    p.add_argument(
        "--backend", default="numpy", choices=("numpy", "cupy"), help="array backend of the search"
    )


def run(args) -> None:
    settings = Settings(
        args.ir,
        args.ou,
        args.rs,
        args.xr,
        args.yr,
        args.ts,
        args.center,
        args.CTF,
        args.snr,
        args.rand_seed,
        args.min_class_size,
    )
    classify2d(
        args.particles,
        args.out,
        args.references,
        args.classes,
        args.maxit,
        args.iteration,
        settings,
        args.mask,
        args.continue_params,
        args.batch_size,
        args.backend,
    )
