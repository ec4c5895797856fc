"""Bad input: one clear message naming the file and the problem, exit 2, no output left."""

import mrcfile
import numpy as np
import pytest

from cryomatch.cli import main
from cryomatch.io.mrc import write_mrc
from cryomatch.io.star import read_star, write_star


def _run(capsys, folder, out, *extra):
    code = main(["preprocess", "--star", str(folder / "particles.star"), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert [p for p in out.rglob("*") if p.is_file()] == [] if out.exists() else True
    assert err.startswith("cryomatch: error: ") and err.count("\n") == 1
    return err


def _edit_star(folder, edit):
    blocks = read_star(folder / "particles.star")
    blocks["particles"] = edit(blocks["particles"])
    write_star(folder / "particles.star", blocks)


def test_file_that_is_not_mrc(capsys, dataset, tmp_path):
    (dataset / "particles.mrcs").write_text("not an image\n" * 200)
    err = _run(capsys, dataset, tmp_path / "out")
    assert "particles.mrcs: not an MRC file" in err


def test_truncated_mrc(capsys, dataset, tmp_path):
    raw = (dataset / "particles.mrcs").read_bytes()
    (dataset / "particles.mrcs").write_bytes(raw[: len(raw) // 2])
    err = _run(capsys, dataset, tmp_path / "out")
    assert "particles.mrcs: truncated MRC file" in err


def test_star_missing_required_column(capsys, dataset, tmp_path):
    _edit_star(dataset, lambda t: t.drop(columns=["rlnDefocusU"]))
    err = _run(capsys, dataset, tmp_path / "out")
    assert "particles.star: missing required column(s) rlnDefocusU" in err


def test_star_naming_missing_image_file(capsys, dataset, tmp_path):
    (dataset / "particles.mrcs").rename(dataset / "elsewhere.mrcs")
    err = _run(capsys, dataset, tmp_path / "out")
    assert "particles.star: image file 'particles.mrcs'" in err and "does not exist" in err


def test_index_past_end_of_stack(capsys, dataset, tmp_path):
    _edit_star(
        dataset,
        lambda t: t.assign(rlnImageName=t["rlnImageName"].str.replace("000040@", "000041@")),
    )
    err = _run(capsys, dataset, tmp_path / "out")
    assert "particles.star: the metadata asks for image 41 but the stack holds 40" in err


def test_non_square_images(capsys, dataset, tmp_path):
    write_mrc(dataset / "particles.mrcs", np.zeros((40, 32, 30), np.float32), 4.0)
    err = _run(capsys, dataset, tmp_path / "out")
    assert "particles.mrcs: images are not square (30 x 32 pixels)" in err


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_pixels_remove_stacks_already_written(capsys, dataset, tmp_path, value):
    with mrcfile.open(dataset / "particles.mrcs", mode="r+") as m:
        m.data[33, 5, 5] = value  # in the third stack of 15: two complete stacks come first
    err = _run(capsys, dataset, tmp_path / "out", "--stack-size", "15")
    assert "particles.mrcs: image 34 holds NaN or inf pixels" in err


def test_empty_stack(capsys, dataset, tmp_path):
    with mrcfile.new(dataset / "particles.mrcs", overwrite=True) as m:
        m.set_data(np.zeros((0, 32, 32), np.float32))
    err = _run(capsys, dataset, tmp_path / "out")
    assert "particles.mrcs: empty MRC file: it holds no images" in err


def test_star_without_particles(capsys, dataset, tmp_path):
    _edit_star(dataset, lambda t: t.iloc[:0])
    err = _run(capsys, dataset, tmp_path / "out")
    assert "particles.star: the file lists no particles" in err


def test_metadata_nan(capsys, dataset, tmp_path):
    _edit_star(
        dataset, lambda t: t.assign(rlnDefocusV=t["rlnDefocusV"].where(t.index != 3, np.nan))
    )
    err = _run(capsys, dataset, tmp_path / "out")
    assert "particles.star: row 4: rlnDefocusV is not a finite number" in err


def test_missing_star(capsys, tmp_path):
    err = _run(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert "particles.star: file does not exist" in err
