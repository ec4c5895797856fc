"""The particle table from RELION 3.0 / 3.1 / 5 STAR and cryoSPARC .cs files."""

import warnings

import numpy as np
import pandas as pd
import pytest

from cryomatch import geometry
from cryomatch.errors import CryomatchWarning
from cryomatch.io.particles import ImageReader, read_particles, write_particles
from cryomatch.io.star import read_star


def test_relion31_optics_pixel_size_and_permissive_stack(real_data):
    p = read_particles(real_data / "particles/relion31/relion31.star")
    assert len(p) == 5
    assert p.pixel_size() == pytest.approx(2.806)  # from the optics table, header says 1.0
    assert set(p.optics["rlnVoltage"]) == {300.0}
    with pytest.warns(CryomatchWarning):
        with ImageReader(p) as reader:
            assert reader.check() == 256
            images = reader.read(0, 5)
    assert images.shape == (5, 256, 256) and images.dtype == np.float32


def test_relion30_pixel_size_from_detector_and_magnification(real_data):
    p = read_particles(real_data / "particles/empiar10076/empiar_10076_7.star")
    assert p.pixel_size() == pytest.approx(5 * 1e4 / 38168)
    assert p.table["rlnDefocusU"].iloc[0] == pytest.approx(15301.1)
    assert len(p.optics) == 1


def test_relion30_origins_in_pixels_become_angstrom(real_data):
    star = real_data / "particles/metadata_only/FinalRefinement-OriginalParticles-PfCRT.star"
    raw = read_star(star)["images"]
    with pytest.warns(CryomatchWarning, match="rlnAmplitudeContrast"):  # this file lacks it
        p = read_particles(star, images=False)
    assert (p.table["rlnAmplitudeContrast"] == 0.1).all()
    apix = raw["rlnDetectorPixelSize"] * 1e4 / raw["rlnMagnification"]
    np.testing.assert_allclose(p.table["rlnOriginXAngst"], raw["rlnOriginX"] * apix)


def test_six_optics_groups_keep_their_own_values(real_data):
    star = real_data / "particles/metadata_only/relion31.6opticsgroups.star"
    optics = read_star(star)["optics"]
    p = read_particles(star, images=False)
    assert len(p) == 139 and len(p.optics) == 6
    for _, g in optics.iterrows():
        rows = p.table[p.table["rlnOpticsGroup"] == g["rlnOpticsGroup"]]
        assert (rows["rlnVoltage"] == g["rlnVoltage"]).all()
        assert (rows["rlnSphericalAberration"] == g["rlnSphericalAberration"]).all()
        assert (rows["rlnImagePixelSize"] == g["rlnImagePixelSize"]).all()


def test_relion5(real_data):
    p = read_particles(real_data / "particles/metadata_only/relion5.star", images=False)
    assert len(p) == 17
    assert {"rlnAngleRot", "rlnOriginXAngst", "rlnDefocusU"} <= set(p.table)


def test_trpv1_local_paths_resolve_beside_the_star(real_data):
    p = read_particles(real_data / "particles/trpv1/trpv1_small_stack.localpaths.star")
    assert p.table["image_file"].iloc[0] == str(
        (real_data / "particles/trpv1/trpv1_small_stack.mrcs").resolve()
    )
    assert list(p.table["image_index"]) == list(range(10))
    with ImageReader(p) as reader:
        assert reader.check() == 48
        first = reader.read(0, 1)[0]
    np.testing.assert_array_equal(
        first, np.asarray(_mrc(real_data / "particles/trpv1/trpv1_small_stack.mrcs")[0])
    )


def _mrc(path):
    import mrcfile

    return mrcfile.read(path)


def test_cryosparc_matches_the_star_of_the_same_images(real_data):
    cs = read_particles(real_data / "particles/empiar10076/empiar_10076_7.cs")
    star = read_particles(real_data / "particles/empiar10076/empiar_10076_7.star")
    for column in (
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnVoltage",
        "rlnSphericalAberration",
    ):
        np.testing.assert_allclose(cs.table[column], star.table[column], rtol=1e-5, atol=1e-3)
    assert cs.pixel_size() == pytest.approx(1.31, abs=1e-3)
    assert list(cs.table["image_file"]) == list(star.table["image_file"])
    assert list(cs.table["image_index"]) == list(star.table["image_index"])


def test_cryosparc_3d_poses_to_relion_euler(real_data):
    raw = np.load(real_data / "particles/metadata_only/cryosparc_P12_J24_001_particles.cs")
    p = read_particles(
        real_data / "particles/metadata_only/cryosparc_P12_J24_001_particles.cs", images=False
    )
    assert len(p) == 2019
    from scipy.spatial.transform import Rotation

    expected = (
        Rotation.from_rotvec(raw["alignments3D/pose"].astype(float)).as_matrix().transpose(0, 2, 1)
    )
    got = geometry.euler_to_matrix(
        *(p.table[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    )
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(
        p.table["rlnOriginXAngst"],
        raw["alignments3D/shift"][:, 0] * raw["alignments3D/psize_A"],
        rtol=1e-6,
    )


def test_cryosparc_2d_alignments(real_data):
    raw = np.load(real_data / "particles/metadata_only/cryosparc_J2_particles_exported.cs")
    p = read_particles(
        real_data / "particles/metadata_only/cryosparc_J2_particles_exported.cs", images=False
    )
    np.testing.assert_allclose(
        p.table["rlnAnglePsi"], np.rad2deg(raw["alignments2D/pose"]), rtol=1e-6
    )
    assert (p.table["rlnClassNumber"] == raw["alignments2D/class"] + 1).all()


def test_write_read_round_trip(tmp_path, demo_particles):
    p = read_particles(demo_particles)
    write_particles(
        tmp_path / "copy.star",
        p,
        image_names=[
            f"{i + 1:06d}@{f}"
            for i, f in zip(p.table["image_index"], p.table["image_file"], strict=True)
        ],
    )
    q = read_particles(tmp_path / "copy.star")
    common = [c for c in p.table.columns]
    pd.testing.assert_frame_equal(q.table[common], p.table[common], check_dtype=False, atol=1e-5)
    pd.testing.assert_frame_equal(q.optics, p.optics, check_dtype=False)


def test_image_names_resolve_from_a_relion_project_folder(tmp_path, demo_particles):
    """RELION names stacks from its project folder: Class2D/job001/x.star -> Extract/..."""
    import shutil

    project = tmp_path / "project"
    (project / "Extract/job002").mkdir(parents=True)
    shutil.copy(demo_particles.parent / "particles.mrcs", project / "Extract/job002/particles.mrcs")
    p = read_particles(demo_particles)
    (project / "Class2D/job003").mkdir(parents=True)
    names = [f"{i + 1:06d}@Extract/job002/particles.mrcs" for i in range(len(p))]
    write_particles(project / "Class2D/job003/run_data.star", p, image_names=names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = read_particles(project / "Class2D/job003/run_data.star")
    assert set(q.table["image_file"]) == {str(project / "Extract/job002/particles.mrcs")}


def test_relion30_rows_with_different_optics_get_their_own_groups(tmp_path, real_data):
    text = (real_data / "particles/empiar10076/empiar_10076_7.star").read_text()
    lines = text.splitlines()
    lines[-1] = lines[-1].replace(" 300 2.7 ", " 200 2.7 ")  # last particle at 200 kV
    (tmp_path / "p.star").write_text("\n".join(lines) + "\n")
    p = read_particles(tmp_path / "p.star", images=False)
    assert len(p.optics) == 2
    assert list(p.table["rlnVoltage"]) == [300.0] * 6 + [200.0]
    assert set(p.optics["rlnVoltage"]) == {200.0, 300.0}
