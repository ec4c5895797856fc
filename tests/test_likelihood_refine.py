"""Local refinement below the grid spacing (issue point 5)."""

import numpy as np

from cryomatch import geometry
from cryomatch.kernels import ctf as ctf_kernel
from cryomatch.kernels.fourier import apply_ctf, rfft_frequencies
from cryomatch.kernels.nufft import MapInterpolator
from cryomatch.kernels.phantom import random_structure
from cryomatch.kernels.polar_fourier import polar_grid, polar_transform
from cryomatch.kernels.projection import project_atoms, voxelize_atoms
from cryomatch.kernels.refine import atom_slicer, map_slicer, refine_pose


def test_refinement_recovers_an_off_grid_pose():
    rng = np.random.default_rng(8)
    box, apix = 32, 4.0
    atoms = random_structure(rng, 90, 0.28 * box * apix, 1.6 * apix)
    truth = geometry.euler_to_matrix(37.0, 64.0, 211.0)
    shift = np.array([0.6, -0.3])  # pixels
    image = project_atoms(
        atoms.coords, atoms.amplitudes, atoms.sigmas, truth[None], box, apix, shift[None] * apix
    )
    params = (12000.0, 12500.0, 30.0, 300.0, 2.7, 0.1)
    ky, kx = rfft_frequencies(box, apix)
    image = apply_ctf(image, ctf_kernel.ctf(kx, ky, *params)).astype(np.float64)
    image += 0.05 * image.std() * rng.standard_normal(image.shape)
    image -= image.mean()
    grid = polar_grid(box)
    values = polar_transform(image.astype(np.float32), grid, "dft")[0]
    gx, gy = grid.points()
    ctf = ctf_kernel.ctf(gx / apix, gy / apix, *params)
    ctf0 = float(ctf_kernel.ctf(0.0, 0.0, *params))
    syy = float(np.sum(image**2))
    volume = voxelize_atoms(atoms.coords, atoms.amplitudes, atoms.sigmas, box, apix)
    slicers = [
        map_slicer(MapInterpolator(volume, 1e-4)),
        atom_slicer(atoms.coords / apix, atoms.amplitudes, atoms.sigmas / apix),
    ]
    start = truth @ geometry.euler_to_matrix(4.0, 3.0, -2.0)  # a grid pose ~5 degrees away
    dc = float(volume.sum())
    for slicer in slicers:
        matrix, found, rho = refine_pose(
            values, ctf, syy, ctf0, grid, slicer, dc, start, [1.0, 0.0], 10.0, 1.0
        )
        assert geometry.angle_between_rotations(matrix, truth) < 1.0
        assert np.hypot(*(found - shift)) < 0.1
        assert rho > 0.95
