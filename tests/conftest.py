"""Shared fixtures: the real data folder, seeded generators, small simulated data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("CRYOMATCH_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


def pytest_collection_modifyitems(config, items):
    """Run slow tests too when CRYOMATCH_SLOW=1; skip GPU tests without cupy and a GPU."""
    from cryomatch.backend import cupy_available

    gpu = cupy_available()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs cupy and a CUDA GPU"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data/real beside the checkout (or $CRYOMATCH_REAL_DATA); skips if absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} is absent")
    return REAL_DATA


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def demo_particles(tmp_path_factory):
    """A small simulated particle set (2 phantoms, 3 optics groups): returns its STAR path."""
    from cryomatch.stages.simulate.particles import simulate_particles

    out = tmp_path_factory.mktemp("demo_particles")
    return simulate_particles(out, n=40, snr=0.5, box=32, seed=7, pixel_size=4.0, batch_size=16)


@pytest.fixture
def dataset(tmp_path, demo_particles):
    """A private copy of the demo particles (STAR and stack) that a test may damage."""
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(demo_particles, folder / "particles.star")
    shutil.copy(demo_particles.parent / "particles.mrcs", folder / "particles.mrcs")
    return folder
