"""Preprocessing: normalization, Fourier cropping, inversion, stack splitting, real data."""

import hashlib
import warnings

import numpy as np
import pytest

from cryomatch.errors import CryomatchWarning
from cryomatch.io.mrc import read_images, write_mrc
from cryomatch.io.particles import read_particles, write_particles
from cryomatch.kernels.fourier import fourier_crop
from cryomatch.kernels.normalize import background_mask
from cryomatch.stages.preprocess import preprocess


def _digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_split_into_stacks_keeps_rows_and_inputs(tmp_path, demo_particles):
    before = _digest(demo_particles.parent)
    paths = preprocess(demo_particles, tmp_path, stack_size=15)
    assert [p.name for p in paths] == [
        "stack_000000.mrcs",
        "stack_000001.mrcs",
        "stack_000002.mrcs",
    ]
    assert [len(read_images(p)) for p in paths] == [15, 15, 10]
    original = read_particles(demo_particles).table
    second = read_particles(tmp_path / "particles/stack_000001.star").table
    for column in (
        "rlnAngleRot",
        "rlnOriginXAngst",
        "rlnDefocusU",
        "rlnClassNumber",
        "rlnOpticsGroup",
        "rlnVoltage",
    ):
        np.testing.assert_allclose(second[column], original[column].iloc[15:30], rtol=1e-6)
    assert set(second["image_file"]) == {str(tmp_path / "particles/stack_000001.mrcs")}
    assert len(read_particles(tmp_path / "particles/particles.star")) == 40
    assert _digest(demo_particles.parent) == before  # inputs untouched


def test_background_is_normalized(tmp_path, demo_particles):
    preprocess(demo_particles, tmp_path, stack_size=100, ramp=False, bg_radius=12)
    out = read_images(tmp_path / "particles/stack_000000.mrcs")
    bg = out[:, background_mask(32, 12, np)]
    np.testing.assert_allclose(bg.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(bg.std(axis=1), 1, atol=1e-5)


def test_ramp_is_removed(tmp_path, rng):
    n, box = 6, 32
    grid = np.arange(box) - box // 2
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    images = rng.normal(size=(n, box, box)).astype(np.float32) + (0.3 * xx - 0.2 * yy + 5)[None]
    write_mrc(tmp_path / "in.mrcs", images, 2.0)
    _star_for(tmp_path / "in.star", "in.mrcs", n)
    preprocess(tmp_path / "in.star", tmp_path / "out", bg_radius=10)
    out = read_images(tmp_path / "out/particles/stack_000000.mrcs")
    mask = background_mask(box, 10, np)
    design = np.stack([np.ones(mask.sum()), xx[mask], yy[mask]], 1)
    slopes = np.linalg.lstsq(design, out[:, mask].T, rcond=None)[0][1:]
    assert np.abs(slopes).max() < 1e-4  # the plane is gone; noise std is ~1


def _star_for(path, stack_name, n, box=32, pixel=2.0):
    import pandas as pd

    from cryomatch.io.particles import Particles

    table = pd.DataFrame(
        {
            "rlnDefocusU": 10000.0,
            "rlnDefocusV": 9800.0,
            "rlnDefocusAngle": 10.0,
            "rlnOpticsGroup": 1,
            "image_file": stack_name,
            "image_index": np.arange(n),
        }
    )
    optics = pd.DataFrame(
        [
            {
                "rlnOpticsGroup": 1,
                "rlnOpticsGroupName": "og1",
                "rlnVoltage": 300.0,
                "rlnSphericalAberration": 2.7,
                "rlnAmplitudeContrast": 0.1,
                "rlnImagePixelSize": pixel,
                "rlnImageSize": box,
                "rlnImageDimensionality": 2,
            }
        ]
    )
    write_particles(
        path, Particles(table, optics), image_names=[f"{i + 1}@{stack_name}" for i in range(n)]
    )


@pytest.mark.parametrize(
    "kwargs, box, pixel", [({"box": 16}, 16, 8.0), ({"pixel_size": 6.0}, 22, 4.0 * 32 / 22)]
)
def test_fourier_crop_updates_pixel_size(tmp_path, demo_particles, kwargs, box, pixel):
    preprocess(demo_particles, tmp_path, ramp=False, **kwargs)
    p = read_particles(tmp_path / "particles/particles.star")
    assert p.pixel_size() == pytest.approx(pixel)
    assert (p.optics["rlnImageSize"] == box).all()
    out = read_images(tmp_path / "particles/stack_000000.mrcs")
    cropped = fourier_crop(read_images(demo_particles.parent / "particles.mrcs"), box)
    mask = background_mask(box, 0.375 * box, np)
    bg = cropped[:, mask]
    expected = (cropped - bg.mean(1)[:, None, None]) / bg.std(1)[:, None, None]
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_invert(tmp_path, demo_particles):
    preprocess(demo_particles, tmp_path / "a")
    preprocess(demo_particles, tmp_path / "b", invert=True)
    a = read_images(tmp_path / "a/particles/stack_000000.mrcs")
    b = read_images(tmp_path / "b/particles/stack_000000.mrcs")
    np.testing.assert_array_equal(b, -a)


def test_outputs_are_deterministic(tmp_path, demo_particles):
    preprocess(demo_particles, tmp_path / "a", stack_size=25)
    preprocess(demo_particles, tmp_path / "b", stack_size=25)
    assert _digest(tmp_path / "a/particles") == _digest(tmp_path / "b/particles")


@pytest.mark.parametrize(
    "star, kwargs, n, box",
    [
        ("particles/relion31/relion31.star", {"box": 64}, 5, 64),
        ("particles/empiar10076/empiar_10076_7.cs", {"pixel_size": 5.24}, 7, 80),
        ("particles/trpv1/trpv1_small_stack.localpaths.star", {}, 10, 48),
    ],
)
def test_real_particles(tmp_path, real_data, star, kwargs, n, box):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryomatchWarning)  # headers with wrong voxel sizes
        preprocess(real_data / star, tmp_path, stack_size=4, **kwargs)
    p = read_particles(tmp_path / "particles/particles.star")
    assert len(p) == n and (p.optics["rlnImageSize"] == box).all()
    images = np.concatenate(
        [read_images(f) for f in sorted((tmp_path / "particles").glob("*.mrcs"))]
    )
    assert images.shape == (n, box, box) and np.isfinite(images).all()
    bg = images[:, background_mask(box, 0.375 * box, np)]
    np.testing.assert_allclose(bg.std(axis=1), 1.0, atol=0.05)  # ramp removed, then unit std
