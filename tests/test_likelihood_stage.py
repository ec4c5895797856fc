"""The likelihood stages end to end on a small simulated set, and their bad-input errors."""

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.special import logsumexp

from cryomatch import geometry
from cryomatch.cli import main
from cryomatch.errors import CryomatchError
from cryomatch.io.particles import read_particles
from cryomatch.stages.fourier_stack import fourier_stack
from cryomatch.stages.likelihood import likelihood, output_paths
from cryomatch.stages.likelihood_gather import likelihood_gather
from cryomatch.stages.preprocess import preprocess
from cryomatch.stages.simulate.particles import simulate_particles
from cryomatch.stages.templates import templates, write_template_list

BOX, APIX, SPACING = 32, 4.0, 0.3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Simulate (2 structures, 3 optics groups), preprocess into 2 stacks, run every stage."""
    root = tmp_path_factory.mktemp("likelihood")
    star = simulate_particles(
        root / "demo", n=32, snr=1.0, box=BOX, seed=11, pixel_size=APIX, max_shift=1.5
    )
    preprocess(star, root, stack_size=16)
    stacks = [root / "particles" / f"stack_{i:06d}.star" for i in range(2)]
    ffts = [fourier_stack(s, root / "particles" / "fft") for s in stacks]
    maps = sorted((root / "demo" / "structures").glob("structure_*.mrc"))
    temps = [templates(m, ffts[0], root / "templates", viewing_distance=SPACING) for m in maps]
    for i, t in enumerate(temps):
        for f in ffts:
            likelihood(
                f,
                t,
                root / "likelihood",
                i,
                max_displacement_pixels=2.0,
                n_displacements_x=5,
                n_displacements_y=5,
            )
    gathered = likelihood_gather(root / "likelihood", temps, stacks, 2.0, 5, 5)
    return root, star, ffts, temps, gathered


def test_outputs_in_cryolike_layout(run):
    root, _, ffts, temps, gathered = run
    values = np.load(ffts[0])
    assert values.dtype == np.complex64 and values.shape == (16, BOX + 1, 2 * BOX)
    meta = np.load(ffts[0].with_suffix(".npz"))
    assert {"defocus_u", "pixel_size", "radii", "image_ss", "prior_displacement"} <= set(meta.files)
    assert np.load(temps[0]).shape[1:] == (BOX + 1, 2 * BOX)
    for i in range(2):
        for stack in ("000000", "000001"):
            for path in output_paths(root / "likelihood", i, stack).values():
                assert path.is_file(), path
    assert np.load(gathered["displacements"]).shape == (2, 25)
    assert np.load(gathered["matrix"]).shape == (2, 32)
    assert gathered["png"].stat().st_size > 1000


def test_best_structure_and_pose_recover_the_truth(run):
    _, star, *_, gathered = run
    truth = starfile.read(star)["particles"]
    best = starfile.read(gathered["star"])["particles"]
    # small smooth phantoms at 32 px: some views of one are near-copies of views of the other
    # (equal rho at the true and the found pose); the accuracy figures are in the slow tests
    assert np.mean(truth["rlnClassNumber"].to_numpy() == best["rlnClassNumber"].to_numpy()) >= 0.75
    view_error = geometry.angle_between_directions(
        geometry.viewing_direction(truth["rlnAngleRot"], truth["rlnAngleTilt"]),
        geometry.viewing_direction(best["rlnAngleRot"], best["rlnAngleTilt"]),
    )
    assert np.median(view_error) < np.degrees(SPACING)
    shift = np.hypot(
        *(truth[c].to_numpy() - best[c].to_numpy() for c in ("rlnOriginXAngst", "rlnOriginYAngst"))
    )
    assert np.mean(shift <= APIX) >= 0.75  # within the 1 px grid spacing
    csv = pd.read_csv(gathered["csv"])
    assert list(csv.columns[:4]) == [
        "image",
        "best_structure",
        "posterior",
        "ll_integrated_structure_01",
    ]
    # log-likelihoods differ between images (CryoLike's optimal-pose run wrote a constant)
    assert csv["ll_integrated_structure_01"].std() > 1 and csv["ll_optimal_structure_01"].std() > 1


def test_best_poses_star_is_usable_downstream(run, tmp_path, monkeypatch):
    """rlnImageName resolves from the STAR's own folder, wherever it is read from;
    rlnMaxValueProbDistribution is the best (structure, pose)'s posterior (RELION's meaning);
    the structure posterior has its own column."""
    root, star, _, temps, gathered = run
    monkeypatch.chdir(tmp_path)  # names must not depend on the current directory
    back = read_particles(gathered["star"])
    truth = read_particles(root / "particles" / "stack_000000.star")
    assert back.table["image_file"].iloc[0] == truth.table["image_file"].iloc[0]
    np.testing.assert_array_equal(back.table["image_index"].iloc[:16], np.arange(16))
    best = starfile.read(gathered["star"])["particles"]
    ll = np.load(gathered["matrix"])
    structure = np.exp(ll.max(axis=0) - logsumexp(ll, axis=0))
    np.testing.assert_allclose(best["rlnCryomatchStructurePosterior"], structure, rtol=1e-5)
    # by hand from the job files: P(s | y) x w_view L(best pose) / (D W) / L_integrated
    k = best["rlnClassNumber"].to_numpy() - 1
    pose = np.empty(32)
    for i in range(2):
        meta = np.load(temps[i].with_suffix(".npz"))
        w = meta["view_weights"] / meta["view_weights"].sum()
        for j, stack in enumerate(("000000", "000001")):
            p = output_paths(root / "likelihood", i, stack)
            rows = slice(16 * j, 16 * j + 16)
            mine = k[rows] == i
            view = np.load(p["template"])
            value = np.exp(
                np.load(p["ll_optimal"])
                + np.log(w[view] / (25 * 2 * BOX))
                - np.load(p["ll_integrated"])
            )
            pose[rows][mine] = value[mine]
    expected = structure * pose
    np.testing.assert_allclose(best["rlnMaxValueProbDistribution"], expected, rtol=1e-4)
    # a probability, and the integrated likelihood holds its best pose's share
    assert np.all((expected > 0) & (expected <= structure * (1 + 1e-9)))


def test_one_job_for_several_template_sets(run, tmp_path, capsys):
    """``cryomatch likelihood --templates T0 T1 --i-template 5 7``: the same files as one job
    per set (an ensemble's group of frames); unequal lists are an error."""
    root, _, ffts, temps, _ = run
    opts = ["--max-displacement-pixels", "2", "--n-displacements-x", "5"]
    opts += ["--n-displacements-y", "5"]
    main(
        ["likelihood", "--fourier-stack", str(ffts[1]), "--templates", *map(str, temps)]
        + ["--out", str(tmp_path), "--i-template", "5", "7", *opts]
    )
    for i, j in ((0, 5), (1, 7)):
        alone = output_paths(root / "likelihood", i, "000001")
        together = output_paths(tmp_path, j, "000001")
        for key in ("ll_integrated", "template", "inplane_rotation"):
            np.testing.assert_array_equal(np.load(together[key]), np.load(alone[key]))
    code = main(
        ["likelihood", "--fourier-stack", str(ffts[1]), "--templates", *map(str, temps)]
        + ["--out", str(tmp_path / "x"), "--i-template", "3"]
    )
    assert code == 2
    assert "2 template sets but 1 --i-template" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_full_cross_correlation_and_prior_shifts(run, tmp_path):
    _, _, ffts, temps, _ = run
    paths = likelihood(ffts[0], temps[0], tmp_path, 0, 1.0, 3, 3, full_cross_correlation=True)
    full = np.load(paths["full"])
    n_views = len(np.load(temps[0], mmap_mode="r"))
    assert full.shape == (16, n_views, 9, 2 * BOX)
    rho = np.load(paths["cross_correlation"])
    np.testing.assert_allclose(full.reshape(16, -1).max(axis=1), rho, atol=1e-6)
    flat = full.reshape(16, -1).argmax(axis=1)
    view, disp, rot = np.unravel_index(flat, full.shape[1:])
    np.testing.assert_array_equal(np.load(paths["template"]), view)
    np.testing.assert_allclose(np.load(paths["inplane_rotation"]), rot * 360.0 / (2 * BOX))
    # no displacement search about the STAR shifts: the displacement found is the prior
    paths = likelihood(ffts[0], temps[0], tmp_path / "prior", 0, 0.0, 1, 1, use_prior_shifts=True)
    prior = np.load(ffts[0].with_suffix(".npz"))["prior_displacement"] * APIX
    np.testing.assert_allclose(np.load(paths["displacement_x"]), prior[:, 0], atol=1e-9)
    np.testing.assert_allclose(np.load(paths["displacement_y"]), prior[:, 1], atol=1e-9)


# --- bad input ---------------------------------------------------------------------------
def _map(path, box, voxel):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.random.default_rng(0).normal(size=(box, box, box)).astype(np.float32))
        m.voxel_size = voxel
    return path


@pytest.mark.parametrize(
    "box, voxel, problem", [(40, APIX, "box is 40"), (BOX, 1.02 * APIX, "voxel size")]
)
def test_map_not_matching_the_particles(run, tmp_path, box, voxel, problem):
    _, _, ffts, *_ = run
    with pytest.raises(CryomatchError, match=problem):
        templates(_map(tmp_path / "bad.mrc", box, voxel), ffts[0], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_map_within_one_percent_is_accepted(run, tmp_path):
    _, _, ffts, *_ = run
    out = templates(
        _map(tmp_path / "ok.mrc", BOX, 1.005 * APIX),
        ffts[0],
        tmp_path / "out",
        viewing_distance=1.0,
    )
    assert out.is_file()


def test_missing_ctf_columns(run, tmp_path, capsys):
    root, *_ = run
    star = root / "particles" / "stack_000000.star"
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnDefocusV"])
    blocks["particles"]["rlnImageName"] = [
        n.replace("@", f"@{root / 'particles'}/") for n in blocks["particles"]["rlnImageName"]
    ]
    starfile.write(blocks, tmp_path / "no_ctf.star")
    code = main(
        ["fourier-stack", "--star", str(tmp_path / "no_ctf.star"), "--out", str(tmp_path / "fft")]
    )
    assert code == 2
    assert "rlnDefocusV" in capsys.readouterr().err
    assert not (tmp_path / "fft").exists() or not any((tmp_path / "fft").iterdir())


def test_empty_structure_list(run, tmp_path):
    root, _, _, _, _ = run
    with pytest.raises(CryomatchError, match="empty"):
        write_template_list(tmp_path / "list.npy", [])
    with pytest.raises(CryomatchError, match="empty"):
        likelihood_gather(root / "likelihood", [], [root / "particles" / "stack_000000.star"])
    import yaml
    from snakemake.utils import validate

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["likelihood"]["structures"] = []
    with pytest.raises(Exception, match="structures"):
        validate(config, str(repo / "config" / "schema.yaml"))


@pytest.mark.parametrize("text", ["this is not a model\n", ""])
def test_unreadable_model_file(run, tmp_path, capsys, text):
    _, _, ffts, *_ = run
    model = tmp_path / "broken.pdb"
    model.write_text(text)
    code = main(
        [
            "templates",
            "--structure",
            str(model),
            "--grid-from",
            str(ffts[0]),
            "--out",
            str(tmp_path / "t"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "broken.pdb" in err
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_templates_from_atomic_models(run, real_data, tmp_path):
    """A PDB model (all atoms and C-alpha) gives templates on the particles' grid."""
    _, _, ffts, *_ = run
    model = real_data / "models" / "pdb1ubi.pdb"
    a = templates(model, ffts[0], tmp_path, viewing_distance=1.0, name="ubi_all")
    b = templates(model, ffts[0], tmp_path, viewing_distance=1.0, selection="ca", name="ubi_ca")
    ta, tb = np.load(a), np.load(b)
    assert ta.shape == tb.shape and np.all(np.isfinite(ta))
    # the two descriptions of one protein agree at low resolution (first shells)
    low = slice(0, 6)
    corr = np.abs(np.vdot(ta[:, low], tb[:, low])) / (
        np.linalg.norm(ta[:, low]) * np.linalg.norm(tb[:, low])
    )
    assert corr > 0.95
