"""Run mumott's run_phase_matching_alignment on a tilt series saved by bench/tomo.py.

Runs in a separate environment that has mumott (it needs matplotlib < 3.9); mumott is not a
dependency of cryomatch. Usage: python mumott_driver.py IN.npz OUT.npz
IN: stack (n, ny, nx) with the tilt axis along y, angles (degrees), optionally maxiter and
shift_tolerance (0 runs exactly maxiter iterations). OUT: shifts (n, 2) as mumott's (j, k)
offsets, seconds (wall) and cpu_seconds (process time) of the alignment.
"""

import sys
import time

import numba
import numpy as np
from mumott.core.projection_stack import Projection
from mumott.data_handling import DataContainer
from mumott.pipelines import run_phase_matching_alignment
from scipy.spatial.transform import Rotation


def main(src, dst):
    numba.set_num_threads(1)  # one thread, as cryomatch's figures
    z = np.load(src)
    stack, angles = z["stack"].astype(np.float64), z["angles"]
    n, ny, nx = stack.shape
    dc = DataContainer(data_path=None, data_type=None)
    g = dc.geometry
    g.volume_shape = np.array([nx, nx, ny])
    g.projection_shape = np.array([nx, ny])
    g.p_direction_0 = np.array([0.0, 1.0, 0.0])
    g.j_direction_0 = np.array([1.0, 0.0, 0.0])
    g.k_direction_0 = np.array([0.0, 0.0, 1.0])
    g.detector_direction_origin = np.array([1.0, 0.0, 0.0])
    g.detector_direction_positive_90 = np.array([0.0, 0.0, 1.0])
    g.detector_angles = np.array([0.0])
    absorbances = np.ascontiguousarray(stack.transpose(0, 2, 1))[..., None]  # (n, j, k, 1)
    for a in angles:
        rot = Rotation.from_rotvec(np.deg2rad(a) * np.array([0.0, 0.0, 1.0])).as_matrix()
        dc.projections.append(
            Projection(
                data=np.ones((nx, ny, 1)),
                diode=np.ones((nx, ny)),
                weights=np.ones((nx, ny, 1)),
                rotation=rot,
                j_offset=0.0,
                k_offset=0.0,
            )
        )
    t0, c0 = time.perf_counter(), time.process_time()
    out = run_phase_matching_alignment(
        dc,
        reconstruction_pipeline_kwargs={"absorbances": absorbances, "maxiter": 10},
        maxiter=int(z["maxiter"]) if "maxiter" in z else 20,
        upsampling=1,
        shift_tolerance=float(z["shift_tolerance"]) if "shift_tolerance" in z else None,
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    shifts = np.stack([g.j_offsets_as_array, g.k_offsets_as_array], axis=1)
    np.savez(
        dst,
        shifts=shifts,
        seconds=seconds,
        cpu_seconds=cpu,
        reconstruction=out["reconstruction"][..., 0],
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
