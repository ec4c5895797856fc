"""Subtomogram alignment benchmark: seconds per subvolume and subvolumes per second at 48^3
with 125 rotations ((10, 5) per axis), missing wedge +-60 degrees, SNR 0.1, against acryo
(when installed: ``pip install acryo``; never a dependency) measured in the same run, with
accuracy on the same subvolumes. Also numpy's float32 matrix product in the same run, as
a reference for the machine's speed.

    python bench/subtomo.py [--n 100] [--acryo-n 5] [--refine-n 10] [--seed 2026]

Prints times and ratios; absolute times vary with load (other jobs on the machine): the
ratios measured in one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from scipy.spatial.transform import Rotation

from cryomatch.alignment import PCCAlignment, ZNCCAlignment
from cryomatch.stages.simulate.subvolumes import read_simulated, simulate_subvolumes

BOX, MAX_SHIFTS, ROTATIONS, TILT = 48, (4, 4, 4), [(10, 5)] * 3, (-60, 60)


def errors(quat, shift, quats, shifts) -> str:
    rot = np.rad2deg((Rotation.from_quat(quat) * Rotation.from_quat(quats).inv()).magnitude())
    shift_error = np.linalg.norm(shift - shifts, axis=1).mean()
    return f"shift error {shift_error:.2f} voxel, rotation error {rot.mean():.2f} deg"


def matmul_gflops() -> float:
    a = np.random.default_rng(0).normal(size=(1500, 1500)).astype(np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * 1500**3 / (time.perf_counter() - t) / 1e9


def run_cryomatch(name, model, volumes, quats, shifts, n_single):
    t = time.perf_counter()
    model._prepare(np, [0.0, 0.0, 0.0, 1.0])  # rotate the templates (once per job)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    single = [model.align(v, MAX_SHIFTS) for v in volumes[:n_single]]
    per_one = (time.perf_counter() - t) / n_single
    t = time.perf_counter()
    _, shift, quat, _ = model.align_batch(volumes, MAX_SHIFTS)
    batch = time.perf_counter() - t
    print(
        f"{name}: setup {setup:.1f} s; one at a time {per_one:.3f} s/subvolume; batch of "
        f"{len(volumes)}: {len(volumes) / batch:.1f} subvolumes/s "
        f"({len(volumes) / (batch + setup):.1f} with setup); {errors(quat, shift, quats, shifts)}"
    )
    del single
    return per_one


def run_acryo(cls_name, volumes, template, quats, shifts, n):
    from acryo import alignment

    cls = getattr(alignment, cls_name)
    t = time.perf_counter()
    model = cls(template, rotations=ROTATIONS, tilt=TILT)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    results = [model.align(v, MAX_SHIFTS) for v in volumes[:n]]
    per_one = (time.perf_counter() - t) / n
    shift = np.array([r.shift for r in results])
    quat = np.array([r.quat for r in results])
    print(
        f"acryo {cls_name} (no mask, its best): setup {setup:.1f} s; {per_one:.2f} s/subvolume "
        f"over {n}; {errors(quat, shift, quats[:n], shifts[:n])}"
    )
    return per_one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="subvolumes in the batch")
    p.add_argument("--acryo-n", type=int, default=5, help="subvolumes aligned by acryo")
    p.add_argument("--refine-n", type=int, default=10, help="subvolumes with local refinement")
    p.add_argument("--seed", type=int, default=2026)
    args = p.parse_args()
    print(
        f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; numpy float32 "
        f"matmul {matmul_gflops():.0f} GFLOPS"
    )
    with tempfile.TemporaryDirectory() as tmp:
        simulate_subvolumes(
            tmp,
            n=args.n,
            snr=0.1,
            box=BOX,
            seed=args.seed,
            n_templates=1,
            max_angle=10.0,
            max_shift=3.0,
            tilt=TILT,
        )
        volumes, templates, mask, _, quats, shifts = read_simulated(tmp)
    template = templates[0]
    print(f"{args.n} subvolumes {BOX}^3, 125 rotations, max shifts {MAX_SHIFTS}")
    zncc = run_cryomatch(
        "cryomatch ZNCC",
        ZNCCAlignment(template, mask=mask, rotations=ROTATIONS, tilt=TILT),
        volumes,
        quats,
        shifts,
        n_single=10,
    )
    run_cryomatch(
        "cryomatch ZNCC, no mask",
        ZNCCAlignment(template, rotations=ROTATIONS, tilt=TILT),
        volumes,
        quats,
        shifts,
        n_single=10,
    )
    pcc = run_cryomatch(
        "cryomatch PCC (cutoff 0.15)",
        PCCAlignment(template, mask=mask, rotations=ROTATIONS, tilt=TILT, cutoff=0.15),
        volumes,
        quats,
        shifts,
        n_single=10,
    )
    if args.refine_n:
        model = ZNCCAlignment(template, mask=mask, rotations=ROTATIONS, tilt=TILT, refine=True)
        k = args.refine_n
        run_cryomatch(
            "cryomatch ZNCC refined", model, volumes[:k], quats[:k], shifts[:k], n_single=min(k, 3)
        )
    try:
        import acryo  # noqa: F401
    except ImportError:
        print("acryo is not installed: no comparison (pip install acryo)")
        return
    if args.acryo_n:
        acryo_zncc = run_acryo("ZNCCAlignment", volumes, template, quats, shifts, args.acryo_n)
        acryo_pcc = run_acryo("PCCAlignment", volumes, template, quats, shifts, args.acryo_n)
        print(
            f"speed-up, one subvolume at a time: ZNCC {acryo_zncc / zncc:.0f}x, "
            f"PCC {acryo_pcc / pcc:.0f}x (acryo's over cryomatch's, same run)"
        )


if __name__ == "__main__":
    main()
