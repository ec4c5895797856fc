"""The subtomo stage: simulated subvolumes (stack and tomogram), known answers in RELION's
conventions, chunks, outputs, bad input through the command line, and the workflow."""

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryomatch import geometry
from cryomatch.cli import main
from cryomatch.io.star import read_star
from cryomatch.io.volumes import VolumeStackWriter
from cryomatch.stages.simulate.subvolumes import simulate_subvolumes
from cryomatch.stages.subtomo import subtomo_align, subtomo_merge
from cryomatch.workflow import count_subvolumes

REPO = Path(__file__).resolve().parents[1]
APIX = 8.0
ROTATIONS = [(4, 2)] * 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("subvolumes")
    simulate_subvolumes(
        out,
        n=10,
        snr=2.0,
        box=32,
        seed=5,
        pixel_size=APIX,
        n_templates=2,
        max_angle=4.0,
        max_shift=1.5,
        tomogram=True,
    )
    return out


def _templates(demo):
    return [str(demo / "templates" / f"template_{k:02d}.mrc") for k in (1, 2)]


def _poses(star):
    t = read_star(star)["particles"]
    a = geometry.euler_to_matrix(
        *(t[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    )
    origin = t[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy(float)
    return a, origin, t["rlnClassNumber"].to_numpy()


def _errors(result_star, truth_star):
    a1, o1, c1 = _poses(result_star)
    a2, o2, c2 = _poses(truth_star)
    rot = geometry.angle_between_rotations(a1, a2)
    shift = np.linalg.norm(o1 - o2, axis=1) / APIX
    return rot.mean(), shift.mean(), (c1 == c2).mean()


def test_stack_recovers_the_truth(demo, tmp_path):
    table = subtomo_align(
        tmp_path,
        _templates(demo),
        subvolumes=demo / "subvolumes.mrcs",
        mask=demo / "mask.mrc",
        max_shifts=(2, 2, 2),
        rotations=ROTATIONS,
    )
    assert len(table) == 10
    rot, shift, labels = _errors(tmp_path / "subtomo.star", demo / "subvolumes.star")
    assert labels == 1.0
    assert shift < 0.2
    assert rot < 2.0
    for k in (1, 2):
        with mrcfile.open(tmp_path / f"average_{k:02d}.mrc") as mrc:
            assert mrc.data.shape == (32, 32, 32) and mrc.voxel_size.x == pytest.approx(APIX)
        assert (tmp_path / f"average_{k:02d}.png").stat().st_size > 1000
    text = (tmp_path / "subtomo.star").read_text()
    assert "# cryomatch" in text and "rlnCryomatchScore" in text


def test_tomogram_chunks_merge_to_the_whole(demo, tmp_path):
    common = dict(
        star=demo / "particles.star",
        tomograms=[demo / "tomogram.mrc"],
        mask=demo / "mask.mrc",
        max_shifts=(2, 2, 2),
        rotations=ROTATIONS,
    )
    whole = subtomo_align(tmp_path / "whole", _templates(demo), **common)
    for k in range(2):
        subtomo_align(tmp_path / "chunked", _templates(demo), chunk=k, chunk_size=5, **common)
    merged = subtomo_merge(tmp_path / "chunked", 2)
    # batches differ (float32 sums in another order): results agree well below the errors
    a1, o1, c1 = _poses(tmp_path / "whole" / "subtomo.star")
    a2, o2, c2 = _poses(tmp_path / "chunked" / "subtomo.star")
    assert geometry.angle_between_rotations(a1, a2).max() < 0.05
    np.testing.assert_allclose(o1, o2, atol=0.01)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(merged["rlnCryomatchScore"], whole["rlnCryomatchScore"], atol=1e-4)
    with (
        mrcfile.open(tmp_path / "whole" / "average_01.mrc") as a,
        mrcfile.open(tmp_path / "chunked" / "average_01.mrc") as b,
    ):
        np.testing.assert_allclose(a.data, b.data, atol=5e-3)
    rot, shift, labels = _errors(tmp_path / "whole" / "subtomo.star", demo / "truth.star")
    assert labels == 1.0 and shift < 0.2 and rot < 2.0
    assert "rlnCenteredCoordinateXAngst" in merged and "rlnTomoName" in merged


def test_workflow_counts_subvolumes_of_a_star_and_of_a_stack(demo):
    assert count_subvolumes(demo / "particles.star") == 10  # positions in the tomogram
    assert count_subvolumes(demo / "subvolumes.mrcs") == 10


def _cli(args, capsys):
    code = main(["subtomo", "align", *map(str, args)])
    return code, capsys.readouterr().err


def test_bad_mask_shape(demo, tmp_path, capsys):
    mask = tmp_path / "mask.mrc"
    with mrcfile.new(mask) as mrc:
        mrc.set_data(np.ones((32, 32, 20), np.float32))
    out = tmp_path / "out"
    code, err = _cli(
        [
            "--subvolumes",
            demo / "subvolumes.mrcs",
            "--template",
            _templates(demo)[0],
            "--mask",
            mask,
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 2 and f"{mask}: the mask has shape" in err
    assert not out.exists() or not any(out.rglob("*"))


def test_subvolumes_of_another_shape(demo, tmp_path, capsys):
    stack = tmp_path / "small.mrcs"
    with VolumeStackWriter(stack, 2, (20, 20, 20), APIX) as w:
        w.write(np.zeros((2, 20, 20, 20), np.float32))
    code, err = _cli(
        ["--subvolumes", stack, "--template", _templates(demo)[0], "--out", tmp_path / "o"], capsys
    )
    assert code == 2 and f"{stack}: the subvolumes have shape (20, 20, 20)" in err


def test_max_shifts_beyond_half_the_box(demo, tmp_path, capsys):
    code, err = _cli(
        [
            "--subvolumes",
            demo / "subvolumes.mrcs",
            "--template",
            _templates(demo)[0],
            "--out",
            tmp_path / "o",
            "--max-shifts",
            "2",
            "16",
            "2",
        ],
        capsys,
    )
    assert code == 2 and "half the box" in err
    assert not (tmp_path / "o" / "subtomo.star").exists()


def test_tomogram_name_without_tomogram(demo, tmp_path, capsys):
    star = tmp_path / "two.star"
    text = (demo / "particles.star").read_text()
    star.write_text(text.replace("tomogram\t", "other\t", 1))
    code, err = _cli(
        [
            "--star",
            star,
            "--tomogram",
            demo / "tomogram.mrc",
            "--tomogram",
            demo / "subvolumes.mrcs",
            "--template",
            _templates(demo)[0],
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert code == 2 and "no tomogram given for rlnTomoName 'other'" in err


def test_inputs_are_not_modified(demo, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*")}
    subtomo_align(
        tmp_path,
        _templates(demo)[:1],
        subvolumes=demo / "subvolumes.mrcs",
        max_shifts=(1, 1, 1),
        rotations=[(0, 0)] * 3,
        angpix=APIX,
    )
    assert before == {p: p.stat().st_mtime_ns for p in demo.rglob("*")}


@pytest.mark.workflow
def test_workflow_dry_run_lists_chunks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "lib"))
    (tmp_path / "extra.yaml").write_text("subtomo:\n  chunk_size: 5\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "subtomo_merge",
            "-n",
            "--cores",
            "1",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(tmp_path),
            "--configfile",
            str(tmp_path / "extra.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    n = 24  # the demo's subvolumes (config/config.yaml) in chunks of 5
    assert f"subtomo_align{' ' * 14}{-(-n // 5)}" in done.stdout
