"""Benchmarks of the tomo stage (prints figures; not a test).

1. Phase-matching refinement of a 40^3 phantom from 31 tilts (-60..60 degrees, shifts up to
   4 px, noise 0.05 of the signal's standard deviation), from zero shifts to convergence, on
   the CPU: cryomatch's run_phase_matching_alignment (warm leaky SIRT, 2 updates per
   iteration) at mumott's upsampling 1 and at 10, and at 10 against leave-one-out
   reprojections.
   mumott's figure on an idle machine of this kind: 0.27 px in 57 s; the target is <= 5 s
   at <= 0.27 px. With --mumott PYTHON (an environment holding mumott, which needs
   matplotlib < 3.9) mumott runs on the same data in the same run.
2. Cost of one phase-matching iteration (CPU seconds, process time, one thread: run with
   OPENBLAS_NUM_THREADS=1) at the NIST needle's size, 256^2 x 77 tilts, with the defaults of
   ``cryomatch tomo-refine`` (2 warm leaky SIRT updates, upsampling 10), beside the same on
   the 40^3 x 31 case and, with --mumott, mumott's iterations on the 40^3 case in the same
   run (mumott runs single-threaded too: the driver sets numba's threads to 1).
3. Each alignment method on a 256 px, 61-tilt series (shifts up to 8 px, noise 0.15); with
   --etspy PYTHON, etspy's methods on the same data.

Errors are rms over tilts of |shift error| after removing the unobservable components
(mean and cos/sin across the tilt axis, mean along it). Times are also given as multiples of
a reference measured in the same run (a 1024^2 float32 matrix product), since absolute times
are noisy on a shared machine.

    OPENBLAS_NUM_THREADS=1 python bench/tomo.py [--mumott PYTHON] [--etspy PYTHON]
        [--only phase-matching|per-iteration|methods]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from cryomatch.geometry import remove_unobservable
from cryomatch.kernels.ellipsoids import project, random_phantom
from cryomatch.kernels.phasematch import run_phase_matching_alignment
from cryomatch.stages.tomo.align import METHODS, align_stack

HERE = Path(__file__).resolve().parent


def reference_seconds() -> float:
    """Median time of a 1024^2 float32 matrix product."""
    a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def series(size, n_tilts, max_shift, noise, seed):
    rng = np.random.default_rng(seed)
    angles = np.linspace(-60, 60, n_tilts)
    phantom = random_phantom(rng, size)
    truth = rng.uniform(-max_shift, max_shift, size=(n_tilts, 2))
    clean = project(phantom, angles, (size, size), truth)
    stack = clean + rng.normal(size=clean.shape).astype(np.float32) * noise * clean.std()
    return stack, angles, truth


def rms_error(shifts, truth, angles) -> float:
    r = remove_unobservable(np.asarray(shifts) - truth, angles)
    return float(np.sqrt((r**2).sum(axis=1).mean()))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_other(python, script, arrays, *args):
    """Run a driver script in another environment on ``arrays``; its output npz or None."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, **arrays)
        single = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
        done = subprocess.run(
            [python, str(HERE / script), str(src), str(dst), *args],
            capture_output=True,
            text=True,
            env=os.environ | single,
        )
        if done.returncode:
            print(f"  {script} failed: {done.stderr.strip().splitlines()[-1:]}")
            return None
        return dict(np.load(dst))


def bench_phase_matching(ref, mumott_python):
    print("\n== phase matching: 40^3, 31 tilts, shifts <= 4 px, noise 0.05, from zero ==")
    stack, angles, truth = series(40, 31, 4.0, 0.05, seed=11)
    print(f"  start error {rms_error(np.zeros_like(truth), angles=angles, truth=truth):.2f} px")
    settings = [
        ("cryomatch, upsampling 1 (mumott's), warm SIRT 2", dict(upsampling=1)),
        ("cryomatch, upsampling 10, warm SIRT 2", dict(upsampling=10)),
        (
            "cryomatch, upsampling 10, leave-one-out reprojections",
            dict(upsampling=10, reconstruction="loo"),
        ),
    ]
    for label, kw in settings:
        out, seconds = timed(
            lambda kw=kw: run_phase_matching_alignment(stack, angles, maxiter=100, **kw)
        )
        err = rms_error(out["shifts"], truth, angles)
        print(
            f"  {label}: {err:.3f} px in {seconds:.2f} s ({len(out['record'])} iterations, "
            f"{seconds / ref:.0f} x ref; mumott idle 57 s -> {57 / seconds:.0f}x faster)"
        )
    if mumott_python:
        z = run_other(
            mumott_python, "mumott_driver.py", dict(stack=stack, angles=angles, maxiter=20)
        )
        if z is not None:
            # mumott's offsets move the projection onto the data: ours with either sign
            err = min(rms_error(s * z["shifts"], truth, angles) for s in (1, -1))
            print(
                f"  mumott 2.3 (MITRA 10, upsampling 1): {err:.3f} px in "
                f"{float(z['seconds']):.1f} s (same run, same data)"
            )


def cpu_per_iteration(stack, angles, iterations=4):
    """CPU seconds per phase-matching iteration with tomo-refine's defaults (the projector's
    one-off construction left out: iterations 2.. are timed)."""
    marks = []
    run_phase_matching_alignment(
        stack,
        angles,
        maxiter=iterations,
        upsampling=10,
        shift_tolerance=0.0,
        callback=lambda row: marks.append((time.process_time(), row["seconds"])),
    )
    cpu = (marks[-1][0] - marks[0][0]) / (len(marks) - 1)
    return cpu, float(np.mean([m[1] for m in marks[1:]]))


def bench_per_iteration(ref, mumott_python):
    print("\n== phase matching: CPU seconds per iteration (tomo-refine defaults, one thread) ==")
    stack, angles, _ = series(256, 77, 4.0, 0.05, seed=13)
    angles = np.arange(-76, 77, 2.0)  # the NIST needle's geometry
    cpu, wall = cpu_per_iteration(stack, angles)
    print(f"  cryomatch 256^2 x 77 tilts: {cpu:.2f} CPU-s per iteration ({wall:.2f} s wall)")
    small, small_angles, _ = series(40, 31, 4.0, 0.05, seed=11)
    cpu40, wall40 = cpu_per_iteration(small, small_angles)
    print(f"  cryomatch 40^3 x 31 tilts:   {cpu40:.3f} CPU-s per iteration ({wall40:.3f} s wall)")
    if mumott_python:
        arrays = dict(stack=small, angles=small_angles, maxiter=3, shift_tolerance=0.0)
        z = run_other(mumott_python, "mumott_driver.py", arrays)
        if z is not None:
            m_cpu, m_wall = float(z["cpu_seconds"]) / 3, float(z["seconds"]) / 3
            print(
                f"  mumott 2.3 40^3 x 31 tilts:  {m_cpu:.2f} CPU-s per iteration ({m_wall:.2f} s "
                f"wall; MITRA 10, upsampling 1): {m_cpu / cpu40:.0f}x cryomatch's on the same "
                f"case, {m_cpu / cpu:.1f}x cryomatch's at 256^2 x 77"
            )


def bench_methods(ref, etspy_python):
    print("\n== alignment methods: 256 px, 61 tilts, shifts <= 8 px, noise 0.15 ==")
    stack, angles, truth = series(256, 61, 8.0, 0.15, seed=12)
    for method in METHODS:
        result, seconds = timed(
            lambda m=method: align_stack(stack, m, angles=angles, show_progressbar=False)
        )
        err = rms_error(result.shifts, truth, angles)
        print(
            f"  cryomatch {method:12s} {seconds:7.2f} s ({seconds / ref:6.0f} x ref)  "
            f"error {err:.3f} px"
        )
    if etspy_python:
        methods = ["PC", "COM", "COM-CL", "StackReg"]
        z = run_other(etspy_python, "etspy_driver.py", dict(stack=stack, angles=angles), *methods)
        for m in methods if z is not None else []:
            seconds = float(z[f"{m}_seconds"])
            if f"{m}_shifts" in z:
                err = f"error {rms_error(z[f'{m}_shifts'], truth, angles):.3f} px"
            else:
                err = str(z[f"{m}_error"])
            print(f"  etspy     {m:12s} {seconds:7.2f} s ({seconds / ref:6.0f} x ref)  {err}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mumott", help="python of an environment with mumott")
    parser.add_argument("--etspy", help="python of an environment with etspy")
    parser.add_argument(
        "--only", choices=["phase-matching", "per-iteration", "methods"], help="one part only"
    )
    args = parser.parse_args()
    ref = reference_seconds()
    print(f"reference: 1024^2 float32 matrix product {ref * 1e3:.1f} ms")
    if args.only in (None, "phase-matching"):
        bench_phase_matching(ref, args.mumott)
    if args.only in (None, "per-iteration"):
        bench_per_iteration(ref, args.mumott)
    if args.only in (None, "methods"):
        bench_methods(ref, args.etspy)


if __name__ == "__main__":
    main()
