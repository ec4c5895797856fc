"""Simulated RELION 5 particle series with known poses, for the particle-series tests.

The geometry (per-tilt projection matrices), CTF (defocus, rlnCtfScalefactor) and exposure
come from the real WarpTools tomograms STAR; the images are real-space projections of a
given map (kernels.projection.project_volume: spline interpolation, independent of the
Fourier insertion under test) at R = M A diag(1, 1, -1), CTF-premultiplied like WarpTools'.
"""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from cryomatch import geometry
from cryomatch.kernels import backprojection as bp
from cryomatch.kernels.ctf import ctf
from cryomatch.kernels.fourier import rfft_frequencies
from cryomatch.kernels.projection import project_volume, spline_coefficients

WARP = "tomo/cryoet_warptools_tomodrgn"
TOMOGRAMS = f"{WARP}/warptools_test_4-tomos_10-ptcls_box-32_angpix-12_tomograms.star"
OPTIMISATION_SET = f"{WARP}/warptools_test_4-tomos_10-ptcls_box-32_angpix-12_optimisation_set.star"
RELION_MAP = f"{WARP}/warptools_test_box-32_angpix-12_reconstruct.mrc"


def _rows(column: pd.Series) -> np.ndarray:
    return np.array([json.loads(v) for v in column], dtype=np.float64)


def perturb(poses: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Poses turned by random rotations of exactly ``degrees`` about random axes."""
    axes = rng.standard_normal((len(poses), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    from scipy.spatial.transform import Rotation

    turn = Rotation.from_rotvec(axes * np.deg2rad(degrees)).as_matrix()
    return poses @ turn


def simulate(
    out: Path,
    real: Path,
    volume,
    pixel_size: float,
    n: int,
    rng,
    snr=None,
    pose_error=0.0,
    origin_error=0.0,
) -> dict:
    """Write stacks, particles STAR and optimisation set under ``out``; returns the true poses
    (n, 3, 3), the STAR poses (perturbed by ``pose_error`` degrees), the STAR origins (n, 3)
    in A (random directions of length ``origin_error``; the images are centred) and the
    paths."""
    out.mkdir(parents=True, exist_ok=True)
    tomo_path = real / TOMOGRAMS
    blocks = starfile.read(tomo_path, always_dict=True)
    names = list(blocks["global"]["rlnTomoName"])
    box = volume.shape[-1]
    coefficients = spline_coefficients(volume)
    true = geometry.random_rotations(n, rng).as_matrix()
    given = perturb(true, pose_error, rng) if pose_error else true
    origins = rng.standard_normal((n, 3))
    origins *= origin_error / np.linalg.norm(origins, axis=1, keepdims=True)
    ky, kx = rfft_frequencies(box, pixel_size)
    k = np.sqrt(kx**2 + ky**2)
    rows = []
    signal_var = []
    stacks = []
    for p in range(n):
        name = names[p % len(names)]
        tilts = blocks[name]
        m = np.stack([_rows(tilts[f"rlnTomoProj{a}"])[:, :3] for a in "XYZ"], axis=1)
        r = m @ true[p] @ np.diag([1.0, 1.0, -1.0])
        proj = project_volume(coefficients, r)
        c = ctf(
            kx,
            ky,
            tilts["rlnDefocusU"].to_numpy(),
            tilts["rlnDefocusV"].to_numpy(),
            tilts["rlnDefocusAngle"].to_numpy(),
            300.0,
            2.7,
            0.07,
        )
        scale = tilts["rlnCtfScalefactor"].to_numpy()[:, None, None]
        dose = bp.dose_weights(k.ravel(), tilts["rlnMicrographPreExposure"].to_numpy())
        env = scale * dose.reshape(len(tilts), *k.shape)
        raw = np.fft.rfft2(proj) * c * env
        signal_var.append(np.fft.irfft2(raw, s=(box, box)).var())
        stacks.append((raw, c, name, len(tilts)))
    noise_sigma = 0.0 if snr is None else np.sqrt(np.mean(signal_var) / snr)
    for p, (raw, c, name, n_tilts) in enumerate(stacks):
        noisy = raw + np.fft.rfft2(noise_sigma * rng.standard_normal((n_tilts, box, box)))
        images = np.fft.irfft2(noisy * c, s=(box, box)).astype(np.float32)  # premultiplied
        stack = out / f"particle_{p + 1:04d}.mrcs"
        with mrcfile.new(stack, overwrite=True) as mrc:
            mrc.set_data(images)
            mrc.voxel_size = pixel_size
        rot, tilt, psi = geometry.matrix_to_euler(given[p])
        rows.append(
            {
                "rlnTomoName": name,
                "rlnTomoParticleId": p + 1,
                "rlnCoordinateX": 0.0,
                "rlnCoordinateY": 0.0,
                "rlnCoordinateZ": 0.0,
                "rlnAngleRot": float(rot),
                "rlnAngleTilt": float(tilt),
                "rlnAnglePsi": float(psi),
                "rlnTomoParticleName": f"{name}/{p + 1}",
                "rlnOpticsGroup": 1,
                "rlnImageName": str(stack),
                "rlnOriginXAngst": origins[p, 0],
                "rlnOriginYAngst": origins[p, 1],
                "rlnOriginZAngst": origins[p, 2],
                "rlnTomoVisibleFrames": "[" + ",".join(["1"] * n_tilts) + "]",
            }
        )
    optics = pd.DataFrame(
        [
            {
                "rlnOpticsGroup": 1,
                "rlnOpticsGroupName": "opticsGroup1",
                "rlnSphericalAberration": 2.7,
                "rlnVoltage": 300.0,
                "rlnTomoTiltSeriesPixelSize": 1.667,
                "rlnCtfDataAreCtfPremultiplied": 1,
                "rlnImageDimensionality": 2,
                "rlnImagePixelSize": pixel_size,
                "rlnImageSize": box,
                "rlnAmplitudeContrast": 0.07,
            }
        ]
    )
    particles = out / "particles.star"
    starfile.write(
        {
            "general": {"rlnTomoSubTomosAre2DStacks": 1},
            "optics": optics,
            "particles": pd.DataFrame(rows),
        },
        particles,
        overwrite=True,
    )
    opt = out / "optimisation_set.star"
    starfile.write(
        {"": {"rlnTomoParticlesFile": str(particles), "rlnTomoTomogramsFile": str(tomo_path)}},
        opt,
        overwrite=True,
    )
    return {
        "true": true,
        "given": given,
        "origins": origins,
        "optimisation_set": opt,
        "particles": particles,
    }
