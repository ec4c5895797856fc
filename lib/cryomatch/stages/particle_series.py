"""Particle series (RELION 5 / WarpTools 2D tilt stacks, or RELION 3 per-tilt rows): the
average by Fourier back-projection, and a local refinement of the particle poses.

``cryomatch particle-series reconstruct`` inserts each tilt image's 2D transform as a central
slice of the particle's 3D transform (:mod:`cryomatch.kernels.backprojection`), weighted by
the CTF and the dose: plain images enter as ``w CTF X`` with weight ``(w CTF)^2``,
CTF-premultiplied ones (rlnCtfDataAreCtfPremultiplied) as ``w X`` with the same weight, where
``w = rlnCtfScalefactor x dose weight`` (Grant and Grigorieff's critical exposure from
rlnMicrographPreExposure, or the B-factor envelope of rlnCtfBfactor); the sums are divided by
the summed weights plus ``wiener`` x their mean. Two half maps from the particles' halves
(rlnRandomSubset, else alternating) and their FSC; with ``--reference`` the FSC of the average
against that map, unmasked and inside a soft sphere.

``cryomatch particle-series refine`` searches, per particle, small rotations (a ball of
``max_angle`` degrees on a ``angle_step`` grid, then a finer grid about the best) and 3D
shifts (``max_shift`` pixels, ``shift_step``) that best match every tilt image of the particle
with the central slices of a reference, CTF and dose applied, up to ``lowpass`` Angstrom
(default: where the half-map FSC of the current average falls below 0.143, so that only
frequencies that carry signal are compared; never lower than the round before). The
reference of each particle is the reconstruction from the *other* particles of its half
(``references="halves"``: gold standard, the halves never mix and their FSC stays an honest
measure), or from all other particles (``"all"``); never from the particle itself. Writes
the refined STAR, the per-particle changes (degrees, Angstrom), the new average and, with
``--reference``, the FSC against it before and after.

Outputs in OUT: ``average.mrc``, ``half1.mrc``, ``half2.mrc``, ``average.png``,
``fsc_halves.csv`` (1/A, FSC), ``fsc_reference.csv`` (1/A, unmasked, masked), ``fsc.png``,
``summary.json``; refine adds ``particles_refined.star``, ``pose_changes.csv`` and
``fsc_reference_before.csv``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from .. import geometry, provenance
from ..backend import array_module, fft_module, get_xp, to_numpy
from ..errors import CryomatchError, CryomatchWarning
from ..io.atomic import Outputs
from ..io.figures import curves, orthogonal_slices, save_png
from ..io.files import write_csv, write_json
from ..io.mrc import read_volume, write_mrc
from ..io.particle_series import ParticleSeries, read_particle_series, read_tilt_images
from ..io.star import read_star, write_star
from ..kernels import backprojection as bp
from ..kernels.ctf import ctf
from ..kernels.fourier import shift_images
from ..kernels.fsc import fsc, fsc_weight, resolution_at, shell_filter
from ..kernels.volumes import soft_sphere
from ..progress import progress


def log(message: str) -> None:
    print(f"particle-series: {message}", file=sys.stderr, flush=True)


# --- per-tilt weights -------------------------------------------------------------------------
class Grid:
    """The slice points of one padded grid and their frequencies in 1/A."""

    def __init__(self, box: int, pad: int, pixel_size: float, xp=np):
        self.box, self.pad, self.size = box, pad, bp.padded_size(box, pad)
        self.radius = self.size // 2 - 1  # trilinear corners stay inside the grid
        self.ky, self.kx, self.flat = bp.slice_grid(self.size, self.radius, xp)
        self.kx_a = self.kx / (self.size * pixel_size)
        self.ky_a = self.ky / (self.size * pixel_size)
        self.k_a = xp.sqrt(self.kx_a**2 + self.ky_a**2)


def tilt_factors(series: ParticleSeries, rows, grid: Grid, dose: bool = True):
    """(CTF (n, m), envelope w (n, m)) of tilt rows at the grid's points: w is
    rlnCtfScalefactor times the dose weight (exposure) or the B-factor envelope."""
    xp = array_module(grid.kx)
    t = series.tilts.iloc[np.asarray(rows)]
    c = ctf(
        grid.kx_a,
        grid.ky_a,
        *(t[col].to_numpy(float) for col in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")),
        t["rlnVoltage"].to_numpy(float),
        t["rlnSphericalAberration"].to_numpy(float),
        t["rlnAmplitudeContrast"].to_numpy(float),
        t["rlnPhaseShift"].to_numpy(float),
    )
    env = xp.asarray(t["scale"].to_numpy(float))[:, None] * xp.ones_like(c)
    if dose:
        exposure = t["exposure"].to_numpy(float)
        if np.isfinite(exposure).all():
            env = env * bp.dose_weights(grid.k_a, xp.asarray(exposure))
        bfactor = t["bfactor"].to_numpy(float)
        if np.any(bfactor != 0):
            env = env * bp.bfactor_weights(grid.k_a, xp.asarray(bfactor))
    return c, env


def centred_spectra(series, images, rows, grid: Grid):
    """Slice values (n, m) of tilt images, moved so that the particle sits at the centre
    (minus its recorded displacement shift_x/y)."""
    xp = array_module(grid.kx)
    spectra = bp.centred_fft2(xp.asarray(images), grid.size).reshape(len(images), -1)[:, grid.flat]
    t = series.tilts.iloc[np.asarray(rows)]
    d = (
        np.stack([t["shift_x"].to_numpy(float), t["shift_y"].to_numpy(float)], 1)
        / series.pixel_size
    )
    if np.any(d != 0):
        d = xp.asarray(d)
        phase = 2j * np.pi * (grid.kx[None] * d[:, :1] + grid.ky[None] * d[:, 1:]) / grid.size
        spectra = spectra * xp.exp(phase)
    return spectra


# --- reconstruction ---------------------------------------------------------------------------
class Accumulator:
    """Summed slices and weights of the two halves on a padded grid."""

    def __init__(self, grid: Grid, xp):
        n = grid.size**3
        self.data = [xp.zeros(n, dtype=xp.complex128) for _ in range(2)]
        self.weight = [xp.zeros(n, dtype=xp.float64) for _ in range(2)]

    def maps(self, grid: Grid, wiener: float, gridding: str):
        """(half1, half2, average) float32 numpy maps."""
        out = [
            bp.reconstruct(d, w, grid.box, wiener, grid.radius, gridding)
            for d, w in zip(self.data, self.weight, strict=True)
        ]
        out.append(
            bp.reconstruct(
                self.data[0] + self.data[1],
                self.weight[0] + self.weight[1],
                grid.box,
                wiener,
                grid.radius,
                gridding,
            )
        )
        return [to_numpy(m) for m in out]


SPLITS = ("particles", "tilts")


def tilt_halves(series, rows, split: str, p: int) -> np.ndarray:
    """Half (1 or 2) of each tilt row: the particle's (gold standard), or by alternate tilt
    (odd/even tilt index: independent noise, shared particles; a check of the data)."""
    if split == "tilts":
        return (series.tilts["tilt"].to_numpy()[rows] % 2) + 1
    if split != "particles":
        raise ValueError(f"unknown split {split!r} (use one of {SPLITS})")
    return np.full(len(rows), int(series.particles["half"].iloc[p]))


def insert_particles(series, particles, poses, grid, acc, gridding, dose, xp, split="particles"):
    """Insert the tilt images of ``particles`` (poses (n_particles, 3, 3) for all particles)
    into the accumulators of their halves (:func:`tilt_halves`)."""
    matrices = series.compose(poses)
    for p in particles:
        rows = series.rows_of([p])
        images = read_tilt_images(series, rows)
        c, env = tilt_factors(series, rows, grid, dose)
        spectra = centred_spectra(series, images, rows, grid)
        values = spectra * env if series.premultiplied else spectra * c * env
        weights = (c * env) ** 2
        halves = tilt_halves(series, rows, split, p)
        for half in (1, 2):
            sel = np.flatnonzero(halves == half)
            if len(sel) == 0:
                continue
            bp.insert_slices(
                acc.data[half - 1],
                acc.weight[half - 1],
                values[sel],
                weights[sel],
                xp.asarray(matrices[rows[sel]]),
                grid.ky,
                grid.kx,
                gridding,
            )
    return acc


def reference_fsc(average, reference, pixel_size, mask_radius, mask_edge):
    """(freq 1/A, unmasked FSC, FSC inside a soft sphere) of the average and a reference."""
    box = average.shape[-1]
    if reference.shape != average.shape:
        raise CryomatchError(
            f"the reference has shape {reference.shape}, the average {average.shape}"
        )
    radius = box // 2 - 4 if mask_radius is None else mask_radius
    mask = soft_sphere(average.shape, radius, mask_edge)
    freq, unmasked = fsc(average, reference, pixel_size)
    _, masked = fsc(average * mask, reference * mask, pixel_size)
    return freq, unmasked, masked


def fsc_summary(freq, curve, box: int) -> dict:
    return {
        "fsc_at_half_nyquist": float(curve[box // 4]),
        "mean_fsc_to_half_nyquist": float(np.mean(curve[1 : box // 4 + 1])),
        "half_nyquist_A": float(1 / freq[box // 4]),
        "resolution_fsc_0.5_A": resolution_at(freq, curve, 0.5),
        "resolution_fsc_0.143_A": resolution_at(freq, curve, 0.143),
    }


def reconstruct_series(
    series, poses, pad, gridding, wiener, dose, batch_size, xp, split="particles"
):
    """(grid, accumulator, [half1, half2, average]) of a series at particle poses (n, 3, 3)."""
    grid = Grid(series.box, pad, series.pixel_size, xp)
    acc = Accumulator(grid, xp)
    everyone = np.arange(series.n_particles)
    for start in progress(range(0, len(everyone), batch_size), desc="insert", unit="batch"):
        batch = everyone[start : start + batch_size]
        insert_particles(series, batch, poses, grid, acc, gridding, dose, xp, split)
    return grid, acc, acc.maps(grid, wiener, gridding)


def particle_series_reconstruct(
    star,
    out,
    tomograms=None,
    angpix=None,
    reference=None,
    pad=2,
    gridding="trilinear",
    wiener=0.1,
    dose=True,
    mask_radius=None,
    mask_edge=3.0,
    split="particles",
    batch_size=8,
    backend="numpy",
) -> dict:
    """Reconstruct the average of a particle series and write it with its FSCs (see module)."""
    out = Path(out)
    params = dict(
        star=str(star),
        tomograms=tomograms,
        angpix=angpix,
        reference=reference,
        pad=pad,
        gridding=gridding,
        wiener=wiener,
        dose=dose,
        mask_radius=mask_radius,
        mask_edge=mask_edge,
        split=split,
        batch_size=batch_size,
        backend=backend,
    )
    prov = provenance.record("particle-series reconstruct", params)
    xp = get_xp(backend)
    series, ref = _read_inputs(star, tomograms, angpix, reference)
    _check_halves(series, split)
    _, _, (half1, half2, average) = reconstruct_series(
        series, series.poses, pad, gridding, wiener, dose, batch_size, xp, split
    )
    summary = {
        "notes": series.notes,
        "n_particles": series.n_particles,
        "n_tilts": len(series.tilts),
        "pixel_size_A": series.pixel_size,
        "box": series.box,
        "halves_split_by": split,
    }
    with Outputs() as outputs:
        _write_maps(
            out, series, half1, half2, average, ref, mask_radius, mask_edge, prov, outputs, summary
        )
        write_json(out / "summary.json", {"provenance": prov, **summary}, outputs)
    return summary


def _check_halves(series, split: str) -> None:
    """Warn (log and summary) when a particle half is too small for a meaningful FSC."""
    if split != "particles":
        return
    counts = [int((series.particles["half"] == h).sum()) for h in (1, 2)]
    if min(counts) < 2:
        message = (
            f"the particle halves hold {counts[0]} and {counts[1]} particles: their FSC means "
            "little (split by tilts to check the data)"
        )
        series.notes.append(message)
        warnings.warn(f"{series.source}: {message}", CryomatchWarning, stacklevel=2)


def _read_inputs(star, tomograms, angpix, reference):
    """(series, reference map or None): the series with its notes logged."""
    series = read_particle_series(star, tomograms, angpix)
    for note in series.notes:
        log(note)
    return series, _read_reference(reference, series)


def _read_reference(reference, series):
    if reference is None:
        return None
    ref, _ = read_volume(reference)
    if ref.shape != (series.box,) * 3:
        raise CryomatchError(
            f"the reference has shape {ref.shape}, the particle images are {series.box} px",
            reference,
        )
    return ref


def _write_maps(
    out, series, half1, half2, average, ref, mask_radius, mask_edge, prov, outputs, summary
):
    px = series.pixel_size
    labels = provenance.mrc_labels(prov)
    for name, vol in (("half1", half1), ("half2", half2), ("average", average)):
        write_mrc(out / f"{name}.mrc", vol, px, labels, outputs)
    save_png(
        orthogonal_slices(average, f"average of {series.n_particles} particles"),
        out / "average.png",
        outputs,
    )
    freq, halves = fsc(half1, half2, px)
    write_csv(
        out / "fsc_halves.csv",
        pd.DataFrame({"frequency_1_per_A": freq, "fsc": halves}),
        prov,
        outputs,
    )
    curves_to_plot = {"half maps": halves}
    summary["halves"] = fsc_summary(freq, halves, series.box)
    log(f"half-map FSC 0.143 at {summary['halves']['resolution_fsc_0.143_A']:.1f} A")
    if ref is not None:
        freq, unmasked, masked = _write_reference_fsc(
            out / "fsc_reference.csv", average, ref, series, mask_radius, mask_edge, prov, outputs
        )
        curves_to_plot |= {"vs reference": unmasked, "vs reference, soft sphere": masked}
        summary["reference_unmasked"] = fsc_summary(freq, unmasked, series.box)
        summary["reference_masked"] = fsc_summary(freq, masked, series.box)
        for key in ("reference_unmasked", "reference_masked"):
            s = summary[key]
            log(
                f"FSC {key.replace('_', ' ')}: {s['fsc_at_half_nyquist']:.3f} at half Nyquist "
                f"({s['half_nyquist_A']:.0f} A), 0.5 at {s['resolution_fsc_0.5_A']:.1f} A"
            )
    fig = curves(  # from shell 1: shell 0 is the mean
        freq[1:],
        {name: curve[1:] for name, curve in curves_to_plot.items()},
        "spatial frequency (1/A)",
        "FSC",
        "Fourier shell correlation",
        hlines=(0.5, 0.143),
    )
    save_png(fig, out / "fsc.png", outputs)


def _write_reference_fsc(path, vol, ref, series, mask_radius, mask_edge, prov, outputs):
    """Write the FSC of ``vol`` against ``ref`` (unmasked, in a soft sphere) to ``path``;
    return (frequency 1/A, unmasked, masked)."""
    freq, unmasked, masked = reference_fsc(vol, ref, series.pixel_size, mask_radius, mask_edge)
    table = pd.DataFrame(
        {"frequency_1_per_A": freq, "fsc_unmasked": unmasked, "fsc_masked": masked}
    )
    write_csv(path, table, prov, outputs)
    return freq, unmasked, masked


# --- local refinement ---------------------------------------------------------------------------
def rotation_ball(max_angle: float, step: float) -> np.ndarray:
    """Small rotations (n, 3, 3): rotation vectors on a cubic grid of ``step`` degrees within
    a ball of ``max_angle`` degrees (the identity first)."""
    if step <= 0 or max_angle <= 0:
        return np.eye(3)[None]
    k = int(np.floor(max_angle / step + 1e-9))
    g = np.arange(-k, k + 1) * step
    v = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    v = v[np.linalg.norm(v, axis=1) <= max_angle + 1e-9]
    v = v[np.argsort(np.linalg.norm(v, axis=1), kind="stable")]
    return Rotation.from_rotvec(v, degrees=True).as_matrix()


def shift_grid(max_shift: float, step: float) -> np.ndarray:
    """3D shifts (n, 3) in pixels on a cubic grid within a ball of ``max_shift``."""
    if step <= 0 or max_shift <= 0:
        return np.zeros((1, 3))
    k = int(np.floor(max_shift / step + 1e-9))
    g = np.arange(-k, k + 1) * step
    s = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return s[np.linalg.norm(s, axis=1) <= max_shift + 1e-9]


def score_candidates(data, model_slices, matrices, grid_box, shifts, xp):
    """Cross-correlations (n_rot, n_shift) of a particle: the sum over tilts of each tilt's
    data correlated with its model slice moved by the projected 3D shift. data (t, box, box)
    complex spectra on the unpadded centred grid (divided by the noise power for a
    likelihood); model_slices (n_rot, t, box, box); matrices (n_rot, t, 3, 3); shifts (s, 3)
    px."""
    fft = fft_module(xp)
    box = grid_box
    cross = data[None] * xp.conj(model_slices)  # (r, t, box, box), centred
    # cc[d] = sum_k D conj(M e^{-2 pi i k d / box}) (ifft2 divides by box^2: undone)
    cc = fft.ifft2(fft.ifftshift(cross, axes=(-2, -1))).real * (box * box)
    # image displacement of each tilt for each shift: (R s)[:2]
    d = xp.einsum("rtij,sj->rtsi", xp.asarray(matrices)[..., :2, :], xp.asarray(shifts))
    # bilinear interpolation of the periodic cc maps at d (x, y)
    x0 = xp.floor(d[..., 0])
    y0 = xp.floor(d[..., 1])
    fx, fy = d[..., 0] - x0, d[..., 1] - y0
    r_idx = xp.arange(cc.shape[0])[:, None, None]
    t_idx = xp.arange(cc.shape[1])[None, :, None]
    total = 0.0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            iy = (y0 + dy).astype(xp.int64) % box
            ix = (x0 + dx).astype(xp.int64) % box
            total = total + wy * wx * cc[r_idx, t_idx, iy, ix]
    return xp.sum(total, axis=1)


ESTIMATES = ("mean", "best")


def refine_particle(
    series,
    p,
    ref_spectrum,
    grid,
    band,
    rotations,
    shifts,
    dose,
    xp,
    pose,
    estimate="mean",
    mask=None,
):
    """(rotation C (3, 3), shift (3,) px, log-likelihood gain) for particle p against the
    reference's padded spectrum: tilt matrices R C, image shifts (R C s)[:2].

    Each candidate's log-likelihood under white Gaussian noise per tilt and shell (its power
    estimated from the data, where the signal is weak) with the best non-negative amplitude
    ``a``: ``L = max(CC, 0)^2 / (2 |M|^2)`` (whitened). ``estimate`` "mean" returns the
    posterior mean over the candidates (uniform prior; a flat posterior, where the data do not
    decide, stays near the identity), "best" the most likely candidate. The gain is the best
    candidate's L minus the identity's. ``mask`` (box, box): a soft disk the centred images
    are multiplied by (their neighbours left out), or None."""
    rows = series.rows_of([p])
    box = series.box
    unpadded = Grid(box, 1, series.pixel_size, xp)
    images = xp.asarray(read_tilt_images(series, rows), dtype=xp.float64)
    if mask is not None:  # centre the particle, then keep it alone (no neighbours)
        t = series.tilts.iloc[rows]
        d = np.stack([t["shift_x"].to_numpy(float), t["shift_y"].to_numpy(float)], 1)
        images = shift_images(images, xp.asarray(-d / series.pixel_size)) * mask
        spectra = bp.centred_fft2(images, box).reshape(len(rows), -1)[:, unpadded.flat]
    else:
        spectra = centred_spectra(series, images, rows, unpadded)
    c, env = tilt_factors(series, rows, unpadded, dose)
    lo, hi = band
    keep = xp.flatnonzero((unpadded.k_a >= lo) & (unpadded.k_a <= hi))
    model_factor = (c * c * env if series.premultiplied else c * env)[:, keep]
    flat = unpadded.flat[keep]
    # noise power per tilt and shell
    shells = xp.rint(xp.sqrt(unpadded.kx[keep] ** 2 + unpadded.ky[keep] ** 2)).astype(xp.int64)
    power = xp.abs(spectra[:, keep]) ** 2
    counts = xp.bincount(shells, minlength=box)
    sigma2 = xp.stack([xp.bincount(shells, weights=row, minlength=box) for row in power])
    sigma2 = sigma2 / xp.maximum(counts, 1)[None]
    sigma2 = xp.maximum(sigma2, 1e-12 * float(sigma2.max()))[:, shells]  # (t, m)
    data = xp.zeros((len(rows), box * box), dtype=xp.complex128)
    data[:, flat] = spectra[:, keep] / sigma2  # the cross-correlation divides by sigma2
    data = data.reshape(len(rows), box, box)
    base = series.compose(pose)[rows]
    ky, kx = unpadded.ky[keep] * grid.pad, unpadded.kx[keep] * grid.pad
    loglik = np.empty((len(rotations), len(shifts)))
    for chunk in range(0, len(rotations), 16):
        rots = rotations[chunk : chunk + 16]
        mats = base[None] @ rots[:, None]  # (r, t, 3, 3): R C
        slices = bp.extract_slices(ref_spectrum, xp.asarray(mats.reshape(-1, 3, 3)), ky, kx)
        slices = slices.reshape(len(rots), len(rows), -1) * model_factor[None]
        norm = to_numpy(xp.sum(xp.abs(slices) ** 2 / sigma2[None], axis=(1, 2)))
        model = xp.zeros((len(rots), len(rows), box * box), dtype=xp.complex128)
        model[..., flat] = slices
        model = model.reshape(len(rots), len(rows), box, box)
        cc = to_numpy(score_candidates(data, model, mats, box, shifts, xp))
        loglik[chunk : chunk + len(rots)] = np.maximum(cc, 0.0) ** 2 / (2 * norm[:, None])
    identity = int(np.argmin(np.linalg.norm(shifts, axis=1)))
    gain = float(loglik.max() - loglik[0, identity])
    if estimate == "best":
        r, s = np.unravel_index(int(np.argmax(loglik)), loglik.shape)
        return rotations[r], shifts[s], gain
    if estimate != "mean":
        raise ValueError(f"unknown estimate {estimate!r} (use one of {ESTIMATES})")
    weights = np.exp(loglik - loglik.max())
    weights /= weights.sum()
    rotation = Rotation.from_matrix(rotations).mean(weights=weights.sum(axis=1)).as_matrix()
    shift = weights.sum(axis=0) @ shifts
    return rotation, shift, gain


REFERENCES = ("halves", "all")


def leave_one_out_spectrum(
    series, p, acc, grid, poses, wiener, gridding, dose, xp, references, mask=None, shells=None
):
    """Padded reference spectrum of the reconstruction from the other particles of p's half
    (``references`` "halves") or from all other particles ("all"), times ``mask`` (3D) if
    given, its Fourier shells weighted by ``shells`` (box // 2 + 1,) if given."""
    single = Accumulator(grid, xp)
    insert_particles(series, [p], poses, grid, single, gridding, dose, xp)
    if references == "halves":
        h = int(series.particles["half"].iloc[p]) - 1
        data, weight = acc.data[h] - single.data[h], acc.weight[h] - single.weight[h]
    elif references == "all":
        data = acc.data[0] + acc.data[1] - single.data[0] - single.data[1]
        weight = acc.weight[0] + acc.weight[1] - single.weight[0] - single.weight[1]
    else:
        raise ValueError(f"unknown references {references!r} (use one of {REFERENCES})")
    weight = xp.maximum(weight, 0.0)
    vol = bp.reconstruct(data, weight, grid.box, wiener, grid.radius, gridding)
    if shells is not None:
        vol = shell_filter(vol, shells)
    if mask is not None:
        vol = vol * mask
    return bp.reference_spectrum(vol, grid.pad)  # sampled by trilinear extract_slices


def particle_series_refine(
    star,
    out,
    tomograms=None,
    angpix=None,
    reference=None,
    max_angle=6.0,
    angle_step=2.0,
    max_shift=2.0,
    shift_step=1.0,
    lowpass=None,
    highpass=300.0,
    iterations=2,
    references="halves",
    estimate="mean",
    pad=2,
    gridding="trilinear",
    wiener=0.1,
    dose=True,
    mask_radius=None,
    mask_edge=3.0,
    batch_size=8,
    backend="numpy",
) -> dict:
    """Refine every particle's pose locally (see module) and write the refined outputs."""
    out = Path(out)
    params = dict(
        star=str(star),
        tomograms=tomograms,
        angpix=angpix,
        reference=reference,
        max_angle=max_angle,
        angle_step=angle_step,
        max_shift=max_shift,
        shift_step=shift_step,
        lowpass=lowpass,
        highpass=highpass,
        iterations=iterations,
        references=references,
        estimate=estimate,
        pad=pad,
        gridding=gridding,
        wiener=wiener,
        dose=dose,
        mask_radius=mask_radius,
        mask_edge=mask_edge,
        batch_size=batch_size,
        backend=backend,
    )
    prov = provenance.record("particle-series refine", params)
    xp = get_xp(backend)
    series, ref = _read_inputs(star, tomograms, angpix, reference)
    counts = [int((series.particles["half"] == h).sum()) for h in (1, 2)]
    if references == "halves" and min(counts) < 2:
        raise CryomatchError(
            f"the particle halves hold {counts[0]} and {counts[1]} particles: too few for "
            "references from each half (use references 'all')",
            star,
        )
    if iterations < 1:
        raise CryomatchError(f"iterations must be at least 1, got {iterations}")
    nyquist = 2 * series.pixel_size
    if lowpass is not None and lowpass < nyquist:
        raise CryomatchError(f"lowpass {lowpass} A is beyond Nyquist ({nyquist:g} A)")
    coarse = rotation_ball(max_angle, angle_step)
    fine = rotation_ball(angle_step, angle_step / 2) if angle_step > 0 else coarse
    shifts = shift_grid(max_shift, shift_step)
    fine_shifts = shift_grid(shift_step, shift_step / 4) if shift_step > 0 else shifts
    poses = series.poses.copy()
    moves = np.zeros((series.n_particles, 3))  # particle moves in the frames' coordinates (px)
    gains = np.zeros(series.n_particles)
    current, before, lowpass_used = series, None, []
    radius = series.box // 2 - 4 if mask_radius is None else mask_radius
    sphere = xp.asarray(soft_sphere((series.box,) * 3, radius, mask_edge))
    centre = (0, series.box // 2, series.box // 2)
    disk = xp.asarray(soft_sphere((1, series.box, series.box), radius, mask_edge, centre)[0])
    for iteration in range(iterations):
        grid, acc, maps = reconstruct_series(
            current, poses, pad, gridding, wiener, dose, batch_size, xp
        )
        if before is None:
            before = maps[2]
            freq0, halves0 = fsc(maps[0], maps[1], series.pixel_size)
            before_halves = fsc_summary(freq0, halves0, series.box)
        freq, halves = fsc(maps[0], maps[1], series.pixel_size)
        # the reference's shells weighted by their reliability (Rosenthal and Henderson)
        shells = fsc_weight(halves)
        limit = lowpass
        if limit is None:  # the band never narrows: a noisy crossing must not undo a round
            limit = max(resolution_at(freq, halves, 0.143), nyquist)
            limit = min(limit, lowpass_used[-1]) if lowpass_used else limit
            if not np.isfinite(limit):
                raise CryomatchError(
                    "the half maps do not correlate at all: give --lowpass (A) to refine against",
                    star,
                )
        band = (1.0 / highpass, 1.0 / limit)
        lowpass_used.append(limit)
        log(f"iteration {iteration + 1}: comparing from {highpass:g} A to {limit:.1f} A")
        new_poses = poses.copy()
        for p in progress(
            range(series.n_particles), desc=f"refine {iteration + 1}", unit="particle"
        ):
            ref_spec = leave_one_out_spectrum(
                current, p, acc, grid, poses, wiener, gridding, dose, xp, references, sphere, shells
            )
            c1, s1, g1 = refine_particle(
                current, p, ref_spec, grid, band, coarse, shifts, dose, xp, poses, estimate, disk
            )
            correction, shift, g2 = refine_particle(  # finer grids about the coarse estimate
                current,
                p,
                ref_spec,
                grid,
                band,
                c1[None] @ fine,
                s1[None] + fine_shifts,
                dose,
                xp,
                poses,
                estimate,
                disk,
            )  # g2: log-likelihood gain over the coarse estimate
            gains[p] += g1 + max(g2, 0.0)
            m = series.mirror
            new_poses[p] = poses[p] @ m @ correction @ m  # R' = frame A' mirror = R C
            moves[p] += new_poses[p] @ m @ shift  # R' s = frame (A' mirror s)
        step = geometry.angle_between_rotations(new_poses, poses)
        poses = new_poses
        current = _moved(series, poses, moves)
        log(f"iteration {iteration + 1}: poses turned by {np.median(step):.2f} deg (median)")
    angle = geometry.angle_between_rotations(poses, series.poses)
    moved_a = np.linalg.norm(moves, axis=1) * series.pixel_size
    log(
        f"poses moved by {np.median(angle):.2f} deg (median; max {angle.max():.2f}), particles by "
        f"{np.median(moved_a):.1f} A (median; max {moved_a.max():.1f})"
    )
    _, _, (h1r, h2r, after) = reconstruct_series(
        current, poses, pad, gridding, wiener, dose, batch_size, xp
    )
    summary = {
        "notes": series.notes,
        "n_particles": series.n_particles,
        "iterations": iterations,
        "references": references,
        "estimate": estimate,
        "lowpass_A": lowpass_used,
        "rotation_change_deg": {"median": float(np.median(angle)), "max": float(angle.max())},
        "shift_change_A": {"median": float(np.median(moved_a)), "max": float(moved_a.max())},
    }
    changes = pd.DataFrame(
        {
            "particle": np.arange(series.n_particles) + 1,
            "rotation_change_deg": angle,
            "move_x_A": moves[:, 0] * series.pixel_size,
            "move_y_A": moves[:, 1] * series.pixel_size,
            "move_z_A": moves[:, 2] * series.pixel_size,
            "loglik_gain": gains,
        }
    )
    with Outputs() as outputs:
        before_summary = {"halves_before": before_halves}
        if ref is not None:
            path = out / "fsc_reference_before.csv"
            freq, unmasked, masked = _write_reference_fsc(
                path, before, ref, series, mask_radius, mask_edge, prov, outputs
            )
            before_summary |= {
                "reference_unmasked_before": fsc_summary(freq, unmasked, series.box),
                "reference_masked_before": fsc_summary(freq, masked, series.box),
            }
        summary |= before_summary
        _write_maps(
            out, current, h1r, h2r, after, ref, mask_radius, mask_edge, prov, outputs, summary
        )
        _compare_halves(series, summary)
        write_csv(out / "pose_changes.csv", changes, prov, outputs)
        refined_star = out / "particles_refined.star"
        write_star(refined_star, _refined_blocks(series, poses, moves), prov, outputs)
        if series.tomograms is not None:
            names = {
                "rlnTomoParticlesFile": str(refined_star.resolve()),
                "rlnTomoTomogramsFile": str(series.tomograms),
            }
            write_star(out / "optimisation_set_refined.star", {"": names}, prov, outputs)
        write_json(out / "summary.json", {"provenance": prov, **summary}, outputs)
    return summary


def _compare_halves(series: ParticleSeries, summary: dict) -> None:
    """Warn (log and summary) when the half maps agree less after the refinement than before:
    the data then do not determine the poses better than the input did."""
    before = summary["halves_before"]["mean_fsc_to_half_nyquist"]
    after = summary["halves"]["mean_fsc_to_half_nyquist"]
    summary["refinement_improved_halves"] = bool(after > before)
    if after <= before:
        message = (
            f"the half maps agree less after refinement (mean FSC to half Nyquist {before:.3f} "
            f"-> {after:.3f}): the data do not determine the poses better than the input's"
        )
        series.notes.append(message)
        warnings.warn(f"{series.source}: {message}", CryomatchWarning, stacklevel=2)


def _moved(series: ParticleSeries, poses, moves) -> ParticleSeries:
    """A copy of the series at new particle poses whose tilt displacements include the
    particles' moves (n, 3) px in the frames' coordinates (tomogram frame for RELION 5)."""
    tilts = series.tilts.copy()
    d = _tilt_displacements(series, moves) * series.pixel_size
    tilts["shift_x"] = tilts["shift_x"] + d[:, 0]
    tilts["shift_y"] = tilts["shift_y"] + d[:, 1]
    return ParticleSeries(
        tilts,
        series.frames,
        series.mirror,
        series.particles,
        poses,
        series.pixel_size,
        series.box,
        series.premultiplied,
        series.layout,
        series.source,
        list(series.notes),
        series.tomograms,
    )


def _tilt_displacements(series: ParticleSeries, moves) -> np.ndarray:
    """Image displacements (n_tilts, 2) px of particle moves (n, 3) px: (frame u)[:2]."""
    p = series.tilts["particle"].to_numpy()
    return np.einsum("tij,tj->ti", series.frames[:, :2, :], moves[p])


def _refined_blocks(series: ParticleSeries, poses, moves) -> dict:
    """The input STAR's blocks with refined angles and origins (RELION's conventions): RELION 5
    puts a particle at coordinate - origin (tomogram frame, A), so a move u lowers the origin
    by u; per-tilt rows get their image displacement subtracted from rlnOriginX/YAngst."""
    blocks = dict(read_star(series.source).items())
    key = (
        "particles"
        if isinstance(blocks.get("particles"), pd.DataFrame)
        else next(
            k for k, v in blocks.items() if isinstance(v, pd.DataFrame) and "rlnImageName" in v
        )
    )
    table = blocks[key].copy()
    zeros = pd.Series(np.zeros(len(table)))
    if series.layout == "relion5":
        rot, tilt, psi = geometry.matrix_to_euler(poses)
        move = moves * series.pixel_size
        axes = "XYZ"
    else:
        rot, tilt, psi = geometry.matrix_to_euler(series.compose(poses))
        move = _tilt_displacements(series, moves) * series.pixel_size
        axes = "XY"
    table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = rot, tilt, psi
    for i, a in enumerate(axes):
        old = table.get(f"rlnOrigin{a}Angst", zeros).to_numpy(float)
        table[f"rlnOrigin{a}Angst"] = old - move[:, i]
    table["rlnImageName"] = _absolute_names(series)
    blocks[key] = table
    return blocks


def _absolute_names(series: ParticleSeries) -> list[str]:
    """rlnImageName of the input rows with absolute stack paths (the outputs live elsewhere)."""
    t = series.tilts
    if series.layout == "relion5":
        return list(t.groupby("particle", sort=True)["image_file"].first())
    return [f"{i + 1:06d}@{f}" for i, f in zip(t["image_index"], t["image_file"], strict=True)]


# --- command line -------------------------------------------------------------------------
def _common(a) -> None:
    a.add_argument(
        "--star", required=True, help="optimisation-set, RELION 5 particles or per-tilt STAR"
    )
    a.add_argument("--tomograms", help="RELION 5 tomograms STAR (default: the optimisation set's)")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--angpix", type=float, help="pixel size (A) of the tilt images (default: STAR)")
    a.add_argument("--reference", help="map (MRC) to compare the average with (FSC)")
    a.add_argument("--pad", type=int, default=2, help="Fourier oversampling of the insertion")
    a.add_argument("--gridding", choices=bp.GRIDDINGS, default="trilinear", help="insertion kernel")
    a.add_argument("--wiener", type=float, default=0.1, help="Wiener constant, x mean weight")
    a.add_argument("--no-dose", dest="dose", action="store_false", help="no dose weighting")
    a.add_argument("--mask-radius", type=float, help="soft sphere radius (px) for the masked FSC")
    a.add_argument("--mask-edge", type=float, default=3.0, help="soft sphere edge (px)")
    a.add_argument("--batch-size", type=int, default=8, help="particles read at a time")
    a.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser("reconstruct", help="average by Fourier back-projection, FSCs")
    _common(c)
    c.add_argument(
        "--split",
        choices=SPLITS,
        default="particles",
        help="half maps from the particles' halves, or from odd/even tilts (a data check)",
    )
    r = sub.add_parser("refine", help="local pose refinement, then the new average")
    _common(r)
    r.add_argument("--max-angle", type=float, default=6.0, help="rotation search radius (deg)")
    r.add_argument("--angle-step", type=float, default=2.0, help="rotation grid step (deg)")
    r.add_argument("--max-shift", type=float, default=2.0, help="3D shift search radius (px)")
    r.add_argument("--shift-step", type=float, default=1.0, help="shift grid step (px)")
    r.add_argument(
        "--lowpass",
        type=float,
        help="compare up to this resolution (A); default: the half maps' FSC 0.143",
    )
    r.add_argument("--highpass", type=float, default=300.0, help="... from this resolution (A)")
    r.add_argument("--iterations", type=int, default=2, help="rounds of refinement")
    r.add_argument(
        "--references",
        choices=REFERENCES,
        default="halves",
        help="reference per particle: the other particles of its half (gold standard), or all",
    )
    r.add_argument(
        "--estimate",
        choices=ESTIMATES,
        default="mean",
        help="pose: posterior mean over the candidates, or the most likely one",
    )


def run(args) -> None:
    common = dict(
        tomograms=args.tomograms,
        angpix=args.angpix,
        reference=args.reference,
        pad=args.pad,
        gridding=args.gridding,
        wiener=args.wiener,
        dose=args.dose,
        mask_radius=args.mask_radius,
        mask_edge=args.mask_edge,
        batch_size=args.batch_size,
        backend=args.backend,
    )
    if args.action == "reconstruct":
        particle_series_reconstruct(args.star, args.out, split=args.split, **common)
    else:
        particle_series_refine(
            args.star,
            args.out,
            max_angle=args.max_angle,
            angle_step=args.angle_step,
            max_shift=args.max_shift,
            shift_step=args.shift_step,
            lowpass=args.lowpass,
            highpass=args.highpass,
            iterations=args.iterations,
            references=args.references,
            estimate=args.estimate,
            **common,
        )
