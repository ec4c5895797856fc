"""classify2d on small and degenerate sets (issue 12, point 5): a result or one clear
error, never a traceback."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile

from cryomatch.cli import main
from cryomatch.errors import CryomatchError
from cryomatch.io.files import read_csv
from cryomatch.stages.classify2d import Settings, classify2d
from cryomatch.stages.simulate.views import simulate_views

SETTINGS = Settings(ou=12, xr=1, yr=1)


def _views(tmp_path, n, n_views=2, seed=5):
    return simulate_views(
        tmp_path / "data", n=n, n_views=n_views, snr=1.0, box=32, seed=seed, max_shift=1.0
    )


def _check(out, n, k):
    folder = max((out / "classify2d").iterdir())
    table = starfile.read(folder / "particles.star")["particles"]
    assert len(table) == n and table["rlnClassNumber"].between(1, k).all()
    assert np.isfinite(table[["rlnAnglePsi", "rlnOriginXAngst"]].to_numpy()).all()
    assert np.isfinite(mrcfile.read(folder / "class_averages.mrcs")).all()
    classes = read_csv(folder / "classes.csv")
    assert classes["particles"].sum() == n
    return folder


@pytest.mark.parametrize("n, k", [(5, 2), (3, 3), (7, 2), (1, 1)])
def test_fewer_images_than_four_per_class(tmp_path, n, k):
    star = _views(tmp_path, n)
    classify2d(star, tmp_path / "out", classes=k, maxit=3, settings=SETTINGS)
    _check(tmp_path / "out", n, k)


def test_every_class_too_small_to_reseed(tmp_path, capsys):
    star = _views(tmp_path, 5)
    settings = Settings(ou=12, xr=1, yr=1, min_class_size=10)
    classify2d(star, tmp_path / "out", classes=2, maxit=2, settings=settings)
    _check(tmp_path / "out", 5, 2)
    assert "no class has members to spare: not reseeded" in capsys.readouterr().err


def test_identical_images(tmp_path):
    star = _views(tmp_path, 1)
    table = starfile.read(star)
    table["particles"] = table["particles"].loc[np.zeros(12, int)].reset_index(drop=True)
    starfile.write(table, tmp_path / "data" / "same.star")
    classify2d(
        tmp_path / "data" / "same.star", tmp_path / "out", classes=3, maxit=3, settings=SETTINGS
    )
    _check(tmp_path / "out", 12, 3)


def test_blank_images(tmp_path):
    star = _views(tmp_path, 6)
    with mrcfile.open(tmp_path / "data" / "particles.mrcs", "r+") as m:
        m.data[:] = 0
    classify2d(star, tmp_path / "out", classes=2, maxit=2, settings=SETTINGS)
    _check(tmp_path / "out", 6, 2)


def test_more_classes_than_images(tmp_path, capsys):
    star = _views(tmp_path, 3)
    with pytest.raises(CryomatchError, match="cannot seed 4 classes from 3 images"):
        classify2d(star, tmp_path / "out", classes=4, maxit=1, settings=SETTINGS)
    code = main(
        [
            "classify2d",
            "--particles",
            str(star),
            "--out",
            str(tmp_path / "o"),
            "--classes",
            "4",
            "--ou",
            "12",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "cryomatch: error: cannot seed 4 classes from 3 images"
    assert not any("Traceback" in line for line in err)
