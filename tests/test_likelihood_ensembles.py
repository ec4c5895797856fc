"""Structures from trajectories and multi-model files (issue 15 point 1): frames, atoms,
one template set per frame, the workflow's jobs for thousands of frames."""

import time

import gemmi
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryomatch.cli import main
from cryomatch.errors import CryomatchError
from cryomatch.io.structures import count_frames, read_frames, read_model, selected_frames
from cryomatch.stages.fourier_stack import fourier_stack
from cryomatch.stages.preprocess import preprocess
from cryomatch.stages.simulate.particles import simulate_particles
from cryomatch.stages.templates import ensemble_templates, read_template_list, templates
from workflow_helpers import TINY, planned_jobs, write_config

md = pytest.importorskip("mdtraj")


def _frames(real_data):
    """Ubiquitin (1UBI, no waters) and 3 more frames: rotated, translated, a loop moved."""
    traj = md.load(real_data / "models" / "pdb1ubi.pdb")
    traj = traj.atom_slice(traj.topology.select("not water"))
    xyz = traj.xyz[0].astype(np.float64)
    rotated = Rotation.from_euler("zyz", [30, 50, -20], degrees=True).apply(xyz)
    moved = xyz.copy()
    moved[traj.topology.select("resid 60 to 75")] += [0.5, 0.0, 0.0]  # 5 A
    return traj, np.stack([xyz, rotated, xyz + [1.0, -2.0, 0.5], moved])


@pytest.fixture(scope="module")
def ensemble(real_data, tmp_path_factory):
    """The same 4 frames as topology + .dcd, + .xtc and as a 4-model PDB."""
    root = tmp_path_factory.mktemp("ensemble")
    traj, frames = _frames(real_data)
    top = root / "ubq.pdb"
    traj.save_pdb(str(top))
    files = {}
    for suffix in ("dcd", "xtc"):
        files[suffix] = root / f"ubq.{suffix}"
        md.Trajectory(frames.astype(np.float32), traj.topology).save(str(files[suffix]))
    st = gemmi.read_structure(str(top))
    model = st[0]
    multi = gemmi.Structure()
    multi.cell = st.cell
    for k, xyz in enumerate(frames):
        m = gemmi.Model(str(k + 1))
        for chain in model:
            m.add_chain(chain)
        positions = iter(10.0 * xyz)
        for chain in m:
            for residue in chain:
                for atom in residue:
                    atom.pos = gemmi.Position(*next(positions))
        multi.add_model(m)
    multi.setup_entities()
    files["pdb"] = root / "ubq_models.pdb"
    multi.write_pdb(str(files["pdb"]))
    files["cif"] = root / "ubq_models.cif"
    multi.make_mmcif_document().write_file(str(files["cif"]))
    return root, top, files, frames


def test_frames_are_counted_and_selected(ensemble):
    _, top, files, _ = ensemble
    assert count_frames(top, files["dcd"]) == 4
    assert count_frames(top, files["xtc"]) == 4
    assert count_frames(files["pdb"]) == 4
    assert count_frames(files["cif"]) == 4
    assert selected_frames(10, 3) == [0, 3, 6, 9]
    assert selected_frames(10, 1, [7, 2]) == [7, 2]
    assert selected_frames(10, 2, [1, 2, 3, 4]) == [1, 3]
    with pytest.raises(CryomatchError, match="not in 0..9"):
        selected_frames(10, 1, [3, 10])
    top.with_suffix(".txt").write_text("not a trajectory")
    with pytest.raises(CryomatchError, match="trajectory type"):
        count_frames(top, top.with_suffix(".txt"))
    bad = top.with_name("bad.dcd")
    bad.write_bytes(b"\x00" * 300)
    with pytest.raises(CryomatchError, match="bad.dcd: not a readable ensemble"):
        count_frames(top, bad)


def test_every_reader_gives_the_frames_atoms(ensemble):
    """Frame k from .dcd, .xtc (0.01 A precision), multi-model PDB (0.001 A) and mmCIF:
    the same Gaussian atoms, centred; frame 0 equals the single-model reader's atoms."""
    _, top, files, frames = ensemble
    single = read_model(top)
    for source, tol in (("dcd", 1e-4), ("xtc", 0.01), ("pdb", 2e-3), ("cif", 2e-3)):
        trajectory = files[source] if source in ("dcd", "xtc") else None
        topology = top if trajectory else files[source]
        got = dict(read_frames(topology, trajectory, [0, 1, 3]))
        assert sorted(got) == [0, 1, 3]
        np.testing.assert_allclose(got[0].coords, single.coords, atol=tol)
        np.testing.assert_allclose(got[0].amplitudes, single.amplitudes)
        expected = 10.0 * frames[1] - np.average(
            10.0 * frames[1], axis=0, weights=single.amplitudes
        )
        np.testing.assert_allclose(got[1].coords, expected, atol=tol)
        assert np.ptp(got[3].coords[:, 0] - got[0].coords[:, 0]) > 4.9  # the loop moved 5 A
    # atom selections: mdtraj's language, gemmi's CID
    ((_, ca_md),) = read_frames(top, files["dcd"], [0], "name CA")
    ((_, ca_gemmi),) = read_frames(files["pdb"], None, [0], "/1/*/*/CA")
    assert len(ca_md.coords) == len(ca_gemmi.coords) == 76
    np.testing.assert_allclose(ca_md.coords, ca_gemmi.coords, atol=2e-3)
    with pytest.raises(CryomatchError, match="selection"):
        list(read_frames(top, files["dcd"], [0], "name and and"))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    star = simulate_particles(root / "sim", n=4, snr=1.0, box=32, seed=3, pixel_size=2.0)
    preprocess(star, root, stack_size=4)
    return fourier_stack(root / "particles" / "stack_000000.star", root / "fft")


def test_one_template_set_per_frame(ensemble, grid, tmp_path):
    """Frame 0's templates equal the single-model file's; rotated frames differ; the folder's
    list names the sets in frame order; the CLI gives the same."""
    _, top, files, _ = ensemble
    paths = ensemble_templates(
        top, files["dcd"], [3, 0], grid, tmp_path / "g", "ubq", viewing_distance=0.6, selection="ca"
    )
    assert [p.name for p in paths] == [
        "templates_fourier_ubq_frame000003.npy",
        "templates_fourier_ubq_frame000000.npy",
    ]
    assert read_template_list(tmp_path / "g" / "template_file_list.npy") == paths
    single = np.load(templates(top, grid, tmp_path / "s", viewing_distance=0.6, selection="ca"))
    frame0 = np.load(paths[1])
    assert np.abs(frame0 - single).max() < 1e-4 * np.abs(single).max()
    assert np.abs(np.load(paths[0]) - single).max() > 0.05 * np.abs(single).max()
    meta = np.load(paths[0].with_suffix(".npz"))
    assert int(meta["frame"]) == 3 and str(meta["name"]) == "ubq_frame000003"
    main(
        [
            "templates",
            "--topology",
            str(files["pdb"]),
            "--frames",
            "0",
            "--name",
            "ubq",
            "--grid-from",
            str(grid),
            "--out",
            str(tmp_path / "cli"),
            "--viewing-distance",
            "0.6",
            "--atoms",
            "ca",
        ]
    )
    cli = np.load(tmp_path / "cli" / "templates_fourier_ubq_frame000000.npy")
    assert np.abs(cli - single).max() < 1e-3 * np.abs(single).max()


@pytest.mark.slow
def test_workflow_jobs_for_thousands_of_frames(ensemble, tmp_path):
    """3000 frames, stride 2 (1500 template sets): template jobs and likelihood jobs in
    groups of 100 frames (one likelihood job per group and stack), one gather reading the
    template list; the dry run (DAG) is built in under a minute."""
    root, top, _, frames = ensemble
    traj = md.load(str(root / "ubq.dcd"), top=str(top))
    many = md.Trajectory(np.repeat(traj.xyz, 750, axis=0), traj.topology)
    many.save(str(tmp_path / "long.dcd"))
    config = write_config(
        tmp_path,
        {
            **TINY,
            "stages": ["likelihood"],
            "likelihood": {
                "structures": None,
                "frames_per_job": 100,
                "ensembles": [
                    {
                        "topology": str(top),
                        "trajectory": str(tmp_path / "long.dcd"),
                        "stride": 2,
                        "name": "ubq",
                    }
                ],
            },
        },
    )
    start = time.perf_counter()
    counts = planned_jobs(tmp_path, config)
    seconds = time.perf_counter() - start
    print(f"\n  dry run for 1500 frames: {seconds:.1f} s")
    assert seconds < 60
    assert counts["templates_frames"] == 15 and "templates" not in counts
    groups = [k for k in counts if k.startswith("likelihood_ubq_")]
    assert len(groups) == 15 and "likelihood" not in counts
    assert all(counts[g] == counts["fourier_stack"] for g in groups)
    assert counts["likelihood_gather"] == 1 and counts["reweight"] == 1
