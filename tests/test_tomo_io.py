"""Tilt-angle files (.rawtlt, .tlt, SerialEM .mdoc) and IMOD .xf: real files and bad ones."""

import numpy as np
import pytest

from cryomatch.errors import CryomatchError
from cryomatch.io.tilts import read_angles, read_mdoc, read_xf, write_tlt, write_xf


def test_real_rawtlt_and_tlt(real_data):
    needle = read_angles(real_data / "tomo/haadf_needle_tiltseries/HAADF.rawtlt").angles
    np.testing.assert_allclose(needle, np.arange(-76, 77, 2.0))
    tlt = read_angles(real_data / "tomo/tilt_metadata/etomofiles_TS_001/TS_001.tlt").angles
    assert len(tlt) == 40 and tlt[0] == pytest.approx(-57.12)


def test_real_mdoc_keeps_stack_order(real_data):
    meta = read_mdoc(real_data / "tomo/tilt_metadata/TS_01.mrc.mdoc")
    assert len(meta.angles) == 41
    np.testing.assert_allclose(meta.angles[:4], [0.001, 3.001, -2.999, -5.999], atol=1e-3)
    assert meta.tilt_axis == pytest.approx(85.3)
    assert meta.pixel_size == pytest.approx(5.4)


def test_real_xf(real_data):
    matrices, shifts = read_xf(real_data / "tomo/tilt_metadata/etomofiles_TS_001/TS_001.xf")
    assert matrices.shape == (40, 2, 2) and shifts.shape == (40, 2)
    np.testing.assert_allclose(shifts[0], [2.395, -3.871])
    np.testing.assert_allclose(np.linalg.det(matrices), 1.0, atol=1e-5)  # rotations


def test_xf_and_tlt_round_trip(tmp_path, rng):
    shifts = rng.normal(size=(7, 2)) * 3
    rot = np.array([[0.6, 0.8], [-0.8, 0.6]])
    write_xf(tmp_path / "a.xf", rot, shifts)
    m, s = read_xf(tmp_path / "a.xf")
    np.testing.assert_allclose(s, shifts, atol=1e-3)
    np.testing.assert_allclose(m, np.broadcast_to(rot, (7, 2, 2)), atol=1e-7)
    write_tlt(tmp_path / "a.tlt", [-60, 0.5, 60])
    np.testing.assert_allclose(read_angles(tmp_path / "a.tlt").angles, [-60, 0.5, 60])


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("a.rawtlt", "-60\n0\nabc\n", "line 3 is not a tilt angle"),
        ("a.tlt", "\n\n", "no tilt angles"),
        ("a.xf", "1 0 0 1 2\n", "has 5 numbers"),
        ("a.mdoc", "PixelSpacing = 2\n", "no [ZValue"),
        ("a.mdoc", "[ZValue = 0]\nTiltAngle = 1\n[ZValue = 0]\nTiltAngle = 2\n", "appears twice"),
        ("a.mdoc", "[ZValue = 0]\nExposure = 1\n", "has no TiltAngle"),
        ("a.angles", "1\n2\n", "unknown tilt-angle file type"),
    ],
)
def test_bad_metadata_files(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CryomatchError, match=problem.replace("[", r"\[")) as err:
        read_xf(path) if name.endswith(".xf") else read_angles(path)
    assert err.value.path == str(path)
