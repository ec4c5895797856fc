"""Subtomogram alignment about STAR priors: the pose composition (known answers, both
orders), the local search on a real map at orientations all over SO(3), RELION 5's
subtomogram frames, the cone and in-plane limits, and bad priors."""

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from cryomatch import geometry
from cryomatch.alignment.local import LocalZNCC, allowed_rotations
from cryomatch.errors import CryomatchError
from cryomatch.io.star import read_star, write_star
from cryomatch.kernels.rotate import affine_resample
from cryomatch.stages.simulate.subvolumes import simulate_subvolumes
from cryomatch.stages.subtomo import subtomo_align
from cryomatch.stages.subtomo_priors import origins_pixels

BOX = 32


def _move(volume, quat, shift):
    """The volume moved as x -> R (x - c) + c + shift (the alignment API's convention)."""
    rot = Rotation.from_quat(quat).as_matrix()
    c = geometry.acryo_centre(volume.shape)
    return affine_resample(volume, rot.T, c - rot.T @ (c + np.asarray(shift)), 0.0)


def test_composition_is_prior_after_correction(rng):
    volume = gaussian_filter(rng.standard_normal((BOX,) * 3), 1.2).astype(np.float32)
    volume *= np.exp(-np.sum((np.indices(volume.shape) - BOX / 2) ** 2, axis=0) / 60.0)
    prior = Rotation.from_euler("zyz", [40, 70, -20], degrees=True).as_quat()
    corr = Rotation.from_euler("zyx", [20, -25, 15], degrees=True).as_quat()
    s_prior, s_corr = np.array([1.0, -0.5, 0.7]), np.array([0.4, 0.3, -0.6])
    twice = _move(_move(volume, corr, s_corr), prior, s_prior)  # correction, then prior
    q, s = geometry.compose_subvolume_poses(prior, s_prior, corr, s_corr)
    right = _move(volume, q, s)
    q_wrong = (Rotation.from_quat(corr) * Rotation.from_quat(prior)).as_quat()
    wrong = _move(volume, q_wrong, s)
    inner = (slice(6, -6),) * 3
    assert np.corrcoef(twice[inner].ravel(), right[inner].ravel())[0, 1] > 0.995
    assert np.corrcoef(twice[inner].ravel(), wrong[inner].ravel())[0, 1] < 0.9
    # in RELION's matrices: A = A_prior A_correction
    a = [
        geometry.euler_to_matrix(
            *geometry.subvolume_pose_to_relion(x, np.zeros(3), volume.shape)[:3]
        )
        for x in (q, prior, corr)
    ]
    np.testing.assert_allclose(a[0], a[1] @ a[2], atol=1e-9)
    assert geometry.angle_between_rotations(a[0], a[2] @ a[1]) > 1.0


@pytest.fixture(scope="module")
def so3(tmp_path_factory, real_data):
    out = tmp_path_factory.mktemp("priors")
    simulate_subvolumes(
        out,
        n=16,
        snr=0.1,
        box=BOX,
        seed=11,
        max_shift=2.0,
        map_path=real_data / "maps" / "emd_1832.map",
        uniform=True,
        prior_error=10.0,
        prior_shift_error=1.0,
        tomogram=True,
    )
    return out


def _matrices(table, cols=("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
    return geometry.euler_to_matrix(*(table[c].to_numpy(float) for c in cols))


def _origins(table):
    return table[[f"rlnOrigin{a}Angst" for a in "XYZ"]].to_numpy(float)


def test_priors_on_so3_real_map(so3, tmp_path, capfd):
    table = subtomo_align(
        tmp_path,
        [so3 / "templates" / "template_01.mrc"],
        star=so3 / "priors.star",
        mask=so3 / "mask.mrc",
        max_shifts=(3, 3, 3),
        prior_search={"range": 12.0, "step": 4.0},
    )
    assert "priors of 16 particles used" in capfd.readouterr().err
    truth = read_star(so3 / "subvolumes.star")["particles"]
    priors = read_star(so3 / "priors.star")["particles"]
    before = geometry.angle_between_rotations(_matrices(priors), _matrices(truth))
    assert np.allclose(before, 10.0, atol=1e-3)
    err = geometry.angle_between_rotations(_matrices(table), _matrices(truth))
    pixel = float(read_star(so3 / "subvolumes.star")["optics"]["rlnImagePixelSize"].iloc[0])
    shift = np.linalg.norm(_origins(table) - _origins(truth), axis=1) / pixel
    print(
        f"one pass about 10-degree priors: {err.mean():.2f} deg mean, {err.max():.2f} max; "
        f"{shift.mean():.2f} px mean"
    )
    assert err.mean() < 1.5 and err.max() < 3.0
    assert shift.max() < 0.5
    # the priors are kept beside the result
    np.testing.assert_allclose(
        _matrices(table, [f"rlnCryomatchPrior{a}" for a in ("Rot", "Tilt", "Psi")]),
        _matrices(priors),
        atol=1e-9,
    )


def test_relion5_subtomogram_frame(so3, tmp_path, rng):
    """Rows with rlnTomoSubtomogramRot/Tilt/Psi S and particle angles S^T A, origins in the
    subtomogram frame: the same search and, composed back, the same poses as plain rows."""
    blocks = read_star(so3 / "truth.star")
    plain = blocks["particles"].copy()
    n = len(plain)
    axes = rng.standard_normal((n, 3))
    turn = Rotation.from_rotvec(np.deg2rad(8.0) * axes / np.linalg.norm(axes, axis=1)[:, None])
    a = turn.as_matrix() @ _matrices(plain)
    plain[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = np.stack(geometry.matrix_to_euler(a), 1)
    plain[[f"rlnOrigin{x}Angst" for x in "XYZ"]] = rng.uniform(-8, 8, (n, 3))
    sub_angles = rng.uniform(-180, 180, (n, 3))
    sub_angles[:, 1] = rng.uniform(0, 180, n)
    s = geometry.euler_to_matrix(*sub_angles.T)
    framed = plain.copy()
    for i, c in enumerate(
        ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
    ):
        framed[c] = sub_angles[:, i]
    framed[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = np.stack(
        geometry.matrix_to_euler(np.swapaxes(s, 1, 2) @ a), 1
    )
    framed[[f"rlnOrigin{x}Angst" for x in "XYZ"]] = np.einsum("nji,nj->ni", s, _origins(plain))
    results = []
    for name, table in (("plain", plain), ("framed", framed)):
        write_star(tmp_path / f"{name}.star", {"optics": blocks["optics"], "particles": table})
        results.append(
            subtomo_align(
                tmp_path / name,
                [so3 / "templates" / "template_01.mrc"],
                star=tmp_path / f"{name}.star",
                tomograms=[so3 / "tomogram.mrc"],
                mask=so3 / "mask.mrc",
                max_shifts=(3, 3, 3),
                prior_search={"range": 10.0, "step": 5.0},
            )
        )
    p, f = results
    np.testing.assert_allclose(s @ _matrices(f), _matrices(p), atol=1e-6)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", s, _origins(f)), _origins(p), atol=1e-4)
    truth = _matrices(read_star(so3 / "truth.star")["particles"])
    assert geometry.angle_between_rotations(_matrices(p), truth).mean() < 1.5


def test_cone_and_inplane_limits(rng):
    prior = geometry.euler_to_matrix(*rng.uniform(0, 180, (5, 3)).T)
    grid = Rotation.from_euler(
        "zyx",
        np.stack(np.meshgrid(*[np.arange(-10, 11, 5.0)] * 3), -1).reshape(-1, 3),
        degrees=True,
    ).as_quat()
    corr = geometry.zyx_to_relion_matrix(Rotation.from_quat(grid).as_matrix())
    final = prior[:, None] @ corr[None]
    view = geometry.angle_between_directions(
        final[..., 2, :],
        prior[:, None, 2, :],  # A^T e_z: the third row of A
    )
    twist = np.abs(geometry.inplane_angle_between(final, prior[:, None]))
    ok = allowed_rotations(prior, prior, grid, cone=6.0, inplane=None)
    assert np.array_equal(ok, view <= 6.0 + 1e-6) and 0 < ok.sum() < ok.size
    ok = allowed_rotations(prior, prior, grid, cone=None, inplane=3.0)
    assert np.array_equal(ok, twist <= 3.0 + 1e-6) and 0 < ok.sum() < ok.size
    # with cone 0 only turns about the particle's own z axis stay
    ok = allowed_rotations(prior, prior, grid, cone=0.0, inplane=None)
    assert np.all(view[ok] < 1e-5)


def test_wedge_normalization_is_the_filtered_templates_norm(rng):
    """Each (subvolume, rotation) score is divided by ||G t'||, G the low-pass times the
    particle's wedge: the one matrix product must equal the norm of each prepared
    template filtered by G, computed directly (Parseval on the full grid)."""
    shape = (12, 14, 16)
    template = gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32)
    model = LocalZNCC(template, angular_range=10, angular_step=10, cutoff=0.3, tilt=(-50, 40))
    prep = model._prepare(np, [0.0, 0, 0, 1])
    quats = Rotation.random(2, random_state=3).as_quat()
    wedges = np.stack([model._tilt_model.rfft_mask(Rotation.from_quat(q), shape) for q in quats])
    v = rng.normal(size=(2,) + shape).astype(np.float32)
    norm = model._subvolume_data_local(v, wedges, prep)[3]  # (2, rotations)
    rotated, masks = model.rotated_templates()
    spectra = model._template_spectra(np, prep.filt, rotated[0], masks)
    for s in range(2):
        g = prep.filt[0] * wedges[s]
        filtered = np.fft.irfftn(spectra * g, s=shape, axes=(1, 2, 3))
        direct = np.sqrt((filtered**2).sum(axis=(1, 2, 3)))
        np.testing.assert_allclose(norm[s], direct, rtol=1e-4)
    assert np.ptp(norm) > 0.01 * norm.max()  # the wedges and rotations matter


def test_origins_in_pixels_and_bad_priors(so3, tmp_path):
    t = pd.DataFrame({"rlnOriginX": [1.0], "rlnOriginY": [2.0], "rlnOriginZ": [3.0]})
    np.testing.assert_allclose(origins_pixels(t, 4.0), [[1, 2, 3]])
    t = pd.DataFrame({f"rlnOrigin{a}Angst": [8.0] for a in "XYZ"})
    np.testing.assert_allclose(origins_pixels(t, 4.0), [[2, 2, 2]])
    blocks = read_star(so3 / "priors.star")
    table = blocks["particles"].copy()
    table.loc[3, "rlnAngleTilt"] = np.nan
    table["rlnImageName"] = [f"{k}@{so3 / p}" for k, p in table["rlnImageName"].str.split("@")]
    write_star(tmp_path / "bad.star", {"optics": blocks["optics"], "particles": table})
    with pytest.raises(CryomatchError, match="row 4: rlnAngleTilt"):
        subtomo_align(
            tmp_path / "out",
            [so3 / "templates" / "template_01.mrc"],
            star=tmp_path / "bad.star",
            mask=so3 / "mask.mrc",
            max_shifts=(3, 3, 3),
        )
    assert not (tmp_path / "out" / "subtomo.star").exists()
