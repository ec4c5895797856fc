"""The tomo-align and tomo-refine commands: simulated series end to end, real data, bad input."""

import json
import shutil

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryomatch.cli import main
from cryomatch.errors import CryomatchError
from cryomatch.geometry import remove_unobservable
from cryomatch.io.tilts import read_angles, read_xf, write_tlt
from cryomatch.stages.simulate.tiltseries import simulate_tiltseries
from cryomatch.stages.tomo.align import tomo_align
from cryomatch.stages.tomo.common import read_tilt_series
from cryomatch.stages.tomo.refine import tomo_refine


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiltseries")
    simulate_tiltseries(
        folder, size=48, tilts=(-60, 60, 3), max_shift=6, noise=0.15, seed=4, tilt_axis=2.0
    )
    return folder


def _errors(folder, truth_folder, csv="shifts.csv"):
    truth = pd.read_csv(truth_folder / "truth.csv")
    found = pd.read_csv(folder / csv)
    d = found[["shift_x", "shift_y"]].to_numpy() - truth[["shift_x", "shift_y"]].to_numpy()
    return np.sqrt((remove_unobservable(d, truth["angle"].to_numpy()) ** 2).mean(axis=0))


def test_align_and_refine_commands_write_every_output(demo, tmp_path):
    out = tmp_path / "results"
    assert (
        main(
            [
                "tomo-align",
                "--stack",
                str(demo / "tiltseries.mrc"),
                "--out",
                str(out),
                "--name",
                "demo",
                "--pixel-size",
                "10",
                "--tilt-axis",  # nominal 0, fitted (no axis at all: a half-circle search)
                "0",
            ]
        )
        == 0
    )
    folder = out / "tomo" / "demo"
    summary = json.loads((folder / "alignment.json").read_text())
    assert summary["tilt_axis"] == pytest.approx(2.0, abs=0.5)
    assert _errors(folder, demo).max() < 0.3
    matrices, shifts = read_xf(folder / "demo.xf")
    np.testing.assert_allclose(
        shifts,
        pd.read_csv(folder / "shifts.csv")[["shift_x", "shift_y"]].to_numpy(),
        atol=1e-3,
    )
    np.testing.assert_allclose(read_angles(folder / "demo.tlt").angles, np.arange(-60, 61, 3.0))
    with mrcfile.open(folder / "aligned.mrc") as m:
        assert m.data.shape == (41, 48, 48)
    with mrcfile.open(folder / "reconstruction.mrc") as m:
        assert m.data.shape == (48, 48, 48) and m.voxel_size.x == pytest.approx(10.0)
    assert (folder / "alignment.png").stat().st_size > 1000

    assert (
        main(
            [
                "tomo-refine",
                "--stack",
                str(demo / "tiltseries.mrc"),
                "--out",
                str(out),
                "--alignment",
                str(folder / "alignment.json"),
                "--maxiter",
                "8",
            ]
        )
        == 0
    )
    record = pd.read_csv(folder / "refinement.csv")
    assert list(record.columns) == [
        "iteration",
        "max_shift",
        "rms_shift",
        "n_sampled",
        "residual",
        "seconds",
    ]
    assert _errors(folder, demo, "refined_shifts.csv").max() < 0.3
    for name in (
        "demo_refined.xf",
        "demo_refined.tlt",
        "refined_reconstruction.mrc",
        "refinement.png",
    ):
        assert (folder / name).is_file()


def test_mdoc_order_is_kept_and_chained_methods_refuse_it(demo, tmp_path):
    angles = np.arange(-60, 61, 3.0)
    order = np.argsort(np.abs(angles), kind="stable")  # dose-symmetric-like order
    with mrcfile.open(demo / "tiltseries.mrc") as m:
        data = m.data[order]
    stack = tmp_path / "ds.mrc"
    with mrcfile.new(stack) as m:
        m.set_data(data)
    (tmp_path / "ds.mrc.mdoc").write_text(
        "PixelSpacing = 10\n[T = Tilt axis angle = 2.0]\n"
        + "".join(f"[ZValue = {k}]\nTiltAngle = {a}\n" for k, a in enumerate(angles[order]))
    )
    series = read_tilt_series(stack)
    np.testing.assert_allclose(series.angles, angles[order])
    assert series.tilt_axis == 2.0 and series.pixel_size == 10.0
    with pytest.raises(CryomatchError, match="not in order"):
        tomo_align(stack, tmp_path / "out", method="PC")
    assert not (tmp_path / "out" / "tomo" / "ds").exists() or not any(
        (tmp_path / "out" / "tomo" / "ds").iterdir()
    )
    folder = tomo_align(stack, tmp_path / "out", method="COM")  # order-free
    found = pd.read_csv(folder / "shifts.csv")
    truth = pd.read_csv(demo / "truth.csv").iloc[order]
    d = found[["shift_x", "shift_y"]].to_numpy() - truth[["shift_x", "shift_y"]].to_numpy()
    assert np.sqrt((remove_unobservable(d, angles[order]) ** 2).mean(axis=0)).max() < 0.5


@pytest.mark.parametrize(
    "case, problem",
    [
        ("count", "40 tilt angles for 41 images"),
        ("duplicate", "duplicate tilt angles"),
        ("single", "a single image"),
        ("nan", "holds NaN"),
        ("no_angles", "no tilt angles"),
    ],
)
def test_bad_input_gives_one_clear_error_and_no_output(demo, tmp_path, capsys, case, problem):
    stack = tmp_path / "s.mrc"
    shutil.copy(demo / "tiltseries.mrc", stack)
    angles = np.arange(-60, 61, 3.0)
    if case == "count":
        write_tlt(tmp_path / "s.rawtlt", angles[:-1])
    elif case == "duplicate":
        write_tlt(tmp_path / "s.rawtlt", np.r_[angles[:-1], angles[-2]])
    else:
        write_tlt(tmp_path / "s.rawtlt", angles)
    if case in ("single", "nan"):
        with mrcfile.open(demo / "tiltseries.mrc") as m:
            data = m.data.copy()
        if case == "nan":
            data[3, 5, 5] = np.nan
        with mrcfile.new(stack, overwrite=True) as m:
            m.set_data(data[0] if case == "single" else data)
    if case == "no_angles":
        (tmp_path / "s.rawtlt").unlink()
    out = tmp_path / "out"
    code = main(["tomo-align", "--stack", str(stack), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert problem in err and ("s.mrc" in err or "s.rawtlt" in err)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_refine_rejects_bad_options(demo, tmp_path):
    with pytest.raises(CryomatchError, match="projection_cropping"):
        tomo_refine(demo / "tiltseries.mrc", tmp_path, projection_cropping=30)
    with pytest.raises(CryomatchError, match="outside"):
        tomo_refine(demo / "tiltseries.mrc", tmp_path, ignored_subset=[99])
    with pytest.raises(CryomatchError, match="not an alignment.json"):
        (tmp_path / "a.json").write_text("{}")
        tomo_refine(demo / "tiltseries.mrc", tmp_path, alignment=tmp_path / "a.json")


def test_real_needle_opens_with_its_wrong_header(real_data):
    with pytest.warns(UserWarning, match="opened permissively"):
        series = read_tilt_series(
            real_data / "tomo/haadf_needle_tiltseries/HAADF.mrc", pixel_size=33.6
        )
    assert series.data.shape == (77, 256, 256) and series.data.dtype == np.float32
    np.testing.assert_allclose(series.angles, np.arange(-76, 77, 2.0))
    assert series.angles_path.name == "HAADF.rawtlt"


@pytest.mark.slow
def test_real_needle_alignment_agrees_with_stackreg(real_data, tmp_path):
    """Our reprojection method against our StackReg-style alignment (which matches etspy's
    pystackreg shifts to 0.01 px) on the NIST needle; tilt axis near etspy's reference
    (-2.79 degrees from horizontal, i.e. 92.79 counter-clockwise from +y)."""
    stack = real_data / "tomo/haadf_needle_tiltseries/HAADF.mrc"
    angles = np.arange(-76, 77, 2.0)
    shifts, axes = {}, {}
    for method in ("StackReg", "reprojection"):
        folder = tomo_align(
            stack, tmp_path / method, method=method, tilt_axis=90.0, pixel_size=33.6, binning=2
        )
        shifts[method] = pd.read_csv(folder / "shifts.csv")[["shift_x", "shift_y"]].to_numpy()
        axes[method] = json.loads((folder / "alignment.json").read_text())["tilt_axis"]
    d = remove_unobservable(shifts["reprojection"] - shifts["StackReg"], angles)
    assert np.sqrt((d**2).mean(axis=0)).max() < 0.5
    for axis in axes.values():
        assert axis == pytest.approx(92.79, abs=1.0)


@pytest.mark.workflow
def test_workflow_runs_a_configured_series(demo, tmp_path):
    """Snakemake with a user's series (angles given in the config) builds align and refine."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    angles = ", ".join(str(a) for a in np.arange(-60, 61, 3.0))
    (tmp_path / "config.yaml").write_text(
        f"output_dir: {tmp_path / 'out'}\nstages: [tomo]\ntomo:\n  method: COM\n"
        f"  series:\n    mine: {{stack: {demo / 'tiltseries.mrc'}, angles: [{angles}], "
        "pixel_size: 10}\n  refine: {maxiter: 3}\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        "2",
        "--snakefile",
        str(repo / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(tmp_path / "config.yaml"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "out" / "tomo" / "mine"
    for name in ("alignment.png", "refinement.png", "refined_shifts.csv", "mine.xf"):
        assert (folder / name).is_file()
