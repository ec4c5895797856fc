"""Accuracy on simulated data from a real map, and on real TRPV1 particles (issue point 6).

Slow: run with ``pytest -m slow tests/test_likelihood_accuracy.py -s`` (``-s`` shows the
figures printed for the closing note).
"""

import numpy as np
import pytest
import starfile

from cryomatch import geometry
from cryomatch.io.mrc import read_volume, write_mrc
from cryomatch.stages.fourier_stack import fourier_stack
from cryomatch.stages.likelihood import likelihood
from cryomatch.stages.likelihood_gather import likelihood_gather
from cryomatch.stages.preprocess import preprocess
from cryomatch.stages.simulate.particles import simulate_particles
from cryomatch.stages.templates import templates

pytestmark = pytest.mark.slow
SPACING = 0.2  # radians between template views (11.5 degrees)


def _pose_errors(truth, est):
    """View error (degrees), in-plane twist error (degrees), shift error (Angstrom)."""
    a_t = geometry.euler_to_matrix(
        *(truth[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    )
    a_e = geometry.euler_to_matrix(
        *(est[c].to_numpy() for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    )
    view = geometry.angle_between_directions(
        geometry.viewing_direction(truth["rlnAngleRot"], truth["rlnAngleTilt"]),
        geometry.viewing_direction(est["rlnAngleRot"], est["rlnAngleTilt"]),
    )
    twist = np.abs(geometry.inplane_angle_between(a_e, a_t))
    shift = np.hypot(
        *(truth[c].to_numpy() - est[c].to_numpy() for c in ("rlnOriginXAngst", "rlnOriginYAngst"))
    )
    return view, twist, shift


@pytest.fixture(scope="module")
def simulated(real_data, tmp_path_factory):
    """150 images at 64 px, SNR 0.1, CTFs of a real 6-optics-group STAR, from EMD-1832 and a
    variant with its distinct arm removed; the whole likelihood pipeline."""
    root = tmp_path_factory.mktemp("accuracy")
    volume, voxel = read_volume(real_data / "maps" / "emd_1832.map")
    z, y, x = np.indices(volume.shape) - 32
    arm = (x + 13) ** 2 + (y + 9) ** 2 + (z - 0) ** 2 < 8**2  # the lobe off the ring
    variant = np.where(arm, 0.0, volume).astype(np.float32)
    maps = [root / "emd_1832.mrc", root / "emd_1832_armless.mrc"]
    write_mrc(maps[0], volume, voxel)
    write_mrc(maps[1], variant, voxel)
    star = simulate_particles(
        root / "sim",
        n=150,
        snr=0.1,
        box=64,
        seed=1,
        maps=[str(m) for m in maps],
        max_shift=3.0,
        ctf_star=str(real_data / "particles" / "metadata_only" / "relion31.6opticsgroups.star"),
    )
    preprocess(star, root, stack_size=75)
    stacks = [root / "particles" / f"stack_{i:06d}.star" for i in range(2)]
    ffts = [fourier_stack(s, root / "particles" / "fft") for s in stacks]
    temps = [templates(m, ffts[0], root / "templates", viewing_distance=SPACING) for m in maps]
    for i, t in enumerate(temps):
        for f in ffts:
            likelihood(f, t, root / "likelihood", i)
    gathered = likelihood_gather(root / "likelihood", temps, stacks)
    return root, star, temps, gathered


def test_poses_on_simulated_data(simulated):
    root, star, temps, _ = simulated
    truth = starfile.read(star)["particles"]
    est = truth.copy()
    for i in range(2):  # each image against its own structure's templates
        mine = truth["rlnClassNumber"].to_numpy() == i + 1
        meta = np.load(temps[i].with_suffix(".npz"))

        def load(kind, name, i=i):
            folder = root / "likelihood" / f"template{i}" / kind
            return np.concatenate(
                [np.load(folder / f"{name}_stack_{s}.npy") for s in ("000000", "000001")]
            )

        view = load("optimal_pose", "optimal_template")
        est.loc[mine, "rlnAngleRot"] = meta["rot"][view][mine]
        est.loc[mine, "rlnAngleTilt"] = meta["tilt"][view][mine]
        est.loc[mine, "rlnAnglePsi"] = load("optimal_pose", "optimal_inplane_rotation")[mine]
        est.loc[mine, "rlnOriginXAngst"] = -load("optimal_pose", "optimal_displacement_x")[mine]
        est.loc[mine, "rlnOriginYAngst"] = -load("optimal_pose", "optimal_displacement_y")[mine]
    view, twist, shift = _pose_errors(truth, est)
    pixel, step = 5.7, 360.0 / 128
    good = (twist <= step) & (shift <= pixel)
    print(
        f"\nsimulated EMD-1832, 64 px, SNR 0.1, {len(truth)} images, "
        f"views every {np.degrees(SPACING):.1f} deg:"
        f"\n  view error median {np.median(view):.2f} deg (90%: {np.percentile(view, 90):.2f});"
        f" in-plane within one step ({step:.2f} deg) {np.mean(twist <= step):.1%};"
        f" shift within 1 px {np.mean(shift <= pixel):.1%}; both {np.mean(good):.1%}"
    )
    assert np.median(view) < np.degrees(SPACING)
    assert np.mean(good) >= 0.95


def test_structure_assignment_on_simulated_data(simulated):
    _, star, _, gathered = simulated
    truth = starfile.read(star)["particles"]["rlnClassNumber"].to_numpy()
    best = starfile.read(gathered["star"])["particles"]["rlnClassNumber"].to_numpy()
    print(f"\n  two structures: {np.mean(truth == best):.1%} of images assigned to their own")
    assert np.mean(truth == best) >= 0.95


def test_trpv1_real_particles_against_their_refined_poses(real_data, tmp_path):
    """The 10 real TRPV1 particles against the TRPV1 map (C4): best (and locally refined)
    poses compared with the refined poses of their STAR file, up to the C4 symmetry about z.
    Checked: every pose found scores (rho) at least as well as the STAR pose, within the
    grid's discretization; the pose agreement is reported."""
    from cryomatch.io.polar_files import read_fourier_stack
    from cryomatch.io.structures import read_map
    from cryomatch.kernels.nufft import MapInterpolator
    from cryomatch.kernels.refine import map_slicer, rho_at_pose
    from cryomatch.kernels.templates import slice_points
    from cryomatch.stages.likelihood import polar_ctf

    star = real_data / "particles" / "trpv1" / "trpv1_small_stack.localpaths.star"
    volume_path = real_data / "maps" / "trpv1_volume_48px_4.88A.mrc"
    preprocess(star, tmp_path, stack_size=10)
    fft = fourier_stack(tmp_path / "particles" / "stack_000000.star", tmp_path / "fft")
    temp = templates(volume_path, fft, tmp_path / "templates", viewing_distance=0.1)
    paths = likelihood(
        fft,
        temp,
        tmp_path / "likelihood",
        0,
        max_displacement_pixels=4.0,
        n_displacements_x=9,
        n_displacements_y=9,
        refine=True,
    )
    out = likelihood_gather(
        tmp_path / "likelihood", [temp], [tmp_path / "particles" / "stack_000000.star"], 4.0, 9, 9
    )
    truth = starfile.read(star)["particles"]
    est = starfile.read(out["star"])["particles"]  # the refined poses
    cols = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    a_t = geometry.euler_to_matrix(*(truth[c].to_numpy() for c in cols))
    a_e = geometry.euler_to_matrix(*(est[c].to_numpy() for c in cols))
    sym = geometry.euler_to_matrix(np.arange(4) * 90.0, 0.0, 0.0)  # C4 about the map's z axis
    angle = np.min([geometry.angle_between_rotations(a_e, a_t @ s.T) for s in sym], axis=0)
    shift = np.hypot(
        *(truth[c].to_numpy() - est[c].to_numpy() for c in ("rlnOriginXAngst", "rlnOriginYAngst"))
    )
    # rho at the STAR's poses, with the same exact templates (scaled as the template set)
    stack = read_fourier_stack(fft)
    meta = np.load(temp.with_suffix(".npz"))
    volume, _ = read_map(volume_path)
    slicer = map_slicer(MapInterpolator(volume * float(meta["scale"]), 1e-5))
    star_rho = []
    for i in range(len(truth)):
        ctf, ctf0 = polar_ctf(stack, slice(i, i + 1))
        disp = (
            -truth.loc[i, ["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=float)
            / stack.pixel_size
        )
        star_rho.append(
            rho_at_pose(
                np.asarray(stack.values[i]),
                ctf[0],
                float(stack.meta["image_ss"][i]),
                float(ctf0[0]),
                stack.grid,
                slicer(slice_points(stack.grid, a_t[i : i + 1])[0]),
                float(meta["dc"][0]),
                disp,
            )
        )
    star_rho = np.array(star_rho)
    grid_rho = np.load(paths["cross_correlation"])
    refined_rho = np.load(paths["refined"])[:, 5]
    print(
        "\nTRPV1 real particles vs their refined STAR poses (views every 5.7 deg, C4):"
        f"\n  rotation difference up to C4 (deg): {np.round(angle, 1).tolist()}"
        f"\n  shift difference (A): {np.round(shift, 1).tolist()}"
        f"\n  rho at the STAR pose: {np.round(star_rho, 3).tolist()}"
        f"\n  rho at the best grid pose: {np.round(grid_rho, 3).tolist()}"
        f"\n  rho after local refinement: {np.round(refined_rho, 3).tolist()}"
    )
    assert np.all(grid_rho >= star_rho - 0.02)
    assert np.all(refined_rho >= grid_rho - 1e-6)
    assert np.all(refined_rho >= star_rho - 0.005)
