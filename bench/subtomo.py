"""Subtomogram alignment benchmark: seconds per subvolume and subvolumes per second at 48^3
with 125 rotations ((10, 5) per axis), missing wedge +-60 degrees, SNR 0.1, against acryo
(when installed: ``pip install acryo``; never a dependency) measured in the same run, with
accuracy on the same subvolumes. Also numpy's float32 matrix product in the same run, as
a reference for the machine's speed.

    python bench/subtomo.py [--n 100] [--acryo-n 5] [--refine-n 10] [--seed 2026]
        [--priors-n 40] [--iteration-n 40]

With priors (``--priors-n``): the same subvolumes' sizes at orientations uniform on SO(3),
priors 10 degrees off, searched locally (the same 125 rotations about each prior). One
refinement iteration (``--iteration-n``): the loop's align jobs (two half-set models per
job, every particle aligned and summed) and merge measured on a subset and extrapolated to
1000 subvolumes in chunks of 100, two jobs at a time on 2 cores (stated as such).

Prints times and ratios; absolute times vary with load (other jobs on the machine): the
ratios measured in one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from reference_rate import matmul_gflops
from scipy.spatial.transform import Rotation

from cryomatch import geometry
from cryomatch.alignment import PCCAlignment, ZNCCAlignment
from cryomatch.alignment.local import LocalZNCC
from cryomatch.io.star import read_star
from cryomatch.stages.simulate.subvolumes import read_simulated, simulate_subvolumes

BOX, MAX_SHIFTS, ROTATIONS, TILT = 48, (4, 4, 4), [(10, 5)] * 3, (-60, 60)


def errors(quat, shift, quats, shifts) -> str:
    rot = np.rad2deg((Rotation.from_quat(quat) * Rotation.from_quat(quats).inv()).magnitude())
    shift_error = np.linalg.norm(shift - shifts, axis=1).mean()
    return f"shift error {shift_error:.2f} voxel, rotation error {rot.mean():.2f} deg"


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


def run_priors(n, seed, n_single=10):
    """LocalZNCC about 10-degree priors at uniform orientations: s per subvolume."""
    with tempfile.TemporaryDirectory() as tmp:
        simulate_subvolumes(
            tmp, n=n, snr=0.1, box=BOX, seed=seed, max_shift=2.0, uniform=True, prior_error=10.0
        )
        volumes, templates, mask, _, quats, shifts = read_simulated(tmp)
        pr = read_star(f"{tmp}/priors.star")["particles"]
    origin = pr[[f"rlnOrigin{a}Angst" for a in "XYZ"]].to_numpy(float) / 8.0
    angles = (pr[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    pq, ps = geometry.relion_to_subvolume_pose(*angles, origin, volumes.shape[1:])
    model = LocalZNCC(templates[0], mask=mask, angular_range=10, angular_step=5, tilt=TILT)
    t = time.perf_counter()
    model._prepare(np, [0.0, 0.0, 0.0, 1.0])
    setup = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n_single):
        model.align_priors(volumes[i : i + 1], MAX_SHIFTS, pq[i : i + 1], ps[i : i + 1])
    per_one = (time.perf_counter() - t) / n_single
    t = time.perf_counter()
    _, shift, quat, _ = model.align_priors(volumes, MAX_SHIFTS, pq, ps)
    batch = time.perf_counter() - t
    print(
        f"cryomatch LocalZNCC about priors (uniform SO(3), 10 deg off): setup {setup:.1f} s; "
        f"one at a time {per_one:.3f} s/subvolume; batch of {n}: {n / batch:.1f} subvolumes/s;"
        f" {errors(quat, shift, quats, shifts)}"
    )
    return per_one


def run_iteration(n, seed):
    """One loop iteration: the two half-set models' setup of one job, the per-subvolume
    cost (align + wedge-weighted sum) over n subvolumes, and the merge; extrapolated to
    1000 subvolumes."""
    from cryomatch.io.mrc import read_volume
    from cryomatch.stages.subtomo import build_local_model, open_source
    from cryomatch.stages.subtomo_refine import (
        _align_chunk,
        refine_align,
        refine_init,
        refine_merge,
    )

    with tempfile.TemporaryDirectory() as tmp:
        simulate_subvolumes(
            tmp, n=n, snr=0.1, box=BOX, seed=seed, max_shift=2.0, uniform=True, prior_error=10.0
        )
        star, mask, out = f"{tmp}/priors.star", f"{tmp}/mask.mrc", f"{tmp}/loop"
        state = refine_init(
            out, f"{tmp}/templates/template_01.mrc", star=star, angular_range=10, angular_step=5
        )
        search = {"range": 10.0, "step": 5.0}
        ref, mask_arr = (read_volume(f"{out}/it000/reference1.mrc")[0], read_volume(mask)[0])
        t = time.perf_counter()
        models = {}
        for h in (1, 2):
            models[h] = build_local_model(ref[None], mask_arr, search, state["cutoff"], TILT, True)
            models[h]._prepare(np, [0.0, 0.0, 0.0, 1.0])
        setup = time.perf_counter() - t
        source = open_source(None, star, ())
        source.table = read_star(f"{out}/it000/particles.star")["particles"]
        source._angpix = state["angpix"]
        t = time.perf_counter()
        _align_chunk(source, models, 0, n, MAX_SHIFTS, state["angpix"], TILT, "numpy", 16)
        per_particle = (time.perf_counter() - t) / n
        source.close()
        refine_align(out, 1, 0, star=star, mask=mask, chunk_size=n, max_shifts=MAX_SHIFTS)
        t = time.perf_counter()
        refine_merge(out, 1, 1, mask=mask)
        merge = time.perf_counter() - t
    print(
        f"one refinement iteration (125 rotations about the priors, two half-set models per "
        f"job): setup {setup:.1f} s per job, {per_particle:.3f} s per subvolume (align + "
        f"wedge-weighted sum), merge {merge:.1f} s (measured on {n} subvolumes)"
    )
    for size in (100, 500):
        jobs = 1000 // size
        total = jobs * (setup + size * per_particle) / 2 + merge
        print(
            f"-> 1000 subvolumes of {BOX}^3 in {jobs} jobs of {size}, two at a time on 2 "
            f"cores: {total:.0f} s per iteration (extrapolated from the measured subset)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="subvolumes in the batch")
    p.add_argument("--acryo-n", type=int, default=5, help="subvolumes aligned by acryo")
    p.add_argument("--refine-n", type=int, default=10, help="subvolumes with local refinement")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--priors-n", type=int, default=40, help="subvolumes aligned about priors")
    p.add_argument("--iteration-n", type=int, default=40, help="subvolumes of the iteration")
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
    local = run_priors(args.priors_n, args.seed) if args.priors_n else None
    if args.iteration_n:
        run_iteration(args.iteration_n, args.seed)
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
        if local is not None:
            print(
                f"speed-up about priors (125 rotations, one subvolume at a time): "
                f"{acryo_zncc / local:.0f}x acryo's ZNCC (same run)"
            )


if __name__ == "__main__":
    main()
