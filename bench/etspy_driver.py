"""Time etspy's alignment methods on a tilt series saved by bench/tomo.py.

Runs in a separate environment that has etspy (not a dependency of cryomatch).
Usage: python etspy_driver.py IN.npz OUT.npz METHOD [METHOD ...]
IN: stack (n, ny, nx) with the tilt axis along y, angles. etspy wants the axis along x, so
the images are transposed; its shifts (perpendicular, parallel) then are our (x, y).
"""

import logging
import sys
import time

import etspy.api as etspy
import numpy as np

logging.disable(logging.WARNING)


def main(src, dst, methods):
    z = np.load(src)
    stack = np.ascontiguousarray(z["stack"].transpose(0, 2, 1)).astype(np.float32)
    tomo = etspy.TomoStack(stack, tilts=z["angles"])
    out = {}
    for method in methods:
        t0 = time.perf_counter()
        try:
            aligned = tomo.stack_register(method)
            out[f"{method}_shifts"] = np.asarray(aligned.shifts.data, dtype=float)
        except Exception as exc:  # record failures (etspy's COM below ~100 px)
            out[f"{method}_error"] = np.array(f"{type(exc).__name__}: {exc}")
        out[f"{method}_seconds"] = np.array(time.perf_counter() - t0)
    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
