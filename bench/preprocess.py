"""Preprocess throughput: images per second through read, Fourier crop, normalization and
write, against the same run's plain copy of the stack's bytes (the I/O floor).

    python bench/preprocess.py [--n 4000] [--box 128] [--crop 64]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cryomatch.stages.preprocess import preprocess
from cryomatch.stages.simulate.particles import simulate_particles


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--crop", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        star = simulate_particles(tmp / "sim", args.n, 0.1, args.box, seed=1, batch_size=512)
        stack = star.parent / "particles.mrcs"
        t0 = time.perf_counter()
        data = np.fromfile(stack, dtype=np.uint8)
        (tmp / "copy.bin").write_bytes(data.tobytes())
        copy_s = time.perf_counter() - t0
        for label, kwargs in (
            ("normalize", {}),
            (f"crop {args.box}->{args.crop} + normalize", {"box": args.crop}),
        ):
            t0 = time.perf_counter()
            preprocess(star, tmp / label.replace(" ", "_"), stack_size=1000, **kwargs)
            run_s = time.perf_counter() - t0
            print(
                f"preprocess {label}: {args.n / run_s:,.0f} images/s at {args.box} px "
                f"({run_s:.2f} s); plain byte copy of the stack {copy_s:.3f} s; "
                f"ratio to the copy {run_s / copy_s:.1f}x"
            )


if __name__ == "__main__":
    main()
